"""Config: every YAML in the repo loads; overrides; unknown keys and wrong types fail by name."""

import glob
import os
import subprocess
import sys

import pytest

from llmos_ray.config import Config, ConfigError, all_keys, field_docs, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_YAMLS = sorted(glob.glob(os.path.join(ROOT, "jobs", "configs", "*.yaml")))


def test_repo_has_configs():
    names = {os.path.basename(p) for p in CONFIG_YAMLS}
    assert {"pretrain_tiny.yaml", "pretrain_small.yaml", "pretrain_1b.yaml", "pretrain_7b.yaml"} <= names


@pytest.mark.parametrize("path", CONFIG_YAMLS, ids=os.path.basename)
def test_every_yaml_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    job = os.path.basename(path).split("_")[0]
    resolved = cfg.resolved(job)
    assert resolved.run.output_dir and resolved.run.storage_path


def test_overrides_are_parsed_as_yaml_and_typed():
    cfg = load_config(None, ["train.lr=3e-4", 'data.paths=["a.txt","s3://b/*.jsonl"]', "deepspeed.zero_stage=3",
                             "model.overrides={n_layer: 3}", "train.global_batch_size=null"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.data.paths == ["a.txt", "s3://b/*.jsonl"]
    assert cfg.deepspeed.zero_stage == 3
    assert cfg.model.overrides == {"n_layer": 3}
    assert cfg.train.global_batch_size is None


def test_overrides_win_over_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.1\n  max_steps: 7\n")
    cfg = load_config(str(f), {"train.lr": 0.2})
    assert (cfg.train.lr, cfg.train.max_steps) == (0.2, 7)


@pytest.mark.parametrize("override,expected", [
    ("train.lrr=1", "did you mean 'train.lr'"),
    ("data.seqlen=5", "did you mean 'data.seq_len'"),
    ("train.zero_stage=3", "did you mean 'deepspeed.zero_stage'"),
    ("trian.lr=1", "unknown config key 'trian'"),
])
def test_unknown_key_names_it_and_the_closest(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


@pytest.mark.parametrize("override,expected", [
    ("train.lr=abc", "train.lr: expected float, got str 'abc'"),
    ("train.max_steps=1.5", "train.max_steps: expected int"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage: expected 0 | 1 | 2 | 3"),
    ("data.dedup=maybe", "data.dedup: expected bool"),
    ("train=5", "train: expected a mapping"),
])
def test_wrong_type_is_an_error(override, expected):
    with pytest.raises(ConfigError, match=expected.replace("|", r"\|")):
        load_config(None, [override])


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="global_batch_size=20 must be a multiple"):
        load_config(None, ["train.global_batch_size=20", "train.micro_batch_size=8", "train.num_workers=2"])
    with pytest.raises(ConfigError, match="offload_params needs deepspeed.zero_stage=3"):
        load_config(None, ["deepspeed.offload_params=true"])


def test_unknown_key_in_yaml_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  text_feild: body\n")
    with pytest.raises(ConfigError, match="did you mean 'data.text_field'"):
        load_config(str(f))


def test_every_field_has_a_docstring():
    docs = field_docs()
    assert set(all_keys()) <= set(docs)
    assert not [k for k, v in docs.items() if not v.strip()]


def test_defaults_resolve_paths():
    cfg = load_config(None, ["run.name=x", "run.output_dir=/tmp/out"]).resolved()
    assert cfg.run.storage_path == "/tmp/out/checkpoints"
    s3 = load_config(None, ["run.storage_path=s3://bucket/ckpt"]).resolved()
    assert s3.run.storage_path == "s3://bucket/ckpt"


def test_a_loaded_config_is_resolved_by_each_job_for_itself():
    """One loaded config drives pretrain and then finetune without the second landing in the first's run."""
    cfg = load_config(None, ["train.max_steps=5"])
    assert cfg.run.name is None and cfg.run.output_dir is None
    assert cfg.resolved("pretrain").run.name == "default"
    assert cfg.resolved("finetune").run.name == "finetune"
    assert cfg.resolved("finetune").run.output_dir.endswith(os.path.join("runs", "finetune"))


def test_config_show_cli_prints_resolved_config(tmp_path):
    out = subprocess.run([sys.executable, "-m", "llmos_ray.cli", "config", "show", "--config",
                          os.path.join(ROOT, "jobs/configs/pretrain_tiny.yaml"), "train.max_steps=3"],
                         capture_output=True, text=True, check=True).stdout
    assert "max_steps: 3" in out and "name: pretrain-tiny" in out
    bad = subprocess.run([sys.executable, "-m", "llmos_ray.cli", "config", "show", "train.lrr=1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "did you mean 'train.lr'" in bad.stderr
