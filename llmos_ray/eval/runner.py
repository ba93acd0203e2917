"""`evaluate(cfg)`: each model of eval.model on held-out text (perplexity) and on generation tasks
(BLEU, ROUGE), as Ray Data batch inference; one report.json for all of them.

    report = evaluate(load_config("jobs/configs/evaluate_tiny.yaml"))
    print(format_table(report))            # models side by side

1. Models are resolved as `llmos serve` resolves them (a directory, fsspec URI, registry name,
   hub id or LoRA adapter) and loaded the same way, so what is evaluated is what is served.
2. Inputs are read once, on behalf of every model:
   - Perplexity documents: eval.perplexity_paths, read by the corpus pipeline as a separate
     validation corpus (data.format, data.text_field, data.txt_mode, data.min_chars and
     data.max_bad_fraction apply; bad, short and duplicate records are counted). When it is empty,
     the validation documents of the data section: data.val_paths, or the documents held out of
     data.paths by data.val_fraction. Whole documents, not the packed blocks behind the trainer's
     val loss: every model scores the same text with its own tokenizer and up to its full
     context (sliding windows, see metrics.py), so figures compare across models and tokenizers
     (bits_per_byte). eval.max_documents caps them.
   - Tasks: each JSONL file of eval.task_paths is a task named after the file, one record
     {"prompt": str, "reference": str} per line; bad records are counted and listed, and a file
     over data.max_bad_fraction fails.
3. Per model, one Ray Data pass: documents and prompts → `map_batches(ModelWorker)` on an actor
   pool of eval.num_workers actors (each loads the model once, on a GPU when the cluster has
   them) → a row per document (NLL sum, tokens scored) and per prompt (greedy answer), reduced
   on the driver: perplexity is token-weighted over all documents, BLEU is corpus-level. The
   perplexity window is eval.max_length, else the data.seq_len the model was trained with (read
   from the llmos_config.yaml of our exports: positions beyond it were never trained), else the
   model's context.
4. `<run.output_dir>/report.json` holds every figure, the models' sources and URIs, the resolved
   config, timings and the counts of bad or skipped records; `generations/<model>.jsonl` holds
   every prompt, reference and answer. Models named from the registry get their figures in their
   entry's `eval` dict (eval.attach_results).
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import math
import os
import re
import time
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from llmos_ray.config import Config
from llmos_ray.errors import ConfigError, DataError, ModelError, reraise_ours
from llmos_ray.eval.metrics import bleu, rouge, summarize_nll
from llmos_ray.storage import write_text

log = logging.getLogger(__name__)

INPUT_SCHEMA = pa.schema([("kind", pa.string()), ("id", pa.int64()), ("text", pa.large_string())])
"""Rows fed to a model: kind 'ppl' (a document to score) or 'gen' (a prompt to answer, id = its example)."""
MAX_BAD_LISTED = 20


def evaluate(cfg: Config) -> dict:
    """Evaluate every model of `cfg.eval.model`; write `<run.output_dir>/report.json` and return it."""
    from llmos_ray.runtime import init_ray

    started = time.perf_counter()
    cfg = with_defaults(cfg.resolved("evaluate"))
    ev = cfg.eval
    _check(cfg)
    models = resolve_models(cfg)
    init_ray()
    t0 = time.perf_counter()
    documents, ppl_info = perplexity_documents(cfg)
    ppl_info["seconds"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    examples, task_info = read_tasks(cfg) if ev.task_paths else ([], {})
    tasks_seconds = round(time.perf_counter() - t0, 3)
    if documents is None and not examples:
        raise ConfigError("nothing to evaluate: no perplexity documents ("
                          f"{ppl_info.get('skipped', 'none read')}) and no task examples (eval.task_paths)")
    parts = [d for d in (documents, _prompts_dataset(examples) if examples else None) if d is not None]
    inputs = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    resources, threads = worker_resources(cfg)
    out_dir = cfg.run.output_dir.rstrip("/")
    report: dict[str, Any] = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "report_path": f"{out_dir}/report.json",
        "models": {},
        "inputs": {"perplexity": ppl_info, "tasks": task_info, "tasks_read_seconds": tasks_seconds},
        "settings": {"max_length": ev.max_length, "stride": ev.stride, "batch_size": ev.batch_size,
                     "max_new_tokens": ev.max_new_tokens, "stop": list(ev.stop), "num_workers": ev.num_workers,
                     "worker_resources": resources, "torch_threads": threads},
        "versions": _versions(),
        "config": cfg.to_dict(),
    }
    for model in models:
        log.info("evaluating %s (%s) with %d actor(s) %s", model["label"], model["uri"], ev.num_workers, resources)
        t0 = time.perf_counter()
        rows = run_model(inputs, model, cfg, resources, threads)
        result = summarize_model(model, rows, examples, documents is not None)
        result["seconds"] = round(time.perf_counter() - t0, 3)
        if examples:
            result["generations"] = f"{out_dir}/generations/{_file_name(model['label'])}.jsonl"
            write_text(result["generations"], _generations_jsonl(rows, examples))
        report["models"][model["label"]] = result
        log.info("%s: %s", model["label"], flat_results(result))
    report["seconds"] = round(time.perf_counter() - started, 3)
    report = _json_ready(report)
    write_text(report["report_path"], json.dumps(report, indent=2) + "\n")
    if ev.attach_results:
        attach_to_registry(report, cfg)
    log.info("evaluation report: %s", report["report_path"])
    return report


DEFAULT_MODELS = (os.path.join("runs", "finetune", "export"), os.path.join("runs", "default", "export"))
"""What `llmos evaluate` with no models compares: the default fine-tune against its base."""


def with_defaults(cfg: Config) -> Config:
    """`llmos evaluate` with no eval.model: the default fine-tuned export beside the default pretrained
    one, on the corpus's held-out documents and — unless eval.task_paths says otherwise — the held-out
    split of the embedded instruction set as a generation task (prompt rendered with the chat template,
    reference = the docstring's summary)."""
    if cfg.eval.model:
        return cfg
    found = [os.path.abspath(m) for m in DEFAULT_MODELS if os.path.isfile(os.path.join(m, "config.json"))]
    if not found:
        return cfg  # _check explains what to pass
    cfg.eval.model = found
    if not cfg.eval.task_paths:
        cfg.eval.task_paths = [default_task_file(found[0], cfg.run.output_dir)]
    log.info("evaluating the default models %s", found)
    return cfg


def default_task_file(model_dir: str, out_dir: str) -> str:
    from llmos_ray.data import load_tokenizer
    from llmos_ray.data.instructions import stdlib_instructions
    from llmos_ray.data.sft import ensure_chat_template

    tokenizer = load_tokenizer(model_dir)
    ensure_chat_template(tokenizer)
    path = os.path.join(out_dir, "tasks", "stdlib_summaries.jsonl")
    lines = []
    for record in stdlib_instructions("val"):
        prompt = tokenizer.apply_chat_template(record["messages"][:1], tokenize=False, add_generation_prompt=True)
        lines.append(json.dumps({"prompt": prompt, "reference": record["messages"][1]["content"]}))
    write_text(path, "\n".join(lines) + "\n")
    return path


def _check(cfg: Config) -> None:
    if not cfg.eval.model:
        raise ConfigError("eval.model is empty: name at least one model directory or registry name "
                          "(llmos evaluate --model DIR_OR_NAME, or eval.model=[a,b])")


# ---------------------------------------------------------------------------------------------
# Models


def resolve_models(cfg: Config) -> list[dict]:
    """One {"label", "source", "uri", "base_uri", "registry_name"} per eval.model entry; labels are
    short (a registry name, a directory's name) and unique."""
    from llmos_ray.registry import default_name, resolve_source

    models, labels = [], set()
    for source in cfg.eval.model:
        uri, base, entry = resolve_source(source, cfg.registry.uri)
        if "://" not in uri and os.path.isdir(uri) and not any(
                os.path.isfile(os.path.join(uri, f)) for f in ("config.json", "adapter_config.json")):
            raise ModelError(f"model directory {uri} has no config.json: is it a Hugging Face export? "
                             "(`llmos export CHECKPOINT DIR` makes one)")
        label = base_label = entry["name"] if entry else default_name(source)
        n = 1
        while label in labels:
            n += 1
            label = f"{base_label}-{n}"
        labels.add(label)
        models.append({"label": label, "source": source, "uri": uri, "base_uri": base,
                       "registry_name": entry["name"] if entry else None})
    return models


def worker_resources(cfg: Config) -> tuple[dict, int]:
    """Ray resources of one inference actor, and its torch threads. Without eval.cpus_per_worker,
    an actor asks for 1 CPU, or an equal share when the cluster has fewer CPUs than actors (a
    request the cluster can never grant would wait forever)."""
    import ray

    ev = cfg.eval
    cluster = ray.cluster_resources()
    gpus = cluster.get("GPU", 0)
    use_gpu = ev.device == "cuda" or (ev.device == "auto" and gpus > 0)
    if ev.device == "cuda" and gpus < ev.num_workers:
        log.warning("eval.device=cuda with %d actor(s) but the cluster has %g GPU(s) now: the actors wait for "
                    "GPUs (an autoscaling cluster adds them)", ev.num_workers, gpus)
    cpus = ev.cpus_per_worker
    if cpus is None:
        cpus = round(min(1.0, cluster.get("CPU", 1.0) / ev.num_workers), 3)
    return {"num_cpus": cpus, "num_gpus": 1 if use_gpu else 0}, max(1, int(cpus))


# ---------------------------------------------------------------------------------------------
# Inputs


def perplexity_documents(cfg: Config):
    """(Ray Dataset of INPUT_SCHEMA rows, materialized, or None; what was read and skipped)."""
    from llmos_ray.data import corpus_stats, documents_dataset, has_validation

    ev = cfg.eval
    pcfg = copy.deepcopy(cfg)
    if ev.perplexity_paths:
        pcfg.data.val_paths = list(ev.perplexity_paths)
        info: dict[str, Any] = {"source": "eval.perplexity_paths", "paths": list(ev.perplexity_paths)}
    elif has_validation(cfg.data):
        info = {"source": "data.val_paths" if cfg.data.val_paths else
                f"data.val_fraction={cfg.data.val_fraction:g} of data.paths",
                "paths": list(cfg.data.val_paths or cfg.data.paths) or ["<default corpus>"]}
    else:
        return None, {"skipped": "no eval.perplexity_paths and no validation split (data.val_fraction=0, "
                                 "no data.val_paths)"}
    with reraise_ours():
        ds = documents_dataset(pcfg, "val")
        if ev.max_documents is not None:
            ds = ds.limit(ev.max_documents)
        ds = ds.map_batches(_as_documents, batch_format="pyarrow", batch_size=None, num_cpus=0.25)
        ds.context.raise_original_map_exception = True  # a DataError reaches reraise_ours() as itself
        ds = ds.materialize()
    counts = corpus_stats(pcfg, "val")
    info["documents"] = ds.count()
    info["max_documents"] = ev.max_documents
    info["counts"] = {k: v for k, v in counts.items() if k != "train_documents"}
    if info["documents"] == 0:
        log.warning("no perplexity documents in %s (%s); perplexity is skipped", info["paths"], info["counts"])
        info["skipped"] = "no documents left after cleaning"
        return None, info
    log.info("perplexity: %d document(s) from %s", info["documents"], info["source"])
    return ds, info


def _as_documents(batch: pa.Table) -> pa.Table:
    n = batch.num_rows
    return pa.Table.from_arrays([pa.array(["ppl"] * n, pa.string()), pa.array([-1] * n, pa.int64()),
                                 batch.column("text").cast(pa.large_string())], schema=INPUT_SCHEMA)


def read_tasks(cfg: Config) -> tuple[list[dict], dict[str, dict]]:
    """(examples [{"task", "line", "prompt", "reference"}], per task {"path", "records", "examples",
    "bad_records", "bad": [{"line", "reason"}, ...]}) from eval.task_paths, read with the corpus
    reader (any fsspec URI, .gz etc.); a task is named after its file."""
    from llmos_ray.data.sources import expand_sources

    examples: list[dict] = []
    tasks: dict[str, dict] = {}
    for source in expand_sources(list(cfg.eval.task_paths), "auto", cfg.data.storage_options):
        if source.format not in ("jsonl", "json"):
            raise DataError(f"task file {source.uri} is {source.format}; tasks are JSONL records "
                            '{"prompt": ..., "reference": ...}')
        name = base = _task_name(source.uri)
        n = 1
        while name in tasks:
            n += 1
            name = f"{base}-{n}"
        task_examples, tasks[name] = _read_task(name, source, cfg.data)
        examples += task_examples
    return examples, tasks


def _read_task(name: str, source, data) -> tuple[list[dict], dict]:
    """One task file's examples and what was read; a DataError when over data.max_bad_fraction are bad."""
    from llmos_ray.data.records import field_text, read_objects
    from llmos_ray.data.sources import Corpus

    examples: list[dict] = []
    info: dict[str, Any] = {"path": source.uri, "records": 0, "examples": 0, "bad_records": 0, "bad": []}
    corpus = Corpus([source], max_bad_fraction=1.0, storage_options=data.storage_options)
    for line, record, why in read_objects(corpus, source):
        info["records"] += 1
        prompt = reference = None
        if why is None:
            _, prompt, why = field_text(line, record, "prompt")
        if why is None:
            _, reference, why = field_text(line, record, "reference")
        if prompt is None or reference is None or not prompt.strip():
            info["bad_records"] += 1
            if len(info["bad"]) < MAX_BAD_LISTED:
                info["bad"].append({"line": line, "reason": why or "empty prompt"})
            continue
        examples.append({"task": name, "line": line, "prompt": prompt, "reference": reference})
        info["examples"] += 1
    if info["bad_records"] > data.max_bad_fraction * max(info["records"], 1):
        first = info["bad"][0]
        raise DataError(f"{source.uri}: {info['bad_records']} of {info['records']} task records are bad "
                        f"(> data.max_bad_fraction={data.max_bad_fraction:g}); first at line {first['line']}: "
                        f"{first['reason']}. Each line must be a JSON object with string fields 'prompt' "
                        "and 'reference'")
    if info["bad_records"]:
        log.warning("%s: skipped %d bad record(s), e.g. line %d: %s", source.uri, info["bad_records"],
                    info["bad"][0]["line"], info["bad"][0]["reason"])
    return examples, info


def _task_name(uri: str) -> str:
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".gz", ".bz2", ".zst", ".xz", ".jsonl", ".ndjson", ".json"):
        name = name.removesuffix(suffix)
    return name or "task"


def _prompts_dataset(examples: list[dict]):
    import ray

    table = pa.Table.from_arrays([pa.array(["gen"] * len(examples), pa.string()),
                                  pa.array(range(len(examples)), pa.int64()),
                                  pa.array([e["prompt"] for e in examples], pa.large_string())], schema=INPUT_SCHEMA)
    return ray.data.from_arrow(table)


# ---------------------------------------------------------------------------------------------
# Inference


class ModelWorker:
    """Ray Data actor: loads one model once; scores documents (per-document NLL sum and tokens) and
    answers prompts (greedy) of each batch of INPUT_SCHEMA rows. Output: one row per input row."""

    def __init__(self, model: dict, settings: dict):
        import torch

        from llmos_ray.models import context_length
        from llmos_ray.serve.engine import load_model
        from llmos_ray.serve.spec import ModelSpec

        torch.set_num_threads(settings["threads"])
        spec = ModelSpec(name=model["label"], uri=model["uri"], base_uri=model["base_uri"], device=settings["device"],
                         trust_remote_code=settings["trust_remote_code"])
        # A failure is raised from the first batch, not from here: Ray reports an actor that fails
        # to start as ActorDiedError with the cause only in its text, a failed batch as the error itself.
        self.error: Optional[ModelError] = None
        try:
            self.model, self.tokenizer, self.device = load_model(spec)
        except ModelError as e:
            self.error = e
            return
        except Exception as e:  # noqa: BLE001 - transformers raises many types; all mean "cannot load"
            self.error = ModelError(f"cannot load model {model['label']!r} from {model['uri']}: "
                                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return
        self.settings = settings
        context = context_length(self.model.config)
        trained = trained_length(model["uri"])
        if settings["max_length"]:
            self.max_length, self.window_source = min(settings["max_length"], context), "eval.max_length"
        elif trained and trained < context:
            self.max_length, self.window_source = trained, "data.seq_len the model was trained with"
        else:
            self.max_length, self.window_source = context, "model context"
        self.stride = min(settings["stride"] or max(1, self.max_length // 2), self.max_length)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from llmos_ray.eval.generation import greedy_generate
        from llmos_ray.eval.metrics import document_nll

        if self.error is not None:
            raise self.error
        s = self.settings
        kinds = np.asarray(batch["kind"]).astype(str)
        n = len(kinds)
        max_length, stride = self.max_length, self.stride
        out = {"kind": kinds, "id": np.asarray(batch["id"], dtype=np.int64),
               "nll": np.zeros(n), "tokens": np.zeros(n, np.int64), "bytes": np.zeros(n, np.int64),
               "words": np.zeros(n, np.int64), "output": np.array([""] * n, dtype=object),
               "prompt_tokens": np.zeros(n, np.int64), "new_tokens": np.zeros(n, np.int64),
               "truncated": np.zeros(n, bool), "seconds": np.zeros(n), "device": np.array([self.device] * n, object),
               "max_length": np.full(n, max_length, np.int64), "stride": np.full(n, stride, np.int64),
               "window_source": np.array([self.window_source] * n, object)}
        docs = np.flatnonzero(kinds == "ppl")
        if len(docs):
            t0 = time.perf_counter()
            scored = document_nll(self.model, self.tokenizer, [str(batch["text"][i]) for i in docs],
                                  max_length, stride, s["batch_size"])
            for i, row in zip(docs, scored):
                for key in ("nll", "tokens", "bytes", "words"):
                    out[key][i] = row[key]
            out["seconds"][docs] = (time.perf_counter() - t0) / len(docs)
        prompts = np.flatnonzero(kinds == "gen")
        if len(prompts):
            t0 = time.perf_counter()
            answers = greedy_generate(self.model, self.tokenizer, [str(batch["text"][i]) for i in prompts],
                                      s["max_new_tokens"], s["batch_size"], s["stop"])
            for i, row in zip(prompts, answers):
                for key in ("output", "prompt_tokens", "new_tokens", "truncated"):
                    out[key][i] = row[key]
            out["seconds"][prompts] = (time.perf_counter() - t0) / len(prompts)
        return out


def trained_length(uri: str) -> Optional[int]:
    """data.seq_len of the training run that exported a model (its llmos_config.yaml), else None.
    A model trained on shorter sequences than its position table has untrained positions beyond
    them, so its perplexity window defaults to what it was trained on."""
    import yaml

    from llmos_ray.storage import localize

    path = os.path.join(localize(uri), "llmos_config.yaml") if "://" in uri or os.path.isdir(uri) else None
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            value = (yaml.safe_load(f) or {}).get("data", {}).get("seq_len")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 1 else None


def run_model(inputs, model: dict, cfg: Config, resources: dict, threads: int) -> list[dict]:
    """Every input row through an actor pool of `model`; the output rows (any order)."""
    import ray


    ev = cfg.eval
    settings = {"max_length": ev.max_length, "stride": ev.stride, "batch_size": ev.batch_size,
                "max_new_tokens": ev.max_new_tokens, "stop": list(ev.stop), "threads": threads,
                "device": "cuda" if resources["num_gpus"] else "cpu",
                "trust_remote_code": cfg.model.trust_remote_code}
    out = inputs.map_batches(ModelWorker, fn_constructor_kwargs={"model": model, "settings": settings},
                             batch_size=ev.batch_size, batch_format="numpy",
                             compute=ray.data.ActorPoolStrategy(size=ev.num_workers),
                             udf_modifying_row_count=False, **resources)
    out.context.raise_original_map_exception = True  # a ModelError reaches reraise_ours() as itself
    with reraise_ours():
        return out.take_all()


# ---------------------------------------------------------------------------------------------
# Results


def summarize_model(model: dict, rows: list[dict], examples: list[dict], has_documents: bool) -> dict:
    """One model's figures from its output rows."""
    result: dict[str, Any] = {k: model[k] for k in ("source", "uri", "base_uri", "registry_name")}
    result["device"] = sorted({str(r["device"]) for r in rows})
    docs = [r for r in rows if r["kind"] == "ppl"]
    if has_documents:
        ppl = summarize_nll(docs)
        seconds = sum(float(r["seconds"]) for r in docs)
        ppl.update(max_length=int(docs[0]["max_length"]), stride=int(docs[0]["stride"]),
                   window_source=str(docs[0]["window_source"]),
                   empty_documents=sum(1 for r in docs if int(r["tokens"]) == 0),
                   compute_seconds=round(seconds, 3),
                   tokens_per_s=round(ppl["tokens"] / seconds, 1) if seconds > 0 else None)
        result["perplexity"] = ppl
    else:
        result["perplexity"] = None
    result["tasks"] = {}
    answers = {int(r["id"]): r for r in rows if r["kind"] == "gen"}
    for task in dict.fromkeys(e["task"] for e in examples):
        ids = [i for i, e in enumerate(examples) if e["task"] == task]
        hyps = [str(answers[i]["output"]) for i in ids]
        refs = [examples[i]["reference"] for i in ids]
        b = bleu(hyps, refs)
        seconds = sum(float(answers[i]["seconds"]) for i in ids)
        result["tasks"][task] = {
            "bleu": b["bleu"], **rouge(hyps, refs), "examples": len(ids),
            "bleu_details": {k: b[k] for k in ("precisions", "brevity_penalty", "sys_len", "ref_len", "signature")},
            "truncated_prompts": sum(bool(answers[i]["truncated"]) for i in ids),
            "empty_outputs": sum(1 for h in hyps if not h),
            "new_tokens": sum(int(answers[i]["new_tokens"]) for i in ids),
            "compute_seconds": round(seconds, 3),
        }
    return result


def flat_results(result: dict) -> dict[str, float]:
    """A model's headline figures as one flat dict: perplexity, bits_per_byte, <task>/bleu, ..."""
    flat: dict[str, Any] = {}
    if result.get("perplexity"):
        for key in ("perplexity", "bits_per_byte", "tokens"):
            flat[key if key != "tokens" else "perplexity_tokens"] = result["perplexity"][key]
    for task, scores in result.get("tasks", {}).items():
        for key in ("bleu", "rouge1", "rouge2", "rougeL"):
            flat[f"{task}/{key}"] = scores[key]
    return {k: v for k, v in flat.items() if v is not None}


def attach_to_registry(report: dict, cfg: Config) -> None:
    """Merge each registry-named model's headline figures (and where the report is) into its entry."""
    from llmos_ray import registry

    for result in report["models"].values():
        name = result.get("registry_name")
        if name:
            registry.attach_eval(name, {**flat_results(result), "eval_report": report["report_path"],
                                        "evaluated": report["created"]}, cfg.registry.uri)
            log.info("registry: attached the results to %s", name)


_TABLE_ROWS = (("perplexity", "{:.2f}"), ("bits_per_byte", "{:.4f}"), ("perplexity_tokens", "{:d}"))


def format_table(report: dict) -> str:
    """The report's headline figures, one column per model (BLEU 0-100, ROUGE F1 0-1)."""
    labels = list(report["models"])
    flats = {label: flat_results(report["models"][label]) for label in labels}
    keys = list(dict.fromkeys(k for flat in flats.values() for k in flat))
    formats = dict(_TABLE_ROWS)
    rows = [["metric", *labels]]
    for key in keys:
        fmt = formats.get(key, "{:.2f}" if key.endswith("/bleu") else "{:.4f}")
        rows.append([key, *(fmt.format(flats[m][key]) if flats[m].get(key) is not None else "-" for m in labels)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _generations_jsonl(rows: list[dict], examples: list[dict]) -> str:
    lines = []
    for r in sorted((r for r in rows if r["kind"] == "gen"), key=lambda r: int(r["id"])):
        e = examples[int(r["id"])]
        lines.append(json.dumps({"task": e["task"], "line": e["line"], "prompt": e["prompt"],
                                 "reference": e["reference"], "output": str(r["output"]),
                                 "prompt_tokens": int(r["prompt_tokens"]), "new_tokens": int(r["new_tokens"]),
                                 "truncated": bool(r["truncated"])}, ensure_ascii=False))
    return "\n".join(lines) + "\n"


def _file_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", label)


def _json_ready(value):
    """NaN/inf become null (JSON has neither); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _versions() -> dict[str, Optional[str]]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("llmos-ray", "ray", "torch", "transformers", "sacrebleu", "rouge-score"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out
