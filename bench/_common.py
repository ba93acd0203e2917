"""What the training benchmarks share: real text tokenized into blocks, a run config, Ray started
with enough logical CPUs, and a description of the machine."""

from __future__ import annotations

import datetime
import glob
import os
import platform
import sysconfig

import numpy as np

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def stdlib_sources() -> list[str]:
    """Real text present on every machine: the Python standard library's top-level modules, in name order."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    return [open(f, encoding="utf-8", errors="replace").read() for f in files]


def tokenizer_and_blocks(n_blocks: int, seq_len: int, vocab_size: int):
    """A byte-level BPE (`train_tokenizer`) trained on the first 60 stdlib modules, and the first
    `n_blocks` blocks of seq_len + 1 tokens of the stdlib (each module + EOS, packed), int32."""
    from llmos_ray.data.tokenizer import train_tokenizer

    texts = stdlib_sources()
    tok = train_tokenizer(texts[:60], vocab_size=vocab_size)
    need = n_blocks * (seq_len + 1)
    ids: list[int] = []
    for text in texts:
        ids += tok(text)["input_ids"] + [tok.eos_token_id]
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise SystemExit(f"the stdlib holds {len(ids):,} tokens, fewer than the {need:,} asked for")
    return tok, np.array(ids[:need], dtype=np.int32).reshape(n_blocks, seq_len + 1)


def run_config(out_dir: str, overrides: dict):
    """A run that trains on an in-memory array: no validation, no export, no wandb, one checkpoint
    (the last step's, which the loop always writes), no retries."""
    from llmos_ray.config import load_config

    base = {"run.name": os.path.basename(out_dir), "run.output_dir": out_dir, "run.wandb": "disabled",
            "run.resume": "never", "train.export": False, "train.max_failures": 0, "train.num_to_keep": 1,
            "train.device": "cpu"}
    return load_config(None, {**base, **overrides})


def start_ray(num_cpus: int) -> None:
    """A local Ray with `num_cpus` logical CPUs (more than the cores, so the trainer's workers never
    wait for a CPU) and the environment our workers need."""
    import ray

    from llmos_ray.runtime import WORKER_ENV

    env = {**WORKER_ENV, "DS_ACCELERATOR": "cpu"}
    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING", runtime_env={"env_vars": env})


def machine() -> str:
    """CPU model, cores, this process's torch threads, library versions and the date."""
    import psutil
    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from importlib.metadata import PackageNotFoundError, version

    versions = []
    for name in ("torch", "deepspeed", "ray", "transformers"):
        try:
            versions.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return (f"machine: {model}, {psutil.cpu_count(logical=False)} cores / {os.cpu_count()} logical CPUs, "
            f"torch threads in this process {torch.get_num_threads()}, load average "
            f"{os.getloadavg()[0]:.1f}; {', '.join(versions)}; "
            f"{datetime.datetime.now().astimezone().isoformat(timespec='minutes')}")
