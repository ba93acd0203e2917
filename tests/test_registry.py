"""The model library: local and S3 (moto server) files, atomic writes, name validation, versions,
aliases and lineage, concurrent writers in several processes, CLI."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
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
    assert json.load(open(reg))["version"] == 2


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
    assert json.loads(s3.cat(reg))["models"]["remote"]["versions"][-1]["eval"] == {"ppl": 12.5}
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
    from llmos_ray import LLM
    from tests.serve.reference import greedy

    with LLM.from_pretrained(f"s3://{bucket}/exports/tiny") as llm:  # the SDK loads it as serving does
        assert llm.generate("def main():", max_tokens=4, temperature=0) == greedy(tiny_model_dir, "def main():",
                                                                                  max_new_tokens=4)


def test_cli_models_commands(tiny_model_dir, tmp_path, capsys):
    from llmos_ray.cli import main

    reg = str(tmp_path / "r.json")
    assert main(["models", "register", "tiny", tiny_model_dir, "--registry", reg, "--size", "tiny",
                 "--eval", '{"ppl": 3}']) == 0
    assert "serve --model tiny" in capsys.readouterr().out
    assert main(["models", "list", "--registry", reg]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["name", "ver", "aliases", "family", "task", "size", "params", "registered", "uri"]
    from transformers import AutoModelForCausalLM

    from llmos_ray.models import count_parameters
    from llmos_ray.registry import human_count

    params = count_parameters(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert row.split()[:7] == ["tiny", "1", "-", "gpt2", "causal_lm", "tiny", human_count(params)] and "ppl=3" in row
    assert tiny_model_dir in row
    assert main(["models", "show", "tiny", "--registry", reg]) == 0
    assert json.loads(capsys.readouterr().out)["uri"] == tiny_model_dir
    assert main(["models", "register", "../x", tiny_model_dir, "--registry", reg]) == 2
    assert "not valid" in capsys.readouterr().err
    assert main(["models", "remove", "tiny", "--registry", reg]) == 0
    assert main(["models", "show", "tiny", "--registry", reg]) == 2


# -- versions, aliases, lineage -----------------------------------------------------------------


def test_versions_aliases_and_what_references_resolve_to(tiny_model_dir, tmp_path):
    reg = str(tmp_path / "models.json")
    second = shutil.copytree(tiny_model_dir, tmp_path / "second")
    assert registry.register("tiny", tiny_model_dir, registry=reg).ref == "tiny@1"
    assert registry.register("tiny", str(second), registry=reg).ref == "tiny@2"
    assert registry.register("tiny", "s3://bucket/third", registry=reg).version == 3
    with pytest.raises(ConfigError, match="already registered as tiny@3"):
        registry.register("tiny", "s3://bucket/third", registry=reg)
    assert registry.promote("tiny@2", "prod", registry=reg).aliases == ["prod"]
    registry.promote("tiny@1", "staging", registry=reg)
    assert registry.resolve_source("tiny", reg)[0] == "s3://bucket/third"  # the latest version
    assert registry.resolve_source("tiny:latest", reg)[0] == "s3://bucket/third"
    assert registry.resolve_source("tiny@2", reg)[0] == str(second)
    assert registry.resolve_source("tiny:prod", reg)[2]["ref"] == "tiny@2"
    assert registry.get("tiny:staging", reg).uri == tiny_model_dir
    registry.promote("tiny@3", "prod", registry=reg)  # an alias moves
    assert registry.get("tiny:prod", reg).version == 3 and registry.get("tiny@2", reg).aliases == []
    with pytest.raises(ModelError, match=r"no version 7 \(versions: 1, 2, 3\)"):
        registry.resolve_source("tiny@7", reg)
    with pytest.raises(ModelError, match="no alias 'canary' .aliases: prod -> 3, staging -> 1"):
        registry.get("tiny:canary", reg)
    with pytest.raises(ModelError, match="did you mean 'tiny'"):
        registry.resolve_source("tinny@1", reg)
    with pytest.raises(ConfigError, match="alias 'latest' is not valid"):
        registry.promote("tiny@1", "latest", registry=reg)
    assert [e.version for e in registry.versions("tiny", reg)] == [1, 2, 3]
    assert [e.ref for e in registry.list_models(reg)] == ["tiny@3"]
    assert registry.remove("tiny@3", reg).version == 3  # its alias goes with it; numbers are never reused
    assert registry.get("tiny", reg).version == 2 and registry.get("tiny@1", reg).aliases == ["staging"]
    with pytest.raises(ModelError, match="no alias 'prod'"):
        registry.get("tiny:prod", reg)
    assert registry.register("tiny", "s3://bucket/fourth", registry=reg).version == 4
    registry.attach_eval("tiny@2", {"ppl": 9.0}, registry=reg)
    assert registry.get("tiny@2", reg).eval == {"ppl": 9.0} and registry.get("tiny", reg).eval == {}
    registry.remove("tiny", reg)
    assert registry.list_models(reg) == []


def test_the_one_entry_per_name_format_is_read_as_version_1(tiny_model_dir, tmp_path):
    reg = tmp_path / "old.json"
    reg.write_text(json.dumps({"version": 1, "models": {"old": {
        "name": "old", "uri": tiny_model_dir, "family": "gpt2", "size": "tiny", "created": "2026-11-01T00:00:00+00:00",
        "source_run": "r1", "eval": {"ppl": 3.0}, "meta": {"description": "d"}}}}))
    entry = registry.get("old", str(reg))
    assert (entry.ref, entry.uri, entry.eval, entry.meta, entry.source_run) == \
        ("old@1", tiny_model_dir, {"ppl": 3.0}, {"description": "d"}, "r1")
    assert registry.resolve_source("old@1", str(reg))[0] == tiny_model_dir
    registry.register("old", "s3://bucket/new", registry=str(reg))
    raw = json.loads(reg.read_text())
    assert raw["version"] == 2 and [v["version"] for v in raw["models"]["old"]["versions"]] == [1, 2]


def test_lineage_is_read_from_the_export(tiny_model_dir, tmp_path):
    run = tmp_path / "runs" / "sft"
    export = shutil.copytree(tiny_model_dir, run / "export")
    (export / "llmos_config.yaml").write_text(f"run:\n  name: sft\n  output_dir: {run}\nmodel:\n  base: /models/base\n")
    (run / "data_stats.json").write_text(json.dumps({"documents": 12, "bad_records": 1, "bad_by_file": {"a": [3]}}))
    entry = registry.register("sft", str(export), registry=str(tmp_path / "r.json"), eval={"ppl": 4.0})
    assert (entry.task, entry.family, entry.source_run, entry.base_model) == \
        ("causal_lm", "gpt2", "sft", "/models/base")
    assert entry.data_stats == {"documents": 12, "bad_records": 1} and entry.eval == {"ppl": 4.0}
    given = registry.register("other", str(export), registry=str(tmp_path / "r.json"), source_run="mine",
                              base_model="tiny@1", task="classification")
    assert (given.source_run, given.base_model, given.task) == ("mine", "tiny@1", "classification")


def _register_many(reg: str, tag: str, n: int, start) -> None:
    start.wait(30)
    for i in range(n):
        registry.register("shared", f"s3://exports/{tag}{i}", registry=reg, family="gpt2")
    registry.register(tag, f"s3://exports/{tag}", registry=reg, family="gpt2")


def _two_processes_register_at_once(reg: str, n: int = 4) -> None:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_register_many, args=(reg, tag, n, start)) for tag in "ab"]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    shared = registry.versions("shared", reg)
    assert [e.version for e in shared] == list(range(1, 2 * n + 1))  # every one landed, numbered once
    assert sorted(e.uri for e in shared) == sorted(f"s3://exports/{t}{i}" for t in "ab" for i in range(n))
    assert [e.name for e in registry.list_models(reg)] == ["a", "b", "shared"]


def test_two_processes_registering_at_once_both_land_on_local_disk(tmp_path):
    _two_processes_register_at_once(str(tmp_path / "lib" / "models.json"))


def test_two_processes_registering_at_once_both_land_on_s3(s3):
    fs, bucket = s3
    _two_processes_register_at_once(f"s3://{bucket}/library/models.json")
