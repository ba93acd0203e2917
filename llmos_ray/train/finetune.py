"""Fine-tuning (full or LoRA) and distillation: other data and another loss, the same trainer, loop,
checkpoints and export as pretraining (`run_training`)."""

from __future__ import annotations

import copy
import logging
import os
from typing import Optional

from llmos_ray.config import Config
from llmos_ray.errors import ConfigError, DataError, ModelError
from llmos_ray.train.trainer import TrainResult, progress_log, resolve_resume, run_training

log = logging.getLogger(__name__)

DEFAULT_BASE = os.path.join("runs", "default", "export")
"""Where `llmos pretrain` with no arguments exports: the base `llmos finetune` uses by default."""


def finetune(cfg: Config) -> TrainResult:
    """Supervised fine-tuning of `model.base` on `finetune.paths` (or the embedded instruction set);
    with finetune.task=classification, a sequence classifier (train/classification.py); with
    finetune.task=seq2seq, an encoder-decoder (train/seq2seq.py)."""
    from llmos_ray.runtime import init_ray, run_log

    cfg = cfg.resolved("finetune")
    if cfg.finetune.task == "classification":
        from llmos_ray.train.classification import finetune_classifier

        return finetune_classifier(cfg)
    if cfg.finetune.task == "seq2seq":
        from llmos_ray.train.seq2seq import finetune_seq2seq

        return finetune_seq2seq(cfg)
    cfg, resume_from, finished = resolve_resume(_with_base(cfg), "finetune")
    if finished is not None:
        return finished
    with run_log(cfg.run.output_dir):
        tokenizer, train, val = _examples(cfg)
        train_blocks, val_blocks = example_rows(cfg, train), example_rows(cfg, val)
        _check_batch(cfg, len(train_blocks))
        init_ray()
        if val_blocks is not None:
            val_blocks = val_blocks[: cfg.data.val_max_blocks]
        return run_training(cfg, tokenizer, {"train": train_blocks}, val_blocks, resume_from, job="finetune",
                            data_counts={"train": train.counts, "val": val.counts if val else None})


def example_rows(cfg: Config, examples):
    """The rows the loop trains on: one padded example each, or (data.packing=reset) several per row
    with boundaries; the packing's fill (real tokens / row capacity) goes into the counts."""
    if examples is None:
        return None
    rows = examples.packed_blocks() if cfg.data.packing == "reset" else examples.blocks()
    real = int(examples.lengths.sum())
    examples.counts["packing"] = {"mode": cfg.data.packing, "rows": len(rows), "tokens": real,
                                  "fill": round(real / max(1, rows.shape[0] * rows.shape[-1]), 4)}
    return rows


def _examples(cfg: Config):
    """(tokenizer with a chat template, train examples, held-out examples or None) of a fine-tuning run."""
    from llmos_ray.data import load_tokenizer
    from llmos_ray.data.sft import build_examples, ensure_chat_template

    tokenizer = load_tokenizer(cfg.model.base)
    ensure_chat_template(tokenizer)
    mixed: dict = {}
    train_records, val_records = instruction_records(cfg, mixed)
    seq_len, fmt, bad = cfg.data.seq_len, cfg.finetune.format, cfg.data.max_bad_fraction
    train = build_examples(train_records, tokenizer, seq_len, fmt, bad)
    val = build_examples(val_records, tokenizer, seq_len, fmt, 1.0) if val_records else None
    if mixed:
        train.counts["mix"] = mixed["train"]
    progress_log.info("fine-tuning data: %s%s", _describe(train.counts),
                      f"; held out: {val.counts['examples']}" if val else "")
    return tokenizer, train, val


def distill(cfg: Config) -> TrainResult:
    """Train a student (`model.base`, or the preset `model.family`/`model.size`) on the corpus
    against a frozen teacher's logits (`distill.teacher`), with the teacher's tokenizer."""
    from llmos_ray import data
    from llmos_ray.data.corpus import check_corpus
    from llmos_ray.runtime import init_ray, run_log
    from llmos_ray.train.trainer import corpus_datasets

    cfg = cfg.resolved("distill")
    if not cfg.distill.teacher:
        raise ConfigError("distill.teacher is required: the model directory or hub id to learn from")
    cfg, resume_from, finished = resolve_resume(cfg, "distill")
    if finished is not None:
        return finished
    with run_log(cfg.run.output_dir):
        check_corpus(cfg.data)
        tokenizer = data.load_tokenizer(cfg.distill.teacher)
        init_ray()
        train_ds, val_blocks = corpus_datasets(cfg, tokenizer)
        return run_training(cfg, tokenizer, {"train": train_ds}, val_blocks, resume_from, job="distill")


def _with_base(cfg: Config) -> Config:
    """model.base checked (a model directory, a hub id) or resolved (a model library reference: NAME,
    NAME@N, NAME:ALIAS), defaulting to the `llmos pretrain` export."""
    from llmos_ray import registry

    base = cfg.model.base
    if base is not None and registry.is_ref(base) and not os.path.exists(base) and \
            registry.parse_ref(base).name in registry.read_library(cfg.registry.uri)["models"]:
        uri, _, entry = registry.resolve_source(base, cfg.registry.uri)
        log.info("model.base %s is %s (%s)", base, uri, entry["ref"])
        cfg.model.base = base = uri
    if base is not None and (base.startswith(("/", ".", "~")) or os.path.exists(base)) \
            and not os.path.isfile(os.path.join(os.path.expanduser(base), "config.json")):
        raise ModelError(f"model.base={base!r} is not a model directory (no config.json); give an export "
                         "directory, e.g. runs/default/export, or a hub id")
    if cfg.model.base is None:
        if not os.path.isfile(os.path.join(DEFAULT_BASE, "config.json")):
            raise ConfigError(f"model.base is not set and there is no default export at {DEFAULT_BASE}: run "
                              f"`llmos pretrain` first, or pass model.base=<model directory or hub id>")
        cfg.model.base = os.path.abspath(DEFAULT_BASE)
    return cfg


def _check_batch(cfg: Config, n: int) -> None:
    per_step = cfg.train.micro_batch_size * cfg.train.num_workers
    if n < per_step:
        rows = "rows of packed examples" if cfg.data.packing == "reset" else "fine-tuning examples"
        raise DataError(f"{n} {rows} are fewer than one step needs "
                        f"(train.micro_batch_size * train.num_workers = {per_step})")


def _describe(counts: dict) -> str:
    return (f"{counts['examples']} examples from {counts['records']} records ({counts['formats']}); "
            f"{counts['bad_records']} bad, {counts['truncated']} truncated to data.seq_len, "
            f"{counts['no_target']} dropped with no target left")


def instruction_records(cfg: Config, mix_counts: Optional[dict] = None) -> tuple[list, list]:
    """(source, line, record) triples of the train and held-out splits. The user's files are split
    by a hash of each record (data.val_fraction); the embedded set has its own held-out split.
    With finetune.mix, each set is split alike and the splits are mixed by weight (`mix_counts`
    receives the realized shares of each split)."""
    from llmos_ray.data.documents import is_held_out
    from llmos_ray.data.instructions import stdlib_instructions
    from llmos_ray.data.sft import read_sft_records

    if cfg.finetune.mix:
        return _mixed_records(cfg, mix_counts if mix_counts is not None else {})
    if not cfg.finetune.paths:
        tag = "llmos:stdlib-instructions"
        return ([(tag, i, r) for i, r in enumerate(stdlib_instructions("train"), 1)],
                [(tag, i, r) for i, r in enumerate(stdlib_instructions("val"), 1)])
    train, val = [], []
    for source, line, record in read_sft_records(cfg.finetune.paths, cfg.data.storage_options):
        (val if is_held_out(f"{source}:{line}", cfg.data.val_fraction) else train).append((source, line, record))
    return train, val


def _mixed_records(cfg: Config, mix_counts: dict) -> tuple[list, list]:
    from llmos_ray.config import mix_components
    from llmos_ray.data.mix import interleave_lists

    parts = mix_components(cfg.finetune.mix, "finetune.mix")
    splits = []
    for part in parts:
        one = copy.deepcopy(cfg)
        one.finetune.mix, one.finetune.paths = [], list(part.paths)
        splits.append(instruction_records(one))
    names, weights = [p.name for p in parts], [p.weight for p in parts]
    train, mix_counts["train"] = interleave_lists([s[0] for s in splits], names, weights)
    val, mix_counts["val"] = interleave_lists([s[1] for s in splits], names, weights)
    return train, val
