"""The evaluation report: per model, its figures from the worker's output rows (token-weighted
perplexity over all documents, corpus-level BLEU and ROUGE per task; a classifier's accuracy,
macro-F1, per-label precision/recall and confusion matrix); the headline figures flat and as a
table (confusion matrices after it); every prompt, reference and answer as JSON lines; the figures attached to the
model's registry entry. `<run.output_dir>/report.json` holds every figure, the models' sources and
URIs, the resolved config, timings and the counts of bad or skipped records.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import re
from typing import Any, Optional

import numpy as np

from llmos_ray.config import Config
from llmos_ray.eval.metrics import bleu, chrf, rouge, summarize_nll
from llmos_ray.storage import write_text

log = logging.getLogger(__name__)


def new_report(cfg: Config, inputs: dict, resources: dict, threads: int) -> dict:
    """The report before any model ran: where it goes, what the inputs were, the settings, versions
    and the resolved config; `models` fills in per model."""
    ev = cfg.eval
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "report_path": f"{cfg.run.output_dir.rstrip('/')}/report.json",
        "models": {},
        "inputs": inputs,
        "settings": {"max_length": ev.max_length, "stride": ev.stride, "batch_size": ev.batch_size,
                     "max_new_tokens": ev.max_new_tokens, "stop": list(ev.stop), "num_workers": ev.num_workers,
                     "worker_resources": resources, "torch_threads": threads},
        "versions": _versions(),
        "config": cfg.to_dict(),
    }


def write_report(report: dict) -> dict:
    """Write `report` (made JSON-ready, with its `legend`) to its report_path and return what was written."""
    report["legend"] = legend(report)
    report = _json_ready(report)
    write_text(report["report_path"], json.dumps(report, indent=2) + "\n")
    return report


def write_generations(report: dict, label: str, rows: list[dict], examples: list[dict]) -> str:
    """Every prompt, reference and answer of model `label` as generations/<label>.jsonl beside the report."""
    path = f"{report['report_path'].rsplit('/', 1)[0]}/generations/{_file_name(label)}.jsonl"
    write_text(path, _generations_jsonl(rows, examples))
    return path


def summarize_model(model: dict, rows: list[dict], examples: list[dict], has_documents: bool) -> dict:
    """One model's figures from its output rows."""
    result: dict[str, Any] = {k: model.get(k) for k in ("source", "uri", "base_uri", "registry_name", "registry_ref")}
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
            "bleu": b["bleu"], "chrf": chrf(hyps, refs)["chrf"], **rouge(hyps, refs), "examples": len(ids),
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
        for key in ("bleu", "chrf", "rouge1", "rouge2", "rougeL"):
            flat[f"{task}/{key}"] = scores.get(key)
    for task, scores in (result.get("classification") or {}).items():
        for key in ("accuracy", "macro_f1", "majority_baseline"):
            flat[f"{task}/{key}"] = scores[key]
        for label, figures in scores["per_class"].items():
            flat[f"{task}/{label}/precision"] = figures["precision"]
            flat[f"{task}/{label}/recall"] = figures["recall"]
    return {k: v for k, v in flat.items() if v is not None}


def attach_to_registry(report: dict, cfg: Config) -> None:
    """Merge each registry-named model's headline figures (and where the report is) into the entry of
    the version evaluated."""
    from llmos_ray import registry

    for result in report["models"].values():
        name = result.get("registry_ref") or result.get("registry_name")
        if name:
            registry.attach_eval(name, {**flat_results(result), "eval_report": report["report_path"],
                                        "evaluated": report["created"]}, cfg.registry.uri)
            log.info("registry: attached the results to %s", name)


_TABLE_ROWS = (("perplexity", "{:.2f}"), ("bits_per_byte", "{:.4f}"), ("perplexity_tokens", "{:d}"))


def legend(report: dict) -> dict[str, str]:
    """What each metric of the table is measured on and its scale, from the report's inputs."""
    out: dict[str, str] = {}
    ppl = (report.get("inputs") or {}).get("perplexity") or {}
    if ppl.get("documents"):
        where = f"{ppl['documents']} held-out documents of {ppl.get('source')} ({', '.join(ppl.get('paths') or [])})"
        out["perplexity"] = (f"exp(mean negative log-likelihood per token) on {where}; lower is better. A "
                             "fine-tuned model is scored on this same text, where it is usually worse than its "
                             "base: it has moved toward its fine-tuning data")
        out["bits_per_byte"] = "negative log-likelihood in bits per UTF-8 byte of the same text; lower is better; " \
                               "unlike perplexity, comparable across tokenizers"
        out["perplexity_tokens"] = "tokens scored (each model's own tokenizer)"
    for task, info in ((report.get("inputs") or {}).get("tasks") or {}).items():
        on = f"greedy answers to {info.get('examples')} prompts of {info.get('path')} against their references"
        out[f"{task}/bleu"] = f"sacreBLEU corpus BLEU, 0-100, of {on}; higher is better"
        out[f"{task}/chrf"] = "sacreBLEU corpus chrF (character 6-grams), 0-100, of the same answers; higher is better"
        for key, name in (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L")):
            out[f"{task}/{key}"] = f"mean {name} F1, 0-1 (stemmed), of the same answers; higher is better"
    info = (report.get("inputs") or {}).get("classification")
    if info:
        task = info["name"]
        on = f"the {info['records']} labelled records of {info['source']} ({', '.join(info.get('paths') or [])})"
        out[f"{task}/accuracy"] = (f"share of {on} whose predicted label is the reference (multi-label: whose label "
                                   "set is exactly right), 0-1, minus the model's bad records; higher is better")
        out[f"{task}/macro_f1"] = "unweighted mean over the model's labels of each label's F1, 0-1; higher is better"
        out[f"{task}/majority_baseline"] = "accuracy of always answering the most frequent reference label"
        out[f"{task}/<label>/precision"] = "of the records predicted as <label>, the share that are; 0-1"
        out[f"{task}/<label>/recall"] = "of the records labelled <label>, the share predicted so; 0-1"
    return out


def confusion_matrices(report: dict) -> str:
    """Each classifier's confusion matrix per task (rows: reference label, columns: predicted)."""
    blocks = []
    for label, result in report["models"].items():
        for task, scores in (result.get("classification") or {}).items():
            if scores.get("multi_label"):
                continue  # one 2x2 matrix per label: in report.json
            names, matrix = scores["labels"], scores["confusion_matrix"]
            width = max([len(n) for n in names] + [len(str(v)) for row in matrix for v in row])
            lines = [f"confusion matrix of {label} on {task} (rows: reference, columns: predicted):",
                     " " * (width + 2) + " ".join(n.rjust(width) for n in names)]
            lines += [f"  {n.rjust(width)} " + " ".join(str(v).rjust(width) for v in row)
                      for n, row in zip(names, matrix)]
            blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def format_table(report: dict) -> str:
    """The report's headline figures, one column per model (BLEU 0-100, ROUGE F1 0-1), then the legend."""
    labels = list(report["models"])
    flats = {label: flat_results(report["models"][label]) for label in labels}
    keys = list(dict.fromkeys(k for flat in flats.values() for k in flat))
    formats = dict(_TABLE_ROWS)
    rows = [["metric", *labels]]
    for key in keys:
        fmt = formats.get(key, "{:.2f}" if key.endswith(("/bleu", "/chrf")) else "{:.4f}")
        rows.append([key, *(fmt.format(flats[m][key]) if flats[m].get(key) is not None else "-" for m in labels)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    meaning = report.get("legend") or legend(report)
    generic = [re.sub(r"^([^/]+)/[^/]+/(precision|recall)$", r"\1/<label>/\2", key) for key in keys]
    shown = [f"  {key}: {meaning[key]}" for key in dict.fromkeys(generic) if key in meaning]
    matrices = confusion_matrices(report)
    return "\n".join(lines + (["", "legend:", *shown] if shown else []) + (["", matrices] if matrices else []))


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
    for name in ("llmos-ray", "ray", "torch", "transformers", "sacrebleu", "rouge-score", "scikit-learn"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out
