"""Fine-tuning a sequence classifier (finetune.task=classification): labelled records → label names
→ token arrays → the same trainer, loop, checkpoints and export as every other run
(`run_training`), with the SequenceClassification task (tasks.py).

    result = finetune(load_config(None, ["finetune.task=classification"]))   # embedded language ID
    pipeline("text-classification", model=result.export_dir)("Fichier introuvable")  # [{'label': 'fr', ...}]

The model: `model.base` (our bert or gpt2/llama exports, a hub id) with a new classification head,
or — no base — a fresh preset of model.family (bert by default for this task) trained from
scratch on the labelled text, with a byte-level BPE tokenizer trained on the training texts
(data.vocab_size; saved in the run's directory, so a resumed run reuses it). Label names come
from the training split and go into the export's config.json (id2label/label2id).
"""

from __future__ import annotations

import logging

from llmos_ray.config import Config
from llmos_ray.errors import DataError
from llmos_ray.train.examples import train_on_examples
from llmos_ray.train.trainer import TrainResult, progress_log

log = logging.getLogger(__name__)


def finetune_classifier(cfg: Config) -> TrainResult:
    """Train a classifier on `finetune.paths` (or the embedded language-ID set); `cfg` is resolved."""
    return train_on_examples(cfg, classification_data)


def classification_data(cfg: Config):
    """(tokenizer, train Examples, held-out Examples or None, task info for the workers, source)."""
    from llmos_ray.data.classification import class_weights, encode_examples, label_names, labelled_records

    ft = cfg.finetune
    splits = labelled_records(cfg)
    labels = label_names(splits.train, ft.multi_label)
    if len(labels) < 2:
        raise DataError(f"classification needs at least 2 labels in the training split, found {labels} "
                        f"({len(splits.train)} training records)")
    tokenizer = classification_tokenizer(cfg, [r for _, _, r in splits.train])
    types = "token_type_ids" in tokenizer.model_input_names and _uses_token_types(cfg)
    seq_len, multi = cfg.data.seq_len, ft.multi_label
    train = encode_examples(splits.train, tokenizer, labels, seq_len, multi, types, cfg.data.max_bad_fraction)
    val = encode_examples(splits.val, tokenizer, labels, seq_len, multi, types) if splits.val else None
    progress_log.info("classification data: %d training examples of %d labels (%d bad records, %d truncated to "
                      "data.seq_len)%s", train.counts["examples"], len(labels), train.counts["bad_records"],
                      train.counts["truncated"], f"; held out: {val.counts['examples']}" if val else "")
    per_step = cfg.train.micro_batch_size * cfg.train.num_workers
    if train.counts["examples"] < per_step:
        raise DataError(f"{train.counts['examples']} classification examples are fewer than one step needs "
                        f"(train.micro_batch_size * train.num_workers = {per_step})")
    weights = None
    if ft.class_weights == "balanced":
        weights = class_weights(train.counts["per_label"], labels, multi, train.counts["examples"])
        log.info("class weights: %s", dict(zip(labels, [round(w, 3) for w in weights])))
    return tokenizer, train, val, {"labels": labels, "class_weights": weights}, splits.source


def classification_tokenizer(cfg: Config, train_records: list):
    """model.base's tokenizer, data.tokenizer, the run's own (a resumed run), or a byte-level BPE
    trained on the training texts and saved as the run's; framed for classification."""
    from llmos_ray.data.classification import frame_for_classification
    from llmos_ray.data.tokenizer import run_tokenizer

    def texts() -> list[str]:
        return [t for r in train_records if isinstance(r, dict)
                for t in (r.get("text"), r.get("text_pair")) if isinstance(t, str)]

    tokenizer = run_tokenizer(cfg, texts, "classification texts")
    frame_for_classification(tokenizer)
    return tokenizer


def _uses_token_types(cfg: Config) -> bool:
    """Whether the model embeds token types (bert's segments A/B); decoders do not."""
    if cfg.model.base:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(cfg.model.base, trust_remote_code=cfg.model.trust_remote_code)
        return getattr(config, "type_vocab_size", 0) > 1
    return cfg.model.family == "bert"


