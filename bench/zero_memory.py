"""Benchmark: per-rank bytes of parameters + gradients + optimizer states, ZeRO-0 against ZeRO-3.

Both are measured inside the real thing: `run_training` on 2 Ray Train workers, our DeepSpeed config,
the same preset model and blocks of stdlib source, in two precisions (`train.precision`):

    bf16   mixed precision, the case the theory (and `llmos plan`) describes: bf16 weights and
           gradients, fp32 master weights + Adam moments in the optimizer, 16 bytes per parameter:
           ZeRO-0 2Ψ + 2Ψ + 12Ψ = 16Ψ per rank, ZeRO-3 16Ψ/N, ratio N = 2.0. The headline figure
           (`ratio=`) and the one the goal (>= 1.8) applies to. DeepSpeed's CPU accelerator runs bf16.
    fp32   what `train.precision=auto` picks on CPU: 4Ψ weights + 4Ψ gradients + 8Ψ moments = 16Ψ
           per rank under ZeRO-0, 16Ψ/N under ZeRO-3. DeepSpeed 0.19's ZeRO-3 alone would keep a
           redundant fp32 "master" copy of its (already fp32) partition, +4Ψ/N (ratio 1.60 here):
           its "reuse the weights" test in stage3.py `_create_fp32_partitions` compares
           `tensor.device` with the string 'cpu', never equal. Our loop frees that copy
           (llmos_ray.train.model.share_fp32_partitions); the run says so if one remains.

A wrapper around `deepspeed.initialize` (in each worker) hooks the engine's second `step()`: after
that step's backward, before the optimizer runs, the gradients of this step and the Adam moments of
the first are both live. There each rank counts the bytes of the tensor storages it holds (each
storage once, even when many tensors view it):

    params     the model's parameter tensors: p.data where not empty (ZeRO-0: every weight; ZeRO-3: the
               parameters kept whole by stage3_param_persistence_threshold) and p.ds_tensor, the
               ZeRO-3 partition
    master     the tensors the torch AdamW updates (DeepSpeed's flat fp32 copies or partitions), when
               they are not the parameters already counted
    grads      p.grad, the master tensors' .grad, and DeepSpeed's gradient buffers (ZeRO-3's
               grad_partitions_flat_buffer, ZeRO-1/2's averaged_gradients)
    optimizer  AdamW's state tensors (exp_avg, exp_avg_sq, step)

ZeRO-0 is the baseline (every rank holds everything, as DDP); ZeRO-3 is ours. It also counts every
live tensor in the worker (through the garbage collector) and names the engine's largest other
tensors, to show what else it keeps (communication buckets), and checks that both runs of a
precision started from the same weights (equal step-1 loss). Prints the tables, the theory, both
ratios, the machine and date, and `ratio=<zero0/zero3>` of bf16 (largest rank of each) last.

    .venv/bin/python bench/zero_memory.py [--size small] [--family gpt2] [--precision bf16 fp32]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

# bench/ is on sys.path: it is the script's directory.
from _common import machine, run_config, start_ray, tokenizer_and_blocks

WORKERS = 2
STEPS = 2
MICRO = 2
CATEGORIES = ("params", "master", "grads", "optimizer")


def held_bytes(engine) -> dict:
    """Bytes of the parameter, master-weight, gradient and optimizer-state storages this rank holds."""
    import gc

    import torch

    seen: set[int] = set()

    def add(tensors) -> int:
        total = 0
        for t in tensors:
            if t is None or not torch.is_tensor(t) or t.numel() == 0:
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return total

    params = list({id(p): p for p in engine.module.parameters()}.values())
    basic = engine.basic_optimizer  # the torch AdamW; under ZeRO it steps DeepSpeed's flat fp32 partitions
    zero = engine.optimizer
    # ZeRO-3 hands its fp32 partitions to the AdamW only during step(); ZeRO-1/2 keep them in param_groups.
    masters = [q for group in basic.param_groups for q in group["params"]]
    masters += list(getattr(zero, "fp32_partitioned_groups_flat", None) or [])
    masters += list(getattr(zero, "single_partition_of_fp32_groups", None) or [])
    buffers = [getattr(zero, "grad_partitions_flat_buffer", None)]
    averaged = getattr(zero, "averaged_gradients", None) or {}
    for grads in (averaged.values() if isinstance(averaged, dict) else averaged):
        buffers += list(grads or [])
    out = {
        "params": add(p.data for p in params) + add(getattr(p, "ds_tensor", None) for p in params),
        "master": add(masters),
        "grads": add(p.grad for p in params) + add(q.grad for q in masters) + add(buffers),
        "optimizer": add(v for state in basic.state.values() for v in state.values()),
    }
    out["total"] = sum(out[c] for c in CATEGORIES)
    out["n_params"] = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    out["whole_param_elements"] = sum(p.data.numel() for p in params)  # ZeRO-3: persistent (or still gathered)
    others = {}  # the engine's largest other tensors, by attribute path (communication buckets…)
    for path, t in engine_tensors(zero, "optimizer"):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen and t.untyped_storage().nbytes() > 1 << 20:
            others.setdefault(ptr, (path, t.untyped_storage().nbytes()))
    out["largest_others"] = sorted(others.values(), key=lambda x: -x[1])[:3]
    gc.collect()
    out["all_live_tensors"] = add(o for o in gc.get_objects() if torch.is_tensor(o)) + out["total"]
    return out


def engine_tensors(obj, path: str, depth: int = 0):
    """(attribute path, tensor) for tensors reachable from a DeepSpeed object within 4 attribute levels."""
    import torch

    if depth > 4:
        return
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    elif type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__") \
            and not isinstance(obj, torch.nn.Module):
        items = vars(obj).items()
    else:
        return
    for key, value in list(items):
        if torch.is_tensor(value):
            if value.numel():
                yield f"{path}.{key}", value
        else:
            yield from engine_tensors(value, f"{path}.{key}", depth + 1)


def measuring_train_loop(loop_config: dict) -> None:
    """Our train loop, unchanged, with a probe on the engine it builds (runs on every worker)."""
    import deepspeed
    import ray.train
    import torch.distributed as dist

    from llmos_ray.train.loop import train_loop

    snapshot: dict = {}
    real_initialize = deepspeed.initialize

    def initialize(*args, **kwargs):
        engine, optimizer, loader, scheduler = real_initialize(*args, **kwargs)
        real_step = engine.step

        def step(*a, **k):
            if engine.global_steps == 1 and not snapshot:  # second optimizer step, before it runs
                snapshot.update(held_bytes(engine))
            return real_step(*a, **k)

        engine.step = step
        return engine, optimizer, loader, scheduler

    deepspeed.initialize = initialize
    try:
        train_loop(loop_config)
    finally:
        deepspeed.initialize = real_initialize
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, snapshot)
    # With a "step", the driver's metrics log keeps it: it comes back in result.history.
    ray.train.report({"step": STEPS, "per_rank": per_rank})


def measure(stage: int, precision: str, args, tok, blocks, out: str) -> list[dict]:
    from llmos_ray.train.trainer import run_training

    cfg = run_config(os.path.join(out, f"zero{stage}-{precision}"), {
        "model.family": args.family, "model.size": args.size, "data.seq_len": args.seq_len,
        "data.vocab_size": args.vocab_size, "train.num_workers": WORKERS, "train.micro_batch_size": MICRO,
        "train.max_steps": STEPS, "train.log_every": 1, "train.checkpoint_every": STEPS,
        "deepspeed.zero_stage": stage, "train.precision": precision})
    history = run_training(cfg, tok, {"train": blocks}, None, None, train_fn=measuring_train_loop).history
    per_rank = next((h["per_rank"] for h in history if "per_rank" in h), None)
    if per_rank is None:
        raise SystemExit(f"ZeRO-{stage} {precision}: the workers reported no measurement: {history}")
    if any(not r for r in per_rank):
        raise SystemExit(f"ZeRO-{stage} {precision}: a rank did not reach its second step: {per_rank}")
    first_loss = next(h["loss"] for h in history if h.get("step") == 1 and "loss" in h)
    return [{**r, "step1_loss": first_loss} for r in per_rank]


def theory(n_params: int, stage: int, world: int, precision: str) -> dict:
    """Adam bytes per parameter, split by ZeRO (llmos_ray.models.zero_memory_per_device, what `llmos plan` prints)."""
    from llmos_ray.models import zero_memory_per_device

    return zero_memory_per_device(n_params, stage, world, precision)


def report(precision: str, runs: dict, n: int, mib) -> float:
    """Print one precision's table and checks; return its ratio (largest rank of each stage)."""
    print(f"\n{precision}: {'bf16 weights and gradients, fp32 master + ' if precision == 'bf16' else 'fp32 '}"
          f"Adam (torch AdamW), {WORKERS} ranks, CPU; measured before the 2nd optimizer step")
    print(f"{'':22}{'params':>10}{'master':>10}{'grads':>10}{'optim':>10}{'total':>10}   MiB per rank"
          f"{'all tensors':>14}")
    for stage, ranks in runs.items():
        for rank, r in enumerate(ranks):
            print(f"ZeRO-{stage} rank {rank} measured  " + "".join(f"{mib(r[c]):>10}" for c in (*CATEGORIES, "total"))
                  + f"{'':15}{mib(r['all_live_tensors']):>10}")
        t = theory(n, stage, WORKERS, precision)
        print(f"ZeRO-{stage}        theory  " + "".join(f"{mib(t[c]):>10}" for c in (*CATEGORIES, "total")))
    for stage, ranks in runs.items():
        for path, nbytes in ranks[0]["largest_others"]:
            print(f"ZeRO-{stage} rank 0 also holds {path}: {nbytes / 2**20:.1f} MiB")
    whole = max(r["whole_param_elements"] for r in runs[3])
    print(f"ZeRO-3 parameters kept whole on every rank (stage3_param_persistence_threshold): {whole:,} elements "
          f"({whole / n:.1%} of Ψ)")
    loss0, loss3 = runs[0][0]["step1_loss"], runs[3][0]["step1_loss"]
    same = abs(loss0 - loss3) < 1e-3  # same seed, data and init: ZeRO changes only the order of sums
    print(f"step-1 loss: ZeRO-0 {loss0:.4f}, ZeRO-3 {loss3:.4f} "
          f"({'same model' if same else 'DIFFERENT: the two engines did not start from the same weights'})")
    zero0 = max(r["total"] for r in runs[0])
    zero3 = max(r["total"] for r in runs[3])
    t0, t3 = theory(n, 0, WORKERS, precision)["total"], theory(n, 3, WORKERS, precision)["total"]
    print(f"theory ({precision}, {WORKERS} ranks): ZeRO-0 16Ψ = {t0 / 2**20:.2f} MiB, ZeRO-3 16Ψ/{WORKERS} = "
          f"{t3 / 2**20:.2f} MiB, ratio {t0 / t3:.2f}")
    print(f"measured ({precision}, largest rank): ZeRO-0 {zero0 / 2**20:.2f} MiB, ZeRO-3 {zero3 / 2**20:.2f} MiB, "
          f"ratio {zero0 / zero3:.2f}")
    extra = max(r["master"] for r in runs[3]) - theory(n, 3, WORKERS, precision)["master"]
    if extra > 0.01 * zero3:
        print(f"ZeRO-3 {precision} keeps a separate fp32 master copy of its partition ({extra / 2**20:.2f} MiB) "
              f"although the model is fp32 (DeepSpeed's device-vs-string test); without it the ratio would be "
              f"{zero0 / (zero3 - extra):.2f}")
    return zero0 / zero3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="gpt2")
    parser.add_argument("--size", default="small", help="model preset (default small)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"],
                        help="precisions to measure (default both); ratio= is the first one's")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs given to Ray (default 4)")
    args = parser.parse_args()
    import ray

    from llmos_ray.models import zero_memory_per_device

    tok, blocks = tokenizer_and_blocks(STEPS * MICRO * WORKERS, args.seq_len, args.vocab_size)
    out = tempfile.mkdtemp(prefix="llmos-bench-zero-")
    start_ray(args.num_cpus)
    try:
        runs = {precision: {stage: measure(stage, precision, args, tok, blocks, out) for stage in (0, 3)}
                for precision in args.precision}
    finally:
        ray.shutdown()
        shutil.rmtree(out, ignore_errors=True)  # the run's checkpoints and metrics

    first = args.precision[0]
    n = runs[first][0][0]["n_params"]
    mib = lambda b: f"{b / 2**20:9.2f}"  # noqa: E731
    print(f"\nmodel: {args.family} {args.size} preset, Ψ = {n:,} parameters, vocab {len(tok)}")
    ratios = {precision: report(precision, r, n, mib) for precision, r in runs.items()}
    planned = (zero_memory_per_device(n, 0, WORKERS, "bf16")["total"]
               / zero_memory_per_device(n, 3, WORKERS, "bf16")["total"])
    print(f"\nllmos plan (models.zero_memory_per_device, bf16) predicts {planned:.2f}; measured "
          + ", ".join(f"{p} {r:.2f}" for p, r in ratios.items()) + f"; ratio= below is {first}'s (goal >= 1.8)")
    print(machine())
    print(f"ratio={ratios[first]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
