"""The model library: local and S3 (moto server) files, atomic writes, name validation, CLI."""

from __future__ import annotations

import json
import os
import threading

import pytest

from llmos_ray import registry
from llmos_ray.errors import ConfigError, ModelError


def test_round_trip_in_a_local_file(tiny_model_dir, tmp_path):
    reg = str(tmp_path / "lib" / "models.json")
    e = registry.register("tiny-v1", tiny_model_dir, size="tiny", source_run="run-7", eval={"ppl": 50.0},
                          registry=reg, description="fixture")
    assert (e.family, e.size, e.source_run, e.meta) == ("gpt2", "tiny", "run-7", {"description": "fixture"})
    assert [m.name for m in registry.list_models(reg)] == ["tiny-v1"]
    registry.attach_eval("tiny-v1", {"rougeL": 0.3}, registry=reg)
    got = registry.get("tiny-v1", registry=reg)
    assert got.uri == tiny_model_dir and got.eval == {"ppl": 50.0, "rougeL": 0.3} and got.created
    with pytest.raises(ConfigError, match="already registered"):
        registry.register("tiny-v1", tiny_model_dir, registry=reg)
    registry.register("tiny-v1", tiny_model_dir, size="small", overwrite=True, registry=reg)
    assert registry.get("tiny-v1", registry=reg).size == "small"
    with pytest.raises(ModelError, match="did you mean 'tiny-v1'"):
        registry.get("tiny-v2", registry=reg)
    assert registry.remove("tiny-v1", registry=reg).name == "tiny-v1"
    assert registry.list_models(reg) == []
    assert sorted(os.listdir(tmp_path / "lib")) == ["models.json", "models.json.lock"]  # no temp files left


@pytest.mark.parametrize("name", ["../../etc/passwd", "a/b", "", ".hidden", "-x", "x" * 129, "a b", "~root"])
def test_names_are_never_paths(name, tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="not valid"):
        registry.register(name, tiny_model_dir, registry=str(tmp_path / "r.json"))
    with pytest.raises(ConfigError):
        registry.get(name, registry=str(tmp_path / "r.json"))


def test_uri_must_be_a_model_directory(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        registry.register("m", str(tmp_path / "missing"), registry=str(tmp_path / "r.json"))
    with pytest.raises(ModelError, match="neither config.json nor adapter_config.json"):
        registry.register("m", str(tmp_path), registry=str(tmp_path / "r.json"))


def test_location_comes_from_argument_then_env_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOS_REGISTRY", str(tmp_path / "env.json"))
    assert registry.registry_uri() == str(tmp_path / "env.json")
    assert registry.registry_uri(str(tmp_path / "cfg.json")) == str(tmp_path / "cfg.json")
    monkeypatch.delenv("LLMOS_REGISTRY")
    assert registry.registry_uri() == os.path.expanduser("~/.llmos/models.json")


def test_concurrent_writers_lose_no_entry(tiny_model_dir, tmp_path):
    reg = str(tmp_path / "r.json")
    threads = [threading.Thread(target=registry.register, args=(f"m{i}", tiny_model_dir), kwargs={"registry": reg})
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(registry.list_models(reg)) == 8
    assert json.load(open(reg))["version"] == 1


def test_a_corrupt_file_is_reported_not_overwritten(tmp_path):
    reg = tmp_path / "r.json"
    reg.write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        registry.list_models(str(reg))
    assert reg.read_text() == "{not json"


@pytest.fixture
def s3(s3_bucket):
    """(filesystem, bucket) on the session's moto S3 server (tests/conftest.py)."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return s3fs.S3FileSystem(), s3_bucket.removeprefix("s3://")


def test_registry_on_s3(s3, tiny_model_dir):
    s3, bucket = s3
    reg = f"s3://{bucket}/library/models.json"
    registry.register("tiny", tiny_model_dir, registry=reg)
    registry.register("remote", f"s3://{bucket}/exports/tiny", registry=reg, family="gpt2")
    assert [m.name for m in registry.list_models(reg)] == ["remote", "tiny"]
    assert registry.get("remote", registry=reg).uri == f"s3://{bucket}/exports/tiny"
    registry.attach_eval("remote", {"ppl": 12.5}, registry=reg)
    assert json.loads(s3.cat(reg))["models"]["remote"]["eval"] == {"ppl": 12.5}
    registry.remove("tiny", registry=reg)
    assert [m.name for m in registry.list_models(reg)] == ["remote"]
    assert s3.ls(f"{bucket}/library") == [f"{bucket}/library/models.json"]


def test_serving_loads_an_export_from_s3(s3, tiny_model_dir, tmp_path, monkeypatch):
    from llmos_ray.storage import localize

    s3, bucket = s3
    s3.put(tiny_model_dir.rstrip("/") + "/", f"{bucket}/exports/tiny", recursive=True)
    monkeypatch.setenv("LLMOS_CACHE", str(tmp_path / "cache"))
    local = localize(f"s3://{bucket}/exports/tiny")
    assert sorted(os.listdir(local)) == sorted(os.listdir(tiny_model_dir))


def test_cli_models_commands(tiny_model_dir, tmp_path, capsys):
    from llmos_ray.cli import main

    reg = str(tmp_path / "r.json")
    assert main(["models", "register", "tiny", tiny_model_dir, "--registry", reg, "--size", "tiny",
                 "--eval", '{"ppl": 3}']) == 0
    assert "serve --model tiny" in capsys.readouterr().out
    assert main(["models", "list", "--registry", reg]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["name", "family", "task", "size", "params", "registered", "uri"]
    from transformers import AutoModelForCausalLM

    from llmos_ray.models import count_parameters
    from llmos_ray.registry import human_count

    params = count_parameters(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert row.split()[:5] == ["tiny", "gpt2", "causal_lm", "tiny", human_count(params)] and "ppl=3" in row
    assert tiny_model_dir in row
    assert main(["models", "show", "tiny", "--registry", reg]) == 0
    assert json.loads(capsys.readouterr().out)["uri"] == tiny_model_dir
    assert main(["models", "register", "../x", tiny_model_dir, "--registry", reg]) == 2
    assert "not valid" in capsys.readouterr().err
    assert main(["models", "remove", "tiny", "--registry", reg]) == 0
    assert main(["models", "show", "tiny", "--registry", reg]) == 2
