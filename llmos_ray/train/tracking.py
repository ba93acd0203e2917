"""Experiment tracking on rank 0: a wandb run per llmos run (offline unless an API key is set),
resumed under the same id when the run resumes. Metrics reach Ray and metrics.jsonl either way."""

from __future__ import annotations

import logging
import os

from llmos_ray.config import Config

log = logging.getLogger(__name__)


def start_wandb(cfg: Config):
    """The wandb run of `cfg.run` (None when run.wandb=disabled or wandb fails to start)."""
    mode = cfg.run.wandb
    if mode == "disabled":
        return None
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    try:
        import wandb

        os.makedirs(cfg.run.output_dir, exist_ok=True)
        return wandb.init(project=cfg.run.wandb_project, name=cfg.run.name, dir=cfg.run.output_dir, mode=mode,
                          config=cfg.to_dict(), resume="allow", id=_wandb_id(cfg),
                          settings=wandb.Settings(quiet=True, console="off"))
    except Exception as e:  # metrics still reach Ray and metrics.jsonl
        log.warning("wandb disabled: %s", e)
        return None


def _wandb_id(cfg: Config) -> str:
    import hashlib

    return hashlib.sha1(f"{cfg.run.storage_path}/{cfg.run.name}".encode()).hexdigest()[:16]
