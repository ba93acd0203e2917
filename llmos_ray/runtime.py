"""Connecting to Ray: the cluster in RAY_ADDRESS (as under `ray job submit`) or a local one of our own.

A local Ray that an llmos command starts is pinned, never found by lookup: `address="local"` and
a temp root of its own (RAY_TMPDIR, inherited by its workers). Ray's address lookup — `ray.init()`
without an address, and Ray Train's state queries inside the run — otherwise scans the machine's
running clusters and, with another Ray up (a `ray start` cluster, a notebook), fails with "Found
multiple active Ray instances" or queries the wrong one. To use a running cluster, set RAY_ADDRESS.
"""

from __future__ import annotations

import logging
import os

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
    log.info("Ray: %s", {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")})
    return True


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
