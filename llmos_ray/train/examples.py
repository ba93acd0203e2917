"""Fine-tuning on examples encoded in memory (sequence classification, seq2seq): the model.base
check, the run's resume, log and data counts, then the one trainer (`run_training`)."""

from __future__ import annotations

import os
from typing import Optional

from llmos_ray.config import Config
from llmos_ray.errors import ModelError
from llmos_ray.train.trainer import TrainResult, resolve_resume, run_training


def check_base(base: Optional[str]) -> None:
    """A model.base that names a local path must be a model directory (a hub id is checked on load)."""
    if base is not None and (base.startswith(("/", ".", "~")) or os.path.exists(base)) \
            and not os.path.isfile(os.path.join(os.path.expanduser(base), "config.json")):
        raise ModelError(f"model.base={base!r} is not a model directory (no config.json); give an export "
                         "directory or a hub id, or leave it out to train a fresh model.family preset")


def train_on_examples(cfg: Config, load_data) -> TrainResult:
    """A fine-tune on examples encoded in memory (classification, seq2seq; `cfg` resolved):
    `load_data(cfg)` -> (tokenizer, train, held-out or None, task info, source), each split with
    `.array` and `.counts`; the run's state, log and data counts as every run's."""
    from llmos_ray.runtime import init_ray, run_log

    check_base(cfg.model.base)
    cfg, resume_from, finished = resolve_resume(cfg, "finetune")
    if finished is not None:
        return finished
    with run_log(cfg.run.output_dir):
        tokenizer, train, val, info, source = load_data(cfg)
        init_ray()
        val_rows = val.array[: cfg.data.val_max_blocks] if val is not None else None
        counts = {"train": train.counts, "val": val.counts if val else None, "source": source}
        if "labels" in info:
            counts["labels"] = info["labels"]
        return run_training(cfg, tokenizer, {"train": train.array}, val_rows, resume_from, job="finetune",
                            data_counts=counts, task_info=info)
