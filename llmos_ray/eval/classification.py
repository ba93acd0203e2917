"""Evaluating sequence classifiers: labelled records → a Ray Data actor pool predicting each text's
label probabilities → accuracy, macro-F1, per-label precision and recall, confusion matrix
(scikit-learn, metrics.classification_scores).

The records are eval.classification_paths (JSONL, parquet or CSV `{text, label}`, read like
fine-tuning records: any fsspec URI, compressed or not), one task named "classification"; else
the held-out split of the first classifier's own training run (its llmos_config.yaml: its
finetune.paths split by data.val_fraction, or the embedded language-ID set), named "heldout".
Every classifier of an evaluation scores the same records. A record is bad for a model — counted
with its file and line, never dropped silently — when it has no text or label, or a label the
model was not trained on (its config.json id2label).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import numpy as np

from llmos_ray.config import Config, load_config
from llmos_ray.errors import ConfigError, reraise_ours

log = logging.getLogger(__name__)

MAX_BAD_LISTED = 20


def classification_inputs(cfg: Config, classifiers: list[dict]) -> tuple[list, dict]:
    """((source, line, record) triples, {"name", "source", "records"}) every classifier is scored on."""
    from llmos_ray.data.classification import labelled_records
    from llmos_ray.data.sft import read_sft_records

    paths = list(cfg.eval.classification_paths)
    if paths:
        triples = list(read_sft_records(paths, cfg.data.storage_options))
        return triples, {"name": "classification", "source": "eval.classification_paths", "paths": paths,
                         "records": len(triples)}
    run_config = os.path.join(classifiers[0]["uri"], "llmos_config.yaml")
    if not os.path.isfile(run_config):
        raise ConfigError(f"{classifiers[0]['source']} has no llmos_config.yaml naming the data it was trained on: "
                          "give eval.classification_paths (labelled {text, label} records)")
    run = load_config(run_config)
    splits = labelled_records(run)
    where = f"the held-out split of {classifiers[0]['label']}'s training data"
    return splits.val, {"name": "heldout", "source": where, "paths": list(run.finetune.paths) or ["<embedded>"],
                        "records": len(splits.val)}


def model_labels(uri: str) -> tuple[list[str], bool]:
    """(label names in id order, multi-label?) of a local classifier export's config.json."""
    from llmos_ray.storage import localize

    with open(os.path.join(localize(uri), "config.json")) as f:
        config = json.load(f)
    id2label = config.get("id2label") or {}
    names = [id2label[k] for k in sorted(id2label, key=int)]
    return names, config.get("problem_type") == "multi_label_classification"


def score_classifier(triples: list, model: dict, cfg: Config, resources: dict, threads: int) -> dict:
    """One classifier's figures on `triples`: classification_scores, bad records (file, line, reason)."""
    from llmos_ray.data.classification import parse_labelled
    from llmos_ray.eval.metrics import classification_scores

    labels, multi = model_labels(model["uri"])
    index = {name: i for i, name in enumerate(labels)}
    rows, truth, bad = [], [], []
    for source, line, record in triples:
        try:
            names, text, pair = parse_labelled(record, index, multi)
        except ValueError as e:
            bad.append({"file": source, "line": line, "reason": str(e)})
            continue
        rows.append({"id": len(rows), "text": text, "pair": pair or ""})
        truth.append([index[n] for n in names])
    if not rows:
        raise ConfigError(f"no usable classification records for {model['label']} ({len(bad)} bad, e.g. "
                          f"{bad[:1]})")
    probs = _predict(rows, model, cfg, resources, threads)
    if multi:
        y_true = np.zeros((len(rows), len(labels)), dtype=int)
        for i, ids in enumerate(truth):
            y_true[i, ids] = 1
        y_pred = (probs >= 0.5).astype(int)
    else:
        y_true, y_pred = np.array([ids[0] for ids in truth]), probs.argmax(axis=1)
    scores = classification_scores(y_true, y_pred, labels, multi)
    scores.update(multi_label=multi, bad_records=len(bad), bad=bad[:MAX_BAD_LISTED])
    if bad:
        log.warning("%s: %d record(s) are bad for it, e.g. %s line %d: %s", model["label"], len(bad), bad[0]["file"],
                    bad[0]["line"], bad[0]["reason"])
    return scores


def _predict(rows: list[dict], model: dict, cfg: Config, resources: dict, threads: int) -> np.ndarray:
    """[rows, labels] probabilities (softmax, or sigmoid per label), from an actor pool of the model."""
    import ray

    ev = cfg.eval
    settings = {"threads": threads, "device": "cuda" if resources["num_gpus"] else "cpu",
                "trust_remote_code": cfg.model.trust_remote_code, "max_length": ev.max_length}
    ds = ray.data.from_items(rows)
    out = ds.map_batches(ClassifierWorker, fn_constructor_kwargs={"model": model, "settings": settings},
                         batch_size=ev.batch_size, batch_format="numpy",
                         compute=ray.data.ActorPoolStrategy(size=ev.num_workers), **resources)
    out.context.raise_original_map_exception = True
    with reraise_ours():
        scored = out.take_all()
    probs: list[Optional[list]] = [None] * len(rows)
    for r in scored:
        probs[int(r["id"])] = list(r["probs"])
    return np.array(probs, dtype=np.float64)


class ClassifierWorker:
    """Ray Data actor: loads one classifier once (as `llmos serve` does) and gives each row's label
    probabilities (a list column `probs`)."""

    def __init__(self, model: dict, settings: dict):
        import torch

        from llmos_ray.models import context_length
        from llmos_ray.runtime import worker_logging
        from llmos_ray.serve.loading import load_model
        from llmos_ray.serve.spec import ModelSpec

        worker_logging()
        torch.set_num_threads(settings["threads"])
        spec = ModelSpec(name=model["label"], uri=model["uri"], base_uri=model["base_uri"], device=settings["device"],
                         trust_remote_code=settings["trust_remote_code"])
        self.model, self.tokenizer, self.device = load_model(spec)
        self.max_length = min(settings["max_length"] or 1 << 30, context_length(self.model.config, self.tokenizer))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from llmos_ray.serve.classifier import label_probabilities

        texts = [str(t) for t in batch["text"]]
        pairs = [str(p) or None for p in batch["pair"]]
        probs = label_probabilities(self.model, self.tokenizer, texts, pairs, self.max_length, self.device)
        return {"id": np.asarray(batch["id"], dtype=np.int64), "probs": np.array([list(p) for p in probs], object)}
