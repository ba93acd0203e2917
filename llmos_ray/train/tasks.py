"""What a run trains the model to do: one `Task` object per objective, which the loop asks for the
model inputs of a micro-batch, the training loss and the validation NLL. The loop, the DeepSpeed
engine, checkpoints, resume and export are the same for every task.

    task = task_for(cfg, job, teacher)
    batch = task.batch(micro_batch, device)       # tensors the model takes, + what the loss needs
    loss, extras = task.loss(engine, batch)       # extras: more figures to log (a distillation's KL)
    nll, counted = task.nll(engine, batch)        # summed validation NLL and how many targets it scored

Micro-batches are what the readers give (readers.py): packed blocks [B, T+1] (every next token is
a target), or fine-tuning examples [B, 2, T+1] (tokens and a loss mask). A new objective (masked
LM, classification, seq2seq) is a new Task here, chosen in `task_for`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from llmos_ray.config import Config
from llmos_ray.train.losses import causal_lm_loss, distill_loss, inputs_and_targets, next_token_nll


@dataclass
class CausalLM:
    """Next-token prediction: pretraining on packed blocks, fine-tuning on masked examples."""

    name = "causal_lm"

    def batch(self, micro: np.ndarray, device) -> dict[str, Any]:
        inputs, targets = inputs_and_targets(micro, device)
        return {"input_ids": inputs, "targets": targets}

    def loss(self, engine, batch: dict[str, Any]) -> tuple[Any, dict[str, float]]:
        return causal_lm_loss(engine, batch["input_ids"], batch["targets"]), {}

    def nll(self, engine, batch: dict[str, Any]) -> tuple[float, int]:
        return next_token_nll(engine, batch["input_ids"], batch["targets"])


@dataclass
class Distill(CausalLM):
    """A student learning from a frozen teacher's logits (and the data): see losses.distill_loss."""

    teacher: Any = None
    temperature: float = 2.0
    alpha: float = 0.5
    name = "distill"

    def loss(self, engine, batch: dict[str, Any]) -> tuple[Any, dict[str, float]]:
        loss, kl = distill_loss(engine, self.teacher, batch["input_ids"], batch["targets"], self.temperature,
                                self.alpha)
        return loss, {"kl": kl}


def task_for(cfg: Config, job: str, teacher: Optional[Any] = None):
    """The task of a run: distillation against `teacher`, else next-token prediction."""
    if job == "distill":
        return Distill(teacher=teacher, temperature=cfg.distill.temperature, alpha=cfg.distill.alpha)
    return CausalLM()
