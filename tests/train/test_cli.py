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


def read_metrics(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


def test_pretrain_cli_default_cpus_does_not_hang_and_learns(tmp_path, ray_tmp):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "llmos_ray.cli", "pretrain", "--config", TINY, f"run.output_dir={out}",
           "train.max_steps=20", "train.eval_every=10", "data.max_documents=120"]
    proc = subprocess.run(cmd, env=llmos_env(ray_tmp), capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Requesting resources: {'CPU': 0.5} * 2" in proc.stdout + proc.stderr  # 2 CPUs: half each
    assert f"next: llmos serve --model {out / 'export'}" in proc.stdout
    vals = [m["val_ppl"] for m in read_metrics(out) if "val_ppl" in m]
    assert len(vals) == 2 and vals[1] < vals[0]
    from llmos_ray.config import load_config

    assert load_config(str(out / "config.yaml")).train.max_steps == 20
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "export")
    tok = AutoTokenizer.from_pretrained(out / "export")
    ids = model.generate(**tok("import os\n", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert ids.shape[1] > 3


def test_resume_never_refuses_an_existing_run(tmp_path):
    from llmos_ray.config import ConfigError, load_config
    from llmos_ray.train.trainer import resolve_resume

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=r", "run.resume=never"]).resolved()
    os.makedirs(os.path.join(cfg.run.storage_path, "r"))
    open(os.path.join(cfg.run.storage_path, "r", "checkpoint_manager_snapshot.json"), "w").write("{}")
    with pytest.raises(ConfigError, match="already has checkpoints"):
        resolve_resume(cfg)
    cfg.run.resume = "auto"
    assert resolve_resume(cfg) is None


def test_resume_from_a_missing_checkpoint_is_a_clear_error(tmp_path):
    from llmos_ray.config import load_config
    from llmos_ray.errors import CheckpointError
    from llmos_ray.train.trainer import resolve_resume

    cfg = load_config(None, [f"run.output_dir={tmp_path}",
                             f"run.resume={tmp_path}/nope/checkpoint_00000004"]).resolved()
    with pytest.raises(CheckpointError, match="has no llmos_state.json"):
        resolve_resume(cfg)
