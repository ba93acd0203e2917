"""Benchmark: SFT tokens/s (non-padding tokens trained per second) with data.packing=reset against
today's padded batches (data.packing=concat: one right-padded example per row).

    baseline  the embedded instruction set (llmos_ray.data.instructions, chat format), one example per
              row of seq_len + 1 tokens, right-padded: what `llmos finetune` trains on by default.
    ours      the same examples packed several to a row (data.sft.pack_examples, first-fit decreasing),
              each a segment of its own: position ids restart, attention stays inside the segment
              (a 4-D block-diagonal mask through SDPA on CPU), loss masks per example.

Both: run_training(job="finetune") on the same preset model from the same seed, the same workers,
threads, micro-batch, steps and schedule, one after the other in one Ray session. A figure is the
non-padding tokens of the rows each run trained (the ArrayReader takes rows in order) divided by the
seconds of its measured steps (the loop's own step_time_s per log window, the first --skip-windows
windows dropped). Prints both, the fill of each layout, and `ratio=<packed/padded>` last (goal >= 2).

    .venv/bin/python bench/sft_packing.py [--steps 12] [--log-every 3] [--size tiny] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import numpy as np

# bench/ is on sys.path: it is the script's directory.
from _common import machine, run_config, start_ray, stdlib_sources


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12, help="optimizer steps in each run (default 12)")
    p.add_argument("--log-every", type=int, default=3, help="metrics window, in steps (default 3)")
    p.add_argument("--skip-windows", type=int, default=1, help="leading windows left out of the figure (default 1)")
    p.add_argument("--family", default="gpt2")
    p.add_argument("--size", default="tiny", help="model preset (default tiny)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--micro-batch", type=int, default=4, help="rows per worker per forward (default 4)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs given to Ray (default 4)")
    args = p.parse_args()
    if args.steps <= args.log_every * args.skip_windows:
        p.error("--steps must exceed --log-every x --skip-windows, or nothing is measured")
    return args


def examples(seq_len: int, vocab_size: int):
    """A BPE trained on the stdlib (as the other benchmarks), given a chat template, and the
    embedded instruction set's train split encoded as SFT examples."""
    from llmos_ray.data.instructions import stdlib_instructions
    from llmos_ray.data.sft import build_examples, ensure_chat_template
    from llmos_ray.data.tokenizer import train_tokenizer

    tok = train_tokenizer(stdlib_sources()[:60], vocab_size=vocab_size)
    ensure_chat_template(tok)
    records = [("llmos:stdlib-instructions", i, r) for i, r in enumerate(stdlib_instructions("train"), 1)]
    return tok, build_examples(records, tok, seq_len)


def real_tokens(rows: np.ndarray, lengths: np.ndarray | None) -> np.ndarray:
    """Non-padding tokens of each row: the example's length (padded rows), or its segments' tokens."""
    return lengths if lengths is not None else (rows[:, 2] > 0).sum(axis=1)


def train(cfg, tok, rows: np.ndarray, per_row: np.ndarray, skip_steps: int) -> dict:
    from llmos_ray.train.deepspeed import accumulation_steps
    from llmos_ray.train.trainer import run_training

    result = run_training(cfg, tok, {"train": rows}, None, None, job="finetune")
    g = cfg.train.micro_batch_size * accumulation_steps(cfg, cfg.train.num_workers) * cfg.train.num_workers
    windows, prev = [], 0
    for h in result.history:
        if "step_time_s" in h:
            windows.append((prev + 1, h["step"], h["step_time_s"] * (h["step"] - prev), h["loss"]))
            prev = h["step"]
    if not windows or windows[-1][1] != cfg.train.max_steps:
        raise SystemExit(f"the run did not report every window up to step {cfg.train.max_steps}: {result.history}")
    tokens = seconds = 0.0
    for first, last, secs, _ in windows:
        if first > skip_steps:
            idx = np.arange((first - 1) * g, last * g) % len(rows)  # the reader's order, wrapping at an epoch
            tokens += float(per_row[idx].sum())
            seconds += secs
    return {"tokens_per_s": tokens / seconds, "step_s": seconds / (cfg.train.max_steps - skip_steps),
            "loss": windows[-1][3], "rows": len(rows)}


def main() -> int:
    args = parse_args()
    load_at_start = os.getloadavg()[0]
    import ray

    tok, ex = examples(args.seq_len, args.vocab_size)
    padded, packed = ex.blocks(), ex.packed_blocks()
    assert int(real_tokens(packed, None).sum()) == int(ex.lengths.sum())  # every example packed, whole
    width = args.seq_len + 1
    out = tempfile.mkdtemp(prefix="llmos-bench-sft-")
    common = {"model.base": None, "model.family": args.family, "model.size": args.size,
              "data.seq_len": args.seq_len, "train.num_workers": args.workers,
              "train.micro_batch_size": args.micro_batch, "train.max_steps": args.steps,
              "train.log_every": args.log_every, "train.checkpoint_every": args.steps,
              "deepspeed.zero_stage": 2, "finetune.lora": False}
    skip = args.log_every * args.skip_windows
    start_ray(args.num_cpus)
    try:
        figures = {}
        for mode, rows, per_row in (("concat", padded, ex.lengths), ("reset", packed, real_tokens(packed, None))):
            cfg = run_config(os.path.join(out, mode), {**common, "data.packing": mode})
            figures[mode] = train(cfg, tok, rows, per_row, skip)
    finally:
        ray.shutdown()
        shutil.rmtree(out, ignore_errors=True)
    base, ours = figures["concat"], figures["reset"]
    n = len(ex.lengths)
    print(f"\ndata: {n} examples of the embedded instruction set, {int(ex.lengths.sum()):,} tokens, mean "
          f"{ex.lengths.mean():.0f}, max {ex.lengths.max()} (seq_len {args.seq_len})")
    print(f"model: {args.family} {args.size} preset, vocab {len(tok)}; {args.workers} workers x micro-batch "
          f"{args.micro_batch}; {args.steps} steps, steps {skip + 1}-{args.steps} measured; fp32, ZeRO-2, CPU")
    for name, f, rows in (("baseline, padded (data.packing=concat)", base, padded),
                          ("ours, packed with boundaries (data.packing=reset)", ours, packed)):
        fill = int(ex.lengths.sum()) / (len(rows) * width)
        print(f"{name}: {f['tokens_per_s']:9,.0f} non-padding tokens/s ({f['step_s']:.3f} s/step; {f['rows']} rows, "
              f"fill {fill:.1%}; last loss {f['loss']:.3f})")
    if load_at_start > 0.5:
        print(f"WARNING: the machine was busy (load average {load_at_start:.1f} at start): these timings are noise; "
              "measure on a quiet machine.")
    print(machine())
    print(f"ratio={ours['tokens_per_s'] / base['tokens_per_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
