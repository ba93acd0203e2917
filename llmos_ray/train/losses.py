"""What a training step optimises and what validation measures, from one micro-batch of blocks.

    packed blocks [B, T+1]              every next token is a target (pretraining, distillation)
    fine-tuning examples [B, 2, T+1]    tokens and a loss mask: only masked-in tokens are targets
    (rows with boundaries, data.packing=reset: packing.py builds their inputs and targets)

Targets of -100 carry no loss.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from llmos_ray.config import Config


def inputs_and_targets(batch: np.ndarray, device):
    """Model inputs and next-token targets of a micro-batch. Packed blocks [B, T+1] train on every
    token; fine-tuning examples [B, 2, T+1] (tokens, loss mask) train only where the mask is 1."""
    import torch

    if batch.ndim == 3:
        tokens, mask = batch[:, 0], batch[:, 1]
        targets = np.where(mask[:, 1:] == 1, tokens[:, 1:], -100)
        return (torch.tensor(tokens[:, :-1], dtype=torch.long, device=device),
                torch.tensor(targets, dtype=torch.long, device=device))
    return (torch.tensor(batch[:, :-1], dtype=torch.long, device=device),
            torch.tensor(batch[:, 1:], dtype=torch.long, device=device))


def causal_lm_loss(engine, inputs, targets, forward: Optional[dict] = None):
    """Mean next-token cross-entropy over targets that are not -100. `forward`: the keyword
    arguments of the forward pass when there is more than `inputs` (packing.model_inputs)."""
    import torch.nn.functional as F

    logits = engine(**(forward or {"input_ids": inputs})).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


def distill_loss(engine, teacher, inputs, targets, temperature: float, alpha: float,
                 forward: Optional[dict] = None, teacher_forward: Optional[dict] = None):
    """alpha · T² · KL(teacher ‖ student) at temperature T + (1 - alpha) · cross-entropy on the data
    (Hinton et al. 2015), over the positions that carry a target. Returns (loss, KL value)."""
    import torch
    import torch.nn.functional as F

    logits = engine(**(forward or {"input_ids": inputs})).logits.float()
    with torch.no_grad():
        teacher_logits = teacher(**(teacher_forward or {"input_ids": inputs})).logits.float()
    keep = (targets != -100).reshape(-1)
    s = logits.reshape(-1, logits.size(-1))[keep]
    t = teacher_logits.reshape(-1, teacher_logits.size(-1))[keep][:, : s.size(-1)]
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                  reduction="batchmean")
    ce = F.cross_entropy(s, targets.reshape(-1)[keep])
    return alpha * temperature**2 * kl + (1 - alpha) * ce, kl.item()


def next_token_nll(engine, inputs, targets, forward: Optional[dict] = None) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over targets that are not -100, and how many there are."""
    import torch.nn.functional as F

    logits = engine(**(forward or {"input_ids": inputs})).logits.float()
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum",
                          ignore_index=-100)
    return nll.item(), int((targets != -100).sum())


def validation_loss(engine, task, val_blocks: np.ndarray, cfg: Config, rank: int, world: int, device,
                    dist) -> float:
    """Target-weighted mean validation loss of `task` over every rank's share of `val_blocks`. Every
    rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively)."""
    import torch

    engine.eval()
    mb = cfg.train.micro_batch_size
    mine = val_blocks[rank::world] if len(val_blocks) >= world else val_blocks
    n_batches = min(cfg.train.eval_batches, max(1, math.ceil(len(val_blocks) / world / mb)))
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for i in range(n_batches):
            chunk = mine[i * mb:(i + 1) * mb] if len(mine) > i * mb else mine[:0]
            if len(chunk) == 0:  # this rank has run out; still join the collective forward
                chunk = val_blocks[:1]
                weight = 0.0
            else:
                weight = 1.0
            nll, counted = task.nll(engine, task.batch(chunk, device))
            total += torch.tensor([nll * weight, counted * weight], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total[0] / max(total[1], 1.0))


def mean_over_ranks(dist, value: float, device) -> float:
    """The mean of one float over all ranks (collective)."""
    import torch

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item() / dist.get_world_size())
