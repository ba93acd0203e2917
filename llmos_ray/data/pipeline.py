"""Ray Data pipelines: corpus → cleaned documents → tokenized blocks of seq_len + 1 tokens.

    ReadCorpus       tasks    read units (consecutive sources, 1-64 MB) → blocks of records
    limit            —        data.max_documents records (when set)
    CountAndSplit    1 actor  the ledger: counts, drops bad/short/duplicates, keeps one split,
                              emits one row {"texts"} per data.batch_docs documents
    TokenizeAndPack  tasks    one such row → rows {"input_ids": int32} of seq_len + 1 tokens
    limit            —        data.val_max_blocks rows (validation only)

Split "both" (a held-out share of one plain corpus: what `llmos data prepare` writes) streams both
splits in one pass: the ledger's rows and the packed rows carry `split` (0 train, 1 val), and each
split's rows are exactly those of its own pipeline, in the same order (the consumer caps val).

Execution preserves order (`preserve_order=True` on each dataset's context), and a batch of
documents is one row, so batch boundaries (hence the tail rows) depend only on the documents —
not on how Ray sizes blocks or how many read tasks there are: the stream is the same on every run
and cluster, documents in corpus order, rows in document order. Every task asks for at most 1 CPU
(and tokenizes on one thread); the ledger asks for none. Nothing is materialised: a consumer
streams the rows (`iter_batches`, or Ray Train's `get_dataset_shard` / `streaming_split`) and
joins the tail rows with `llmos_ray.data.iter_blocks`. Ray Train replaces a dataset's execution options with its own
`DataConfig`'s: pass `ray.train.DataConfig(execution_options=ingest_options())` to keep the order.

Bad files raise `DataError` inside a Ray task; wrap consumption in `errors.reraise_ours()` to get
the `DataError` itself rather than Ray's wrapper with the remote traceback.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import uuid
import warnings
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llmos_ray.data.corpus import resolve_corpus
from llmos_ray.data.documents import READ_SCHEMA, Ledger, read_blocks, record_limit
from llmos_ray.data.mix import MixLedger
from llmos_ray.data.pack import pack_documents
from llmos_ray.data.sources import Corpus, Source
from llmos_ray.data.stats import stats_actor
from llmos_ray.errors import DataError

log = logging.getLogger(__name__)

READ_UNIT_BYTES = (4 << 20, 64 << 20)
"""A read unit (one task) holds consecutive sources until their stored size reaches 1/64 of the
corpus, kept within these bounds: small corpora still stream through several tasks."""
READ_UNIT_FILES = 512
"""... or until this many files are in the unit."""
BATCH_SCHEMA = pa.schema([("texts", pa.list_(pa.large_string()))])
PACKED_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32()))])
SPLITS = ("train", "val")
"""The `split` column's values of a "both" pipeline: index into this."""


def in_one_pass(data) -> bool:
    """Whether both splits of `data` can stream in one pass (split "both"): validation held out of
    a plain corpus by key (not a separate data.val_paths corpus, not a data.mix mixture)."""
    return data.val_fraction > 0 and not data.val_paths and not data.mix


def has_validation(data) -> bool:
    """Whether a DataConfig defines a validation split (data.val_paths or data.val_fraction > 0)."""
    return bool(data.val_paths) or data.val_fraction > 0


def ingest_options():
    """Ray Data ExecutionOptions for Ray Train's DataConfig: the current ones, order preserved."""
    from ray.data import DataContext, ExecutionOptions

    current = DataContext.get_current().execution_options
    return ExecutionOptions(resource_limits=current.resource_limits, exclude_resources=current.exclude_resources,
                            preserve_order=True, verbose_progress=current.verbose_progress)


def read_units(sources: list[Source]) -> list[list[int]]:
    """Group consecutive sources into read units (one Ray task each), by stored size and count."""
    low, high = READ_UNIT_BYTES
    target = min(max(sum(s.size for s in sources) // 64, low), high)
    units: list[list[int]] = []
    unit: list[int] = []
    size = 0
    for i, source in enumerate(sources):
        unit.append(i)
        size += source.size
        if size >= target or len(unit) >= READ_UNIT_FILES:
            units.append(unit)
            unit, size = [], 0
    if unit:
        units.append(unit)
    return units


def documents_dataset(cfg, split: str = "train"):
    """The cleaned documents of `split` ("train" or "val") as a Ray Dataset of rows {"text"}, in
    corpus order. Counts are published while it streams (`corpus_stats(cfg, split)`)."""

    def explode(batch: pa.Table) -> pa.Table:
        return pa.table({"text": pc.list_flatten(batch.column("texts"))})

    # A cheap step: a quarter CPU, so it never waits behind the CPU-bound stages.
    return document_batches(cfg, split).map_batches(explode, batch_format="pyarrow", batch_size=None, num_cpus=0.25)


def document_batches(cfg, split: str = "train"):
    """The cleaned documents of `split` in rows {"texts": [data.batch_docs documents]} (the last
    row may hold fewer), in corpus order: the input of the packing stage. Split "both": rows
    {"texts", "split"} of either split (`in_one_pass` says when)."""
    import ray

    data = cfg.data
    if split == "val" and not has_validation(data):
        raise DataError("no validation split: set data.val_fraction > 0 or data.val_paths")
    if split == "both" and not in_one_pass(data):
        raise DataError("both splits stream in one pass only when data.val_fraction holds validation out of "
                        "data.paths (no data.val_paths, no data.mix)")
    corpus = resolve_corpus(data, "train" if split == "both" else split)
    units, ends = mix_units(corpus) if corpus.mix else plain_units(corpus)
    log.info("%s corpus: %s (%d read task%s)", split, corpus.description, len(units), "s"[:len(units) != 1])
    board = stats_actor(cfg.run.name, split)
    ds = ray.data.from_items([{"unit": i} for i in range(len(units))], override_num_blocks=len(units))
    ds.context.execution_options.preserve_order = True
    ds = ds.map_batches(ReadCorpus(corpus, units, ends), batch_size=1, batch_format="numpy", num_cpus=1)
    # A mixture caps the documents it mixes (in its ledger), a plain corpus the records read.
    limit = record_limit(data, "train" if split == "both" else split) if not corpus.mix else None
    if limit is not None:
        ds = ds.limit(limit)
    ledger = MixLedger.for_config(data, corpus, split) if corpus.mix else Ledger.for_config(data, corpus, split)
    stage = {"ledger": ledger, "board": board, "batch_docs": data.batch_docs, "record_limit": limit,
             "run_name": cfg.run.name}
    with warnings.catch_warnings():
        # The ledger is stateful and must see blocks in corpus order: Ray Data lets map actors run
        # tasks out of order by default, and restarts them (which would restart the counts). Both
        # settings go through Ray's deprecated **ray_remote_args; there is no named parameter yet.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        return ds.map_batches(CountAndSplit, fn_constructor_kwargs=stage, batch_size=None, batch_format="pyarrow",
                              zero_copy_batch=True, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0,
                              allow_out_of_order_execution=False, max_restarts=0)


def packed_dataset(cfg, tokenizer, split: str = "train"):
    """Tokenized documents of `split` packed into rows {"input_ids": int32[seq_len + 1]}.

    Each batch of data.batch_docs documents is tokenized (no special tokens added), each
    document followed by EOS, and cut into rows of seq_len + 1 tokens plus at most one shorter
    tail row; consumers join tails with `iter_blocks`. `tokenizer` is a transformers tokenizer
    (see `get_tokenizer`) or a directory. Validation is capped at data.val_max_blocks rows. Split
    "both": rows {"input_ids", "split"} of both splits, validation not capped (the consumer does)."""
    if isinstance(tokenizer, str):
        from llmos_ray.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    data = cfg.data
    # One batch of documents per packing task, however the ledger's output blocks were formed.
    ds = document_batches(cfg, split).repartition(target_num_rows_per_block=1)
    ds = ds.map_batches(TokenizeAndPack(tokenizer, data.seq_len + 1), batch_size=1, batch_format="pyarrow",
                        zero_copy_batch=True, num_cpus=1)
    if split == "val":
        ds = ds.limit(data.val_max_blocks)
    return ds


def plain_units(corpus: Corpus) -> tuple[list[list[int]], dict[int, list[int]]]:
    """Read units of a corpus in order; the corpus ends after the last one."""
    units = read_units(corpus.sources)
    return units, {len(units) - 1: [0]}


def mix_units(corpus: Corpus) -> tuple[list[list[int]], dict[int, list[int]]]:
    """Read units of a mixture (data.mix) and where each component ends: every component's sources
    in units of their own (`read_units`), the units of all components ordered by when the mixture
    needs them — a unit's bytes before it in its component over the component's weight — so the
    ledger's buffers stay small; the order changes no document (the Interleaver decides that)."""
    keyed = []
    for c, part in enumerate(corpus.mix):
        indices = [i for i, owner in enumerate(corpus.component_of) if owner == c]
        before = 0
        for unit in read_units([corpus.sources[i] for i in indices]):
            keyed.append((before / part.weight, c, [indices[j] for j in unit]))
            before += sum(corpus.sources[indices[j]].size for j in unit)
    keyed.sort(key=lambda k: (k[0], k[1]))
    units = [unit for _, _, unit in keyed]
    ends: dict[int, list[int]] = {}
    for c in range(len(corpus.mix)):
        ends.setdefault(max(i for i, k in enumerate(keyed) if k[1] == c), []).append(c)
    return units, ends


class ReadCorpus:
    """Ray Data UDF: a batch of read-unit numbers → blocks of records (documents.READ_SCHEMA).

    The last unit of the corpus (of each component, for a mixture) ends with a one-row marker
    block (`end_of_corpus`) telling the ledger that nothing more comes."""

    def __init__(self, corpus: Corpus, units: list[list[int]], ends: Optional[dict[int, list[int]]] = None):
        self.corpus, self.units = corpus, units
        self.ends = ends if ends is not None else {len(units) - 1: [0]}

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[pa.Table]:
        for unit in batch["unit"]:
            yield from read_blocks(self.corpus, self.units[int(unit)])
            for component in self.ends.get(int(unit), ()):
                yield end_of_corpus(component)


def end_of_corpus(component: int = 0) -> pa.Table:
    """The marker row after the last record (of a mixture's component `component`): file -1 - component."""
    return pa.table({"file": [-1 - component], "line": [0], "text": [None], "reason": [None], "key": [bytes(16)],
                     "bucket": [0]}, schema=READ_SCHEMA)


class CountAndSplit:
    """Ray Data actor UDF: the `Ledger` (sees every block in corpus order, publishes its counts;
    a `MixLedger` for a mixture), then `Batcher`: one output row per data.batch_docs documents."""

    def __init__(self, ledger, board, batch_docs: int, record_limit: Optional[int] = None, run_name: str = ""):
        import ray

        self._ray = ray
        self.ledger, self.board = ledger, board
        both = getattr(ledger, "split", None) == "both"
        self.batchers = [Batcher(batch_docs) for _ in (SPLITS if both else SPLITS[:1])]
        self.record_limit = record_limit
        self.run_name = run_name
        self.execution = uuid.uuid4().hex
        self._reported_bad = -1
        self._gauge = None
        self._report()

    def __call__(self, block: pa.Table) -> pa.Table:
        files = block.column("file").to_numpy()
        start = 0
        for at in [*np.flatnonzero(files < 0).tolist(), block.num_rows]:  # end markers: file -1 - component
            if at > start:
                self._push(self.ledger.add(block.slice(start, at - start)))
            if at < block.num_rows:
                self._push(self.ledger.close(-1 - int(files[at])))
            start = at + 1
        self._report()
        ended = self.ledger.done or (self.record_limit is not None and self.ledger.records >= self.record_limit)
        if len(self.batchers) == 1:
            return self.batchers[0].pop(final=ended)
        rows = [b.pop(final=ended) for b in self.batchers]
        split = pa.array(np.repeat(np.arange(len(rows), dtype=np.int8), [r.num_rows for r in rows]))
        return pa.concat_tables(rows).append_column("split", split)

    def _push(self, documents: pa.Table) -> None:
        """The ledger's documents to the batcher of their split ({text, val}: a "both" ledger's)."""
        if "val" not in documents.column_names:
            return self.batchers[0].push(documents)
        val = documents.column("val")
        self.batchers[0].push(documents.filter(pc.invert(val)))
        self.batchers[1].push(documents.filter(val))

    def _report(self) -> None:
        counts = self.ledger.counts()
        if self.ledger.bad_records == self._reported_bad:  # unchanged: keep the board's copy
            counts.pop("bad_by_file")
            counts.pop("bad_count_by_file")
        self._reported_bad = self.ledger.bad_records
        self._ray.get(self.board.update.remote(self.execution, counts))
        if "mix" in counts:
            self._publish_mix(counts["mix"])

    def _publish_mix(self, mix: dict) -> None:
        """The realized share of each mixture component, as the Ray metric llmos_data_mix_share (dashboard)."""
        try:
            from ray.util.metrics import Gauge

            if self._gauge is None:
                self._gauge = Gauge("llmos_data_mix_share", description="share of a data.mix component in the "
                                    "documents mixed so far", tag_keys=("run", "component"))
            for name, c in mix.items():
                self._gauge.set(float(c["share"]), tags={"run": self.run_name, "component": name})
        except Exception as e:  # metrics are best effort
            log.debug("ray metrics unavailable: %s", e)


class Batcher:
    """Groups an ordered stream of documents ({"text"} tables) into rows {"texts"} of exactly
    `size` documents; `pop(final=True)` also returns the remainder as a last, shorter row."""

    def __init__(self, size: int):
        self.size = size
        self.pending: list[pa.Array] = []
        self.count = 0

    def push(self, documents: pa.Table) -> None:
        if documents.num_rows:
            self.pending.append(documents.column("text").combine_chunks().cast(pa.large_string()))
            self.count += documents.num_rows

    def pop(self, final: bool = False) -> pa.Table:
        whole = self.count - self.count % self.size
        take = self.count if final else whole
        values = pa.concat_arrays(self.pending) if self.pending else pa.array([], pa.large_string())
        bounds = list(range(0, whole + 1, self.size)) + ([take] if take > whole else [])
        self.pending, self.count = ([values.slice(take)] if take < self.count else []), self.count - take
        if len(bounds) < 2:
            return BATCH_SCHEMA.empty_table()
        rows = pa.ListArray.from_arrays(pa.array(bounds, pa.int32()), values.slice(0, take))
        return pa.Table.from_arrays([rows], schema=BATCH_SCHEMA)


_ENCODERS: dict[str, Any] = {}  # per worker process: tokenizer key → loaded tokenizer


class TokenizeAndPack:
    """Ray Data UDF: one row {"texts"} (a batch of documents) → packed rows {"input_ids"}.

    Carries the tokenizer as its serialized JSON (fast tokenizers) and loads it once per worker
    process; encodes with the `tokenizers` backend directly (no special tokens added)."""

    def __init__(self, tokenizer, block_len: int):
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no eos token; documents are joined with it when packing")
        self.eos_id, self.block_len = int(tokenizer.eos_token_id), block_len
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            self.kind, self.payload = "tokenizers", backend.to_str().encode("utf-8")
        else:
            self.kind, self.payload = "transformers", pickle.dumps(tokenizer)
        self.key = hashlib.sha1(self.payload).hexdigest()

    def encode(self, texts: list[str]) -> list[list[int]]:
        enc = _ENCODERS.get(self.key)
        if enc is None:
            if self.kind == "tokenizers":
                from tokenizers import Tokenizer

                # This task holds one CPU: encode on one thread; tasks side by side use the others.
                os.environ["TOKENIZERS_PARALLELISM"] = "false"
                enc = Tokenizer.from_str(self.payload.decode("utf-8"))
            else:
                enc = pickle.loads(self.payload)
            _ENCODERS[self.key] = enc
        if self.kind == "tokenizers":
            return [e.ids for e in enc.encode_batch(texts, add_special_tokens=False)]
        return enc(texts, add_special_tokens=False)["input_ids"]

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = pc.list_flatten(batch.column("texts")).to_pylist()
        values, offsets = pack_documents(self.encode(texts), self.eos_id, self.block_len)
        packed = pa.Table.from_arrays([pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))],
                                      schema=PACKED_SCHEMA)
        if "split" in batch.column_names:  # a "both" pipeline: one batch of documents is of one split
            packed = packed.append_column("split", pa.array(np.full(packed.num_rows, batch["split"][0].as_py(),
                                                                    dtype=np.int8)))
        return packed
