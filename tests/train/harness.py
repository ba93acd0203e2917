"""Many training configurations in one Ray Train fit, and their single-process PyTorch references.

`engines_loop(specs, out)` is a train function for `run_training(..., train_fn=...)`: every worker
trains each spec in turn with the loop's own steps — `setup_worker`, `plan_resume`, `build`,
`restore`, `open_reader`, `train_step`, `log_metrics`, `save_and_report` — building one DeepSpeed
engine after another, so the start-up of a fit (worker group, process group, imports) is paid once
for a dozen configurations. Rank 0 writes every step's metrics (loss, grad norm, LR, DeepSpeed's
step counters) to `<out>/<spec>.json`.

`reference(...)` is the trusted run: one process, plain PyTorch, the same weights and the same
micro-batches (ArrayReader's order: micro-step k of rank r takes rows [(k·world + r)·micro, +micro)),
the loss of each micro-batch divided by world × accumulation before backward, torch's clip_grad_norm_,
AdamW and the warmup + cosine schedule; dropout replays each rank's own RNG stream.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class Spec:
    """One configuration trained inside a harness fit."""

    name: str
    config: dict
    """The resolved llmos Config as a dict (cfg.to_dict())."""
    save_at: tuple[int, ...] = ()
    """Steps after which a checkpoint `<name>-<step>` is written (collective, through ray.train.report)."""
    resume_from: Optional[str] = None
    """A checkpoint to start from (plan_resume/restore, as a resumed run does)."""
    skip_rng_restore: bool = False
    """Control experiment: resume without restoring the ranks' RNG states."""
    extra: dict = field(default_factory=dict)


def engines_loop(specs: list[Spec], out_dir: str):
    """The train function of a harness fit (Ray pickles it by value)."""

    def loop(loop_config):
        import gc

        import ray.train

        from llmos_ray.train import checkpoint as ckpt_io
        from llmos_ray.train import loop as steps
        from llmos_ray.train.readers import open_reader

        for spec in specs:
            worker = steps.setup_worker({**loop_config, "config": spec.config})
            resume = steps.plan_resume(spec.resume_from, worker)
            training = steps.build(worker, resume)
            real_restore_rng = ckpt_io.restore_rng
            if spec.skip_rng_restore:
                ckpt_io.restore_rng = lambda *a, **k: None
            try:
                steps.restore(training, resume, worker)
            finally:
                ckpt_io.restore_rng = real_restore_rng
            state = resume.state
            reader = open_reader(loop_config["train_array"], worker.cfg, worker.job, worker.rank, worker.world,
                                 state.data, training.task)
            cfg, engine = worker.cfg, training.engine
            tokens = cfg.train.micro_batch_size * cfg.data.seq_len * worker.accumulation * worker.world
            throughput = steps.Throughput(tokens, 1.0, 1.0)
            engine.train()
            records = []
            while state.step < cfg.train.max_steps:
                window = steps.MetricsWindow()
                steps.train_step(training, reader, worker, window)
                state.step += 1
                state.tokens_seen += tokens
                state.data = dict(reader.position)
                window.steps += 1
                m = steps.log_metrics(training, state, worker, window, throughput)
                m.update(global_steps=engine.global_steps, micro_steps=engine.micro_steps,
                         scheduler_steps=training.scheduler.last_epoch, data=dict(state.data),
                         accumulation=worker.accumulation)
                records.append(m)
                if state.step in spec.save_at:
                    ckpt_io.save_and_report(engine, cfg, worker.tokenizer, training.model.config, state.record(worker),
                                            {"step": state.step, "spec": spec.name}, worker.rank,
                                            dir_name=f"{spec.name}-{state.step}")
                    worker.dist.barrier()  # every rank's files are in storage before anyone reads them
            if worker.rank == 0:
                with open(os.path.join(out_dir, f"{spec.name}.json"), "w") as f:
                    json.dump({"resumed_via": resume.path, "world": worker.world, "steps": records,
                               "precision": worker.precision}, f)
            engine.destroy()
            del training, engine
            gc.collect()
            worker.dist.barrier()
        ray.train.report({"step": 0, "specs": len(specs)})

    return loop


def read_results(out_dir: str, name: str) -> dict:
    with open(os.path.join(out_dir, f"{name}.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# The single-process reference


@dataclass
class RefState:
    """A reference run's state after some step: what a resume continues from."""

    model: object
    optimizer: object
    scheduler: object
    rng: list
    step: int


def reference_model(cfg, tokenizer):
    """The model the loop builds for `cfg` (base weights, or the preset from run.seed), in fp32."""
    import random

    import torch

    from llmos_ray.train.model import build_model

    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    return build_model(cfg, tokenizer, None)  # activation checkpointing changes no number: left out


def reference(cfg, tokenizer, blocks: np.ndarray, world: int, *, start: Optional[RefState] = None,
              fresh_optimizer: bool = False, autocast_bf16: bool = False, keep_at: tuple[int, ...] = ()):
    """Train `cfg` in one process on the micro-batches `world` workers would see; returns (per-step
    records {loss, grad_norm, lr}, {step: RefState} for the steps in `keep_at`). `start` continues
    a previous reference run (a resume); `fresh_optimizer` restarts its AdamW moments, as a resume
    from consolidated weights does."""
    import torch

    from llmos_ray.train.deepspeed import accumulation_steps, lr_at

    t = cfg.train
    accum, micro = accumulation_steps(cfg, world), t.micro_batch_size
    if start is None:
        model = reference_model(cfg, tokenizer)
        rng = [torch.get_rng_state() for _ in range(world)]  # every rank seeds alike, then builds
        first = 0
    else:
        model, first = copy.deepcopy(start.model), start.step
        rng = [r.clone() for r in start.rng]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg))
    if start is not None and not fresh_optimizer:
        opt.load_state_dict(copy.deepcopy(start.optimizer.state_dict()))
        sched.load_state_dict(start.scheduler.state_dict())
    elif start is not None:
        for _ in range(first):
            sched.step()
    model.train()
    out, kept = [], {}
    for step in range(first, t.max_steps):
        losses = []
        for m in range(accum):
            for r in range(world):
                k = step * accum + m
                rows = blocks[(k * world + r) * micro:(k * world + r + 1) * micro]
                batch = torch.tensor(rows, dtype=torch.long)
                torch.set_rng_state(rng[r])
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
                    logits = model(input_ids=batch[:, :-1]).logits
                loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                                         batch[:, 1:].reshape(-1))
                rng[r] = torch.get_rng_state()
                (loss / (accum * world)).backward()
                losses.append(loss.item())
        norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else float("inf"))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        out.append({"step": step + 1, "loss": float(np.mean(losses)), "grad_norm": float(norm),
                    "lr": sched.get_last_lr()[0]})
        if step + 1 in keep_at:
            kept[step + 1] = RefState(copy.deepcopy(model), copy.deepcopy(opt), copy.deepcopy(sched),
                                      [r.clone() for r in rng], step + 1)
    return out, kept
