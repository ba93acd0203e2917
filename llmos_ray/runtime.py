"""Connecting to Ray: the cluster in RAY_ADDRESS (as under `ray job submit`) or a local one of our own.

A local Ray that an llmos command starts is pinned, never found by lookup: `address="local"` and
a temp root of its own (RAY_TMPDIR, inherited by its workers). Ray's address lookup — `ray.init()`
without an address, and Ray Train's state queries inside the run — otherwise scans the machine's
running clusters and, with another Ray up (a `ray start` cluster, a notebook), fails with "Found
multiple active Ray instances" or queries the wrong one. To use a running cluster, set RAY_ADDRESS.

Where output goes (`run_log`): while a command works on a run, everything Ray, DeepSpeed, wandb
and our own INFO logs say — in this process and in every worker of a Ray we started — is appended
to the run's `llmos.log`; the console keeps progress lines, warnings and errors (`verbose`: all).
`command()` is how the user's shell reaches `llmos`, for the next commands that output suggests.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading

log = logging.getLogger(__name__)

# Environment every llmos worker needs; set in the job's runtime_env when we start Ray ourselves.
WORKER_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}


def init_ray(num_cpus: int | None = None) -> bool:
    """Connect to the running cluster (RAY_ADDRESS, or inside a Ray job) or start a local Ray.
    Does nothing when Ray is already initialised (a driver script or a test did it). Returns
    whether this call initialised Ray (then the caller may shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    env = {k: os.environ.get(k, v) for k, v in WORKER_ENV.items()}
    for key in ("WANDB_API_KEY", "WANDB_MODE", "HF_TOKEN", "HF_HUB_OFFLINE", "DS_ACCELERATOR",
                "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_DEFAULT_REGION"):
        if key in os.environ:
            env[key] = os.environ[key]
    address = os.environ.get("RAY_ADDRESS")
    if address:
        # On a cluster (and inside `ray job submit`, which sets RAY_ADDRESS) the job's own runtime
        # env applies: adding ours would conflict with it (see jobs/runtime_env.yaml).
        ray.init(address=address, log_to_driver=True)
    else:
        # Short: Ray's socket paths under it must fit the 107-byte limit of a Unix socket address.
        os.environ.setdefault("RAY_TMPDIR", os.path.join("/tmp", f"llmos-{os.getpid()}"))
        env["RAY_TMPDIR"] = os.environ["RAY_TMPDIR"]
        ray.init(address="local", num_cpus=num_cpus, runtime_env={"env_vars": env}, include_dashboard=None,
                 _temp_dir=os.path.join(os.environ["RAY_TMPDIR"], "ray"))
        _route_worker_output()
    log.info("Ray: %s", {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")})
    return True


# ---------------------------------------------------------------------------------------------
# Where output goes

WORKER_LOG_FORMAT = "llmos %(levelname)s %(name)s: %(message)s"
"""How our loggers write inside Ray workers, so the driver can tell our warnings from the rest."""
_OURS = re.compile(r"llmos (WARNING|ERROR|CRITICAL) ")
_state: dict = {"path": None, "file": None, "verbose": False}
_lock = threading.Lock()


def set_verbose(verbose: bool) -> None:
    """Show everything on the console, as it comes (the CLI's --verbose)."""
    _state["verbose"] = verbose


@contextlib.contextmanager
def run_log(output_dir: str):
    """While the block runs, append every log line of this process (INFO and up) and the output of
    the Ray workers we started to `<output_dir>/llmos.log` (local output dirs only). Yields its path."""
    if "://" in output_dir and not output_dir.startswith("file://"):
        yield None
        return
    path = os.path.join(output_dir.removeprefix("file://"), "llmos.log")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    with contextlib.suppress(ImportError):
        import ray.data  # noqa: F401 - Ray Data configures its own logger on import: let it, then adjust it
    loggers = [logging.getLogger(), logging.getLogger("llmos_ray.progress"), *_ray_loggers()]
    previous = {lg: lg.level for lg in loggers}
    for lg in loggers:
        lg.addHandler(handler)
        if lg.getEffectiveLevel() > logging.INFO:
            lg.setLevel(logging.INFO)
    with _lock:
        before = _state["path"], _state["file"]
        _state["path"], _state["file"] = path, open(path, "a", buffering=1)
    _quiet_ray_console()
    logging.getLogger("llmos_ray.progress").info("log: %s (all of Ray's, DeepSpeed's and our messages; "
                                                 "--verbose shows them here)", path)
    try:
        yield path
    finally:
        with _lock:
            _state["file"].close()
            _state["path"], _state["file"] = before
        for lg in loggers:
            lg.removeHandler(handler)
            lg.setLevel(previous[lg])
        handler.close()


CONSOLE_NOISE = (
    "Token authentication is enabled for this Ray cluster",  # every local start; it is on, as it should be
    "PYTHON worker processes have been started",  # the raylet, when a 2-core machine starts Ray Data actors
    "Progress bars disabled",  # Ray Data, because we disable them (RAY_DATA_DISABLE_PROGRESS_BARS)
)
"""Warnings Ray prints on every run of a small machine that ask nothing of the user: file only."""


def _is_noise(text: str) -> bool:
    return any(n in text for n in CONSOLE_NOISE)


def _quiet_ray_console() -> None:
    """Ray's console handler (which ray.init sets up again) shows warnings and errors only, and not
    CONSOLE_NOISE; its INFO lines (a banner per start, each dataset's plan) reach the run log."""
    if _state["verbose"]:
        return
    for h in (h for lg in _ray_loggers() for h in lg.handlers):
        if not isinstance(h, logging.FileHandler):
            h.setLevel(max(h.level, logging.WARNING))
            if not any(getattr(f, "llmos_noise", False) for f in h.filters):
                noise = logging.Filter()
                noise.filter = lambda record: not _is_noise(record.getMessage())
                noise.llmos_noise = True
                h.addFilter(noise)


def _ray_loggers() -> list[logging.Logger]:
    """Ray's loggers with handlers of their own ("ray", and "ray.data" once Ray Data is imported):
    they do not propagate, so each gets the run log's handler and a quiet console."""
    names = [n for n in logging.Logger.manager.loggerDict if n == "ray" or n.startswith("ray.")]
    return [lg for lg in map(logging.getLogger, dict.fromkeys(["ray", *names])) if lg.handlers and not lg.propagate]


def worker_logging() -> None:
    """Call first in code that runs in a Ray worker (the training loop, an inference actor): our
    loggers write `llmos LEVEL name: message`, which the driver shows when it is a warning or an
    error and files with the rest otherwise."""
    logger = logging.getLogger("llmos_ray")
    if any(getattr(h, "llmos_worker", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(WORKER_LOG_FORMAT))
    handler.llmos_worker = True
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _route_worker_output() -> None:
    """Take over the printing of worker output in this driver (Ray's log monitor hands every batch of
    worker lines to a dispatcher): each line goes to the current run log, and to the console only
    when it is one of our warnings or errors (or everything, verbose). Without a run log, or when
    this Ray version has no such dispatcher, Ray prints as usual."""
    try:
        from ray._private import ray_logging
    except ImportError:
        return
    dispatcher = getattr(ray_logging, "global_worker_stdstream_dispatcher", None)
    default = next((h for name, h in getattr(dispatcher, "handlers", []) if name == "ray_print_logs"), None)
    if default is None:
        return

    def route(data) -> None:
        with _lock:
            sink = _state["file"]
        if sink is None or _state["verbose"]:
            default(data)
        if sink is None:
            return
        who = data.get("actor_name") or data.get("task_name") or "worker"
        prefix = f"({who} pid={data.get('pid')}) "
        with _lock:
            for line in data.get("lines", []):
                sink.write(prefix + line + "\n")
        if not _state["verbose"]:
            for line in data.get("lines", []):
                if _OURS.match(line):
                    print(line.removeprefix("llmos "), file=sys.stderr, flush=True)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("llmos_run_log", route)
    _quiet_ray_console()
    # The raylet's messages (a worker killed for memory, a node lost) are printed by another thread
    # through this module function: the run log gets them all, the console those that are not noise.
    from ray._private import worker as ray_worker

    printer = getattr(ray_worker, "print_to_stdstream", None)
    if printer is None:
        return

    def print_raylet(data, ignore_prefix):
        with _lock:
            sink = _state["file"]
        if sink is not None:
            with _lock:
                for line in data.get("lines", []):
                    sink.write(f"({data.get('pid')}) {line}\n")
        if sink is None or _state["verbose"] or not all(_is_noise(line) for line in data.get("lines", [])):
            printer(data, ignore_prefix)

    ray_worker.print_to_stdstream = print_raylet


ACTOR_NAMESPACE = "llmos"
"""The Ray namespace of our named actors (the usage meter, the adapter table)."""


def detached_actor(cls, name: str, *args, **options):
    """The detached actor `name` of class `cls` in ACTOR_NAMESPACE, started with `args` and the
    actor `options` if there is none: any replica may be first, and two that start it at once
    both get the one that won."""
    import time

    import ray

    options = dict(name=name, namespace=ACTOR_NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
                   **options)
    for attempt in range(5):
        try:
            return ray.remote(cls).options(**options).remote(*args)
        except ValueError:  # two replicas created it at once: the other one won
            time.sleep(0.2 * (attempt + 1))
            try:
                return ray.get_actor(name, namespace=ACTOR_NAMESPACE)
            except ValueError:
                continue
    raise RuntimeError(f"actor {name} could not be started")


def worker_resources(cpus_per_worker: float | None, num_workers: int, use_gpu: bool) -> dict:
    """CPUs per training worker. Unless the config fixes it: at most 1, and never so many that Ray Data
    is left without a CPU — on a 2-CPU machine 2 workers get 0.5 each. With a full CPU each, Ray
    Train v2 reserves every CPU for its workers and Ray Data's read and map tasks never get one: the
    data pipeline waits forever ("Cluster resources are not enough to run any task"), whatever Ray
    Data's resource limits say."""
    import ray

    if cpus_per_worker is None:
        total = float(ray.cluster_resources().get("CPU", 1))
        cpus_per_worker = round(min(1.0, max(0.1, (total - 1.0) / num_workers)), 2)
    res = {"CPU": cpus_per_worker}
    if use_gpu:
        res["GPU"] = 1
    return res


def command() -> str:
    """How a user's shell reaches this `llmos`: `llmos` when that is on PATH and is this one, else
    its path (e.g. .venv/bin/llmos after `make run`, whose virtualenv is not activated)."""
    import shutil

    script = os.path.join(os.path.dirname(sys.executable), "llmos")
    found = shutil.which("llmos")
    if found and os.path.realpath(found) == os.path.realpath(script):
        return "llmos"
    if os.path.exists(script):
        relative = os.path.relpath(script)
        return relative if not relative.startswith("..") else script
    return f"{sys.executable} -m llmos_ray.cli"
