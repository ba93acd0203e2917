"""`llmos pretrain` as a user runs it: a subprocess that starts its own Ray on this 2-core machine
(so the defaults are proven not to hang Ray Data + Ray Train), and run.resume's checks. A driver
killed hard and re-run with run.resume=auto is drilled through job submission in
tests/cluster/test_local_cluster.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "jobs", "configs", "pretrain_tiny.yaml")


def llmos_env(ray_tmp: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, WANDB_MODE="offline", RAY_DATA_DISABLE_PROGRESS_BARS="1")
    return env


def stop_ray_started_under(ray_tmp: str) -> None:
    """Kill only the Ray processes whose session lives in `ray_tmp` (never the test session's Ray)."""
    from llmos_ray.cluster import cluster_processes

    for p in cluster_processes(ray_tmp):
        p.kill()


@pytest.fixture
def ray_tmp(only_ray_on_this_machine):
    path = tempfile.mkdtemp(prefix="llk", dir="/tmp")  # short: Ray's socket paths have a length limit
    yield path
    stop_ray_started_under(path)


def assert_command_serves(command: str, ray_tmp: str) -> None:
    """Run a printed `… serve --model DIR` command as a user's shell would: once it says it is serving,
    the first request is answered."""
    import shlex
    import signal

    import httpx

    from tests.serve.conftest import free_port

    port = free_port()
    proc = subprocess.Popen([*shlex.split(command), "--port", str(port)], env=llmos_env(ray_tmp),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        for line in proc.stdout:  # ends when the command exits; the test's timeout bounds a hang
            seen.append(line)
            if line.startswith("serving "):
                break
        else:
            raise AssertionError(f"`{command}` exited without serving: {''.join(seen)[-3000:]}")
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"model": "run", "prompt": "import os", "max_tokens": 3})
        assert r.status_code == 200, r.text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def read_metrics(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


def interrupt_after_first_checkpoint(cmd: list[str], out, env: dict) -> str:
    """Start `cmd`, send SIGINT (Ctrl-C) once a checkpoint is recorded; return the interruption hint."""
    import signal
    import time

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 420
    while not any("checkpoint" in m for m in read_metrics(out)):
        assert proc.poll() is None and time.time() < deadline, "no checkpoint before the deadline"
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    return next(line for line in err.splitlines() if line.startswith("llmos: interrupted."))


def test_pretrain_cli_as_a_user_runs_it(tmp_path, ray_tmp):
    """`llmos pretrain` in a fresh process with the 2-CPU defaults, beside another Ray on the machine
    (a `ray start` cluster), as a user runs it: Ctrl-C after the first checkpoint names the newest
    complete checkpoint and the exact command that resumes; that command, run as printed, neither
    hangs nor is disturbed by the other Ray, and ends the run; its console holds progress, warnings
    and the summary, while Ray's chatter is in the run's llmos.log; the printed `next:` command
    serves the model."""
    import re
    import shlex

    from llmos_ray import cluster

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "llmos_ray.cli", "pretrain", "--config", TINY, f"run.output_dir={out}",
           "train.max_steps=20", "train.eval_every=10", "train.checkpoint_every=4", "data.max_documents=120"]
    other = cluster.up(num_cpus=1, temp_dir=tempfile.mkdtemp(prefix="llo", dir="/tmp"), dashboard_port=0, port=0,
                       metrics_port=0)
    try:
        hint = interrupt_after_first_checkpoint(cmd, out, llmos_env(ray_tmp))
        # The hint names the newest checkpoint that finished writing: at least the last one the metrics
        # recorded (a later one may have completed between the SIGINT and Ray Train's abort).
        named = re.search(r"The last complete checkpoint of run 'pretrain-tiny' is step (\d+) \((\S+)\); `(.+)` "
                          r"resumes from it \(run.resume=auto\)", hint)
        assert named, hint
        resumed_from, path, resume_cmd = int(named.group(1)), named.group(2), named.group(3)
        assert resumed_from >= max(m["step"] for m in read_metrics(out) if "checkpoint" in m)
        assert resumed_from % 4 == 0 and os.path.exists(os.path.join(path, "llmos_state.json")), path
        assert not (out / "export").exists()
        assert "pretrain --config" in resume_cmd and f"run.output_dir={out}" in resume_cmd
        proc = subprocess.run(shlex.split(resume_cmd), env=llmos_env(ray_tmp), capture_output=True, text=True,
                              timeout=420)
    finally:
        cluster.down(other)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    log_text = open(out / "llmos.log").read()
    assert "Requesting resources: {'CPU': 0.5} * 2" in log_text  # 2 CPUs: half each
    for chatter in ("Reporting training result", "TrainingReport(", "multiple active Ray instances", "wandb:",
                    "Started a local Ray instance", "Token authentication", "streaming_executor", "PYTHON worker",
                    "Processing zero checkpoint", "it/s]"):
        assert chatter not in console, chatter
    progress = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(" |")[0] for line in progress if "| loss " in line] == [
        f"step {s}/20" for s in (5, 10, 15, 20) if s > resumed_from]  # pretrain_tiny.yaml: train.log_every=5
    assert [line.split(" |")[0] for line in progress if "| checkpoint saved" in line] == [
        f"step {s}/20" for s in (8, 12, 16, 20) if s > resumed_from]
    assert f"log: {out / 'llmos.log'}" in proc.stdout
    next_line = proc.stdout.strip().splitlines()[-1]
    assert next_line.startswith("next: ") and next_line.endswith(f"serve --model {out / 'export'}")
    assert_command_serves(next_line.removeprefix("next: "), ray_tmp)
    vals = {m["step"]: m["val_ppl"] for m in read_metrics(out) if "val_ppl" in m}
    assert sorted(vals) == [10, 20] and vals[20] < vals[10]
    from llmos_ray.config import load_config

    assert load_config(str(out / "config.yaml")).train.max_steps == 20
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "export")
    tok = AutoTokenizer.from_pretrained(out / "export")
    ids = model.generate(**tok("import os\n", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert ids.shape[1] > 3


def test_resume_never_leaves_an_existing_run_and_starts_over_beside_it(tmp_path):
    from llmos_ray.config import load_config
    from llmos_ray.train.trainer import resolve_resume

    cfg = load_config(None, [f"run.output_dir={tmp_path / 'r'}", "run.name=r", "run.resume=never"]).resolved()
    ckpt = os.path.join(cfg.run.storage_path, "r", "checkpoint_00000004")
    os.makedirs(ckpt)
    open(os.path.join(ckpt, "llmos_state.json"), "w").write('{"step": 4, "job": "pretrain"}')
    fresh, start, finished = resolve_resume(cfg)
    assert (fresh.run.name, fresh.run.output_dir) == ("r-2", f"{tmp_path / 'r'}-2") and start is finished is None
    assert fresh.run.storage_path == f"{tmp_path / 'r'}-2/checkpoints"
    cfg.run.resume = "auto"
    same, start, finished = resolve_resume(cfg)
    assert same.run.name == "r" and start is finished is None  # step 4 of 200: resumable


def test_resume_from_a_missing_checkpoint_is_a_clear_error(tmp_path):
    from llmos_ray.config import load_config
    from llmos_ray.errors import CheckpointError
    from llmos_ray.train.trainer import resolve_resume

    cfg = load_config(None, [f"run.output_dir={tmp_path}",
                             f"run.resume={tmp_path}/nope/checkpoint_00000004"]).resolved()
    with pytest.raises(CheckpointError, match="has no llmos_state.json"):
        resolve_resume(cfg)
