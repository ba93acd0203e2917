"""Benchmark: training tokens/s of our trainer against a bare single-process PyTorch loop.

    ours      run_training(): Ray Train, 2 workers x 1 torch thread, DeepSpeed ZeRO-2, fp32 on CPU, reading
              an in-memory block array (the deterministic ArrayReader). Steady state: the tokens_per_s
              the loop itself reports per log window (result.history), the first --skip-windows windows
              dropped (startup, first allocations), weighted by each window's steps.
    baseline  one process, torch.set_num_threads(2) (the same 2 threads in all), plain PyTorch: forward,
              cross-entropy, backward, clip_grad_norm_, AdamW + the same warmup/cosine schedule, on the
              whole global batch per step. Timed over the same steps as ours' measured windows.

    ddp       bare PyTorch DDP, 2 processes x 1 thread (what a user writes for `torchrun --nproc-per-node 2`):
              gloo on 127.0.0.1, each rank its micro-batch of the same global batch (the rows ours gives
              that rank), forward, cross-entropy, backward (DDP all-reduces the gradients), clipping,
              AdamW + the same schedule. Timed per step on rank 0 over the same steps. The fair
              baseline for ours (same process layout); printed last, as `ratio=<ours/ddp>` (goal >= 0.95).

Same preset model and init seed, same blocks (the stdlib's sources tokenized by a BPE trained with
`train_tokenizer`), the same global batch of the same rows at every step, the same number of steps.
The run checks that both trained the same thing: the per-window losses must agree (fp32; ZeRO only
reorders sums), else it says MISMATCH and exits with status 1. The baseline runs first, before Ray
starts. Prints the figures, the machine, `ratio_1proc=<ours/baseline>` (goal >= 0.9) and
`ratio=<ours/ddp>` last.

    .venv/bin/python bench/train_throughput.py [--steps 30] [--log-every 5] [--size small] [--zero-stage 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

# bench/ is on sys.path: it is the script's directory.
from _common import machine, run_config, start_ray, tokenizer_and_blocks

# Both start from the same weights and see the same rows: the first window's losses agree to ~1e-5
# (fp32; ZeRO only reorders sums); later windows drift apart slowly as rounding differences grow.
FIRST_WINDOW_ATOL = 1e-3
ANY_WINDOW_ATOL = 5e-2


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="optimizer steps in each run (default 30)")
    p.add_argument("--log-every", type=int, default=5, help="ours' metrics window, in steps (default 5)")
    p.add_argument("--skip-windows", type=int, default=1, help="leading windows left out of the figure (default 1)")
    p.add_argument("--family", default="gpt2")
    p.add_argument("--size", default="small", help="model preset (default small)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per worker per forward (default 8)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs given to Ray (default 4)")
    p.add_argument("--threads", type=int, default=None,
                   help="baseline torch threads (default: the cores, = ours' workers x threads per worker)")
    args = p.parse_args()
    if args.steps <= args.log_every * args.skip_windows:
        p.error("--steps must exceed --log-every x --skip-windows, or nothing is measured")
    return args


def baseline(cfg, tok, blocks, threads: int, skip_steps: int) -> dict:
    """Plain PyTorch, one process: tokens/s over steps skip_steps+1 .. max_steps, and every step's loss."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from llmos_ray.models import preset_config
    from llmos_ray.train.deepspeed import lr_at

    torch.set_num_threads(threads)
    t = cfg.train
    hf = preset_config(cfg.model.family, cfg.model.size, len(tok), cfg.data.seq_len, bos_id=tok.bos_token_id,
                       eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, overrides=cfg.model.overrides)
    torch.manual_seed(cfg.run.seed)
    model = AutoModelForCausalLM.from_config(hf)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg))
    g = global_batch(cfg)
    losses, seconds = [], []
    for step in range(t.max_steps):
        start = time.perf_counter()
        batch = torch.tensor(blocks[step * g:(step + 1) * g], dtype=torch.long)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        seconds.append(time.perf_counter() - start)
    measured = seconds[skip_steps:]
    return {"tokens_per_s": g * cfg.data.seq_len * len(measured) / sum(measured), "losses": losses,
            "step_s": sum(measured) / len(measured), "first_step_s": seconds[0],
            "params": sum(p.numel() for p in model.parameters())}


def ddp_rank(rank: int, world: int, port: int, cfg_dict: dict, ids: tuple, blocks, skip_steps: int, out: str):
    """One DDP process (torch.multiprocessing.spawn): 1 thread, gloo; rank 0 writes its timings to `out`."""
    import json

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel
    from transformers import AutoModelForCausalLM

    from llmos_ray.config import from_dict
    from llmos_ray.models import preset_config
    from llmos_ray.train.deepspeed import lr_at

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = from_dict(cfg_dict)
    t, (vocab, bos, eos, pad) = cfg.train, ids
    hf = preset_config(cfg.model.family, cfg.model.size, vocab, cfg.data.seq_len, bos_id=bos, eos_id=eos, pad_id=pad,
                       overrides=cfg.model.overrides)
    torch.manual_seed(cfg.run.seed)
    model = DistributedDataParallel(AutoModelForCausalLM.from_config(hf))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg))
    micro, g = t.micro_batch_size, global_batch(cfg)
    losses, seconds = [], []
    for step in range(t.max_steps):
        start = time.perf_counter()
        at = step * g + rank * micro  # the rows ArrayReader gives this rank (accumulation 1)
        batch = torch.tensor(blocks[at:at + micro], dtype=torch.long)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
        seconds.append(time.perf_counter() - start)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"losses": losses, "seconds": seconds}, f)
    dist.destroy_process_group()


def ddp(cfg, tok, blocks, skip_steps: int) -> dict:
    """Bare PyTorch DDP, num_workers processes x 1 thread: tokens/s over steps skip_steps+1 .. max_steps."""
    import json
    import socket

    import torch.multiprocessing as mp

    from llmos_ray.train.deepspeed import accumulation_steps

    if accumulation_steps(cfg, cfg.train.num_workers) != 1:
        raise SystemExit("the DDP baseline trains one micro-batch per rank per step (no --global-batch)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tempfile.mktemp(prefix="llmos-bench-ddp-", suffix=".json")
    ids = (len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    mp.spawn(ddp_rank, args=(cfg.train.num_workers, port, cfg.to_dict(), ids, blocks, skip_steps, out),
             nprocs=cfg.train.num_workers, join=True)
    with open(out) as f:
        got = json.load(f)
    os.remove(out)
    measured = got["seconds"][skip_steps:]
    return {"tokens_per_s": global_batch(cfg) * cfg.data.seq_len * len(measured) / sum(measured),
            "losses": got["losses"], "step_s": sum(measured) / len(measured), "first_step_s": got["seconds"][0]}


def ours(cfg, tok, blocks, skip_steps: int) -> dict:
    """run_training on 2 workers: tokens/s from the loop's own windows after step skip_steps."""
    from llmos_ray.train.trainer import run_training

    start = time.perf_counter()
    result = run_training(cfg, tok, {"train": blocks}, None, None)
    wall = time.perf_counter() - start
    windows, prev = [], 0
    for h in result.history:
        if "tokens_per_s" in h:
            windows.append({"first": prev + 1, "last": h["step"], "steps": h["step"] - prev, "loss": h["loss"],
                            "seconds": h["step_time_s"] * (h["step"] - prev), "mfu": h.get("mfu")})
            prev = h["step"]
    if not windows or windows[-1]["last"] != cfg.train.max_steps:
        raise SystemExit(f"our run did not report every window up to step {cfg.train.max_steps}: {result.history}")
    measured = [w for w in windows if w["first"] > skip_steps]
    tokens_per_step = global_batch(cfg) * cfg.data.seq_len
    steps = sum(w["steps"] for w in measured)
    seconds = sum(w["seconds"] for w in measured)
    return {"tokens_per_s": tokens_per_step * steps / seconds, "step_s": seconds / steps, "windows": windows,
            "first_window_step_s": windows[0]["seconds"] / windows[0]["steps"], "wall_s": wall,
            "mfu": measured[-1]["mfu"]}


def global_batch(cfg) -> int:
    from llmos_ray.train.deepspeed import accumulation_steps

    return cfg.train.micro_batch_size * accumulation_steps(cfg, cfg.train.num_workers) * cfg.train.num_workers


def main() -> int:
    args = parse_args()
    load_at_start = os.getloadavg()[0]  # before this run adds its own
    import ray

    out = tempfile.mkdtemp(prefix="llmos-bench-train-")
    cfg = run_config(os.path.join(out, "run"), {
        "model.family": args.family, "model.size": args.size, "data.seq_len": args.seq_len,
        "data.vocab_size": args.vocab_size, "train.num_workers": args.workers,
        "train.micro_batch_size": args.micro_batch, "train.max_steps": args.steps, "train.log_every": args.log_every,
        "train.checkpoint_every": args.steps, "deepspeed.zero_stage": args.zero_stage})
    g = global_batch(cfg)
    tok, blocks = tokenizer_and_blocks(args.steps * g, args.seq_len, args.vocab_size)
    per_worker = max(1, (os.cpu_count() or 1) // args.workers)  # what the loop gives each worker on one node
    threads = args.threads or per_worker * args.workers
    skip = args.log_every * args.skip_windows

    base = baseline(cfg, tok, blocks, threads, skip)
    dist = ddp(cfg, tok, blocks, skip)
    start_ray(args.num_cpus)
    try:
        mine = ours(cfg, tok, blocks, skip)
    finally:
        ray.shutdown()
        shutil.rmtree(out, ignore_errors=True)  # the run's checkpoints and metrics

    # Same work? Each of ours' windows reports the mean loss of its steps; the baseline's must match.
    diffs = [abs(w["loss"] - sum(base["losses"][w["first"] - 1:w["last"]]) / w["steps"]) for w in mine["windows"]]
    same = diffs[0] < FIRST_WINDOW_ATOL and all(d < ANY_WINDOW_ATOL for d in diffs)  # False on NaN too
    ddp_diffs = [abs(w["loss"] - sum(dist["losses"][w["first"] - 1:w["last"]]) / w["steps"]) for w in mine["windows"]]
    same = same and ddp_diffs[0] < FIRST_WINDOW_ATOL and all(d < ANY_WINDOW_ATOL for d in ddp_diffs)
    tokens_per_step = g * args.seq_len
    measured = args.steps - skip
    print(f"\nmodel: {args.family} {args.size} preset, {base['params'] / 1e6:.2f}M parameters, vocab {len(tok)}, "
          f"seq_len {args.seq_len}; global batch {g} sequences = {tokens_per_step:,} tokens/step; "
          f"{args.steps} steps, steps {skip + 1}-{args.steps} measured; fp32, CPU")
    print(f"data: {len(blocks)} blocks of {args.seq_len + 1} tokens from the stdlib sources, the same rows per step "
          "in both")
    print(f"baseline, plain PyTorch, 1 process x {threads} threads: {base['tokens_per_s']:9,.0f} tokens/s "
          f"({base['step_s']:.3f} s/step over {measured} steps; first step {base['first_step_s']:.2f} s)")
    print(f"baseline, bare PyTorch DDP, {args.workers} processes x 1 thread (gloo): {dist['tokens_per_s']:9,.0f} "
          f"tokens/s ({dist['step_s']:.3f} s/step over {measured} steps; first step {dist['first_step_s']:.2f} s; "
          f"first window |loss - ours'| {ddp_diffs[0]:.0e})")
    print(f"ours, run_training {args.workers} workers x {per_worker} thread(s), ZeRO-{args.zero_stage}: "
          f"{mine['tokens_per_s']:9,.0f} tokens/s ({mine['step_s']:.3f} s/step over {measured} steps; first window "
          f"{mine['first_window_step_s']:.3f} s/step; whole fit {mine['wall_s']:.0f} s; mfu {mine['mfu']:.1%})")
    print("ours per window, s/step (|loss - baseline's|): " + ", ".join(
        f"{w['first']}-{w['last']}: {w['seconds'] / w['steps']:.3f} ({d:.0e})" for w, d in zip(mine["windows"], diffs)))
    verdict = "ok" if same else "MISMATCH: the two runs did not train the same thing; the ratio is not valid"
    print(f"same training: {verdict} (first window within {FIRST_WINDOW_ATOL:g}, every window within "
          f"{ANY_WINDOW_ATOL:g})")
    if load_at_start > 0.5:
        print(f"WARNING: the machine was busy (load average {load_at_start:.1f} at start): these timings are noise. "
              "Other processes slow the 2-thread baseline far more than single-threaded workers (its OpenMP threads "
              "wait for each other), so the ratio usually flatters ours; measure on a quiet machine.")
    print(machine())
    print(f"ratio_1proc={mine['tokens_per_s'] / base['tokens_per_s']:.2f} (ours / 1 process x {threads} threads)")
    print(f"ratio={mine['tokens_per_s'] / dist['tokens_per_s']:.2f}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
