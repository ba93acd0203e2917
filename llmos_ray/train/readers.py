"""Where a training worker's micro-batches come from, and where it is in them.

    ShardReader   this worker's Ray Data shard of packed blocks (streamed corpora), in an order
                  that is the same on every run, so a resumed run skips exactly what it trained on
    ArrayReader   an in-memory array of blocks (fine-tuning sets, exact-parity tests)

Both keep a `position` ({"epoch", "micro_batches"}) that checkpoints record, and hand out
micro-batches with `next_agreed(dist)`: every worker gets one, or all move to the next epoch.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

from llmos_ray.config import Config
from llmos_ray.errors import DataError

START = {"epoch": 0, "micro_batches": 0}
"""The data position of a run that starts from the beginning."""


def open_reader(train_array: Optional[np.ndarray], cfg: Config, job: str, rank: int, world: int, position: dict,
                task=None):
    """Micro-batches of the in-memory training array, else of this worker's "train" dataset shard.
    A task that cuts micro-batches to their longest example (its `lengths` and `loss_units`) gets
    them balanced by length across the workers unless train.balance_lengths is off (balance.py)."""
    import ray.train

    if train_array is not None:
        balance = task if cfg.train.balance_lengths and getattr(task, "lengths", None) is not None else None
        return ArrayReader(train_array, cfg.train.micro_batch_size, rank, world, position,
                           shuffle_seed=cfg.run.seed if job != "pretrain" else None, balance=balance)
    return ShardReader(ray.train.get_dataset_shard("train"), cfg.data.seq_len + 1, cfg.train.micro_batch_size,
                       position)


class ShardReader:
    """Micro-batches of packed blocks from this worker's Ray Data shard, epoch after epoch, with a
    position (epoch, micro-batches consumed in it) that a resumed run skips to.

    Workers end an epoch together: before each micro-batch they agree (one all-reduce of a flag)
    that all of them still have one, so no worker waits in a collective while another starts the
    next epoch (Ray's streaming split starts epochs in lockstep).

    Exact resume. Skipping "my first k micro-batches" is right only if this rank receives the same
    rows, in the same order, every time the stream is split: after Ray restarts the worker group
    (Ray Train splits the dataset anew for the new group) or a re-run driver builds it again. In
    Ray 2.60 that holds under these conditions, which our trainer meets:
      - the stream itself is deterministic: llmos_ray.data's pipeline, executed with
        preserve_order=True (Ray Train applies its DataConfig's execution options, so the trainer
        passes `ingest_options()`); every epoch replays the same stream;
      - the split is Ray Train's `streaming_split(n, equal=True)`: its OutputSplitter deals each
        incoming bundle, in arrival order, to the split with the fewest rows so far (ties: lowest
        index), holds bundles back only by row counts (equal=True), and splits the remainder by
        rows at the end — a function of the bundles' row counts, not of timing. Locality hints
        would make it depend on where blocks live; the OutputSplitter ignores them when
        preserve_order is set (and the trainer also disables them: enable_shard_locality=False);
      - the same number of workers. A resume on a different worker count (checkpoint.
        rescale_position) keeps the number of blocks consumed, not the exact rows.
    The reader refuses a shard whose execution does not preserve order.
    tests/train/test_pretrain.py::test_streamed_corpus_resumes_with_the_same_batches checks it."""

    def __init__(self, shard, block_len: int, micro_batch: int, position: Optional[dict] = None):
        self.shard, self.block_len, self.micro_batch = shard, block_len, micro_batch
        self.position = dict(position or START)
        self.dropped_blocks = 0
        self.loss_weight = 1.0  # every rank's loss counts alike (ArrayReader may balance by length)
        self._it: Optional[Iterator[np.ndarray]] = None
        require_ordered(shard)

    def _open_epoch(self) -> None:
        from llmos_ray.data import iter_blocks

        batches = self.shard.iter_batches(batch_size=256, batch_format="numpy", prefetch_batches=2)
        self._it = iter_blocks(batches, self.block_len)
        for _ in range(self.position["micro_batches"]):  # resume: skip what was trained on
            if self._take() is None:
                raise DataError("the checkpoint's data position is beyond the end of the training data: the "
                                "data changed since it was written; resume with the same data.paths, or start "
                                "a new run.name")

    def _take(self) -> Optional[np.ndarray]:
        blocks = []
        for block in self._it:
            blocks.append(block)
            if len(blocks) == self.micro_batch:
                return np.stack(blocks)
        self.dropped_blocks += len(blocks)
        return None

    def next_agreed(self, dist) -> np.ndarray:
        """The next micro-batch, once every worker has one; at the end of an epoch, all open the next."""
        import torch

        for _ in range(3):
            if self._it is None:
                self._open_epoch()
            batch = self._take()
            flag = torch.tensor([0 if batch is None else 1])
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if int(flag.item()) == 1:
                self.position["micro_batches"] += 1
                return batch
            if batch is not None:
                self.dropped_blocks += len(batch)
            self._it = None
            self.position = {"epoch": self.position["epoch"] + 1, "micro_batches": 0}
        raise DataError("the training data has fewer blocks than one micro-batch per worker: "
                        "add data, lower train.micro_batch_size or data.seq_len")


def require_ordered(shard) -> None:
    """Refuse a Ray Data shard whose stream may reach this worker in a different order on each run."""
    get_context = getattr(shard, "get_context", None)
    if get_context is not None and not get_context().execution_options.preserve_order:
        raise DataError("the training dataset is read without preserve_order, so a resumed run would not see "
                        "the same batches: pass ray.train.DataConfig(execution_options=llmos_ray.data."
                        "ingest_options()) to the trainer")


class ArrayReader:
    """Micro-batches from an in-memory array of blocks (fine-tuning sets, exact-parity tests):
    micro-step k of rank r takes rows [(k * world + r) * micro, +micro) of the epoch's order (the
    stored order, or a seeded shuffle per epoch), so every global step sees the same rows whatever
    the worker count.

    With `balance` (a task's `lengths(rows)` and `loss_units(rows)`), micro-step k's world x micro
    rows are split among the ranks by length instead (balance.balanced_groups: the rank with the
    longest examples takes fewer), and `loss_weight` is what this rank's mean loss is multiplied
    by for the average over ranks to be the micro-step's mean over all its rows (1.0 without)."""

    def __init__(self, blocks: np.ndarray, micro_batch: int, rank: int, world: int, position: Optional[dict] = None,
                 shuffle_seed: Optional[int] = None, balance=None):
        self.blocks, self.micro_batch, self.rank, self.world = blocks, micro_batch, rank, world
        self.shuffle_seed, self.balance = shuffle_seed, balance
        self.loss_weight = 1.0
        self.position = dict(position or START)
        self.per_epoch = len(blocks) // (micro_batch * world)
        if self.per_epoch == 0:
            raise DataError(f"{len(blocks)} training blocks are fewer than one micro-batch per worker "
                            f"({micro_batch} x {world})")

    def next_agreed(self, dist=None) -> np.ndarray:
        if self.position["micro_batches"] >= self.per_epoch:
            self.position = {"epoch": self.position["epoch"] + 1, "micro_batches": 0}
        step_rows = self.micro_batch * self.world
        start = self.position["micro_batches"] * step_rows
        self.position["micro_batches"] += 1
        rows = np.arange(start, start + step_rows)
        if self.shuffle_seed is not None:  # a new order every epoch, the same on every rank and run
            rows = np.random.default_rng(self.shuffle_seed + self.position["epoch"]).permutation(len(self.blocks))[rows]
        if self.balance is None:
            return self.blocks[rows[self.rank * self.micro_batch:(self.rank + 1) * self.micro_batch]]
        from llmos_ray.train.balance import balanced_groups

        step = self.blocks[rows]
        groups = balanced_groups(self.balance.lengths(step), self.world)
        units = [float(self.balance.loss_units(step[g])) for g in groups]
        self.loss_weight = self.world * units[self.rank] / max(sum(units), 1e-12)
        return step[groups[self.rank]]
