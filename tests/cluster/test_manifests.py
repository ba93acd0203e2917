"""The cluster definitions under cluster/ agree with the code they run: launcher YAMLs validate against
the installed Ray's schema, KubeRay manifests run our jobs, configs and Ray version, the RayService
serves what `llmos serve --emit-config` writes, and the Grafana dashboard queries exactly the metrics
llmos_ray exports. Pure file checks: no Ray is started."""

import copy
import glob
import importlib
import json
import os
import re
import shlex

import jsonschema
import pytest
import ray
import yaml

from llmos_ray.config import load_config
from llmos_ray.serve.build import emit_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLUSTER = os.path.join(ROOT, "cluster")
LAUNCHERS = ["aws.yaml", "gcp.yaml"]
KUBERAY = {"raycluster.yaml": "RayCluster", "rayjob-pretrain.yaml": "RayJob", "rayservice.yaml": "RayService"}
GPU_GROUP = "gpu_a100"  # the launcher node type sized for pretrain_1b (min) and pretrain_7b (max)

# How Ray 2.60 names application metrics in Prometheus (seen on its metrics export port, 2026-11-23):
# Gauge x -> ray_x; Counter x -> ray_x_total; Histogram x -> ray_x_bucket / ray_x_sum / ray_x_count.
EXPORTED_SUFFIXES = {"Gauge": [""], "Counter": ["_total"], "Histogram": ["_bucket", "_sum", "_count"]}


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _yaml(path: str):
    return yaml.safe_load(_read(path))


def _ray_schema() -> dict:
    return json.loads(_read(os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")))


def _torch_requirement() -> str:
    text = _read(os.path.join(ROOT, "pyproject.toml"))
    return re.search(r'"(torch[^"]*)"', text).group(1)


# ---------------------------------------------------------------------------------------------
# Ray cluster launcher YAMLs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_yaml_validates_against_installed_ray_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _yaml(os.path.join(CLUSTER, name))
    jsonschema.validate(config, _ray_schema())
    # Ray's own checks after filling its defaults (node types, head type, worker bounds), as `ray up` does.
    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("break_it", [
    lambda c: c.update(max_workerz=4),                                       # a typo'd top-level key
    lambda c: c["available_node_types"][GPU_GROUP].update(min_workers="4"),  # wrong type
    lambda c: c.pop("provider"),                                             # required key missing
])
def test_schema_check_rejects_a_broken_launcher_yaml(break_it):
    config = _yaml(os.path.join(CLUSTER, "aws.yaml"))
    break_it(config)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, _ray_schema())


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_installs_project_with_pyproject_torch_range_and_starts_metrics(name):
    config = _yaml(os.path.join(CLUSTER, name))
    setup = "\n".join(config["setup_commands"])
    assert f'"{_torch_requirement()}"' in setup, "torch range differs from pyproject.toml"
    assert "pip install" in setup and "-e" in setup and "~/llmos-ray" in setup
    assert config["file_mounts"] == {"~/llmos-ray": "."}
    assert {".git", ".venv", "runs"} <= set(config["rsync_exclude"])
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    head = " ".join(config["head_start_ray_commands"])
    assert "--head" in head and "--dashboard-host=0.0.0.0" in head and "--metrics-export-port=8080" in head
    assert "--metrics-export-port=8080" in " ".join(config["worker_start_ray_commands"])


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_gpu_group_is_sized_for_the_1b_and_7b_configs(name):
    nodes = _yaml(os.path.join(CLUSTER, name))["available_node_types"]
    head = nodes[_yaml(os.path.join(CLUSTER, name))["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu = nodes[GPU_GROUP]
    per_node = gpu["resources"]["GPU"]
    workers = {name: load_config(os.path.join(ROOT, "jobs", "configs", f"{name}.yaml")).resolved(job).train.num_workers
               for name, job in (("pretrain_1b", "pretrain"), ("pretrain_7b", "pretrain"),
                                 ("finetune_7b_lora", "finetune"))}
    # llmos uses GPUs when the cluster has them at job start, so the minimum must cover pretrain_1b.
    assert gpu["min_workers"] * per_node == workers["pretrain_1b"]
    assert gpu["max_workers"] * per_node >= workers["pretrain_7b"]
    assert per_node >= workers["finetune_7b_lora"]


# ---------------------------------------------------------------------------------------------
# No secrets committed
# ---------------------------------------------------------------------------------------------

SECRET_NAMES = r"(WANDB_API_KEY|AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|AWS_SESSION_TOKEN|LLMOS_API_KEYS|HF_TOKEN)"
# NAME: value / NAME=value / "NAME": "value" whose value is not a reference ($VAR, <…>, …, CHANGE-ME).
LITERAL_SECRET = re.compile(SECRET_NAMES + r"""["']?\s*[:=]\s*["']?(?![$<…"'\s{]|CHANGE-ME)([A-Za-z0-9/+_.-]{8,})""")


def _secret_findings(text: str) -> list[str]:
    found = re.findall(r"\bAKIA[0-9A-Z]{16}\b", text)
    found += [m.group(0) for m in LITERAL_SECRET.finditer(text)]
    return found


def test_no_secret_values_under_cluster():
    files = [p for p in glob.glob(os.path.join(CLUSTER, "**", "*"), recursive=True) if os.path.isfile(p)]
    files.append(os.path.join(ROOT, "jobs", "configs", "serve_gpu.yaml"))
    assert len(files) >= 8
    findings = {os.path.relpath(p, ROOT): _secret_findings(_read(p)) for p in files}
    assert {p: f for p, f in findings.items() if f} == {}


@pytest.mark.parametrize("leak", [
    "AKIAIOSFODNN7EXAMPLE",
    "WANDB_API_KEY: 0123456789abcdef0123456789abcdef",
    'env_vars: {"WANDB_API_KEY": "0123456789abcdef"}',
    "export AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCY",
])
def test_secret_scan_catches_leaks(leak):
    assert _secret_findings(leak)


@pytest.mark.parametrize("reference", [
    'WANDB_API_KEY: "$WANDB_API_KEY"', "--from-literal=WANDB_API_KEY=\"$WANDB_API_KEY\"",
    "- name: WANDB_API_KEY", "key: WANDB_API_KEY, optional: true}", "AWS_ACCESS_KEY_ID=…",
])
def test_secret_scan_allows_references(reference):
    assert _secret_findings(reference) == []


# ---------------------------------------------------------------------------------------------
# KubeRay manifests
# ---------------------------------------------------------------------------------------------

def _manifest(name: str) -> dict:
    return _yaml(os.path.join(CLUSTER, "kuberay", name))


def _cluster_spec(doc: dict) -> dict:
    return {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"],
            "RayService": lambda s: s["rayClusterConfig"]}[doc["kind"]](doc["spec"])


def _containers(spec: dict):
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    for name, group in groups:
        for container in group["template"]["spec"]["containers"]:
            yield name, group, container


@pytest.mark.parametrize("name,kind", sorted(KUBERAY.items()))
def test_kuberay_manifest_kind_version_and_images(name, kind):
    doc = _manifest(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    spec = _cluster_spec(doc)
    assert spec["rayVersion"] == ray.__version__
    for group, _, container in _containers(spec):
        image_ray = re.search(r":(\d+\.\d+\.\d+)-py311-gpu$", container["image"])
        assert image_ray and image_ray.group(1) == ray.__version__, f"{group}: {container['image']}"
        assert any(p["containerPort"] == 8080 and p["name"] == "metrics" for p in container["ports"])
        secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container.get("env", []) if "valueFrom" in e}
        assert secrets and all(ref["name"] == "llmos-secrets" for ref in secrets.values())
    assert spec["headGroupSpec"]["rayStartParams"]["metrics-export-port"] == "8080"


@pytest.mark.parametrize("name", sorted(KUBERAY))
def test_kuberay_worker_groups_request_gpus(name):
    spec = _cluster_spec(_manifest(name))
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            res = container["resources"]
            assert int(res["limits"]["nvidia.com/gpu"]) >= 1, group["groupName"]
            assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head["limits"]


def test_dockerfile_builds_on_the_installed_ray_and_pyproject_torch():
    text = _read(os.path.join(CLUSTER, "Dockerfile"))
    assert f"ARG RAY_VERSION={ray.__version__}\n" in text
    assert "FROM rayproject/ray:${RAY_VERSION}-py311-gpu" in text
    assert f'"{_torch_requirement()}"' in text
    workdir = re.search(r"^WORKDIR (\S+)", text, re.M).group(1)
    assert yaml.safe_load(_manifest("rayjob-pretrain.yaml")["spec"]["runtimeEnvYAML"])["working_dir"] == workdir
    assert re.search(r"^COPY .*\bjobs \./jobs$", text, re.M)


def test_rayjob_runs_a_real_job_with_a_loadable_config():
    spec = _manifest("rayjob-pretrain.yaml")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/pretrain.py"] and argv[2] == "--config"
    assert os.path.isfile(os.path.join(ROOT, argv[1]))
    config_path = argv[3]
    assert config_path.startswith("jobs/configs/") and os.path.isfile(os.path.join(ROOT, config_path))
    cfg = load_config(os.path.join(ROOT, config_path), argv[4:])
    assert cfg.run.storage_path.startswith("s3://") and cfg.data.paths[0].startswith("s3://")
    gpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    assert gpus == cfg.train.num_workers, "the RayJob's cluster is sized for its config"


def test_rayjob_runtime_env_matches_jobs_runtime_env():
    ours = yaml.safe_load(_manifest("rayjob-pretrain.yaml")["spec"]["runtimeEnvYAML"])
    theirs = _yaml(os.path.join(ROOT, "jobs", "runtime_env.yaml"))
    assert ours["excludes"] == theirs["excludes"]
    assert ours["env_vars"].items() >= theirs["env_vars"].items()


def test_rayservice_serves_what_emit_config_writes_for_serve_gpu():
    serve_config = yaml.safe_load(_manifest("rayservice.yaml")["spec"]["serveConfigV2"])
    cfg = load_config(os.path.join(ROOT, "jobs", "configs", "serve_gpu.yaml")).resolved("serve")
    emitted = yaml.safe_load(emit_config(cfg))
    assert serve_config == {"applications": emitted["applications"]}
    for app in serve_config["applications"]:
        module, attr = app["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module), attr))
    s = cfg.serve
    assert s.device == "cuda" and s.num_gpus == 1 and s.host == "0.0.0.0"
    assert all("://" in m.split("=", 1)[-1] or "=" not in m for m in s.models), "S3 URIs or registry names"
    assert cfg.registry.uri.startswith("s3://")


# ---------------------------------------------------------------------------------------------
# Grafana dashboard
# ---------------------------------------------------------------------------------------------

METRIC_CALL = re.compile(r"""\b(Gauge|Counter|Histogram)\(\s*f?["']([a-z0-9_{}]+)["']""")


def _code_metrics() -> dict[str, str]:
    """llmos_* metric name -> Ray metric type, from the ray.util.metrics calls in llmos_ray/."""
    metrics = {}
    for path in glob.glob(os.path.join(ROOT, "llmos_ray", "**", "*.py"), recursive=True):
        text = _read(path)
        for kind, name in METRIC_CALL.findall(text):
            if "{k}" in name:  # trainer: Gauge(f"llmos_train_{k}") for k in ( … )
                keys = re.search(r"for k in \(([^)]*)\)", text[text.index(name):]).group(1)
                for key in re.findall(r"""["'](\w+)["']""", keys):
                    metrics[name.replace("{k}", key)] = kind
            else:
                metrics[name] = kind
    return metrics


def _dashboard() -> dict:
    return json.loads(_read(os.path.join(CLUSTER, "grafana", "llmos-dashboard.json")))


def _queried_metrics(dashboard: dict) -> set[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return {m for e in exprs for m in re.findall(r"\bray_llmos_\w+", e)}


def test_code_metrics_are_found():
    metrics = _code_metrics()
    assert {f"llmos_train_{k}" for k in ("step", "loss", "tokens_per_s", "mfu", "val_loss")} <= set(metrics)
    assert metrics["llmos_serve_requests"] == "Counter"
    assert metrics["llmos_serve_request_latency_s"] == "Histogram"
    assert metrics["llmos_serve_queue_depth"] == "Gauge"


def test_dashboard_queries_only_exported_names_and_covers_every_metric():
    dashboard = _dashboard()
    exported = {f"ray_{name}{suffix}": name for name, kind in _code_metrics().items()
                for suffix in EXPORTED_SUFFIXES[kind]}
    queried = _queried_metrics(dashboard)
    assert queried - set(exported) == set(), "queries name metrics that Ray does not export"
    assert set(_code_metrics()) - {exported[q] for q in queried} == set(), "metrics without a panel"


def test_dashboard_imports_anywhere():
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    targets = [t for p in dashboard["panels"] for t in p.get("targets", [])]
    assert targets and all(p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"] if "targets" in p)
    assert all(t["datasource"]["uid"] == "${datasource}" for t in targets)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert "DS_" not in json.dumps(dashboard)


def test_dashboard_check_bites_on_a_wrong_name():
    dashboard = _dashboard()
    target = next(t for p in dashboard["panels"] for t in p.get("targets", []) if "requests_total" in t["expr"])
    target["expr"] = target["expr"].replace("ray_llmos_serve_requests_total", "ray_llmos_serve_requests")
    exported = {f"ray_{n}{s}" for n, k in _code_metrics().items() for s in EXPORTED_SUFFIXES[k]}
    assert "ray_llmos_serve_requests" in _queried_metrics(dashboard) - exported
