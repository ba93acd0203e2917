"""What a run trains the model to do: one `Task` object per objective, which the loop asks for the
model inputs of a micro-batch, the training loss and the validation NLL. The loop, the DeepSpeed
engine, checkpoints, resume and export are the same for every task.

    task = task_for(cfg, job, teacher)
    batch = task.batch(micro_batch, device)       # tensors the model takes, + what the loss needs
    loss, extras = task.loss(engine, batch)       # extras: more figures to log (a distillation's KL)
    nll, counted = task.nll(engine, batch)        # summed validation NLL and how many targets it scored

Micro-batches are what the readers give (readers.py): packed blocks [B, T+1] (every next token is
a target), or fine-tuning examples [B, 2, T+1] (tokens and a loss mask), or rows packed with
boundaries [B, 3, T+1] (data.packing=reset: packing.py). A new objective (masked LM,
classification, seq2seq) is a new Task here, chosen in `task_for`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from llmos_ray.config import Config
from llmos_ray.train.losses import causal_lm_loss, distill_loss, inputs_and_targets, next_token_nll
from llmos_ray.train.packing import BOUNDARY_CHANNELS, boundary_batch, model_inputs


@dataclass
class CausalLM:
    """Next-token prediction: pretraining on packed blocks, fine-tuning on masked examples."""

    name = "causal_lm"
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


def task_for(cfg: Config, job: str, teacher: Optional[Any] = None, eos_id: Optional[int] = None):
    """The task of a run: distillation against `teacher`, else next-token prediction. `eos_id`
    (the tokenizer's) splits packed blocks into documents under data.packing=reset."""
    reset_at = eos_id if cfg.data.packing == "reset" else None
    if job == "distill":
        return Distill(teacher=teacher, temperature=cfg.distill.temperature, alpha=cfg.distill.alpha,
                       reset_at=reset_at)
    return CausalLM(reset_at=reset_at)
