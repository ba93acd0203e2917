"""What a run trains the model to do: one `Task` object per objective, which the loop asks for the
model inputs of a micro-batch, the training loss and the validation NLL. The loop, the DeepSpeed
engine, checkpoints, resume and export are the same for every task.

    task = task_for(cfg, job, teacher)
    batch = task.batch(micro_batch, device)       # tensors the model takes, + what the loss needs
    loss, extras = task.loss(engine, batch)       # extras: more figures to log (a distillation's KL)
    nll, counted = task.nll(engine, batch)        # summed validation NLL and how many targets it scored

Micro-batches are what the readers give (readers.py): packed blocks [B, T+1] (every next token is
a target), fine-tuning examples [B, 2, T+1] (tokens and a loss mask), rows packed with
boundaries [B, 3, T+1] (data.packing=reset: packing.py), or classification examples (a structured
array, data/classification.py). A new objective is a new Task here, chosen in
`task_for`; its `model_task` says which transformers Auto class the trainer builds, exports and
serves (models.TASK_CLASSES):

    CausalLM                next-token prediction (pretraining gpt2/llama, finetune.task=causal_lm)
    Distill                 a student against a frozen teacher's logits
    MaskedLM                BERT's masked LM (pretraining a bert family model)
    SequenceClassification  labels of texts (finetune.task=classification)
    Seq2SeqLM               an encoder-decoder's target given its source (finetune.task=seq2seq)
    SpanCorruption          T5's span corruption on packed blocks (pretraining a t5 family model)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from llmos_ray.config import Config
from llmos_ray.errors import ConfigError
from llmos_ray.train.losses import causal_lm_loss, distill_loss, inputs_and_targets, next_token_nll
from llmos_ray.train.packing import BOUNDARY_CHANNELS, boundary_batch, model_inputs


@dataclass
class CausalLM:
    """Next-token prediction: pretraining on packed blocks, fine-tuning on masked examples."""

    name = "causal_lm"
    model_task = "causal_lm"
    reset_at: Optional[int] = None
    """data.packing=reset: the EOS id at which packed blocks split into documents that attend only
    within themselves, positions restarting (packing.py). None: blocks attend across documents."""

    def batch(self, micro: np.ndarray, device) -> dict[str, Any]:
        if (micro.ndim == 2 and self.reset_at is not None) or (micro.ndim == 3 and micro.shape[1] == BOUNDARY_CHANNELS):
            return boundary_batch(micro, device, self.reset_at)
        inputs, targets = inputs_and_targets(micro, device)
        return {"input_ids": inputs, "targets": targets}

    def loss(self, engine, batch: dict[str, Any]) -> tuple[Any, dict[str, float]]:
        return causal_lm_loss(engine, batch["input_ids"], batch["targets"], model_inputs(engine, batch)), {}

    def nll(self, engine, batch: dict[str, Any]) -> tuple[float, int]:
        return next_token_nll(engine, batch["input_ids"], batch["targets"], model_inputs(engine, batch))


@dataclass
class Distill(CausalLM):
    """A student learning from a frozen teacher's logits (and the data): see losses.distill_loss."""

    teacher: Any = None
    temperature: float = 2.0
    alpha: float = 0.5
    name = "distill"

    def loss(self, engine, batch: dict[str, Any]) -> tuple[Any, dict[str, float]]:
        loss, kl = distill_loss(engine, self.teacher, batch["input_ids"], batch["targets"], self.temperature,
                                self.alpha, model_inputs(engine, batch), model_inputs(self.teacher, batch))
        return loss, {"kl": kl}


@dataclass
class MaskedLM:
    """BERT's masked LM on packed blocks [B, T+1]: the first T tokens of each block, 15% of them
    selected (80% [MASK], 10% a random token, 10% kept; data/masking.mask_tokens) and predicted.

    The masks of a micro-batch are drawn from a generator seeded by run.seed and the micro-batch's
    own tokens, so a resumed run masks exactly as the uninterrupted one, every rank draws its own
    masks, and the validation blocks are masked the same way at every evaluation (comparable
    validation losses). A block seen again in a later epoch gets the same masks (BERT's static
    masking, rather than RoBERTa's dynamic masking)."""

    mask_id: int
    vocab_size: int
    special_ids: tuple
    seed: int = 0
    probability: float = 0.15
    continuation: Optional[np.ndarray] = None
    """Whole-word masking: masking.continuation_table of the tokenizer."""
    name = "masked_lm"
    model_task = "masked_lm"

    def batch(self, micro: np.ndarray, device) -> dict[str, Any]:
        import zlib

        import torch

        from llmos_ray.data.masking import mask_tokens

        ids = np.ascontiguousarray(micro[:, :-1], dtype=np.int64)
        rng = np.random.default_rng([self.seed, zlib.crc32(ids.tobytes())])
        inputs, labels = mask_tokens(ids, mask_id=self.mask_id, vocab_size=self.vocab_size,
                                     special_ids=self.special_ids, rng=rng, probability=self.probability,
                                     continuation=self.continuation)
        return {"input_ids": torch.tensor(inputs, device=device), "labels": torch.tensor(labels, device=device)}

    def loss(self, engine, batch: dict[str, Any]) -> tuple[Any, dict[str, float]]:
        # the masked positions' cross-entropy: labels are -100 elsewhere, as for a causal LM's targets
        return _token_cross_entropy(engine(input_ids=batch["input_ids"]).logits, batch["labels"], "mean"), {}

    def nll(self, engine, batch: dict[str, Any]) -> tuple[float, int]:
        nll = _token_cross_entropy(engine(input_ids=batch["input_ids"]).logits, batch["labels"], "sum")
        return nll.item(), int((batch["labels"] != -100).sum())


def _token_cross_entropy(logits, labels, reduction: str):
    import torch.nn.functional as F

    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100,
                           reduction=reduction)


@dataclass
class SequenceClassification:
    """One label (softmax cross-entropy, optionally class-weighted) or several (multi-label: binary
    cross-entropy per label, optionally with positive weights) per text, from a structured array
    of examples (data/classification.Examples). Each micro-batch is cut to its longest example
    (dynamic padding, as Hugging Face's DataCollatorWithPadding). The validation NLL is the
    unweighted loss summed over examples: val_loss is the mean per held-out example."""

    multi_label: bool = False
    class_weights: Optional[list] = None
    name = "classification"
    model_task = "classification"

    def batch(self, micro: np.ndarray, device) -> dict[str, Any]:
        import torch

        width = max(1, int(micro["attention_mask"].sum(axis=1).max()))
        out = {key: torch.tensor(np.ascontiguousarray(micro[key][:, :width], dtype=np.int64), device=device)
               for key in ("input_ids", "attention_mask", "token_type_ids") if key in micro.dtype.names}
        kind = torch.float32 if self.multi_label else torch.long
        out["labels"] = torch.tensor(np.ascontiguousarray(micro["labels"]), dtype=kind, device=device)
        return out

    def lengths(self, micro: np.ndarray) -> np.ndarray:
        """Each example's tokens: what its micro-batch is padded by (readers.ArrayReader's balancing)."""
        return micro["attention_mask"].sum(axis=1)

    def loss_units(self, micro: np.ndarray) -> float:
        """The denominator of the micro-batch's mean loss: its examples (weighted: their label weights)."""
        if self.class_weights and not self.multi_label:
            return float(np.asarray(self.class_weights)[micro["labels"]].sum())
        return float(len(micro))

    def _logits(self, engine, batch: dict[str, Any]):
        return engine(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()

    def _loss(self, logits, labels, reduction: str, weighted: bool):
        import torch
        import torch.nn.functional as F

        weights = torch.tensor(self.class_weights, device=logits.device) if weighted and self.class_weights else None
        if self.multi_label:
            per_label = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=weights, reduction="none")
            per_example = per_label.sum(dim=1)
            return per_example.sum() if reduction == "sum" else per_example.mean()
        return F.cross_entropy(logits, labels, weight=weights, reduction=reduction)

    def loss(self, engine, batch: dict[str, Any]) -> tuple[Any, dict[str, float]]:
        return self._loss(self._logits(engine, batch), batch["labels"], "mean", weighted=True), {}

    def nll(self, engine, batch: dict[str, Any]) -> tuple[float, int]:
        nll = self._loss(self._logits(engine, batch), batch["labels"], "sum", weighted=False)
        return nll.item(), int(batch["labels"].shape[0])


@dataclass
class Seq2SeqLM:
    """An encoder-decoder learning each target token given the source and the target before it
    (teacher forcing), from a structured array of pairs (data/seq2seq.Pairs). The decoder's inputs
    are the labels shifted right behind the decoder start token (padding where a label is
    ignored), as T5's `_shift_right`. Each micro-batch is cut to its longest source and longest
    target. The loss is the mean cross-entropy per target token; the validation NLL sums it, so
    val_loss is per held-out target token (and val_ppl its exponential)."""

    decoder_start_id: int
    pad_id: int
    name = "seq2seq"
    model_task = "seq2seq"

    def batch(self, micro: np.ndarray, device) -> dict[str, Any]:
        import torch

        width = max(1, int(micro["attention_mask"].sum(axis=1).max()))
        target = max(1, int((micro["labels"] != -100).sum(axis=1).max()))
        labels = np.ascontiguousarray(micro["labels"][:, :target], dtype=np.int64)
        shifted = np.concatenate([np.full((len(labels), 1), self.decoder_start_id), labels[:, :-1]], axis=1)
        shifted[shifted == -100] = self.pad_id
        tensor = lambda a: torch.tensor(np.ascontiguousarray(a, dtype=np.int64), device=device)  # noqa: E731
        return {"input_ids": tensor(micro["input_ids"][:, :width]),
                "attention_mask": tensor(micro["attention_mask"][:, :width]),
                "decoder_input_ids": tensor(shifted), "labels": tensor(labels)}

    def lengths(self, micro: np.ndarray) -> np.ndarray:
        """[examples, 2]: each pair's source and target tokens (readers.ArrayReader's balancing)."""
        return np.stack([micro["attention_mask"].sum(axis=1), (micro["labels"] != -100).sum(axis=1)], axis=1)

    def loss_units(self, micro: np.ndarray) -> float:
        """The denominator of the micro-batch's mean loss: its target tokens."""
        return float((micro["labels"] != -100).sum())

    def _logits(self, engine, batch: dict[str, Any]):
        return engine(**{k: v for k, v in batch.items() if k != "labels"}).logits

    def loss(self, engine, batch: dict[str, Any]) -> tuple[Any, dict[str, float]]:
        return _token_cross_entropy(self._logits(engine, batch), batch["labels"], "mean"), {}

    def nll(self, engine, batch: dict[str, Any]) -> tuple[float, int]:
        nll = _token_cross_entropy(self._logits(engine, batch), batch["labels"], "sum")
        return nll.item(), int((batch["labels"] != -100).sum())


@dataclass
class SpanCorruption(Seq2SeqLM):
    """T5's pretraining objective on packed blocks [B, T+1]: the first T tokens of each block are
    span-corrupted (data/masking.span_corrupt: noise density 0.15, mean span 3; each dropped span
    a sentinel in the inputs, the targets the sentinels each followed by its span, both ending
    with EOS), and the decoder learns the targets (Seq2SeqLM's loss). Every block of one length
    corrupts to the same two lengths, so a micro-batch needs no padding.

    As MaskedLM, the spans of a micro-batch are drawn from a generator seeded by run.seed and the
    micro-batch's own tokens: a resumed run corrupts exactly as the uninterrupted one, and the
    validation blocks are corrupted the same way at every evaluation."""

    sentinel_ids: tuple = ()
    eos_id: int = 0
    seed: int = 0
    noise_density: float = 0.15
    mean_span_length: float = 3.0
    name = "span_corruption"
    lengths = None  # packed blocks of one length: nothing to balance

    def batch(self, micro: np.ndarray, device) -> dict[str, Any]:
        import zlib

        import torch

        from llmos_ray.data.masking import span_corrupt_batch

        ids = np.ascontiguousarray(micro[:, :-1], dtype=np.int64)
        rng = np.random.default_rng([self.seed, zlib.crc32(ids.tobytes())])
        inputs, targets = span_corrupt_batch(ids, sentinel_ids=self.sentinel_ids, eos_id=self.eos_id, rng=rng,
                                             noise_density=self.noise_density, mean_span_length=self.mean_span_length)
        shifted = np.concatenate([np.full((len(targets), 1), self.decoder_start_id), targets[:, :-1]], axis=1)
        tensor = lambda a: torch.tensor(a, dtype=torch.long, device=device)  # noqa: E731
        return {"input_ids": tensor(inputs), "decoder_input_ids": tensor(shifted), "labels": tensor(targets)}


MODEL_TASKS = {"span_corruption": "seq2seq"}
"""The model_task (models.TASK_CLASSES) of an objective that is not one itself."""


def objective(cfg: Config, job: str) -> str:
    """What a run trains: the fine-tuning task, the pretraining objective of the family
    (models.OBJECTIVES: masked_lm for bert, span_corruption for t5), or causal_lm (distillation).
    Its model_task is MODEL_TASKS.get(objective, objective)."""
    from llmos_ray.models import OBJECTIVES

    if job == "finetune":
        return cfg.finetune.task
    if job == "pretrain":
        family = cfg.model.family
        if cfg.model.base:
            from transformers import AutoConfig

            family = AutoConfig.from_pretrained(cfg.model.base, trust_remote_code=cfg.model.trust_remote_code
                                                ).model_type
        return OBJECTIVES.get(family, "causal_lm")
    return "causal_lm"


def task_for(cfg: Config, job: str, teacher: Optional[Any] = None, tokenizer=None, info: Optional[dict] = None):
    """The task of a run: distillation against `teacher`, masked LM (pretraining a bert), sequence
    classification (finetune.task; `info` from the driver: label names and class weights), seq2seq
    (`info`: the decoder start and pad ids), else next-token prediction. Under data.packing=reset
    the tokenizer's EOS splits packed blocks into documents (causal objectives only)."""
    reset_at = tokenizer.eos_token_id if cfg.data.packing == "reset" and tokenizer is not None else None
    if job == "distill":
        return Distill(teacher=teacher, temperature=cfg.distill.temperature, alpha=cfg.distill.alpha,
                       reset_at=reset_at)
    kind = objective(cfg, job)
    if reset_at is not None and kind != "causal_lm":
        raise ConfigError(f"data.packing=reset packs documents for causal LM objectives; a {kind} run takes "
                          "data.packing=concat")
    if kind == "masked_lm":
        from llmos_ray.data.masking import continuation_table

        return MaskedLM(mask_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                        special_ids=tuple(tokenizer.all_special_ids), seed=cfg.run.seed,
                        probability=cfg.data.mask_probability,
                        continuation=continuation_table(tokenizer) if cfg.data.whole_word_masking else None)
    if kind == "span_corruption":
        from llmos_ray.data.masking import sentinel_ids

        sentinels = tuple(sentinel_ids(tokenizer))
        if not sentinels:
            raise ConfigError("span corruption needs the tokenizer's sentinel tokens <extra_id_0>, ... "
                              "(data.masking.add_sentinel_tokens)")
        pad = tokenizer.pad_token_id
        return SpanCorruption(decoder_start_id=(info or {}).get("decoder_start_token_id", pad), pad_id=pad,
                              sentinel_ids=sentinels, eos_id=tokenizer.eos_token_id, seed=cfg.run.seed)
    if kind == "classification":
        info = info or {}
        return SequenceClassification(multi_label=cfg.finetune.multi_label, class_weights=info.get("class_weights"))
    if kind == "seq2seq":
        info = info or {}
        pad = info.get("pad_token_id", tokenizer.pad_token_id if tokenizer is not None else 0)
        return Seq2SeqLM(decoder_start_id=info.get("decoder_start_token_id", pad), pad_id=pad)
    return CausalLM(reset_at=reset_at)
