"""Benchmark: tokens/s of the corpus pipeline against plain `tokenizers.encode_batch`.

    ours      packed_dataset(cfg, tok, "train") — read files → clean → tokenize → pack in Ray Data —
              consumed by one iterator (iter_batches + iter_blocks), timed from building the dataset
              to the last block, with Ray already running
    baseline  the same tokenizer's `encode_batch` (Rust, all cores) on the same cleaned documents,
              already in memory, in this one process

Both count the same tokens (each document + EOS); the run checks they agree. Corpus: the default
one (the Python standard library, ~12 MB), or --max-documents of it. The tokenizer is trained
first (not timed). Each side runs --repeat times, alternating, and the best time counts (as
timeit does: on a shared machine the best run is the one least disturbed by other work).
Prints both figures and `ratio=<ours/baseline>` last.

    .venv/bin/python bench/data_pipeline.py [--num-cpus 2] [--max-documents N] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs given to Ray (default 2)")
    parser.add_argument("--max-documents", type=int, default=None, help="cap the default corpus")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-docs", type=int, default=None, help="data.batch_docs (default: the config's)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each side; the best counts")
    args = parser.parse_args()

    import ray

    from llmos_ray.config import load_config
    from llmos_ray.data import get_tokenizer, iter_blocks, iter_documents, packed_dataset

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING")
    out = tempfile.mkdtemp(prefix="llmos-bench-data-")
    overrides = {"run.output_dir": out, "data.vocab_size": args.vocab_size, "data.seq_len": args.seq_len,
                 "data.tokenizer_sample_bytes": 2_000_000, "data.max_documents": args.max_documents}
    if args.batch_docs:
        overrides["data.batch_docs"] = args.batch_docs
    cfg = load_config(None, overrides)
    tok = get_tokenizer(cfg)
    block_len = cfg.data.seq_len + 1

    texts = list(iter_documents(cfg.data, "train"))
    backend = tok.backend_tokenizer

    def baseline() -> tuple[float, int]:
        start = time.perf_counter()
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        seconds = time.perf_counter() - start
        return seconds, sum(len(e.ids) for e in encodings) + len(texts)  # + one EOS per document

    def pipeline() -> tuple[float, int, int, int]:
        start = time.perf_counter()
        ds = packed_dataset(cfg, tok, "train")
        blocks = iter_blocks(ds.iter_batches(batch_format="numpy", batch_size=256), block_len)
        n_blocks = sum(1 for _ in blocks)
        seconds = time.perf_counter() - start
        return seconds, n_blocks * block_len + blocks.leftover, n_blocks, blocks.leftover

    base_runs, ours_runs = [], []
    for _ in range(args.repeat):
        ours_runs.append(pipeline())
        base_runs.append(baseline())
    base_seconds, base_tokens = min(base_runs)
    ours_seconds, ours_tokens, n_blocks, leftover = min(ours_runs)
    if ours_tokens != base_tokens:
        raise SystemExit(f"token counts differ: pipeline {ours_tokens}, encode_batch {base_tokens}")

    ours, base = ours_tokens / ours_seconds, base_tokens / base_seconds
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus; ray num_cpus={args.num_cpus}; "
          f"tokenizers parallelism={os.environ.get('TOKENIZERS_PARALLELISM', 'default')}")
    print(f"corpus: {len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f} M chars, {base_tokens:,} tokens, "
          f"vocab {len(tok)}, seq_len {cfg.data.seq_len}, batch_docs {cfg.data.batch_docs}")
    print(f"ours:     {ours:,.0f} tokens/s (best of {args.repeat}: {ours_seconds:.2f} s; all: "
          f"{', '.join(f'{r[0]:.2f}' for r in ours_runs)}; {n_blocks} blocks + {leftover} leftover tokens)")
    print(f"baseline: {base:,.0f} tokens/s (best of {args.repeat}: {base_seconds:.2f} s; all: "
          f"{', '.join(f'{r[0]:.2f}' for r in base_runs)}; encode_batch in one process)")
    print(f"ratio={ours / base:.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
