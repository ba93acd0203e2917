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
Prints both figures and `ratio_warm=<ours/baseline>`.

Then the whole command, as a user pays it once (first run, fresh processes, imports included):

    ours      `llmos data prepare` of the same corpus with the tokenizer saved above (data.tokenizer=):
              Ray start, both splits, cleaning, exact counts, the parquet writes; tokens from its stats.json
    baseline  Hugging Face `datasets`, as its run_clm.py example does it: load_dataset("text",
              sample_by="document") of the same files, map(tokenize, batched, num_proc=2), map(group_texts,
              num_proc=2), save_to_disk; a fresh cache directory (first run)

and `ratio=<ours/baseline>` (tokens/s of the whole command) last.

    .venv/bin/python bench/data_pipeline.py [--num-cpus 2] [--max-documents N] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
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
    from llmos_ray.data.default_corpus import stdlib_sources

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
    print(f"ratio_warm={ours / base:.2f}")
    ray.shutdown()

    tok_dir = os.path.join(out, "bench-tokenizer")
    tok.save_pretrained(tok_dir)
    files = [s.uri.removeprefix("file://") for s in stdlib_sources()][: args.max_documents]
    ours_cmd, ours_tok = prepare_command(tok_dir, args, os.path.join(out, "prepare"))
    hf_cmd, hf_tok = hf_command(tok_dir, files, cfg.data.seq_len, os.path.join(out, "hf"))
    print(f"whole command, ours: `llmos data prepare`: {ours_tok / ours_cmd:,.0f} tokens/s ({ours_tok:,} tokens, both "
          f"splits, in {ours_cmd:.1f} s)")
    print(f"whole command, baseline: HF datasets map(num_proc=2) + group_texts + save_to_disk: {hf_tok / hf_cmd:,.0f} "
          f"tokens/s ({hf_tok:,} tokens in {hf_cmd:.1f} s)")
    print(f"load average {os.getloadavg()[0]:.1f}")
    print(f"ratio={(ours_tok / ours_cmd) / (hf_tok / hf_cmd):.2f}")


def prepare_command(tok_dir: str, args, out: str) -> tuple[float, int]:
    """`llmos data prepare` in a fresh process (its own Ray): seconds, tokens of both splits."""
    cmd = [sys.executable, "-m", "llmos_ray.cli", "data", "prepare", f"run.output_dir={out}",
           f"data.tokenizer={tok_dir}", f"data.seq_len={args.seq_len}"]
    if args.max_documents:
        cmd.append(f"data.max_documents={args.max_documents}")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, as a user's first run
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    with open(os.path.join(out, "stats.json")) as f:
        stats = json.load(f)
    return seconds, stats["tokens"] + stats["val_tokens"]


HF_SCRIPT = r"""
import itertools, json, sys
from datasets import load_dataset
from transformers import AutoTokenizer

tok_dir, files, block, out, cache = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
tok = AutoTokenizer.from_pretrained(tok_dir)
raw = load_dataset("text", data_files=files, sample_by="document", split="train", cache_dir=cache)

def tokenize(batch):
    return {"input_ids": [ids + [tok.eos_token_id] for ids in tok(batch["text"])["input_ids"]]}

def group_texts(batch):
    ids = list(itertools.chain.from_iterable(batch["input_ids"]))
    n = len(ids) // block * block
    return {"input_ids": [ids[i:i + block] for i in range(0, n, block)]}

ids = raw.map(tokenize, batched=True, num_proc=2, remove_columns=["text"])
tokens = sum(len(x) for x in ids["input_ids"])
ids.map(group_texts, batched=True, num_proc=2).save_to_disk(out)
print("TOKENS", tokens)
"""


def hf_command(tok_dir: str, files: list[str], seq_len: int, out: str) -> tuple[float, int]:
    """The Hugging Face `datasets` way in a fresh process: seconds, tokens (each document + EOS)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", HF_SCRIPT, tok_dir, json.dumps(files), str(seq_len + 1), out,
                           out + "-cache"], check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    return seconds, int(next(x for x in proc.stdout.splitlines() if x.startswith("TOKENS")).split()[1])


if __name__ == "__main__":
    main()
