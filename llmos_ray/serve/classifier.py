"""The Ray Serve replica of a text classifier (an export of finetune.task=classification): one
static batch per call, no generation engine.

    handle = classifier_deployment(spec)          # a bound deployment; the ingress calls
    await handle.classify.remote(texts, pairs, top_k)   # -> [[(label, score), ...] per text] | APIError

A call's texts run through the model in chunks of max_batch_size (padded to the longest of each
chunk), in a thread so the replica's event loop stays free; one call runs at a time per replica
(torch uses the replica's threads). Scores are softmax probabilities (one label per text), or a
sigmoid per label for a multi-label model, whose answer lists every label scoring 0.5 or more
(top_k caps it). `label_probabilities` is the forward pass evaluation uses too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any, Optional, Sequence, Union

from ray import serve

from llmos_ray.serve.spec import ModelSpec
from llmos_ray.serve.types import APIError

log = logging.getLogger(__name__)


def label_probabilities(model, tokenizer, texts: Sequence[str], pairs: Optional[Sequence[Optional[str]]] = None,
                        max_length: Optional[int] = None, device: str = "cpu", batch_size: int = 32):
    """[texts, labels] probabilities of a sequence classifier: softmax over its labels, or a sigmoid
    per label (multi_label_classification). Texts are framed by the tokenizer as in training
    (data/classification.py) and truncated to `max_length` tokens."""
    import numpy as np
    import torch

    multi = getattr(model.config, "problem_type", None) == "multi_label_classification"
    pairs = list(pairs) if pairs is not None else [None] * len(texts)
    out = np.zeros((len(texts), model.config.num_labels))
    order = [i for i in range(len(texts)) if pairs[i] is None], [i for i in range(len(texts)) if pairs[i] is not None]
    with torch.inference_mode():
        for group in order:  # texts alone, then pairs: a tokenizer call takes one or the other
            for start in range(0, len(group), batch_size):
                ids = group[start:start + batch_size]
                enc = tokenizer([texts[i] for i in ids], [pairs[i] for i in ids] if pairs[ids[0]] is not None
                                else None, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
                logits = model(**{k: v.to(device) for k, v in enc.items()}).logits.float()
                probs = torch.sigmoid(logits) if multi else torch.softmax(logits, dim=-1)
                out[ids] = probs.cpu().numpy()
    return out


def top_labels(probs, id2label: dict, top_k: int, multi: bool) -> list[list[tuple[str, float]]]:
    """Per text, its labels and scores, best first: the top_k (a multi-label model: those >= 0.5, at most top_k)."""
    answers = []
    for row in probs:
        best = sorted(range(len(row)), key=lambda i: -row[i])[:top_k]
        if multi:
            best = [i for i in best if row[i] >= 0.5]
        answers.append([(id2label[i], float(row[i])) for i in best])
    return answers


class ClassifierServer:
    """One classifier's replica. Built into a deployment by `classifier_deployment(spec)`."""

    def __init__(self, spec: dict):
        import torch

        from llmos_ray.models import context_length
        from llmos_ray.serve.loading import load_model

        self.spec = ModelSpec(**spec)
        torch.set_num_threads(max(1, int(self.spec.num_cpus)))
        self.model, self.tokenizer, self.device = load_model(self.spec)
        self.max_length = context_length(self.model.config, self.tokenizer)
        self.id2label = {int(k): v for k, v in self.model.config.id2label.items()}
        self.multi = getattr(self.model.config, "problem_type", None) == "multi_label_classification"
        self._lock = threading.Lock()
        self.counts = {"requests": 0, "texts": 0}

    def _run(self, texts: list[str], pairs: Optional[list[Optional[str]]], top_k: int):
        with self._lock:
            probs = label_probabilities(self.model, self.tokenizer, texts, pairs, self.max_length, self.device,
                                        self.spec.max_batch_size)
            self.counts["requests"] += 1
            self.counts["texts"] += len(texts)
        return top_labels(probs, self.id2label, top_k, self.multi)

    async def classify(self, texts: list[str], pairs: Optional[list[Optional[str]]] = None,
                       top_k: int = 1) -> Union[list, APIError]:
        """Each text's labels with scores (top_k, best first)."""
        try:
            return await asyncio.to_thread(self._run, texts, pairs, top_k)
        except Exception as e:  # noqa: BLE001 - reported to the client as a 500, logged here
            log.exception("classification failed")
            return APIError(500, f"classification failed: {type(e).__name__}: {e}", code="classification_error")

    async def info(self) -> dict[str, Any]:
        return {"name": self.spec.name, "task": "classification", "labels": list(self.id2label.values()),
                "multi_label": self.multi, "context_length": self.max_length, "device": str(self.device)}

    async def stats(self) -> dict[str, Any]:
        return {**self.counts, "task": "classification", "pid": os.getpid()}

    def check_health(self) -> None:
        return None


def classifier_deployment(spec: ModelSpec):
    """The bound Serve deployment of one classifier, with the spec's replicas and capacity."""
    from llmos_ray.serve.replica import deployment_options

    return serve.deployment(ClassifierServer).options(**deployment_options(spec)).bind(spec.to_dict())
