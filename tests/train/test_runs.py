"""Runs know what they are (llmos_ray.train.runs), checked on run directories laid out as a
training run leaves them — before anything starts, so no Ray here (it would fail the test)."""

from __future__ import annotations

import json
import os

import pytest

from llmos_ray import runtime
from llmos_ray.cli import main
from llmos_ray.config import load_config, save_config
from llmos_ray.errors import ConfigError
from llmos_ray.train import runs


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(runtime, "init_ray", refuse)


def fake_run(root, name="default", step=200, max_steps=200, job="pretrain", overrides=(), losses=True):
    """A run directory as `llmos pretrain` leaves it: config.yaml, metrics.jsonl, a checkpoint, an export."""
    out = os.path.join(root, name)
    cfg = load_config(None, [f"run.name={name}", f"run.output_dir={out}", f"train.max_steps={max_steps}",
                             *overrides]).resolved(job)
    save_config(cfg, os.path.join(out, "config.yaml"))
    ckpt = os.path.join(cfg.run.storage_path, name, f"checkpoint_{step:08d}")
    os.makedirs(ckpt)
    with open(os.path.join(ckpt, "llmos_state.json"), "w") as f:
        json.dump({"step": step, "job": job}, f)
    os.makedirs(os.path.join(out, "export"))
    open(os.path.join(out, "export", "config.json"), "w").write("{}")
    if losses:
        with open(os.path.join(out, "metrics.jsonl"), "w") as f:
            for s in range(10, step + 1, 10):
                f.write(json.dumps({"step": s, "loss": 8.0 - s / 50, "tokens_per_s": 3000.0 + s}) + "\n")
                if s % 50 == 0:
                    f.write(json.dumps({"step": s, "val_loss": 8.5 - s / 60, "val_ppl": 2.0 ** (8.5 - s / 60)}) + "\n")
    return cfg


def test_states_new_resumable_finished(tmp_path):
    new = load_config(None, [f"run.output_dir={tmp_path / 'x'}", "run.name=x"]).resolved()
    assert runs.check_run(new, "pretrain")[0] == "new"
    cfg = fake_run(tmp_path, step=100, max_steps=200)
    state, info = runs.check_run(cfg, "pretrain")
    assert state == "resumable" and info.step == 100
    assert runs.check_run(fake_run(tmp_path, "done"), "pretrain")[0] == "finished"


def test_other_data_or_model_or_job_is_refused_naming_the_keys(tmp_path):
    fake_run(tmp_path, step=100)
    changed = load_config(None, [f"run.output_dir={tmp_path / 'default'}", "run.name=default",
                                 "data.paths=[mycorpus]", "model.size=tiny"]).resolved()
    with pytest.raises(ConfigError, match=r"data\.paths: \[\] -> \['mycorpus'\]; model\.size: 'small' -> 'tiny'"):
        runs.check_run(changed, "pretrain")
    with pytest.raises(ConfigError, match="is a pretrain run"):
        runs.check_run(load_config(None, [f"run.output_dir={tmp_path / 'default'}", "run.name=default"])
                       .resolved(), "finetune")
    longer = load_config(None, [f"run.output_dir={tmp_path / 'default'}", "run.name=default",
                                "train.max_steps=400", "train.lr=3e-4"]).resolved()
    assert runs.check_run(longer, "pretrain")[0] == "resumable"  # training longer, at another lr, is fine


def test_the_trap_a_users_corpus_on_a_finished_default_run(tmp_path, monkeypatch, capsys):
    """`make run`, then `llmos pretrain 'data.paths=[mycorpus]'`: a one-line error naming data.paths
    and the ways out; runs/default/config.yaml stays byte-identical."""
    monkeypatch.chdir(tmp_path)
    fake_run(os.path.join(tmp_path, "runs"))
    saved = open("runs/default/config.yaml", "rb").read()
    (tmp_path / "mycorpus").mkdir()
    (tmp_path / "mycorpus" / "a.txt").write_text("my own text " * 40)
    assert main(["pretrain", "data.paths=[mycorpus]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.paths" in err[0] and "run.name" in err[0] and "run.resume=never" in err[0]
    assert open("runs/default/config.yaml", "rb").read() == saved


def test_a_finished_run_says_so_and_trains_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    fake_run(os.path.join(tmp_path, "runs"))
    assert main(["pretrain"]) == 0
    out = capsys.readouterr().out
    assert "run 'default' already finished at step 200; nothing trained" in out
    assert f"serve --model {tmp_path / 'runs' / 'default' / 'export'}" in out


def test_resume_never_starts_over_beside_the_old_run(tmp_path):
    cfg = fake_run(tmp_path, step=100)
    fresh = runs.fresh_run(cfg)
    assert fresh.run.name == "default-2" and fresh.run.output_dir == f"{tmp_path / 'default'}-2"
    assert runs.check_run(fresh, "pretrain")[0] == "new"


def test_runs_list_and_show_with_a_plot_of_the_right_size(tmp_path, monkeypatch, capsys):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    fake_run(os.path.join(tmp_path, "runs"), "a", step=100)
    fake_run(os.path.join(tmp_path, "runs"), "b", step=200, losses=False)
    assert main(["runs", "list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].split()[:3] == ["run", "job", "step"]
    assert {line.split()[0] for line in listed[1:]} == {"a", "b"}
    assert any(line.split()[:3] == ["a", "pretrain", "100/200"] for line in listed)
    assert main(["runs", "show", "a", "--plot", str(tmp_path / "a.png")]) == 0
    shown = capsys.readouterr().out
    assert "steps       100 of 200" in shown and "6.0000 last" in shown  # loss 8 - 100/50
    assert "val_loss    6.8333 last, 6.8333 best (step 100)" in shown
    assert "throughput  3,055 tokens/s (median of 10 logs)" in shown
    assert Image.open(tmp_path / "a.png").size == (900, 400)
    assert main(["runs", "show", "nope"]) == 2


def test_sparkline():
    assert runs.sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == "▁▂▃▄▅▆▇█"
    assert runs.sparkline([3, 3, 3]) == "▁▁▁"
    assert len(runs.sparkline(list(range(1000)), width=40)) == 40


def test_a_checkpoint_ray_train_never_registered_is_not_one_to_resume_from(tmp_path):
    """Ctrl-C can land after a checkpoint finished writing but before Ray Train registered it; run.resume=auto
    restores the newest registered one, so that is the one the run (and the interruption hint) names."""
    cfg = fake_run(tmp_path, step=4, max_steps=20)
    root = os.path.join(cfg.run.storage_path, cfg.run.name)
    os.makedirs(os.path.join(root, "checkpoint_00000008"))
    with open(os.path.join(root, "checkpoint_00000008", "llmos_state.json"), "w") as f:
        json.dump({"step": 8, "job": "pretrain"}, f)
    assert [c.step for c in runs.checkpoints_of(cfg)] == [4, 8]  # no snapshot yet: every finished one counts
    with open(os.path.join(root, "checkpoint_manager_snapshot.json"), "w") as f:
        json.dump({"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_00000004", "metrics": {"step": 4}}],
                   "latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_00000004"}}, f)
    assert [c.step for c in runs.checkpoints_of(cfg)] == [4]
    assert runs.read_run(cfg).step == 4 and runs.check_run(cfg, "pretrain")[0] == "resumable"
