"""`llmos data prepare`: read, clean, tokenize and pack a corpus once, and account for it.

Writes, under run.output_dir (local path or fsspec URI):

    config.yaml                      the resolved config
    tokenizer/                       the run's tokenizer (trained unless data.tokenizer is set)
    data/train/part-00000.parquet …  rows {"input_ids": list<int32>} in stream order: seq_len + 1
    data/val/part-00000.parquet …    tokens each, tail rows shorter (join them with iter_blocks)
    stats.json                       written last, so its presence means the rest is complete

stats.json holds the ledger's counts (records, documents, train/val documents, bad_records,
dropped_short, duplicates, bad_by_file with line numbers), token and block counts, and timing.
`blocks` is what one consumer gets through `iter_blocks`: tokens // (seq_len + 1).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import time
from typing import Optional

from llmos_ray.errors import DataError

log = logging.getLogger(__name__)

PART_TOKENS = 64 << 20  # tokens per parquet part file (256 MB of int32)
PROGRESS_SECONDS = 10.0
_SUMMED = ("records", "documents", "train_documents", "val_documents", "dropped_short", "duplicates",
           "bad_records", "chars")


def prepare(cfg) -> dict:
    """Run the corpus pipeline for `cfg` and write tokenizer, packed splits and stats.json (see
    module doc). Returns the stats (`summary(stats)` says what was written and the next command)."""
    from llmos_ray.data.corpus import check_corpus
    from llmos_ray.runtime import run_log

    cfg = cfg.resolved()
    check_corpus(cfg.data)
    with run_log(cfg.run.output_dir):
        return _prepare(cfg)


def _prepare(cfg) -> dict:
    import fsspec

    from llmos_ray.config import save_config
    from llmos_ray.data.corpus import resolve_corpus
    from llmos_ray.data.pipeline import has_validation, in_one_pass
    from llmos_ray.data.stats import corpus_stats
    from llmos_ray.data.tokenizer import get_tokenizer, tokenizer_dir
    from llmos_ray.errors import reraise_ours
    from llmos_ray.runtime import init_ray

    start = time.time()
    out = cfg.run.output_dir.rstrip("/")
    fs, root = fsspec.core.url_to_fs(out)
    if fs.exists(f"{root}/stats.json"):
        fs.rm(f"{root}/stats.json")
    save_config(cfg, f"{out}/config.yaml")
    # The tokenizer (loading one imports torch and transformers, ~5 s on 2 slow cores; or training one)
    # needs no Ray: it comes while Ray starts, whose own start mostly waits for its daemons.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenizer") as pool:
        pending = pool.submit(get_tokenizer, cfg)
        init_ray()
        with reraise_ours():
            tokenizer = pending.result()
    with reraise_ours():
        # A held-out share streams with the training split in one pass over the corpus.
        first = "both" if in_one_pass(cfg.data) else "train"
        dests = {"train": f"{out}/data/train", "val": f"{out}/data/val"}
        written = _write_splits(cfg, tokenizer, first, dests if first == "both" else {"train": dests["train"]})
        train, val = written["train"], written.get("val")
        counts = corpus_stats(cfg, first)
        if train["tokens"] == 0:
            raise DataError(f"the corpus left no training documents: {_describe(counts, cfg)}")
        if val is None and has_validation(cfg.data):
            val = _write_splits(cfg, tokenizer, "val", {"val": dests["val"]})["val"]
            if cfg.data.val_paths:
                counts = _merge(counts, corpus_stats(cfg, "val"))
        if val is not None and val["tokens"] == 0:
            log.warning("the validation split is empty: no document fell in data.val_fraction=%g of %d; raise "
                        "it or set data.val_paths", cfg.data.val_fraction, counts.get("documents", 0))
    block_len = cfg.data.seq_len + 1
    seconds = time.time() - start
    corpus = resolve_corpus(cfg.data, "train")
    stats = {
        "corpus": corpus.description, "files": len(corpus.sources),
        **{k: counts.get(k, 0) for k in _SUMMED},
        "tokens": train["tokens"], "blocks": train["tokens"] // block_len, "rows": train["rows"],
        "val_tokens": val["tokens"] if val else 0, "val_blocks": val["tokens"] // block_len if val else 0,
        "val_rows": val["rows"] if val else 0,
        # Validation stops at data.val_max_blocks rows: a separate val corpus is then counted only
        # up to there, and a held-out share may have more documents than the rows written hold.
        "val_capped": bool(val) and val["rows"] >= cfg.data.val_max_blocks,
        "seq_len": cfg.data.seq_len, "block_len": block_len, "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "tokenizer": cfg.data.tokenizer or tokenizer_dir(cfg),
        "train_dir": f"{out}/data/train", "val_dir": f"{out}/data/val" if val else None,
        "bad_count_by_file": counts.get("bad_count_by_file", {}),
        "bad_by_file": counts.get("bad_by_file", {}),
        "seconds": round(seconds, 2), "tokens_per_second": round(train["tokens"] / max(seconds, 1e-9)),
        "output_dir": out,
    }
    with fs.open(f"{root}/stats.json", "w") as f:
        json.dump(stats, f, indent=2)
    return stats


class _Parts:
    """One split's packed rows into parquet part files under `dest`, in order; at most `cap` rows."""

    def __init__(self, dest: str, cap: Optional[int] = None):
        import fsspec

        self.dest, self.cap = dest, cap
        self.fs, self.root = fsspec.core.url_to_fs(dest)
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)
        self.fs.makedirs(self.root, exist_ok=True)
        self.rows = self.tokens = self.parts = self._part_tokens = 0
        self._writer = self._file = None

    def write(self, batch) -> None:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        from llmos_ray.data.pipeline import PACKED_SCHEMA

        if self.cap is not None:
            batch = batch.slice(0, max(self.cap - self.rows, 0))
        if batch.num_rows == 0:
            return
        if self._writer is None:
            self._file = self.fs.open(f"{self.root}/part-{self.parts:05d}.parquet", "wb")
            self._writer = pq.ParquetWriter(self._file, PACKED_SCHEMA, compression="zstd")
            self.parts += 1
        self._writer.write_table(batch.select(["input_ids"]).cast(PACKED_SCHEMA))
        n = pc.sum(pc.list_value_length(batch.column("input_ids"))).as_py() or 0
        self.rows, self.tokens, self._part_tokens = self.rows + batch.num_rows, self.tokens + n, self._part_tokens + n
        if self._part_tokens >= PART_TOKENS:
            self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._file.close()
            self._writer = self._file = None
            self._part_tokens = 0

    def result(self) -> dict:
        return {"rows": self.rows, "tokens": self.tokens, "parts": self.parts}


def _write_splits(cfg, tokenizer, split: str, dests: dict[str, str]) -> dict[str, dict]:
    """Stream the packed rows of `split` ("train", "val", or "both": one pass) into parquet part files
    under each split's destination in `dests`, in order; validation capped at data.val_max_blocks rows.
    Per split: {"rows", "tokens", "parts"}."""
    import pyarrow.compute as pc

    from llmos_ray.data.pipeline import SPLITS, packed_dataset
    from llmos_ray.data.stats import corpus_stats

    parts = {name: _Parts(dest, cfg.data.val_max_blocks if name == "val" else None) for name, dest in dests.items()}
    ds = packed_dataset(cfg, tokenizer, split)
    started = last_log = time.time()
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if split != "both":
                parts[split].write(batch)
            else:
                for code, name in enumerate(SPLITS):
                    parts[name].write(batch.filter(pc.equal(batch.column("split"), code)))
            if time.time() - last_log >= PROGRESS_SECONDS:
                last_log = time.time()
                read = corpus_stats(cfg, split).get("records", 0)
                tokens = sum(p.tokens for p in parts.values())
                log.info("%s: %d records read, %s tokens packed (%.0f tokens/s)", split, read, f"{tokens:,}",
                         tokens / (last_log - started))
    finally:
        for p in parts.values():
            p.close()
    for name, p in parts.items():
        log.info("%s: %s tokens in %d rows, %d part file(s) -> %s (%.1f s)", name, f"{p.tokens:,}", p.rows, p.parts,
                 p.dest, time.time() - started)
    return {name: p.result() for name, p in parts.items()}


def _merge(a: dict, b: dict) -> dict:
    merged = {k: a.get(k, 0) + b.get(k, 0) for k in _SUMMED}
    merged["bad_by_file"] = {**a.get("bad_by_file", {}), **b.get("bad_by_file", {})}
    merged["bad_count_by_file"] = {**a.get("bad_count_by_file", {}), **b.get("bad_count_by_file", {})}
    return merged


def _describe(counts: dict, cfg) -> str:
    return (f"{counts.get('records', 0)} records read: {counts.get('bad_records', 0)} bad, "
            f"{counts.get('dropped_short', 0)} shorter than data.min_chars={cfg.data.min_chars}, "
            f"{counts.get('duplicates', 0)} duplicates, {counts.get('val_documents', 0)} held out for validation")


def summary(s: dict, command: str = "llmos") -> str:
    """The stats of `prepare` for the terminal: what was kept and dropped, where it went, what next
    (`command` is how the user's shell reaches llmos)."""
    out = s["output_dir"]
    lines = [
        f"corpus     {s['corpus']}",
        f"documents  {s['documents']:,} kept ({s['train_documents']:,} train, {s['val_documents']:,} val) of "
        f"{s['records']:,} read; dropped {s['bad_records']:,} bad, {s['dropped_short']:,} short, "
        f"{s['duplicates']:,} duplicate",
        f"tokens     {s['tokens']:,} train = {s['blocks']:,} blocks of {s['block_len']}; {s['val_tokens']:,} val = "
        f"{s['val_blocks']:,} blocks",
    ]
    if s["bad_count_by_file"]:
        uri, n = next(iter(s["bad_count_by_file"].items()))
        first = s["bad_by_file"][uri][0]
        lines.append(f"bad        {s['bad_records']:,} in {len(s['bad_count_by_file'])} file(s); e.g. {uri} "
                     f"line {first['line']}: {first['reason']} (all in stats.json)")
    lines += [
        f"written    {out}/data, {s['tokenizer']}, {out}/stats.json in {s['seconds']:.1f} s "
        f"({s['tokens_per_second']:,} tokens/s)",
        f"next       {command} pretrain --config {out}/config.yaml",
    ]
    return "\n".join(lines)
