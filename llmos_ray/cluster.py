"""A local Ray cluster for `ray job submit`, the dashboard and Python drivers — and the calls a
driver uses to submit llmos jobs to any cluster.

    llmos cluster up            # ray start --head on 127.0.0.1, dashboard + Prometheus metrics
    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/pretrain.py --config jobs/configs/pretrain_tiny.yaml
    llmos cluster down          # stops this cluster's processes, and only those

The head runs from this Python environment (so a job's `python` is this interpreter), with its own
temp dir: `down` finds the cluster's processes by that dir and stops them with their children,
leaving any other Ray on the machine alone. Token auth is on (Ray's default for new clusters); the
client returned by `LocalCluster.client()` sends the token, and `up` prints what the `ray` CLI needs.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Optional

from llmos_ray.errors import ClusterError

log = logging.getLogger(__name__)

DEFAULT_TEMP_DIR = os.path.join(tempfile.gettempdir(), "llmos-ray")
STATE_FILE = "llmos-cluster.json"
RUNTIME_ENV_FILE = os.path.join("jobs", "runtime_env.yaml")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class LocalCluster:
    """A running local head node, as `up` started it (also saved in `<temp_dir>/llmos-cluster.json`)."""

    temp_dir: str
    gcs_address: str
    """`ray.init(address=…)` / `RAY_ADDRESS` for Python drivers on this machine."""
    dashboard_url: str
    """The dashboard, and the address for job submission (`ray job submit --address`)."""
    metrics_url: str
    """Prometheus text of this node's metrics (no auth)."""
    num_cpus: int

    def client(self):
        """A `JobSubmissionClient` for this cluster, sending Ray's auth token."""
        return job_client(self.dashboard_url)


def up(num_cpus: Optional[int] = None, temp_dir: Optional[str] = None, dashboard_port: int = 8265,
       port: int = 6379, metrics_port: int = 8080, timeout_s: float = 90.0) -> LocalCluster:
    """`ray start --head` bound to 127.0.0.1, from this interpreter's environment. Ports already
    taken are replaced by free ones (printed). `num_cpus` defaults to the machine's CPUs + 2
    (4 on 2 cores): Ray Train workers and Ray Data tasks then both find CPUs (on a Ray with as many
    CPUs as cores, workers holding a whole CPU each leave Ray Data's tasks none, and the data
    pipeline waits forever). Refuses to start a second cluster in the same temp dir."""
    temp_dir = os.path.abspath(temp_dir or DEFAULT_TEMP_DIR)
    existing = status(temp_dir)
    if existing is not None:
        raise ClusterError(f"a local cluster is already running from {temp_dir} (dashboard "
                           f"{existing.dashboard_url}); run `llmos cluster down` first or pass another --temp-dir")
    os.makedirs(temp_dir, exist_ok=True)
    num_cpus = num_cpus or (os.cpu_count() or 2) + 2
    ports = {"port": _free(port), "dashboard": _free(dashboard_port), "metrics": _free(metrics_port),
             "agent": _free(0), "client": _free(0)}
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    cmd = [ray_bin if os.path.exists(ray_bin) else "ray", "start", "--head", "--node-ip-address=127.0.0.1",
           f"--port={ports['port']}", f"--num-cpus={num_cpus}", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
           f"--metrics-export-port={ports['metrics']}", f"--dashboard-agent-listen-port={ports['agent']}",
           f"--ray-client-server-port={ports['client']}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    env = dict(os.environ)
    env.setdefault("RAY_AUTH_MODE", "token")  # a new local cluster gets token auth, as Ray's own default
    env.pop("RAY_ADDRESS", None)
    # A job's `python …` resolves through the PATH of the process that started the head.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    if env["RAY_AUTH_MODE"] == "token" and auth_token() is None:
        # A fresh machine has no ~/.ray/auth_token until some Ray made one; `ray start` refuses to
        # make it, `ray get-auth-token --generate` is Ray's documented way.
        subprocess.run([cmd[0], "get-auth-token", "--generate"], env=env, capture_output=True, timeout=timeout_s)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise ClusterError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    cluster = LocalCluster(temp_dir=temp_dir, gcs_address=f"127.0.0.1:{ports['port']}",
                           dashboard_url=f"http://127.0.0.1:{ports['dashboard']}",
                           metrics_url=f"http://127.0.0.1:{ports['metrics']}/metrics", num_cpus=num_cpus)
    with open(os.path.join(temp_dir, STATE_FILE), "w") as f:
        json.dump(asdict(cluster), f, indent=2)
    _wait_for_dashboard(cluster, timeout_s)
    log.info("local Ray cluster up: %s", cluster.dashboard_url)
    return cluster


def down(cluster: Optional[LocalCluster] = None, temp_dir: Optional[str] = None, timeout_s: float = 10.0) -> int:
    """Stop the local cluster started from `temp_dir` (or `cluster`): its Ray processes and their
    children (workers, job drivers), nothing else. Returns how many processes were stopped."""
    import psutil

    temp_dir = os.path.abspath(cluster.temp_dir if cluster else (temp_dir or DEFAULT_TEMP_DIR))
    procs = cluster_processes(temp_dir)
    for p in procs:
        _signal(p, "terminate")
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for p in alive:
        _signal(p, "kill")
    psutil.wait_procs(alive, timeout=5)
    state = os.path.join(temp_dir, STATE_FILE)
    if os.path.exists(state):
        os.remove(state)
    return len(procs)


def status(temp_dir: Optional[str] = None) -> Optional[LocalCluster]:
    """The local cluster running from `temp_dir`, or None (no state file, or its processes are gone)."""
    temp_dir = os.path.abspath(temp_dir or DEFAULT_TEMP_DIR)
    path = os.path.join(temp_dir, STATE_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        cluster = LocalCluster(**json.load(f))
    return cluster if cluster_processes(temp_dir) else None


def cluster_processes(temp_dir: str) -> list:
    """The Ray daemons started with `temp_dir` in their command line, and all their descendants."""
    import psutil

    roots = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmdline = p.info.get("cmdline") or []
        if p.pid != os.getpid() and any(temp_dir in arg for arg in cmdline):
            roots.append(p)
    found = {p.pid: p for p in roots}
    for p in roots:
        try:
            for child in p.children(recursive=True):
                found.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass
    return list(found.values())


def job_client(address: str):
    """A `JobSubmissionClient` for a dashboard address, sending the Ray auth token when there is
    one (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token)."""
    from ray.job_submission import JobSubmissionClient

    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return JobSubmissionClient(address, headers=headers)


def auth_token() -> Optional[str]:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    if os.path.exists(path):
        with open(path) as f:
            return f.read().strip() or None
    return None


def job_runtime_env(working_dir: str = ".", env_vars: Optional[dict] = None) -> dict:
    """The runtime env our docs' `ray job submit` lines use: jobs/runtime_env.yaml plus the working
    dir, with `env_vars` (secrets from your shell, storage endpoints …) added."""
    import yaml

    working_dir = os.path.abspath(working_dir)
    path = os.path.join(working_dir, RUNTIME_ENV_FILE)
    if not os.path.exists(path):
        raise ClusterError(f"{path} not found: working_dir must be the llmos-ray project directory")
    with open(path) as f:
        env = yaml.safe_load(f) or {}
    env["working_dir"] = working_dir
    env["env_vars"] = {**env.get("env_vars", {}), **(env_vars or {})}
    return env


def wait_for_job(client, job_id: str, timeout_s: float = 600.0, poll_s: float = 2.0) -> str:
    """Poll until the job ends; return 'SUCCEEDED', else raise ClusterError with the end of its logs."""
    deadline = time.time() + timeout_s
    while True:
        state = str(client.get_job_status(job_id)).split(".")[-1]
        if state in TERMINAL:
            break
        if time.time() > deadline:
            raise ClusterError(f"job {job_id} still {state} after {timeout_s:.0f} s:\n"
                               f"{client.get_job_logs(job_id)[-3000:]}")
        time.sleep(poll_s)
    if state != "SUCCEEDED":
        raise ClusterError(f"job {job_id} {state}:\n{client.get_job_logs(job_id)[-3000:]}")
    return state


def scrape_metrics(metrics_url: str, prefix: str = "ray_llmos_", timeout_s: float = 30.0) -> dict[str, float]:
    """The Prometheus series of a node's metrics endpoint whose names start with `prefix`, as
    {name: value} (labels dropped; the last series of a name wins). Ray exports our metrics with a
    `ray_` prefix: Gauge `llmos_train_loss` → `ray_llmos_train_loss`, Counter `llmos_serve_requests`
    → `ray_llmos_serve_requests_total`, Histogram `…_latency_s` → `…_latency_s_bucket/_sum/_count`."""
    import urllib.request

    with urllib.request.urlopen(metrics_url, timeout=timeout_s) as r:
        text = r.read().decode()
    return {line.split("{")[0].split(" ")[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith(prefix)}


def _wait_for_dashboard(cluster: LocalCluster, timeout_s: float) -> None:
    """The head answers `ray start` before the job API is up: wait for it."""
    deadline, last = time.time() + timeout_s, None
    while time.time() < deadline:
        try:
            cluster.client().list_jobs()
            return
        except Exception as e:  # connection refused / 503 while the dashboard starts
            last = e
            time.sleep(1.0)
    raise ClusterError(f"the dashboard at {cluster.dashboard_url} did not answer within {timeout_s:.0f} s: {last}")


def _free(port: int) -> int:
    """`port` if nothing listens on it on 127.0.0.1, else a free one the OS picks."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
            return s.getsockname()[1]
        except OSError:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def _signal(proc, how: str) -> None:
    import psutil

    try:
        getattr(proc, how)()
    except psutil.NoSuchProcess:
        pass


def describe(cluster: LocalCluster) -> str:
    """What a user needs to use the cluster from a shell."""
    return "\n".join([
        f"Ray cluster up ({cluster.num_cpus} CPUs), temp dir {cluster.temp_dir}",
        f"  dashboard:  {cluster.dashboard_url}",
        f"  metrics:    {cluster.metrics_url}",
        f"  drivers:    RAY_ADDRESS={cluster.gcs_address}",
        "use it from this shell:",
        f"  export RAY_ADDRESS={cluster.dashboard_url} RAY_AUTH_MODE=token",
        "  ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- "
        "python jobs/pretrain.py --config jobs/configs/pretrain_tiny.yaml",
        "stop it: llmos cluster down"
        + ("" if cluster.temp_dir == DEFAULT_TEMP_DIR else f" --temp-dir {cluster.temp_dir}"),
    ])

