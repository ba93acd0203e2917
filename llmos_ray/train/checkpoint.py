"""Checkpoints: save through ray.train.report, read back, consolidate, export to Hugging Face.

Layout of one checkpoint (a `checkpoint_<step>` folder in the run's storage, local or s3://):

    llmos_state.json        step, tokens seen, data position, world size, ZeRO stage, precision
    config.yaml             the resolved run config
    model/config.json       the transformers config
    tokenizer/              the tokenizer the run trained with
    ds/                     DeepSpeed's sharded model + optimizer + scheduler states (every rank's files)
    rng/rank<r>.pt          each rank's RNG states
    manifest/rank<r>.json   each rank's files and their sizes

Every rank writes its own files into a local temp dir and reports it; Ray Train merges all ranks'
folders into one checkpoint and registers it only when every rank's upload finished, so a crash
mid-save leaves no checkpoint that resume would pick. `llmos_state.json` names the world size and
each rank lists what it wrote, so `validate` tells a complete checkpoint from one damaged later
(a file deleted or truncated in storage), and a resume falls back to the newest complete one.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import shutil
import tempfile
from typing import Any, Optional, Union

import numpy as np

from llmos_ray.config import Config, save_config
from llmos_ray.errors import CheckpointError

log = logging.getLogger(__name__)

STATE_FILE = "llmos_state.json"
MANIFEST_DIR = "manifest"
DS_DIR = "ds"
DS_TAG = "state"


def save_and_report(engine, cfg: Config, tokenizer, model_config, state: dict, metrics: dict, rank: int,
                    dir_name: Optional[str] = None) -> None:
    """Collective: every rank saves its DeepSpeed shards and RNG, then reports the folder to Ray
    (as `dir_name`, default `checkpoint_<step>`; every rank must pass the same name)."""
    import ray.train
    import torch

    local = tempfile.mkdtemp(prefix=f"llmos-ckpt-r{rank}-")
    try:
        ds_dir = os.path.join(local, DS_DIR)
        os.makedirs(ds_dir, exist_ok=True)
        engine.save_checkpoint(ds_dir, tag=DS_TAG)
        os.makedirs(os.path.join(local, "rng"), exist_ok=True)
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, os.path.join(local, "rng", f"rank{rank}.pt"))
        if rank == 0:
            save_config(cfg, os.path.join(local, "config.yaml"))
            model_config.save_pretrained(os.path.join(local, "model"))
            tokenizer.save_pretrained(os.path.join(local, "tokenizer"))
            with open(os.path.join(local, STATE_FILE), "w") as f:
                json.dump(state, f)
        _write_manifest(local, rank)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(local),
                         checkpoint_dir_name=dir_name or checkpoint_name(state["step"]))
    finally:
        shutil.rmtree(local, ignore_errors=True)


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def _write_manifest(local: str, rank: int) -> None:
    files = {}
    for root, _, names in os.walk(local):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, local).replace(os.sep, "/")] = os.path.getsize(path)
    os.makedirs(os.path.join(local, MANIFEST_DIR), exist_ok=True)
    with open(os.path.join(local, MANIFEST_DIR, f"rank{rank}.json"), "w") as f:
        json.dump(files, f, sort_keys=True)


def _as_checkpoint(ckpt):
    import ray.train

    if isinstance(ckpt, ray.train.Checkpoint):
        return ckpt
    if not isinstance(ckpt, str) or not ckpt:
        raise CheckpointError(f"expected a checkpoint path or URI, got {ckpt!r}")
    path = ckpt.removeprefix("file://")
    if "://" not in path:
        path = os.path.abspath(os.path.expanduser(path))
    return ray.train.Checkpoint(path)


def _read_bytes(ckpt, relpath: str) -> bytes:
    ckpt = _as_checkpoint(ckpt)
    try:
        with ckpt.filesystem.open_input_stream(f"{ckpt.path.rstrip('/')}/{relpath}") as f:
            return f.read()
    except (FileNotFoundError, OSError) as e:
        raise CheckpointError(f"checkpoint {ckpt.path!r} has no {relpath} ({e}); is it an llmos checkpoint "
                              f"(a checkpoint_* folder of a run's storage)?") from None


def read_state(ckpt) -> dict[str, Any]:
    """The small JSON record of a checkpoint: step, tokens_seen, data position, world_size, ZeRO stage."""
    return json.loads(_read_bytes(ckpt, STATE_FILE))


def read_rng(ckpt, rank: int) -> Optional[dict]:
    import torch

    try:
        return torch.load(io.BytesIO(_read_bytes(ckpt, f"rng/rank{rank}.pt")), weights_only=False)
    except CheckpointError:
        return None


def restore_rng(ckpt, rank: int) -> None:
    """Set this process's Python, NumPy, torch (and CUDA) RNG to what rank `rank` saved, if it did."""
    import torch

    states = read_rng(ckpt, rank)
    if not states:
        return
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def validate(ckpt) -> dict[str, Any]:
    """Check that every rank's files are present with the sizes it wrote; return the state or raise
    CheckpointError naming what is missing or damaged."""
    from pyarrow import fs as pafs

    ckpt = _as_checkpoint(ckpt)
    state = read_state(ckpt)
    root = ckpt.path.rstrip("/")
    infos = ckpt.filesystem.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    sizes = {i.path[len(root) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}
    problems = []
    for rank in range(state["world_size"]):
        name = f"{MANIFEST_DIR}/rank{rank}.json"
        if name not in sizes:
            problems.append(f"{name} (rank {rank} never finished writing)")
            continue
        for relpath, size in json.loads(_read_bytes(ckpt, name)).items():
            if relpath not in sizes:
                problems.append(f"{relpath} (missing)")
            elif sizes[relpath] != size:
                problems.append(f"{relpath} ({sizes[relpath]} bytes, written as {size})")
    if problems:
        raise CheckpointError(f"checkpoint {ckpt.path!r} is damaged: " + "; ".join(problems[:5])
                              + (f" and {len(problems) - 5} more" if len(problems) > 5 else ""))
    return state


def usable_checkpoint(ckpt) -> tuple[Any, dict[str, Any], list[str]]:
    """`ckpt` and its state if it is complete; else the newest complete checkpoint before it in the
    same run's storage, with a warning. Also returns the folder names of the damaged checkpoints
    skipped, so a resumed run does not write into them. Every rank reaches the same answer."""
    import ray.train
    from pyarrow import fs as pafs

    ckpt = _as_checkpoint(ckpt)
    try:
        return ckpt, validate(ckpt), []
    except CheckpointError as first:
        error = first
    parent, name = ckpt.path.rstrip("/").rsplit("/", 1)
    infos = ckpt.filesystem.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
    older = sorted((os.path.basename(i.path) for i in infos
                    if i.type == pafs.FileType.Directory and os.path.basename(i.path).startswith("checkpoint_")
                    and os.path.basename(i.path) < name), reverse=True)
    skipped = [name]
    for candidate_name in older:
        candidate = ray.train.Checkpoint(f"{parent}/{candidate_name}", filesystem=ckpt.filesystem)
        try:
            state = validate(candidate)
        except CheckpointError as e:
            log.warning("skipping %s too: %s", candidate_name, e)
            skipped.append(candidate_name)
            continue
        log.warning("%s; resuming from %s, the newest complete checkpoint before it", error, candidate_name)
        return candidate, state, skipped
    raise CheckpointError(f"{error}; and no complete checkpoint precedes it in {parent}. Start over with "
                          f"run.resume=never and another run.name, or resume from a copy you trust "
                          f"(run.resume=<checkpoint URI>)")


def load_engine(engine, ckpt) -> None:
    """Restore model, optimizer and scheduler states saved by the same number of workers."""
    ckpt = _as_checkpoint(ckpt)
    with ckpt.as_directory() as d:
        path, _ = engine.load_checkpoint(os.path.join(d, DS_DIR), tag=DS_TAG, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt.path!r}")


def reshard_method(state: dict, cfg: Config) -> tuple[str, str]:
    """How to resume checkpoint `state` on a different worker count, and why:

    "as_is"         ZeRO-0 both times: DeepSpeed's checkpoint holds the whole model and the plain
                    torch optimizer state, nothing is partitioned by worker, it loads unchanged.
    "universal"     ZeRO-1/2 to ZeRO-1/2, ZeRO-3 to ZeRO-3: converted to DeepSpeed's universal
                    checkpoint and re-partitioned for the new workers, fp32 master weights, Adam
                    moments, step and scheduler included.
    "consolidated"  where DeepSpeed can't do that (the reason says which): the consolidated fp32
                    weights only; the optimizer moments restart."""
    old, new = state["zero_stage"], cfg.deepspeed.zero_stage
    extra_zero = cfg.deepspeed.extra.get("zero_optimization", {}) if isinstance(cfg.deepspeed.extra, dict) else {}
    if old == 0 and new == 0:
        return "as_is", "ZeRO-0 checkpoints are not partitioned by worker"
    if old == 0 or new == 0:
        # ds_to_universal needs ZeRO optimizer files (a ZeRO-0 checkpoint has none), and a ZeRO-0
        # engine loading a universal checkpoint restores neither weights nor optimizer (engine.py
        # _load_checkpoint skips the module, _load_zero_checkpoint needs a ZeRO optimizer).
        return "consolidated", f"DeepSpeed has no universal checkpoint between ZeRO-{old} and ZeRO-{new}"
    if (old == 3) != (new == 3):
        # ZeRO-3 keeps model states per rank (zero_pp_rank_*_model_states.pt), ZeRO-1/2 in one
        # mp_rank_00 file: DeepSpeed's engine finds no model states of its own layout (`len(ckpt_list) > 0`).
        return "consolidated", f"DeepSpeed loads no universal checkpoint between ZeRO-{old} and ZeRO-{new}"
    if (extra_zero.get("offload_optimizer") or {}).get("device") == "nvme":
        # engine.load_checkpoint copies each rank's swap files instead of reading the ZeRO states.
        return "consolidated", "DeepSpeed does not load universal checkpoints with the optimizer offloaded to NVMe"
    if state.get("lora"):
        return "consolidated", ("universal checkpoints of LoRA runs (frozen base weights) are not verified "
                                "with our DeepSpeed version")
    return "universal", "DeepSpeed universal checkpoint"


def load_universal(engine, ckpt, local_rank: int, dist) -> None:
    """Collective: restore a ZeRO-1/2/3 checkpoint written by another number of workers, optimizer
    state included, through DeepSpeed's universal checkpoint (the engine was built with
    `deepspeed_config(..., load_universal=True)`).

    Where the converted folder lives: the first worker of each node converts the checkpoint into a
    temp dir on that node's disk and the node's workers load from there. Conversion reads the
    whole checkpoint and is deterministic, so every node gets identical folders without any shared
    filesystem (the run's storage may be s3://, which DeepSpeed can't read); one conversion per
    node, not per worker, bounds the disk and time it costs. The folder is removed once loaded."""
    import uuid

    import torch

    ckpt = _as_checkpoint(ckpt)
    name = [f"llmos-universal-{uuid.uuid4().hex[:12]}"]
    dist.broadcast_object_list(name, src=0)  # one name for all nodes, unique to this resume
    root = os.path.join(tempfile.gettempdir(), name[0])
    failed = torch.zeros(1)
    if local_rank == 0:
        try:
            with ckpt.as_directory() as d:
                to_universal(os.path.join(d, DS_DIR, DS_TAG), os.path.join(root, DS_TAG))
        except Exception:
            log.exception("converting %s to a DeepSpeed universal checkpoint failed", ckpt.path)
            failed += 1
    dist.all_reduce(failed)  # also the barrier: every node's folder is complete past this line
    try:
        if failed.item():
            raise CheckpointError(f"converting {ckpt.path!r} to a DeepSpeed universal checkpoint failed (see the "
                                  f"workers' logs); resume on {read_state(ckpt)['world_size']} workers "
                                  f"(train.num_workers) to load it as written")
        path, _ = engine.load_checkpoint(root, tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load the universal checkpoint made from {ckpt.path!r}")
    finally:
        dist.barrier()
        if local_rank == 0:
            shutil.rmtree(root, ignore_errors=True)


def to_universal(zero_dir: str, out_dir: str) -> str:
    """Convert one tag folder of a DeepSpeed ZeRO-1/2/3 checkpoint (zero_pp_rank_*_optim_states.pt …)
    into a universal checkpoint at `out_dir`: per-parameter fp32 weights, exp_avg, exp_avg_sq and
    step under `out_dir/zero/`, which any number of workers can load. Runs in this process (no pool)."""
    import types

    from deepspeed.checkpoint import ds_to_universal

    args = types.SimpleNamespace(input_folder=zero_dir, output_folder=out_dir, num_extract_workers=1,
                                 num_merge_workers=1, keep_temp_folder=False, strict=True,
                                 # our engines record no UNIVERSAL_CHECKPOINT_INFO (only tensor-parallel
                                 # models need its patterns); ZeRO-1/2 conversion asserts it exists
                                 inject_missing_state=True)
    with prints_to_log("ds_to_universal"):
        ds_to_universal.main(args)
    return out_dir


@contextlib.contextmanager
def prints_to_log(what: str):
    """DeepSpeed's checkpoint tools print their progress; the lines go to this module's log instead."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        for line in printed.getvalue().splitlines():
            log.info("%s: %s", what, line)


def consolidated_state_dict(ckpt) -> dict:
    """The full fp32 model state dict of a checkpoint, whatever its ZeRO stage and worker count
    (ZeRO-3 shards gathered on CPU, no process group needed)."""
    ckpt = _as_checkpoint(ckpt)
    state = read_state(ckpt)
    with ckpt.as_directory() as d:
        return _consolidate_local(d, state["zero_stage"])


def _consolidate_local(checkpoint_dir: str, zero_stage: int) -> dict:
    import torch

    ds_dir = os.path.join(checkpoint_dir, DS_DIR)
    if zero_stage == 0:
        sd = torch.load(os.path.join(ds_dir, DS_TAG, "mp_rank_00_model_states.pt"), map_location="cpu",
                        weights_only=False)["module"]
        return {k: v.float() for k, v in sd.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with prints_to_log("zero_to_fp32"):
        return get_fp32_state_dict_from_zero_checkpoint(ds_dir, tag=DS_TAG)


def _lora_model(config, weights: dict, run_cfg):
    """The fine-tuned LoRA model: merged into plain weights (finetune.merge_lora) or the peft model,
    whose save_pretrained writes the adapter alone (adapter_config.json names the base)."""
    from peft import get_peft_model

    from llmos_ray.models import auto_class, model_task
    from llmos_ray.train.lora import lora_config

    task = model_task(config)
    peft_model = get_peft_model(auto_class(task).from_config(config), lora_config(run_cfg, config.model_type, task))
    peft_model.load_state_dict(weights, strict=True)
    if run_cfg.finetune.merge_lora:
        return peft_model.merge_and_unload()
    peft_model.peft_config["default"].base_model_name_or_path = run_cfg.model.base
    return peft_model


def rescale_position(position: dict, old_world: int, new_world: int, old_micro: int = 1, new_micro: int = 1) -> dict:
    """Data position for a different worker count (and micro-batch size, as when the global batch is
    kept on fewer workers): the same number of blocks consumed in total."""
    blocks = position["micro_batches"] * old_world * old_micro
    return {"epoch": position["epoch"], "micro_batches": blocks // (new_world * new_micro)}


def read_micro_batch_size(ckpt) -> int:
    """train.micro_batch_size of the run that wrote the checkpoint (from its config.yaml)."""
    import yaml

    return int(yaml.safe_load(_read_bytes(ckpt, "config.yaml"))["train"]["micro_batch_size"])


def export(checkpoint: Union[str, Any], out_dir: str, merge_lora: Optional[bool] = None) -> str:
    """Write a checkpoint as a Hugging Face model directory (config.json, model.safetensors,
    tokenizer, generation_config.json, llmos_config.yaml) of the run's model class (its config's
    architectures: a causal LM, a masked LM, a sequence classifier with its id2label). The directory
    appears complete or not at all.
    For a LoRA run, `merge_lora` (default: the run's finetune.merge_lora) chooses merged weights or
    the adapter alone (adapter_config.json + adapter_model.safetensors, loadable with peft)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedModel

    from llmos_ray.models import auto_class, model_task

    ckpt = _as_checkpoint(checkpoint)
    state = validate(ckpt)
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    tmp = f"{out_dir.rstrip('/')}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with ckpt.as_directory() as d:
        config = AutoConfig.from_pretrained(os.path.join(d, "model"))
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(d, "tokenizer"))
        weights = _consolidate_local(d, state["zero_stage"])
        if state.get("lora"):
            from llmos_ray.config import load_config

            run_cfg = load_config(os.path.join(d, "config.yaml"))
            if merge_lora is not None:
                run_cfg.finetune.merge_lora = merge_lora
            model = _lora_model(config, weights, run_cfg)
        else:
            with torch.device("meta"):
                model = auto_class(model_task(config)).from_config(config)
            model.load_state_dict(weights, strict=True, assign=True)
            model.tie_weights()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(state.get("precision"), torch.float32)
        model = model.to(dtype)
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
        base_config = getattr(model, "base_model", model).config if state.get("lora") else model.config
        for key, value in ids.items():
            setattr(base_config, key, value)
        end = tokenizer.convert_tokens_to_ids("<|end|>") if "<|end|>" in tokenizer.get_vocab() else None
        task = model_task(config)
        if state.get("job") == "finetune" and end is not None and task == "causal_lm":
            ids["eos_token_id"] = [tokenizer.eos_token_id, end]  # a chat turn ends at <|end|>
        if task == "seq2seq":  # generation starts the decoder from its start token (T5: pad)
            ids["decoder_start_token_id"] = config.decoder_start_token_id
        if task in ("causal_lm", "seq2seq"):
            model.generation_config = GenerationConfig(**ids)
        model.save_pretrained(tmp, safe_serialization=True)
        if not isinstance(model, PreTrainedModel) and task in ("causal_lm", "seq2seq"):
            # a LoRA adapter alone: keep its base's generation config
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.copy(os.path.join(d, "config.yaml"), os.path.join(tmp, "llmos_config.yaml"))
        with open(os.path.join(tmp, "llmos_state.json"), "w") as f:
            json.dump(dict(state, checkpoint=ckpt.path), f)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    log.info("exported %s -> %s", ckpt.path, out_dir)
    return out_dir
