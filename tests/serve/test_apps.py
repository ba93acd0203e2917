"""The app store without a server: spec checks that name the field, the template sandbox, versions
kept in the model library file, and the catalogue a running server re-reads when the file changes.
(Served over HTTP, created and changed while the server runs: tests/serve/test_http.py.)"""

from __future__ import annotations

import os

import pytest
import yaml

from llmos_ray import registry
from llmos_ray.errors import ConfigError
from llmos_ray.serve import app_store
from llmos_ray.serve.app_specs import AppSpec
from llmos_ray.serve.types import APIError

HAIKU = {"name": "haiku", "description": "A haiku about a topic.",
         "parameters": {"topic": {"type": "string", "required": True, "max_length": 50},
                        "lines": {"type": "integer", "default": 3, "minimum": 1, "maximum": 5}},
         "messages": [{"role": "system", "content": "You write haiku."},
                      {"role": "user", "content": "{{ lines }} lines about {{ topic }}."}],
         "sampling": {"temperature": 0, "max_tokens": 8}}


def refused(**changes) -> str:
    with pytest.raises(ConfigError) as e:
        AppSpec.from_dict({**HAIKU, **changes})
    return str(e.value)


@pytest.mark.parametrize("changes, field", [
    ({"messages": [{"role": "user", "content": "about {{ subject }}"}]}, "messages[0].content: unknown placeholder "
                                                                          "'subject'"),
    ({"parameters": {"topic": {"type": "str"}}}, "parameters.topic.type"),
    ({"parameters": {"topic": {"type": "integer", "default": "x"}}}, "parameters.topic.default"),
    ({"parameters": {"topic": {"type": "string", "colour": "red"}}}, "colour"),
    ({"sampling": {"temprature": 0.5}}, "sampling: unknown field 'temprature'; did you mean 'temperature'"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "{{ topic "}]}, "messages[0].content"),
    ({"output_schema": {"type": "nonsense"}}, "output_schema"),
    ({"name": "../etc"}, "name"),
    ({"temperature": 1}, "unknown field 'temperature'"),
])
def test_invalid_specs_are_refused_naming_the_field(changes, field):
    assert field in refused(**changes)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__ }}", "{{ topic.__class__.__mro__[1].__subclasses__() }}", "{{ topic|attr('__class__') }}",
    "{% include '/etc/passwd' %}", "{% import 'os' as os %}", "{{ cycler.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
])
def test_template_escapes_are_refused(template):
    assert "messages[0].content" in refused(messages=[{"role": "user", "content": template}])


def test_parameters_are_data_checked_at_request_time():
    spec = AppSpec.from_dict(HAIKU)
    assert spec.render({"topic": "{{ 7*7 }} Ray"})[1]["content"] == "3 lines about {{ 7*7 }} Ray."  # never evaluated
    for values, param in (({"topic": 5}, "topic"), ({}, "topic"), ({"topic": "x", "lines": 9}, "lines"),
                          ({"topic": "x" * 51}, "topic")):
        with pytest.raises(APIError) as e:
            spec.render(values)
        assert e.value.status == 400 and e.value.param == param, (values, e.value)


def test_versions_in_the_library_beside_the_builtins(tiny_model_dir, tmp_path):
    reg = str(tmp_path / "models.json")
    assert [a.ref for a in app_store.list_apps(reg)] == ["chat@1", "summarize@1", "translate@1", "code@1"]
    with pytest.raises(ConfigError, match="model: no model named 'ghost'"):
        app_store.create({**HAIKU, "model": "ghost"}, reg)
    registry.register("tiny", tiny_model_dir, registry=reg)
    assert app_store.create({**HAIKU, "model": "tiny"}, reg).ref == "haiku@1"
    changed = {**HAIKU, "model": "tiny", "description": "Shorter.", "sampling": {"max_tokens": 4}}
    assert app_store.create(changed, reg).ref == "haiku@2"
    assert app_store.get("haiku", reg).description == "Shorter." and app_store.get("haiku@1", reg).version == 1
    assert registry.get("tiny", reg).version == 1, "apps and models share the file; neither loses the other"
    exported = yaml.safe_load(app_store.export("haiku@2", reg))
    assert AppSpec.from_dict(exported).to_dict() == AppSpec.from_dict(changed).to_dict()
    assert app_store.create({**HAIKU, "name": "chat"}, reg).ref == "chat@2"  # replaces the built-in until removed
    assert app_store.remove("haiku@2", reg) == [2] and app_store.get("haiku", reg).version == 1
    assert app_store.remove("chat", reg) == [2] and app_store.get("chat", reg).source == "builtin"
    with pytest.raises(ConfigError, match="built in"):
        app_store.remove("summarize", reg)
    with pytest.raises(ConfigError, match="'haiku' has no version 7"):
        app_store.get("haiku@7", reg)


def test_the_catalogue_reloads_when_the_library_changes(tmp_path):
    reg = str(tmp_path / "models.json")
    catalog = app_store.AppCatalog(reg, refresh_s=0)
    assert "haiku" not in catalog.names()
    app_store.create(HAIKU, reg)
    assert catalog.get("haiku").version == 1
    app_store.create({**HAIKU, "description": "v2"}, reg)
    assert catalog.get("haiku").description == "v2"
    os.remove(reg)  # an unreadable or missing library: the built-ins are still served
    assert {"chat", "summarize", "translate", "code"} <= catalog.names()


def test_cli_apps_commands(tmp_path, capsys):
    from llmos_ray.cli import main

    reg, spec = str(tmp_path / "models.json"), tmp_path / "haiku.yaml"
    spec.write_text(yaml.safe_dump(HAIKU))
    assert main(["apps", "create", str(spec), "--registry", reg]) == 0
    assert "created app haiku@1" in capsys.readouterr().out
    assert main(["apps", "list", "--registry", reg]) == 0
    assert "haiku" in capsys.readouterr().out
    assert main(["apps", "export", "haiku", "--registry", reg, "--out", str(tmp_path / "out.yaml")]) == 0
    assert yaml.safe_load((tmp_path / "out.yaml").read_text())["name"] == "haiku"
    assert main(["apps", "show", "haiku@1", "--registry", reg]) == 0 and '"version": 1' in capsys.readouterr().out
    spec.write_text(yaml.safe_dump({**HAIKU, "messages": [{"role": "user", "content": "{{ ''.__class__ }}"}]}))
    assert main(["apps", "create", str(spec), "--registry", reg]) != 0
    assert "messages[0].content" in capsys.readouterr().err
    assert main(["apps", "remove", "haiku", "--registry", reg]) == 0
