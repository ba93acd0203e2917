"""What the training benchmarks share: real text tokenized into blocks, a run config, Ray started
with enough logical CPUs, a description of the machine, and — for the fine-tune benchmarks against
Hugging Face's trainers — our finetune() timed from its own step windows, the trainer arguments of
the same schedule, and a trainer's train() timed step by step."""

from __future__ import annotations

import datetime
import glob
import os
import platform
import shutil
import sysconfig
import tempfile
import time

import numpy as np

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def stdlib_sources() -> list[str]:
    """Real text present on every machine: the Python standard library's top-level modules, in name order."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    return [open(f, encoding="utf-8", errors="replace").read() for f in files]


def untrained_gpt2(out_dir: str, size: str, vocab_size: int, generation_config: bool = False) -> str:
    """A gpt2 `size` preset, untrained (seed 0), with a byte-level BPE trained on the first 60 stdlib
    modules, saved as a model directory (with a generation config of its bos/eos/pad ids if asked)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from llmos_ray.data.tokenizer import train_tokenizer
    from llmos_ray.models import preset_config

    tok = train_tokenizer(stdlib_sources()[:60], vocab_size=vocab_size)
    torch.manual_seed(0)
    cfg = preset_config("gpt2", size, len(tok), 256, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id,
                        pad_id=tok.pad_token_id)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    if generation_config:
        GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id).save_pretrained(out_dir)
    return out_dir


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


def timed_finetune(cfg, skip_steps: int) -> dict:
    """finetune() on the workers: examples/s and s/step from the loop's own windows after step
    skip_steps, the whole call's wall time, and the export."""
    from llmos_ray.train.finetune import finetune

    start = time.perf_counter()
    result = finetune(cfg)
    wall = time.perf_counter() - start
    steps = seconds = prev = 0
    for h in result.history:
        if "step_time_s" in h:
            if prev >= skip_steps:  # the window of steps prev+1 .. h["step"]
                steps, seconds = steps + h["step"] - prev, seconds + h["step_time_s"] * (h["step"] - prev)
            prev = h["step"]
    global_batch = cfg.train.micro_batch_size * cfg.train.num_workers
    return {"examples_per_s": global_batch * steps / seconds, "step_s": seconds / steps, "wall_s": wall,
            "export": result.export_dir, "last_loss": last_loss(result.history)}


def our_order(n_rows: int, cfg) -> np.ndarray:
    """The row indices, in order, that our fine-tuning run `cfg` trains on: the in-memory reader's
    seeded shuffle per epoch (train/readers.ArrayReader), one global batch per step, for
    train.max_steps steps. Given to a Hugging Face trainer that reads its dataset sequentially,
    both see the same examples in the same batches: at 150 steps of a small classifier, the data
    order alone moves held-out accuracy by ~±2 points (0.797-0.847 over 6 orders, 2026-12-02)."""
    from llmos_ray.train.readers import ArrayReader

    global_batch = cfg.train.micro_batch_size * cfg.train.num_workers
    reader = ArrayReader(np.arange(n_rows), global_batch, 0, 1, shuffle_seed=cfg.run.seed)
    return np.concatenate([reader.next_agreed() for _ in range(cfg.train.max_steps)])


def hf_training_args(cfg, args_class):
    """`args_class` (TrainingArguments or Seq2SeqTrainingArguments) for the schedule of our run `cfg`:
    one process with our global batch, the same steps, AdamW settings, warmup + cosine to
    lr * min_lr_ratio and clipping, on the CPU, nothing saved; its output_dir a fresh temp dir. It
    reads its dataset in order: build it with `our_order` to give it our batches."""
    t = cfg.train
    return args_class(train_sampling_strategy="sequential",
        output_dir=tempfile.mkdtemp(prefix="llmos-bench-hf-"), per_device_train_batch_size=t.micro_batch_size
        * t.num_workers, max_steps=t.max_steps, learning_rate=t.lr, warmup_steps=t.warmup_steps,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": t.min_lr_ratio},
        weight_decay=t.weight_decay, adam_beta1=t.betas[0], adam_beta2=t.betas[1], max_grad_norm=t.grad_clip,
        logging_steps=t.log_every, save_strategy="no", report_to=[], use_cpu=True, seed=cfg.run.seed,
        dataloader_num_workers=0, disable_tqdm=True)


def timed_hf_train(trainer, skip_steps: int) -> dict:
    """trainer.train() with a clock at every step's end: examples/s and s/step over steps
    skip_steps+1 .. max_steps, and the whole call's wall time; its output_dir removed after."""
    from transformers import TrainerCallback

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    trainer.add_callback(Clock())
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    shutil.rmtree(trainer.args.output_dir, ignore_errors=True)
    seconds = stamps[-1] - stamps[skip_steps - 1] if skip_steps else stamps[-1] - start
    measured = trainer.args.max_steps - skip_steps
    global_batch = trainer.args.per_device_train_batch_size
    return {"examples_per_s": global_batch * measured / seconds, "step_s": seconds / measured, "wall_s": wall,
            "last_loss": last_loss(trainer.state.log_history)}


def last_loss(history: list[dict]):
    """The newest training loss in a list of logged metrics (ours' result.history, a Trainer's log_history)."""
    return next((h["loss"] for h in reversed(history) if "loss" in h), None)
