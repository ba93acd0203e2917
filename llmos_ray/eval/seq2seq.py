"""Evaluating encoder-decoders (exports of finetune.task=seq2seq): source → target pairs → greedy
translations (or summaries) from the same Ray Data actor pool as every generative model
(worker.py) → corpus BLEU and chrF (sacrebleu) and ROUGE, in the same report.

The pairs are eval.pair_paths (records of any seq2seq shape: `{source, target}`,
`{"translation": {..}}` with finetune.source_lang/target_lang, `{text, summary}`; any fsspec URI,
compressed or not), one task named "pairs"; else the held-out split of the first seq2seq model's
own training run (its llmos_config.yaml: its finetune.paths split by source, or the embedded
gettext pairs), named "heldout". Every seq2seq model of an evaluation answers the same pairs, each
source given that model's own finetune.task_prefix (from its llmos_config.yaml) as in its training.
A record that is not a pair is counted with its file and line, never dropped silently.
"""

from __future__ import annotations

import os

from llmos_ray.config import Config, load_config
from llmos_ray.errors import ConfigError

MAX_BAD_LISTED = 20


def seq2seq_inputs(cfg: Config, models: list[dict]) -> tuple[list[dict], dict]:
    """(pairs [{"line", "source", "reference"}], {task name: {"path", "records", "examples", "bad_records",
    "bad"}}) that every seq2seq model answers."""
    from llmos_ray.data.seq2seq import pair_of, pair_records
    from llmos_ray.data.sft import read_sft_records

    if cfg.eval.pair_paths:
        name, where, ft = "pairs", ", ".join(cfg.eval.pair_paths), cfg.finetune
        triples = list(read_sft_records(list(cfg.eval.pair_paths), cfg.data.storage_options))
    else:
        run = _run_config(models[0])
        if run is None:
            raise ConfigError(f"{models[0]['source']} has no llmos_config.yaml naming the pairs it was trained on: "
                              "give eval.pair_paths (JSONL {source, target} records)")
        ft = run.finetune
        name, where = "heldout", (f"the held-out pairs of {models[0]['label']}'s training data "
                                  f"({', '.join(ft.paths) or '<embedded>'})")
        triples = pair_records(run).val
    pairs, bad = [], []
    for file, line, record in triples:
        try:
            source, target = pair_of(record, ft.source_lang, ft.target_lang)
        except ValueError as e:
            bad.append({"file": file, "line": line, "reason": str(e)})
            continue
        pairs.append({"line": line, "source": source, "reference": target})
    if not pairs:
        raise ConfigError(f"no usable pairs in {where} ({len(bad)} bad, e.g. {bad[:1]})")
    return pairs, {name: {"path": where, "records": len(triples), "examples": len(pairs), "bad_records": len(bad),
                          "bad": bad[:MAX_BAD_LISTED]}}


def model_examples(pairs: list[dict], task: str, model: dict) -> list[dict]:
    """The pairs as generation examples of `model`: prompt = its task prefix + the source."""
    run = _run_config(model)
    prefix = (run.finetune.task_prefix or "") if run is not None else ""
    return [{"task": task, "line": p["line"], "prompt": prefix + p["source"], "reference": p["reference"]}
            for p in pairs]


def _run_config(model: dict):
    path = os.path.join(model["uri"], "llmos_config.yaml")
    return load_config(path) if os.path.isfile(path) else None
