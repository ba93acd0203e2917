"""The exceptions llmos-ray raises on purpose. Each message says what to change.

Every mistake a user can make (a config value, a file, a model, a checkpoint) raises one of these,
in the driver or inside a Ray worker alike; the CLI prints its message as one line and exits 2.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib


class LlmosError(Exception):
    """Base class of every error llmos-ray raises for a user to act on."""


class ConfigError(LlmosError, ValueError):
    """A config file, key or value is wrong."""


class DataError(LlmosError):
    """A corpus or dataset cannot be read, or has too many bad records."""


class ModelError(LlmosError):
    """A model preset, directory or hub id cannot be resolved or loaded."""


class CheckpointError(LlmosError):
    """A checkpoint is missing, incomplete or does not match the run."""


class ClusterError(LlmosError):
    """A local cluster could not be started or found, or a submitted job did not succeed."""


def find_ours(exc: BaseException | None) -> LlmosError | None:
    """The LlmosError that `exc` is or wraps, else None. Ray wraps an exception raised in a task or
    an actor (RayTaskError.cause), Ray Train wraps a worker's (WorkerGroupError.worker_failures)
    and its controller's (ControllerError.controller_failure); Python chains them (__cause__,
    __context__). A user mistake found in a worker is then reported as the one line it says."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, LlmosError) and type(e).__module__.startswith("llmos_ray"):
            return e
        inner = getattr(e, "cause", None)
        if isinstance(inner, LlmosError):
            return inner
        failures = getattr(e, "worker_failures", None)
        nested = [inner, getattr(e, "controller_failure", None), e.__cause__, e.__context__]
        if isinstance(failures, dict):
            nested = [*failures.values(), *nested]
        todo += [n for n in nested if isinstance(n, BaseException)]
    return None


@contextlib.contextmanager
def reraise_ours():
    """Re-raise an LlmosError raised inside a Ray task, actor or training worker as itself."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised unchanged unless it wraps one of ours
        cause = find_ours(e)
        if cause is None or cause is e:
            raise
        raise cause from None
