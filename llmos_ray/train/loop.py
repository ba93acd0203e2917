"""The per-worker training loop that Ray Train runs on every worker, as named steps:

    setup     this worker's place in the group, device, precision, DeepSpeed config   setup_worker
    resume    which checkpoint to start from and how to load it on this worker count  plan_resume
    build     the model (+ LoRA adapters, the teacher), DeepSpeed engine, schedule    build
    restore   the checkpoint's engine, optimizer and RNG states                       restore
    train     per step: micro-batches → forward, backward, optimizer step             train_step
    report    log, evaluate, checkpoint through ray.train.report                      report_step
    cleanup   wandb

Pretraining, fine-tuning and distillation share it; they differ in the batches (`targets` of
-100 carry no loss), adapters (LoRA) and the objective — a `Task` (tasks.py) turns micro-batches
into model inputs, the loss and the validation NLL. The pieces live beside it: model.py (building
and loading models), readers.py (micro-batches), tasks.py and losses.py, checkpoint.py.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, get_args

import numpy as np

from llmos_ray.config import Config, from_dict
from llmos_ray.errors import ConfigError
from llmos_ray.train import checkpoint as ckpt_io
from llmos_ray.train.losses import mean_over_ranks, validation_loss
from llmos_ray.train.model import build_model, choose_device, load_teacher, share_fp32_partitions
from llmos_ray.train.readers import START, open_reader
from llmos_ray.train.tasks import task_for
from llmos_ray.train.tracking import start_wandb

log = logging.getLogger(__name__)

Job = Literal["pretrain", "finetune", "distill"]
"""What a run trains: the loss (a teacher's for 'distill'), adapters ('finetune' with LoRA), the data."""
JOBS: tuple[str, ...] = get_args(Job)


@dataclass
class Worker:
    """This worker's place in the group and what it trains with; fixed once set up."""

    cfg: Config
    job: Job
    tokenizer: Any
    rank: int
    world: int
    local_rank: int
    device: Any
    precision: str
    """'fp32', 'bf16' or 'fp16' (train.precision resolved for this device)."""
    ds_config: dict
    """DeepSpeed's config before the model is known (it sizes buckets once it is)."""
    dist: Any
    """torch.distributed, over the process group Ray Train created."""
    task_info: dict = field(default_factory=dict)
    """What the objective needs from the driver (classification: label names, class weights)."""

    @property
    def accumulation(self) -> int:
        return self.ds_config["gradient_accumulation_steps"]


@dataclass
class WorkerState:
    """A worker's progress: what a checkpoint records and a resume starts from."""

    step: int = 0
    tokens_seen: int = 0
    data: dict = field(default_factory=lambda: dict(START))
    """Position in the training data: epoch, micro-batches consumed in it (the reader's)."""

    def record(self, worker: Worker) -> dict:
        """The checkpoint's llmos_state.json."""
        cfg = worker.cfg
        return {"step": self.step, "tokens_seen": self.tokens_seen, "data": dict(self.data),
                "world_size": worker.world, "zero_stage": cfg.deepspeed.zero_stage, "precision": worker.precision,
                "job": worker.job, "lora": worker.job == "finetune" and cfg.finetune.lora}


@dataclass
class Resume:
    """Where a worker starts, decided before anything is built."""

    checkpoint: Any = None
    """The checkpoint to load (None: a fresh start)."""
    state: WorkerState = field(default_factory=WorkerState)
    """Its step, tokens and data position (rescaled to this worker count)."""
    method: Optional[str] = None
    """On another worker count or ZeRO stage: 'as_is', 'universal' or 'consolidated' (checkpoint.reshard_method)."""
    damaged: list[str] = field(default_factory=list)
    """Folder names of damaged checkpoints skipped: a resumed run does not write into them."""
    same_ranks: bool = True
    """Written by as many workers as resume it: each rank's RNG state is restored."""

    @property
    def resharded(self) -> bool:
        return self.method is not None

    @property
    def path(self) -> Optional[str]:
        """How the checkpoint is loaded, as the first metrics record after a resume names it
        (`resumed_via`): 'same' (as written, RNG included), 'as_is', 'universal', 'consolidated'; None
        for a fresh start."""
        if self.checkpoint is None:
            return None
        return self.method or "same"


@dataclass
class Training:
    """What a worker trains: the DeepSpeed engine around the model, its LR schedule, and the task
    (tasks.py: the objective, which turns micro-batches into model inputs and losses)."""

    engine: Any
    model: Any
    scheduler: Any
    task: Any
    grad_norm: Optional[float] = None
    """The last step's gradient norm before clipping, where DeepSpeed records none (ZeRO-0 in fp32)."""


@dataclass
class Throughput:
    """The constants of the tokens/s and MFU figures."""

    tokens_per_step: int
    flops_per_token: float
    peak_flops: float
    """Of all workers together."""


@dataclass
class MetricsWindow:
    """Sums over the steps since the last log line (reduced across ranks when logged)."""

    loss: float = 0.0
    kl: float = 0.0
    micro_batches: int = 0
    steps: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, kl: Optional[float]) -> None:
        self.loss += loss
        if kl is not None:
            self.kl += kl
        self.micro_batches += 1

    def reset(self) -> None:
        self.loss, self.kl, self.micro_batches, self.steps = 0.0, 0.0, 0, 0
        self.restart_clock()

    def restart_clock(self) -> None:
        """Time spent on evaluation or checkpoints is not training throughput."""
        self.started = time.perf_counter()


def train_loop(loop_config: dict[str, Any]) -> None:
    """Entry point for `TorchTrainer(train_loop_per_worker=...)`. `loop_config` holds the resolved
    config (as a dict), the tokenizer, the job, validation blocks, an in-memory training array
    (else the "train" dataset shard is read) and, optionally, a checkpoint to start from."""
    import ray.train

    worker = setup_worker(loop_config)
    # A checkpoint Ray restored after a failure wins over the one the driver chose.
    resume = plan_resume(ray.train.get_checkpoint() or loop_config.get("resume_from"), worker)
    training = build(worker, resume)
    restore(training, resume, worker)
    state = resume.state
    reader = open_reader(loop_config.get("train_array"), worker.cfg, worker.job, worker.rank, worker.world,
                         state.data, training.task)
    throughput = measure_throughput(worker, training.model)
    wandb_run = start_wandb(worker.cfg) if worker.rank == 0 else None

    training.engine.train()
    window = MetricsWindow()
    resumed_via = resume.path
    while state.step < worker.cfg.train.max_steps:
        train_step(training, reader, worker, window)
        state.step += 1
        state.tokens_seen += throughput.tokens_per_step
        state.data = dict(reader.position)
        window.steps += 1
        if report_step(training, state, worker, window, throughput, loop_config.get("val_blocks"), resume.damaged,
                       wandb_run, resumed_via):
            resumed_via = None
    if wandb_run is not None:
        wandb_run.finish()


# ---------------------------------------------------------------------------------------------
# Setup, resume, build, restore


def setup_worker(loop_config: dict[str, Any]) -> Worker:
    """This worker's rank, device, precision and DeepSpeed config, from the trainer's `loop_config`."""
    import ray.train
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed first picks its accelerator
    from llmos_ray.runtime import worker_logging
    from llmos_ray.train.deepspeed import choose_precision, deepspeed_config

    worker_logging()  # our warnings (a damaged checkpoint skipped, a resume path) reach the console
    cfg: Config = from_dict(loop_config["config"])
    job = loop_config.get("job", "pretrain")
    if job not in JOBS:
        raise ConfigError(f"unknown training job {job!r}: expected one of {', '.join(JOBS)}")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, ctx.get_local_world_size())))
    device = choose_device()
    precision = choose_precision(cfg.train.precision, device.type,
                                 device.type == "cuda" and torch.cuda.is_bf16_supported())
    return Worker(cfg=cfg, job=job, tokenizer=loop_config["tokenizer"], rank=rank, world=world,
                  local_rank=ctx.get_local_rank(), device=device, precision=precision,
                  ds_config=deepspeed_config(cfg, world, device.type, precision), dist=dist,
                  task_info=dict(loop_config.get("task_info") or {}))


def plan_resume(start, worker: Worker) -> Resume:
    """Which checkpoint to start from (a damaged one: the newest complete one before it), its step
    and data position, and — on another worker count or ZeRO stage — how to load it: "as_is" (ZeRO-0),
    "universal" (ZeRO-1/2/3, optimizer state carried over) or, where DeepSpeed can't, "consolidated"
    weights with fresh optimizer moments. The data position keeps the number of blocks consumed
    (checkpoint.rescale_position); on another worker count the RNG stays seeded from run.seed."""
    if start is None:
        return Resume()
    start, restored, damaged = ckpt_io.usable_checkpoint(start)
    cfg, world, written_by = worker.cfg, worker.world, restored["world_size"]
    state = WorkerState(restored["step"], restored["tokens_seen"], restored["data"])
    old_stage, new_stage = restored["zero_stage"], cfg.deepspeed.zero_stage
    if written_by == world and old_stage == new_stage:
        log.info("resume path: same (checkpoint of %d workers, ZeRO-%d, loaded as written)", world, new_stage)
        return Resume(start, state, None, damaged)
    # Another worker count or another ZeRO stage: DeepSpeed's own load_checkpoint expects the
    # files of this stage and worker count (else `len(ckpt_list) > 0` fails inside it).
    how, why = ckpt_io.reshard_method(restored, cfg)
    state.data = ckpt_io.rescale_position(state.data, written_by, world, ckpt_io.read_micro_batch_size(start),
                                          cfg.train.micro_batch_size)
    change = f"{written_by} workers ZeRO-{old_stage} -> {world} workers ZeRO-{new_stage}"
    if how == "consolidated":
        log.warning("resume path: consolidated (%s): loading consolidated weights; optimizer moments restart "
                    "(%s)", change, why)
    else:
        log.info("resume path: %s (%s) with its optimizer state (%s)", how, change, why)
    return Resume(start, state, how, damaged, same_ranks=written_by == world)


def build(worker: Worker, resume: Resume) -> Training:
    """The model (with the checkpoint's weights when they are loaded consolidated), the teacher of
    a distillation run, and the DeepSpeed engine with its optimizer and LR schedule."""
    import deepspeed

    deepspeed.init_distributed(auto_mpi_discovery=False)  # adopts the process group Ray Train created
    _seed_everything(worker.cfg.run.seed)
    model, teacher = _setup_model(worker, resume)
    engine, scheduler = _setup_engine(worker, model, resume)
    return Training(engine, model, scheduler,
                    task_for(worker.cfg, worker.job, teacher, tokenizer=worker.tokenizer, info=worker.task_info))


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _setup_model(worker: Worker, resume: Resume):
    from llmos_ray.train.lora import apply_lora

    cfg, tokenizer = worker.cfg, worker.tokenizer
    model = build_model(cfg, tokenizer, worker.ds_config if resume.method != "consolidated" else None, worker.job,
                        worker.task_info.get("labels"))
    if model.get_input_embeddings().num_embeddings < len(tokenizer):  # chat tokens added for fine-tuning
        model.resize_token_embeddings(len(tokenizer))
    if worker.job == "finetune" and cfg.finetune.lora:
        model = apply_lora(model, cfg, task=cfg.finetune.task)
    teacher = load_teacher(cfg, worker.device) if worker.job == "distill" else None
    if cfg.train.activation_checkpointing:
        model.gradient_checkpointing_enable()
    if resume.method == "consolidated":
        model.load_state_dict(ckpt_io.consolidated_state_dict(resume.checkpoint), strict=True)
    return model, teacher


def _setup_engine(worker: Worker, model, resume: Resume):
    import deepspeed
    import torch

    from llmos_ray.train.deepspeed import deepspeed_config, lr_at, uses_client_optimizer

    cfg = worker.cfg
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", None)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    ds_config = deepspeed_config(cfg, worker.world, worker.device.type, worker.precision, hidden_size=hidden,
                                 load_universal=resume.method == "universal", trainable_params=trainable)
    optimizer = None
    if uses_client_optimizer(cfg, worker.device.type):
        # fused, as transformers' Trainer: ~5 ms a step on t5-small's 9.6M-element partition, ~80 ms unfused
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                      weight_decay=cfg.train.weight_decay, fused=True)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, model_parameters=params,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg)),
        dist_init_required=False)
    share_fp32_partitions(engine)
    return engine, scheduler


def restore(training: Training, resume: Resume, worker: Worker) -> None:
    """Load what `resume` planned into the engine: its states as written, through a universal
    checkpoint, or (consolidated weights already in the model) the LR schedule's steps; and this
    rank's RNG when the worker count is unchanged (dropout then continues as it would have)."""
    if resume.checkpoint is None:
        return
    state = resume.state
    if resume.method == "consolidated":
        for _ in range(state.step):
            training.scheduler.step()
    elif resume.method == "universal":
        ckpt_io.load_universal(training.engine, resume.checkpoint, worker.local_rank, worker.dist)
    else:
        ckpt_io.load_engine(training.engine, resume.checkpoint)
    if resume.same_ranks:
        ckpt_io.restore_rng(resume.checkpoint, worker.rank)
    log.info("rank %d resumed at step %d (epoch %d, micro-batch %d)", worker.rank, state.step,
             state.data["epoch"], state.data["micro_batches"])


def measure_throughput(worker: Worker, model) -> Throughput:
    import torch

    from llmos_ray.models import flops_per_token, gpu_peak_flops, measure_cpu_peak_flops

    cfg, device = worker.cfg, worker.device
    with torch.random.fork_rng(devices=[]):  # its random matrices must not move the RNG a resume restored
        peak = (gpu_peak_flops(torch.cuda.get_device_name(device)) or 0.0) if device.type == "cuda" \
            else measure_cpu_peak_flops()
    tokens_per_step = cfg.train.micro_batch_size * cfg.data.seq_len * worker.accumulation * worker.world
    return Throughput(tokens_per_step, flops_per_token(model.config, cfg.data.seq_len), peak * worker.world)


# ---------------------------------------------------------------------------------------------
# Train step, report


def train_step(training: Training, reader, worker: Worker, window: MetricsWindow) -> None:
    """One optimizer step: each micro-batch's forward and backward (DeepSpeed steps after the last one)."""
    engine, task = training.engine, training.task
    for micro in range(worker.accumulation):
        loss, extras = task.loss(engine, task.batch(reader.next_agreed(worker.dist), worker.device))
        loss = loss * reader.loss_weight  # 1.0 unless balanced by length (readers.ArrayReader)
        engine.backward(loss)
        if micro == worker.accumulation - 1 and _norm_unrecorded(engine):
            training.grad_norm = _grad_norm(training.model)
        engine.step()
        window.add(loss.item(), extras.get("kl"))


def _norm_unrecorded(engine) -> bool:
    """DeepSpeed clips ZeRO-0 fp32 gradients without keeping their norm (engine._take_model_step)."""
    return not (engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled())


def _grad_norm(model) -> float:
    """The global L2 norm of the (all-reduced, not yet clipped) gradients, as DeepSpeed's clipping computes it."""
    import torch

    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def report_step(training: Training, state: WorkerState, worker: Worker, window: MetricsWindow,
                throughput: Throughput, val_blocks: Optional[np.ndarray], damaged: list[str], wandb_run,
                resumed_via: Optional[str] = None) -> bool:
    """After a step: the log line's metrics every train.log_every steps, the validation loss every
    train.eval_every, a checkpoint every train.checkpoint_every (and all three at the last step),
    reported through ray.train.report by every rank (and to wandb by rank 0). The first record after
    a resume names how the checkpoint was loaded (`resumed_via`, Resume.path). Returns whether
    anything was reported."""
    t, step = worker.cfg.train, state.step
    last = step == t.max_steps
    metrics: dict[str, Any] = {}
    if step % t.log_every == 0 or last:
        metrics.update(log_metrics(training, state, worker, window, throughput))
        window.reset()
    if val_blocks is not None and (step % t.eval_every == 0 or last):
        val_loss = validation_loss(training.engine, training.task, val_blocks, worker.cfg, worker.rank, worker.world,
                                   worker.device, worker.dist)
        metrics.update(step=step, val_loss=val_loss)
        if training.task.name != "classification":  # a classifier's val_loss is per example, not per token
            metrics["val_ppl"] = math.exp(min(val_loss, 50.0))
        training.engine.train()
        window.restart_clock()
    checkpoint_now = step % t.checkpoint_every == 0 or last
    if not metrics and not checkpoint_now:
        return False
    metrics.setdefault("step", step)
    if resumed_via is not None:
        metrics["resumed_via"] = resumed_via
    if wandb_run is not None:
        wandb_run.log({k: v for k, v in metrics.items() if v is not None}, step=step)
    if checkpoint_now:
        name = ckpt_io.checkpoint_name(step)
        ckpt_io.save_and_report(training.engine, worker.cfg, worker.tokenizer, training.model.config,
                                state.record(worker), metrics, worker.rank,
                                dir_name=name + "_redo" if name in damaged else name)
        window.restart_clock()
    else:
        import ray.train

        ray.train.report(metrics)
    return True


def log_metrics(training: Training, state: WorkerState, worker: Worker, window: MetricsWindow,
                throughput: Throughput) -> dict[str, Any]:
    """The log line's figures over the window: loss (mean over ranks), LR, tokens, tokens/s, MFU, …"""
    from llmos_ray.models import mfu

    engine, dist, device = training.engine, worker.dist, worker.device
    elapsed = time.perf_counter() - window.started
    loss = mean_over_ranks(dist, window.loss / max(1, window.micro_batches), device)
    tps = throughput.tokens_per_step * window.steps / max(elapsed, 1e-9)
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is None:
        grad_norm = training.grad_norm
    metrics: dict[str, Any] = dict(
        step=state.step, loss=loss, lr=training.scheduler.get_last_lr()[0], tokens=state.tokens_seen,
        tokens_per_s=tps, mfu=mfu(throughput.flops_per_token, tps, throughput.peak_flops), epoch=state.data["epoch"],
        grad_norm=float(grad_norm) if grad_norm is not None else None, step_time_s=elapsed / max(1, window.steps))
    if training.task.name == "distill":
        metrics["kl"] = mean_over_ranks(dist, window.kl / max(1, window.micro_batches), device)
    if training.task.name in ("classification", "seq2seq"):
        # micro-batches are cut to their longest example: seq_len positions each would overstate tokens/s and MFU
        examples = throughput.tokens_per_step // worker.cfg.data.seq_len * window.steps
        metrics.update(tokens_per_s=None, mfu=None, examples_per_s=examples / max(elapsed, 1e-9))
    return metrics
