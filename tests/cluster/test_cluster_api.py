"""The local-cluster calls that need no running cluster: runtime env, auth token, status, port choice.
Starting and stopping a real cluster is tested in test_local_cluster.py."""

from __future__ import annotations

import os
import socket

import pytest
import yaml

from llmos_ray import cluster as local
from llmos_ray.cli import main
from llmos_ray.errors import ClusterError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_job_runtime_env_is_the_docs_file_plus_working_dir_and_extra_env():
    env = local.job_runtime_env(ROOT, env_vars={"WANDB_API_KEY": "from-the-shell"})
    on_disk = yaml.safe_load(open(os.path.join(ROOT, "jobs", "runtime_env.yaml")))
    assert env["working_dir"] == ROOT and env["excludes"] == on_disk["excludes"]
    assert env["env_vars"] == {**on_disk["env_vars"], "WANDB_API_KEY": "from-the-shell"}
    assert "runs/" in env["excludes"] and ".venv/" in env["excludes"]


def test_job_runtime_env_outside_the_project_names_the_missing_file(tmp_path):
    with pytest.raises(ClusterError, match="runtime_env.yaml not found: working_dir must be the llmos-ray project"):
        local.job_runtime_env(str(tmp_path))


def test_auth_token_prefers_the_environment_then_the_token_file(tmp_path, monkeypatch):
    token_file = tmp_path / "auth_token"
    token_file.write_text("file-token\n")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert local.auth_token() == "file-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert local.auth_token() == "env-token"


def test_status_and_down_without_a_cluster(tmp_path, capsys):
    assert local.status(str(tmp_path)) is None
    assert local.down(temp_dir=str(tmp_path)) == 0
    assert main(["cluster", "status", "--temp-dir", str(tmp_path)]) == 0
    assert "no local llmos cluster is running" in capsys.readouterr().out


def test_a_taken_port_is_replaced_by_a_free_one():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        other = local._free(taken)
        assert other != taken
    with socket.socket() as s:
        s.bind(("127.0.0.1", other))  # really free
