"""What every model of an evaluation is run on, read once on behalf of all of them.

- Perplexity documents: eval.perplexity_paths, read by the corpus pipeline as a separate
  validation corpus (data.format, data.text_field, data.txt_mode, data.min_chars and
  data.max_bad_fraction apply; bad, short and duplicate records are counted). When it is empty,
  the validation documents of the data section: data.val_paths, or the documents held out of
  data.paths by data.val_fraction. Whole documents, not the packed blocks behind the trainer's
  val loss: every model scores the same text with its own tokenizer and up to its full context
  (sliding windows, see metrics.py), so figures compare across models and tokenizers
  (bits_per_byte). eval.max_documents caps them.
- Tasks: each JSONL file of eval.task_paths is a task named after the file, one record
  {"prompt": str, "reference": str} per line; bad records are counted and listed, and a file
  over data.max_bad_fraction fails. `default_task_file` writes one from the held-out split of
  the embedded instruction set.

Both become rows of INPUT_SCHEMA, the one table a model worker reads.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from typing import Any

import pyarrow as pa

from llmos_ray.config import Config
from llmos_ray.errors import ConfigError, DataError, reraise_ours
from llmos_ray.storage import write_text

log = logging.getLogger(__name__)

INPUT_SCHEMA = pa.schema([("kind", pa.string()), ("id", pa.int64()), ("text", pa.large_string())])
"""Rows fed to a model: kind 'ppl' (a document to score) or 'gen' (a prompt to answer, id = its example)."""
MAX_BAD_LISTED = 20


def read_inputs(cfg: Config) -> tuple[Any, list[dict], dict]:
    """(perplexity documents or None, task examples, what was read and how long it took); a
    ConfigError when there is nothing to evaluate."""
    t0 = time.perf_counter()
    documents, ppl_info = perplexity_documents(cfg)
    ppl_info["seconds"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    examples, task_info = read_tasks(cfg) if cfg.eval.task_paths else ([], {})
    tasks_seconds = round(time.perf_counter() - t0, 3)
    if documents is None and not examples:
        raise ConfigError("nothing to evaluate: no perplexity documents ("
                          f"{ppl_info.get('skipped', 'none read')}) and no task examples (eval.task_paths)")
    return documents, examples, {"perplexity": ppl_info, "tasks": task_info, "tasks_read_seconds": tasks_seconds}


def model_inputs(documents, examples: list[dict]):
    """One Ray Dataset of INPUT_SCHEMA rows: the perplexity documents (or None) and the task prompts."""
    parts = [d for d in (documents, prompts_dataset(examples) if examples else None) if d is not None]
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


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


def prompts_dataset(examples: list[dict]):
    """The task examples' prompts as INPUT_SCHEMA rows (kind 'gen', id = the example's index)."""
    import ray

    table = pa.Table.from_arrays([pa.array(["gen"] * len(examples), pa.string()),
                                  pa.array(range(len(examples)), pa.int64()),
                                  pa.array([e["prompt"] for e in examples], pa.large_string())], schema=INPUT_SCHEMA)
    return ray.data.from_arrow(table)


def default_task_file(model_dir: str, out_dir: str) -> str:
    """Write the held-out split of the embedded instruction set as a task file (prompt rendered with
    `model_dir`'s chat template, reference = the docstring's summary) under `out_dir`; its path."""
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
