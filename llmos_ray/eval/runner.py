"""`evaluate(cfg)`: each model of eval.model on held-out text (perplexity) and on generation tasks
(BLEU, chrF, ROUGE), as Ray Data batch inference; one report.json for all of them.

    report = evaluate(load_config("jobs/configs/evaluate_tiny.yaml"))
    print(format_table(report))            # models side by side

1. Models are resolved as `llmos serve` resolves them (a directory, fsspec URI, registry name,
   hub id or LoRA adapter) and loaded the same way (worker.py), so what is evaluated is what is
   served. With no eval.model: the default fine-tuned export beside the default pretrained one.
2. Inputs are read once, on behalf of every model (inputs.py): perplexity documents (the
   validation documents unless eval.perplexity_paths says otherwise) and task files.
3. Per model, one Ray Data pass: documents and prompts → `map_batches(ModelWorker)` on an actor
   pool of eval.num_workers actors (each loads the model once, on a GPU when the cluster has
   them) → a row per document (NLL sum, tokens scored) and per prompt (greedy answer), reduced
   on the driver: perplexity is token-weighted over all documents, BLEU is corpus-level.
4. Seq2seq models (exports of finetune.task=seq2seq) translate or summarize eval.pair_paths, else
   the held-out pairs of the first one's training data (seq2seq.py): BLEU, chrF, ROUGE.
5. Classifiers (exports of finetune.task=classification) are scored instead on labelled records
   (classification.py: eval.classification_paths, else the held-out split of the first one's
   training data): accuracy, macro-F1, per-label precision and recall, confusion matrix.
6. `<run.output_dir>/report.json` holds every figure, the models' sources and URIs, the resolved
   config, timings and the counts of bad or skipped records; `generations/<model>.jsonl` holds
   every prompt, reference and answer (report.py). Models named from the registry get their
   figures in their entry's `eval` dict (eval.attach_results).
"""

from __future__ import annotations

import logging
import os
import time

from llmos_ray.config import Config
from llmos_ray.errors import ConfigError
from llmos_ray.eval.inputs import default_task_file, model_inputs, read_inputs
from llmos_ray.eval.report import (
    attach_to_registry,
    flat_results,
    format_table,
    new_report,
    summarize_model,
    write_generations,
    write_report,
)
from llmos_ray.eval.worker import run_model, worker_resources

log = logging.getLogger(__name__)

__all__ = ["evaluate", "with_defaults", "resolve_models", "format_table", "flat_results"]


def evaluate(cfg: Config) -> dict:
    """Evaluate every model of `cfg.eval.model`; write `<run.output_dir>/report.json` and return it."""
    from llmos_ray.runtime import run_log

    started = time.perf_counter()
    cfg = with_defaults(cfg.resolved("evaluate"))
    _check(cfg)
    models = resolve_models(cfg)  # every mistake in models and paths found before Ray starts
    with run_log(cfg.run.output_dir):
        return _evaluate(cfg, models, started)


def _evaluate(cfg: Config, models: list[dict], started: float) -> dict:
    from llmos_ray.eval.classification import classification_inputs, score_classifier
    from llmos_ray.eval.inputs import prompts_dataset
    from llmos_ray.eval.seq2seq import model_examples, seq2seq_inputs
    from llmos_ray.runtime import init_ray

    ev = cfg.eval
    init_ray()
    generative = [m for m in models if m["task"] == "causal_lm"]
    classifiers = [m for m in models if m["task"] == "classification"]
    translators = [m for m in models if m["task"] == "seq2seq"]
    documents, examples, inputs_info = read_inputs(cfg) if generative else (None, [], {})
    if classifiers:
        labelled, inputs_info["classification"] = classification_inputs(cfg, classifiers)
    if translators:
        pairs, pairs_info = seq2seq_inputs(cfg, translators)
        inputs_info.setdefault("tasks", {}).update(pairs_info)
    inputs = model_inputs(documents, examples) if generative else None
    resources, threads = worker_resources(cfg)
    report = new_report(cfg, inputs_info, resources, threads)
    for model in models:
        log.info("evaluating %s (%s) with %d actor(s) %s", model["label"], model["uri"], ev.num_workers, resources)
        t0 = time.perf_counter()
        if model["task"] == "classification":
            result = {k: model[k] for k in ("source", "uri", "base_uri", "registry_name", "task")}
            result["classification"] = {inputs_info["classification"]["name"]:
                                        score_classifier(labelled, model, cfg, resources, threads)}
        elif model["task"] == "seq2seq":  # answers the pairs; perplexity is a causal LM's figure
            own = model_examples(pairs, next(iter(pairs_info)), model)
            rows = run_model(prompts_dataset(own), model, cfg, resources, threads)
            result = summarize_model(model, rows, own, False)
            result["generations"] = write_generations(report, model["label"], rows, own)
        else:
            rows = run_model(inputs, model, cfg, resources, threads)
            result = summarize_model(model, rows, examples, documents is not None)
            if examples:
                result["generations"] = write_generations(report, model["label"], rows, examples)
        result["seconds"] = round(time.perf_counter() - t0, 3)
        report["models"][model["label"]] = result
        log.info("%s: %s", model["label"], flat_results(result))
    report["seconds"] = round(time.perf_counter() - started, 3)
    report = write_report(report)
    if ev.attach_results:
        attach_to_registry(report, cfg)
    log.info("evaluation report: %s", report["report_path"])
    return report


DEFAULT_MODELS = (os.path.join("runs", "finetune", "export"), os.path.join("runs", "default", "export"),
                  os.path.join("runs", "classification", "export"), os.path.join("runs", "seq2seq", "export"))
"""What `llmos evaluate` with no models compares: the default fine-tune against its base, the
default classifier (`llmos finetune finetune.task=classification`) and the default translator
(`llmos finetune finetune.task=seq2seq`), each on what it is for."""


def with_defaults(cfg: Config) -> Config:
    """`llmos evaluate` with no eval.model: the default fine-tuned export beside the default pretrained
    one, on the corpus's held-out documents and — unless eval.task_paths says otherwise — the held-out
    split of the embedded instruction set as a generation task (prompt rendered with the chat template,
    reference = the docstring's summary)."""
    if cfg.eval.model:
        return cfg
    from llmos_ray.registry import model_task_of

    found = [os.path.abspath(m) for m in DEFAULT_MODELS if os.path.isfile(os.path.join(m, "config.json"))]
    if not found:
        return cfg  # _check explains what to pass
    cfg.eval.model = found
    generative = [m for m in found if model_task_of(m) == "causal_lm"]
    if generative and not cfg.eval.task_paths:
        cfg.eval.task_paths = [default_task_file(generative[0], cfg.run.output_dir)]
    log.info("evaluating the default models %s", found)
    return cfg


def _check(cfg: Config) -> None:
    from llmos_ray.data.sources import expand_sources

    if not cfg.eval.model:
        raise ConfigError("eval.model is empty: name at least one model directory or registry name "
                          "(llmos evaluate --model DIR_OR_NAME, or eval.model=[a,b])")
    for key in ("perplexity_paths", "task_paths", "classification_paths", "pair_paths"):
        paths = getattr(cfg.eval, key)
        if paths:
            expand_sources(list(paths), "auto", cfg.data.storage_options)  # DataError naming a missing path


def resolve_models(cfg: Config) -> list[dict]:
    """One {"label", "source", "uri", "base_uri", "registry_name", "registry_ref", "task"} per eval.model
    entry; labels are short (a library reference, a directory's name) and unique; registry_ref is the
    exact version evaluated (NAME@N), which gets the results."""
    from llmos_ray.registry import default_name, model_task_of, resolve_source

    models, labels = [], set()
    for source in cfg.eval.model:
        uri, base, entry = resolve_source(source, cfg.registry.uri)  # a directory must be a model
        label = base_label = default_name(source, entry)  # a library reference as typed (tiny, tiny@2, tiny:prod)
        n = 1
        while label in labels:
            n += 1
            label = f"{base_label}-{n}"
        labels.add(label)
        task = (entry or {}).get("task") or model_task_of(uri)
        if task not in ("causal_lm", "classification", "seq2seq"):
            raise ConfigError(f"model {source!r} is a {task} model: evaluation scores causal LMs (perplexity, "
                              "generation tasks), seq2seq models (BLEU, chrF, ROUGE) and classifiers; fine-tune "
                              "it first (finetune.task=classification or seq2seq)")
        models.append({"label": label, "source": source, "uri": uri, "base_uri": base,
                       "registry_name": entry["name"] if entry else None,
                       "registry_ref": entry["ref"] if entry else None, "task": task})
    return models
