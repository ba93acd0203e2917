"""Corpus counts published while a pipeline streams, readable from anywhere in the Ray job.

The pipeline's ledger stage (one Ray actor that sees every block in corpus order, see
`documents.Ledger`) sends its counts after each block to a small named actor, one per run and
split. Each execution of a dataset (every epoch, every evaluation pass) has its own ledger and
its own entry; `corpus_stats(cfg, split)` returns the entry of the most recent execution:

    {"records", "documents", "train_documents", "val_documents", "dropped_short", "duplicates",
     "bad_records", "chars", "bad_by_file": {uri: [{"line", "reason"}, ...]},
     "bad_count_by_file": {uri: n}}

The counts are complete once the consumer has read the whole stream (the ledger reports a block
before passing it on). Lookups work from the driver, Ray Train workers and Ray Data tasks alike.
"""

from __future__ import annotations

from typing import Optional

from llmos_ray.errors import DataError

_KEPT_EXECUTIONS = 8


class StatsBoard:
    """The named actor's state: the latest counts of each recent pipeline execution, in the order
    the executions started."""

    def __init__(self):
        self._runs: dict[str, dict] = {}

    def update(self, execution: str, counts: dict) -> None:
        """Replace an execution's counts; keys left out (unchanged bad-record lists) are kept."""
        previous = self._runs.get(execution, {})
        self._runs[execution] = {**previous, **counts}
        while len(self._runs) > _KEPT_EXECUTIONS:
            self._runs.pop(next(iter(self._runs)))

    def latest(self) -> Optional[dict]:
        return next(reversed(self._runs.values())) if self._runs else None


def actor_name(run_name: str, split: str) -> str:
    return f"llmos-data-stats:{run_name}:{split}"


_HANDLES: dict[tuple, object] = {}  # the creating (owning) handles: the actors live as long as they do


def stats_actor(run_name: str, split: str):
    """Get or create the named stats actor of a run's split (0 CPUs, not detached).

    A non-detached actor dies when its owner's handles are gone (handles from `get_actor` only
    borrow it), so this process keeps the handle it created, per Ray session, for the job's life."""
    import ray

    from llmos_ray.runtime import init_ray

    init_ray()  # what creating the actor would do implicitly, but as every llmos command starts Ray
    name = actor_name(run_name, split)
    context = ray.get_runtime_context()
    key = (context.gcs_address, context.namespace, context.get_job_id(), name)
    if key not in _HANDLES:
        remote = ray.remote(num_cpus=0, max_restarts=0)(StatsBoard)
        _HANDLES[key] = remote.options(name=name, get_if_exists=True).remote()
    return _HANDLES[key]


def corpus_stats(cfg, split: str = "train") -> dict:
    """Counts of the latest execution of `cfg`'s `split` pipeline in this Ray job (see module doc)."""
    import ray

    try:
        actor = ray.get_actor(actor_name(cfg.run.name, split))
    except ValueError:
        raise DataError(f"no {split} data pipeline of run {cfg.run.name!r} has been built in this Ray job") from None
    return ray.get(actor.latest.remote()) or {}
