"""The per-worker training loop: one function that Ray Train runs on every worker.

    model ─ DeepSpeed engine (ZeRO 0-3, precision, accumulation, clipping, AdamW, warmup+cosine)
    data  ─ this worker's streaming shard, packed blocks → micro-batches
    step  ─ forward, backward, optimizer step; log, evaluate, checkpoint through ray.train.report

Pretraining and fine-tuning share it; they differ in the batches (`targets` of -100 carry no loss).
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from typing import Any, Iterator, Optional

import numpy as np

from llmos_ray.config import Config, from_dict
from llmos_ray.errors import ConfigError, DataError, ModelError

log = logging.getLogger(__name__)


def train_loop(loop_config: dict[str, Any]) -> None:
    """Entry point for `TorchTrainer(train_loop_per_worker=...)`. `loop_config` holds the resolved
    config (as a dict), the tokenizer, validation blocks and, optionally, a checkpoint to start from."""
    import ray.train
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed first picks its accelerator
    import deepspeed

    from llmos_ray.models import flops_per_token, gpu_peak_flops, measure_cpu_peak_flops, mfu
    from llmos_ray.train import checkpoint as ckpt_io
    from llmos_ray.train.deepspeed import choose_precision, deepspeed_config, lr_at, uses_client_optimizer
    from llmos_ray.train.lora import apply_lora

    cfg: Config = from_dict(loop_config["config"])
    tokenizer = loop_config["tokenizer"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, ctx.get_local_world_size())))

    device = _device()
    precision = choose_precision(cfg.train.precision, device.type,
                                 device.type == "cuda" and torch.cuda.is_bf16_supported())
    ds_config = deepspeed_config(cfg, world, device.type, precision)
    accum = ds_config["gradient_accumulation_steps"]

    # Where to start: a checkpoint Ray restored after a failure wins over the one the driver chose.
    start = ray.train.get_checkpoint() or loop_config.get("resume_from")
    restored, damaged = None, []
    if start is not None:  # a damaged checkpoint (file lost or truncated in storage): the newest complete one before it
        start, restored, damaged = ckpt_io.usable_checkpoint(start)
    reshard = restored is not None and restored["world_size"] != world
    # On another worker count: "as_is" (ZeRO-0), "universal" (ZeRO-1/2/3, optimizer state carried
    # over) or, where DeepSpeed can't, "consolidated" weights with fresh optimizer moments.
    how, why = ckpt_io.reshard_method(restored, cfg) if reshard else (None, "")

    deepspeed.init_distributed(auto_mpi_discovery=False)  # adopts the process group Ray Train created
    _seed_everything(cfg.run.seed)
    job = loop_config.get("job", "pretrain")
    model = build_model(cfg, tokenizer, ds_config if how != "consolidated" else None)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):  # chat tokens added for fine-tuning
        model.resize_token_embeddings(len(tokenizer))
    if job == "finetune" and cfg.finetune.lora:
        model = apply_lora(model, cfg)
    teacher = load_teacher(cfg, device) if job == "distill" else None
    if cfg.train.activation_checkpointing:
        model.gradient_checkpointing_enable()
    if how == "consolidated":
        log.warning("checkpoint was written by %d workers, resuming on %d: loading consolidated weights; "
                    "optimizer moments restart (%s)", restored["world_size"], world, why)
        model.load_state_dict(ckpt_io.consolidated_state_dict(start), strict=True)
    elif reshard:
        log.info("checkpoint was written by %d workers, resuming on %d with its optimizer state (%s)",
                 restored["world_size"], world, why)

    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", None)
    ds_config = deepspeed_config(cfg, world, device.type, precision, hidden_size=hidden,
                                 load_universal=how == "universal")
    optimizer = None
    if uses_client_optimizer(cfg, device.type):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr,
                                      betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg)),
        dist_init_required=False)
    share_fp32_partitions(engine)

    step, tokens_seen, data_pos = 0, 0, {"epoch": 0, "micro_batches": 0}
    if restored is not None:
        step, tokens_seen, data_pos = restored["step"], restored["tokens_seen"], restored["data"]
        if reshard:  # the same number of blocks consumed in total; RNG stays seeded from run.seed (ranks differ)
            data_pos = ckpt_io.rescale_position(data_pos, restored["world_size"], world,
                                                ckpt_io.read_micro_batch_size(start), cfg.train.micro_batch_size)
        if how == "consolidated":
            for _ in range(step):
                scheduler.step()
        elif how == "universal":
            ckpt_io.load_universal(engine, start, ctx.get_local_rank(), dist)
        else:
            ckpt_io.load_engine(engine, start, restored)
            if not reshard:
                _set_rng(ckpt_io.read_rng(start, rank))
        log.info("rank %d resumed at step %d (epoch %d, micro-batch %d)", rank, step,
                 data_pos["epoch"], data_pos["micro_batches"])

    seq_len = cfg.data.seq_len
    if loop_config.get("train_array") is not None:
        reader = ArrayReader(loop_config["train_array"], cfg.train.micro_batch_size, rank, world, data_pos,
                             shuffle_seed=cfg.run.seed if job != "pretrain" else None)
    else:
        reader = ShardReader(ray.train.get_dataset_shard("train"), seq_len + 1, cfg.train.micro_batch_size,
                             data_pos)
    val_blocks = loop_config.get("val_blocks")
    fpt = flops_per_token(model.config, seq_len)
    peak = (gpu_peak_flops(torch.cuda.get_device_name(device)) or 0.0) if device.type == "cuda" \
        else measure_cpu_peak_flops()
    tokens_per_step = cfg.train.micro_batch_size * seq_len * accum * world
    wandb_run = _init_wandb(cfg) if rank == 0 else None

    engine.train()
    window = {"loss": 0.0, "n": 0, "t0": time.perf_counter(), "steps": 0}
    while step < cfg.train.max_steps:
        for _ in range(accum):
            inputs, targets = inputs_and_targets(reader.next_agreed(dist), device)
            if teacher is None:
                loss = causal_lm_loss(engine, inputs, targets)
            else:
                loss, kl = distill_loss(engine, teacher, inputs, targets, cfg.distill.temperature, cfg.distill.alpha)
                window["kl"] = window.get("kl", 0.0) + kl
            engine.backward(loss)
            engine.step()
            window["loss"] += loss.item()
            window["n"] += 1
        step += 1
        tokens_seen += tokens_per_step
        window["steps"] += 1

        metrics: dict[str, Any] = {}
        last = step == cfg.train.max_steps
        if step % cfg.train.log_every == 0 or last:
            elapsed = time.perf_counter() - window["t0"]
            loss_avg = _all_mean(dist, window["loss"] / max(1, window["n"]), device)
            tps = tokens_per_step * window["steps"] / max(elapsed, 1e-9)
            grad_norm = engine.get_global_grad_norm()
            metrics.update(step=step, loss=loss_avg, lr=scheduler.get_last_lr()[0], tokens=tokens_seen,
                           tokens_per_s=tps, mfu=mfu(fpt, tps, peak * world), epoch=reader.position["epoch"],
                           grad_norm=float(grad_norm) if grad_norm is not None else None,
                           step_time_s=elapsed / max(1, window["steps"]))
            if teacher is not None:
                metrics["kl"] = _all_mean(dist, window["kl"] / max(1, window["n"]), device)
            window = {"loss": 0.0, "n": 0, "t0": time.perf_counter(), "steps": 0}
        if val_blocks is not None and (step % cfg.train.eval_every == 0 or last):
            val_loss = evaluate(engine, val_blocks, cfg, rank, world, device, dist)
            metrics.update(step=step, val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)))
            engine.train()
            window["t0"] = time.perf_counter()  # evaluation time is not training throughput
        checkpoint_now = step % cfg.train.checkpoint_every == 0 or last
        if metrics or checkpoint_now:
            metrics.setdefault("step", step)
            if wandb_run is not None:
                wandb_run.log({k: v for k, v in metrics.items() if v is not None}, step=step)
            if checkpoint_now:
                state = {"step": step, "tokens_seen": tokens_seen, "data": dict(reader.position),
                         "world_size": world, "zero_stage": cfg.deepspeed.zero_stage, "precision": precision,
                         "job": job, "lora": job == "finetune" and cfg.finetune.lora}
                name = ckpt_io.checkpoint_name(step)
                ckpt_io.save_and_report(engine, cfg, tokenizer, model.config, state, metrics, rank,
                                        dir_name=name + "_redo" if name in damaged else name)
                window["t0"] = time.perf_counter()
            else:
                ray.train.report(metrics)
    if wandb_run is not None:
        wandb_run.finish()


def inputs_and_targets(batch: np.ndarray, device):
    """Model inputs and next-token targets of a micro-batch. Packed blocks [B, T+1] train on every
    token; fine-tuning examples [B, 2, T+1] (tokens, loss mask) train only where the mask is 1."""
    import torch

    if batch.ndim == 3:
        tokens, mask = batch[:, 0], batch[:, 1]
        targets = np.where(mask[:, 1:] == 1, tokens[:, 1:], -100)
        return (torch.tensor(tokens[:, :-1], dtype=torch.long, device=device),
                torch.tensor(targets, dtype=torch.long, device=device))
    return (torch.tensor(batch[:, :-1], dtype=torch.long, device=device),
            torch.tensor(batch[:, 1:], dtype=torch.long, device=device))


def distill_loss(engine, teacher, inputs, targets, temperature: float, alpha: float):
    """alpha · T² · KL(teacher ‖ student) at temperature T + (1 - alpha) · cross-entropy on the data
    (Hinton et al. 2015), over the positions that carry a target. Returns (loss, KL value)."""
    import torch
    import torch.nn.functional as F

    logits = engine(input_ids=inputs).logits.float()
    with torch.no_grad():
        teacher_logits = teacher(input_ids=inputs).logits.float()
    keep = (targets != -100).reshape(-1)
    s = logits.reshape(-1, logits.size(-1))[keep]
    t = teacher_logits.reshape(-1, teacher_logits.size(-1))[keep][:, : s.size(-1)]
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                  reduction="batchmean")
    ce = F.cross_entropy(s, targets.reshape(-1)[keep])
    return alpha * temperature**2 * kl + (1 - alpha) * ce, kl.item()


def load_teacher(cfg: Config, device):
    """The frozen teacher of a distillation run, in eval mode on this worker's device."""
    from llmos_ray.models import load_pretrained

    if not cfg.distill.teacher:
        raise ConfigError("distillation needs distill.teacher (a model directory or hub id)")
    teacher = load_pretrained(cfg.distill.teacher, trust_remote_code=cfg.model.trust_remote_code).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def causal_lm_loss(engine, inputs, targets):
    """Mean next-token cross-entropy over targets that are not -100."""
    import torch.nn.functional as F

    logits = engine(input_ids=inputs).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


def evaluate(engine, val_blocks: np.ndarray, cfg: Config, rank: int, world: int, device, dist) -> float:
    """Token-weighted mean validation loss over every rank's share of `val_blocks`. Every rank runs
    the same number of forward passes (ZeRO-3 gathers parameters collectively)."""
    import torch
    import torch.nn.functional as F

    engine.eval()
    mb = cfg.train.micro_batch_size
    mine = val_blocks[rank::world] if len(val_blocks) >= world else val_blocks
    n_batches = min(cfg.train.eval_batches, max(1, math.ceil(len(val_blocks) / world / mb)))
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for i in range(n_batches):
            chunk = mine[i * mb:(i + 1) * mb] if len(mine) > i * mb else mine[:0]
            if len(chunk) == 0:  # this rank has run out; still join the collective forward
                chunk = val_blocks[:1]
                weight = 0.0
            else:
                weight = 1.0
            x, y = inputs_and_targets(chunk, device)
            logits = engine(input_ids=x).logits.float()
            nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum",
                                  ignore_index=-100)
            counted = int((y != -100).sum())
            total += torch.tensor([nll.item() * weight, counted * weight], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total[0] / max(total[1], 1.0))


class ShardReader:
    """Micro-batches of packed blocks from this worker's Ray Data shard, epoch after epoch, with a
    position (epoch, micro-batches consumed in it) that a resumed run skips to.

    Workers end an epoch together: before each micro-batch they agree (one all-reduce of a flag)
    that all of them still have one, so no worker waits in a collective while another starts the
    next epoch (Ray's streaming split starts epochs in lockstep).

    Exact resume. Skipping "my first k micro-batches" is right only if this rank receives the same
    rows, in the same order, every time the stream is split: after Ray restarts the worker group
    (Ray Train splits the dataset anew for the new group) or a re-run driver builds it again. In
    Ray 2.60 that holds under these conditions, which our trainer meets:
      - the stream itself is deterministic: llmos_ray.data's pipeline, executed with
        preserve_order=True (Ray Train applies its DataConfig's execution options, so the trainer
        passes `ingest_options()`); every epoch replays the same stream;
      - the split is Ray Train's `streaming_split(n, equal=True)`: its OutputSplitter deals each
        incoming bundle, in arrival order, to the split with the fewest rows so far (ties: lowest
        index), holds bundles back only by row counts (equal=True), and splits the remainder by
        rows at the end — a function of the bundles' row counts, not of timing. Locality hints
        would make it depend on where blocks live; the OutputSplitter ignores them when
        preserve_order is set (and the trainer also disables them: enable_shard_locality=False);
      - the same number of workers. A resume on a different worker count (checkpoint.
        rescale_position) keeps the number of blocks consumed, not the exact rows.
    The reader refuses a shard whose execution does not preserve order.
    tests/train/test_pretrain.py::test_streamed_corpus_resumes_with_the_same_batches checks it."""

    def __init__(self, shard, block_len: int, micro_batch: int, position: Optional[dict] = None):
        self.shard, self.block_len, self.micro_batch = shard, block_len, micro_batch
        self.position = dict(position or {"epoch": 0, "micro_batches": 0})
        self.dropped_blocks = 0
        self._it: Optional[Iterator[np.ndarray]] = None
        _require_ordered(shard)

    def _open_epoch(self) -> None:
        from llmos_ray.data import iter_blocks

        batches = self.shard.iter_batches(batch_size=256, batch_format="numpy", prefetch_batches=2)
        self._it = iter_blocks(batches, self.block_len)
        for _ in range(self.position["micro_batches"]):  # resume: skip what was trained on
            if self._take() is None:
                raise DataError("the checkpoint's data position is beyond the end of the training data: the "
                                "data changed since it was written; resume with the same data.paths, or start "
                                "a new run.name")

    def _take(self) -> Optional[np.ndarray]:
        blocks = []
        for block in self._it:
            blocks.append(block)
            if len(blocks) == self.micro_batch:
                return np.stack(blocks)
        self.dropped_blocks += len(blocks)
        return None

    def next_agreed(self, dist) -> np.ndarray:
        import torch

        for _ in range(3):
            if self._it is None:
                self._open_epoch()
            batch = self._take()
            flag = torch.tensor([0 if batch is None else 1])
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if int(flag.item()) == 1:
                self.position["micro_batches"] += 1
                return batch
            if batch is not None:
                self.dropped_blocks += len(batch)
            self._it = None
            self.position = {"epoch": self.position["epoch"] + 1, "micro_batches": 0}
        raise DataError("the training data has fewer blocks than one micro-batch per worker: "
                           "add data, lower train.micro_batch_size or data.seq_len")


def _require_ordered(shard) -> None:
    """Refuse a Ray Data shard whose stream may reach this worker in a different order on each run."""
    from llmos_ray.errors import DataError

    get_context = getattr(shard, "get_context", None)
    if get_context is not None and not get_context().execution_options.preserve_order:
        raise DataError("the training dataset is read without preserve_order, so a resumed run would not see "
                        "the same batches: pass ray.train.DataConfig(execution_options=llmos_ray.data."
                        "ingest_options()) to the trainer")


class ArrayReader:
    """Micro-batches from an in-memory array of blocks (fine-tuning sets, exact-parity tests):
    micro-step k of rank r takes rows [(k * world + r) * micro, +micro) of the epoch's order (the
    stored order, or a seeded shuffle per epoch), so every global step sees the same rows whatever
    the worker count."""

    def __init__(self, blocks: np.ndarray, micro_batch: int, rank: int, world: int, position: Optional[dict] = None,
                 shuffle_seed: Optional[int] = None):
        self.blocks, self.micro_batch, self.rank, self.world = blocks, micro_batch, rank, world
        self.shuffle_seed = shuffle_seed
        self.position = dict(position or {"epoch": 0, "micro_batches": 0})
        self.per_epoch = len(blocks) // (micro_batch * world)
        if self.per_epoch == 0:
            raise DataError(f"{len(blocks)} training blocks are fewer than one micro-batch per worker "
                               f"({micro_batch} x {world})")

    def next_agreed(self, dist=None) -> np.ndarray:
        if self.position["micro_batches"] >= self.per_epoch:
            self.position = {"epoch": self.position["epoch"] + 1, "micro_batches": 0}
        start = (self.position["micro_batches"] * self.world + self.rank) * self.micro_batch
        self.position["micro_batches"] += 1
        rows = np.arange(start, start + self.micro_batch)
        if self.shuffle_seed is not None:  # a new order every epoch, the same on every rank and run
            rows = np.random.default_rng(self.shuffle_seed + self.position["epoch"]).permutation(len(self.blocks))[rows]
        return self.blocks[rows]


def build_model(cfg: Config, tokenizer, ds_config: Optional[dict] = None):
    """A fresh preset model sized for `tokenizer`, or `model.base` loaded from a directory or the hub.
    Under ZeRO-3 (`ds_config` given) a base model's parameters are partitioned as they are created
    (deepspeed.zero.Init through transformers) and filled tensor by tensor, so no rank holds it whole."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmos_ray.models import load_pretrained, preset_config

    zero3 = ds_config is not None and ds_config["zero_optimization"]["stage"] == 3
    if cfg.model.base and not zero3:
        return load_pretrained(cfg.model.base, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.model.base:
        base_dir = local_model_dir(cfg.model.base)
        hf_config = AutoConfig.from_pretrained(base_dir, trust_remote_code=cfg.model.trust_remote_code)
    else:
        hf_config = preset_config(cfg.model.family, cfg.model.size, len(tokenizer), cfg.data.seq_len,
                                  bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id,
                                  pad_id=tokenizer.pad_token_id, overrides=cfg.model.overrides)
    if not zero3 or not cfg.model.base:
        # A fresh model is built whole on every rank from the same seed and partitioned by
        # deepspeed.initialize: transformers' ZeRO-3 initialisation under zero.Init leaves some
        # weights uninitialised in the versions we test with (NaN losses). Costs host memory for
        # the full model per rank while building; loading a base model below does not.
        return AutoModelForCausalLM.from_config(hf_config)
    from transformers.integrations import HfDeepSpeedConfig

    keep = HfDeepSpeedConfig(ds_config)  # transformers checks a weak reference to it while building
    model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.model.base:
        load_weights_zero3(model, base_dir)
    del keep
    return model


def local_model_dir(name_or_path: str) -> str:
    """A local directory for a model directory or hub id (downloaded into the Hugging Face cache)."""
    from llmos_ray.models import is_local_model

    if is_local_model(name_or_path):
        return os.path.expanduser(name_or_path)
    from huggingface_hub import snapshot_download

    return snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])


def load_weights_zero3(model, model_dir: str) -> None:
    """Copy a safetensors checkpoint into a ZeRO-3 partitioned model one tensor at a time (rank 0
    reads, DeepSpeed re-partitions), so no rank materialises the whole model. transformers'
    own ZeRO-3 loading path leaves some weights unloaded in the version we test with."""
    import glob

    import deepspeed
    import torch.distributed as dist
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ModelError(f"{model_dir} has no *.safetensors weights (needed to load under ZeRO-3)")
    params = dict(model.named_parameters())
    loaded = set()
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                param = params.get(key)
                if param is None:
                    continue
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if dist.get_rank() == 0:
                        param.data.copy_(f.get_tensor(key))
                loaded.add(key)
    tied = {k for k, p in params.items() if k not in loaded and any(p is params[o] for o in loaded)}
    missing = set(params) - loaded - tied
    if missing:
        raise ModelError(f"weights missing from {model_dir}: {sorted(missing)[:5]}")


def share_fp32_partitions(engine) -> int:
    """Work around DeepSpeed 0.19's redundant fp32 copy of each ZeRO-3 partition; returns the bytes freed.

    When the weights are already fp32 on the optimizer's device (fp32 training without optimizer
    offload), ZeRO-3 means to let the optimizer update the parameter partitions themselves
    (stage3.py `_create_fp32_partitions`: "we don't need another copy of the weights"), but its
    test compares `tensor.device` with a device *string* (`torch.device('cpu') == 'cpu'` is
    False, and so is 'cuda:0'), so it always clones: +4 bytes/parameter/N per rank, a quarter
    more than ZeRO-3 needs in fp32. Here each fp32 partition that is provably a plain copy (same
    dtype, device and shape, equal values) is replaced by the partition it copies, as DeepSpeed's
    intended branch does, before any optimizer state exists. A no-op for every other case
    (mixed precision, offload, NVMe swap, other stages) and once DeepSpeed reuses the tensor itself."""
    import torch

    zero = engine.optimizer
    hps = getattr(zero, "fp32_partitioned_groups_flat", None)
    lps = getattr(zero, "fp16_partitioned_groups_flat", None)
    if not hps or not lps or getattr(zero, "offload_optimizer", True) or getattr(zero, "swap_optimizer", True) \
            or getattr(zero, "params_in_nvme_and_cpu", True) or engine.global_steps != 0:
        return 0
    freed = 0
    for i, (hp, lp) in enumerate(zip(hps, lps)):
        if lp is None or hp is lp or hp.dtype != lp.dtype or hp.device != lp.device or hp.shape != lp.shape \
                or hp.grad is not None or hp in zero.optimizer.state or not torch.equal(hp, lp):
            continue
        lp.ds_id = hp.ds_id
        lp.requires_grad = True  # as DeepSpeed sets on its fp32 partitions
        hps[i] = lp
        freed += hp.numel() * hp.element_size()
    if freed:
        log.info("ZeRO-3 fp32: the optimizer updates the parameter partitions in place (%.1f MiB not copied)",
                 freed / 2**20)
    return freed


def _device():
    import torch

    if torch.cuda.is_available():
        import ray.train

        local = ray.train.get_context().get_local_rank()
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _set_rng(states: Optional[dict]) -> None:
    import torch

    if not states:
        return
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _all_mean(dist, value: float, device) -> float:
    import torch

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item() / dist.get_world_size())


def _init_wandb(cfg: Config):
    mode = cfg.run.wandb
    if mode == "disabled":
        return None
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    try:
        import wandb

        os.makedirs(cfg.run.output_dir, exist_ok=True)
        return wandb.init(project=cfg.run.wandb_project, name=cfg.run.name, dir=cfg.run.output_dir, mode=mode,
                          config=cfg.to_dict(), resume="allow", id=_wandb_id(cfg),
                          settings=wandb.Settings(quiet=True, console="off"))
    except Exception as e:  # metrics still reach Ray and metrics.jsonl
        log.warning("wandb disabled: %s", e)
        return None


def _wandb_id(cfg: Config) -> str:
    import hashlib

    return hashlib.sha1(f"{cfg.run.storage_path}/{cfg.run.name}".encode()).hexdigest()[:16]
