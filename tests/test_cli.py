"""Every `llmos` command with a typical user mistake: one line on stderr that names the key or the
file, exit code 2, no traceback — and found before Ray starts (these tests fail if anything tries
to start it)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llmos_ray import runtime
from llmos_ray.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "jobs", "configs", "pretrain_tiny.yaml")


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the command started Ray before finding the mistake")

    monkeypatch.setattr(runtime, "init_ray", refuse)
    monkeypatch.setenv("LLMOS_REGISTRY", os.path.join(os.sep, "nonexistent-llmos-registry", "models.json"))


def not_a_model(tmp_path) -> str:
    d = tmp_path / "notes"
    d.mkdir()
    (d / "readme.txt").write_text("not a model\n")
    return str(d)


MISTAKES = [
    # (arguments, what the one line must name)
    (["config", "show", "train.lr=fast"], "train.lr"),
    (["pretrain", "train.zero_stage=3"], "deepspeed.zero_stage"),
    (["pretrain", "--config", "/nonexistent/pretrain.yaml"], "/nonexistent/pretrain.yaml"),
    (["pretrain", "data.paths=[/nonexistent/corpus]"], "/nonexistent/corpus"),
    (["pretrain", "train.global_batch_size=7"], "train.global_batch_size"),
    (["pretrain", "run.resume=/nonexistent/checkpoint_00000010"], "/nonexistent/checkpoint_00000010"),
    (["data", "prepare", "data.paths=[/nonexistent/corpus.jsonl]"], "/nonexistent/corpus.jsonl"),
    (["finetune", "model.base={not_a_model}"], "model.base"),
    (["finetune", "model.base={tiny_model}", "finetune.paths=[/nonexistent/chats.jsonl]"], "/nonexistent/chats.jsonl"),
    (["distill", "model.size=tiny"], "distill.teacher"),
    (["export", "/nonexistent/checkpoint_00000010", "{tmp}/out"], "/nonexistent/checkpoint_00000010"),
    (["plan", "model.family=gpt3"], "model.family"),
    (["serve", "--model", "{not_a_model}"], "has no config.json"),
    (["serve", "--model", "no-such-model"], "no-such-model"),
    (["serve", "serve.port=0", "--model", "{tiny_model}"], "serve.port"),
    (["evaluate", "--model", "{not_a_model}"], "has no config.json"),
    (["models", "show", "no-such-model"], "no-such-model"),
    (["models", "register", "x", "/nonexistent/export"], "/nonexistent/export"),
    (["usage", "--db", "sqlite:///{tmp}/usage.db", "--since", "yesterday"], "since: 'yesterday'"),
    (["usage", "--db", "nosuchdb://x/y"], "serve.usage_db 'nosuchdb://x/y' cannot be opened"),
    (["keys", "new", "alice", "--rpm", "0"], "rpm: must be a positive integer"),
]


@pytest.mark.parametrize("argv,named", MISTAKES, ids=[" ".join(a[:2]) + f" [{n}]" for a, n in MISTAKES])
def test_a_user_mistake_is_one_line_and_exit_2(argv, named, tmp_path, tiny_model_dir, capsys):
    fill = {"not_a_model": not_a_model(tmp_path), "tiny_model": tiny_model_dir, "tmp": str(tmp_path)}
    code = main([a.format(**fill) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmos: error: "), err
    assert named.format(**fill) in lines[0], lines[0]
    assert "Traceback" not in err


def test_the_installed_command_reports_a_mistake_in_one_line():
    """Through the real entry point in a fresh process, as a user's shell runs it."""
    proc = subprocess.run([sys.executable, "-m", "llmos_ray.cli", "pretrain", "--config", TINY, "train.zero_stage=3"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "llmos: error: unknown config key 'train.zero_stage'; did you mean 'deepspeed.zero_stage'? (valid keys of "
        "TrainConfig: " + proc.stderr.split("valid keys of TrainConfig: ", 1)[1].strip()]


def test_serving_a_directory_that_is_not_a_model_fails_in_one_line_within_2_s(tmp_path):
    import time

    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "llmos_ray.cli", "serve", "--model", not_a_model(tmp_path)],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": ROOT})
    seconds = time.perf_counter() - t0
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "has no config.json" in proc.stderr and seconds < 2.0, seconds
