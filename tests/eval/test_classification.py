"""`llmos evaluate` on a classifier (the session's fine-tuned language-ID classifier, tests/conftest.py
`classifier_run`): accuracy, macro-F1, per-label precision/recall and the confusion matrix through
Ray Data equal scikit-learn's on a direct forward pass of the export; bad records counted with file
and line; the default records are the held-out split it trained beside."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from llmos_ray.config import load_config

pytestmark = pytest.mark.slow


def direct_predictions(export_dir: str, texts: list[str]) -> list[str]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(export_dir).eval()
    tok = AutoTokenizer.from_pretrained(export_dir)
    with torch.no_grad():
        return [model.config.id2label[int(model(**tok(t, return_tensors="pt")).logits[0].argmax())] for t in texts]


def test_evaluate_a_classifier_reports_accuracy_f1_and_counts_bad_records(classifier_run, tmp_path, capsys):
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score

    from llmos_ray.cli import main
    from llmos_ray.data.classification import labelled_records
    from llmos_ray.eval.classification import classification_inputs

    export = classifier_run.export_dir
    run_cfg = load_config(os.path.join(export, "llmos_config.yaml"))
    held_out = [r for _, _, r in labelled_records(run_cfg).val]
    # The default records of `llmos evaluate` on it: that held-out split, named as such.
    triples, info = classification_inputs(load_config(None), [{"uri": export, "source": export, "label": "lang-id"}])
    assert [r for _, _, r in triples] == held_out and info["name"] == "heldout" and info["paths"] == ["<embedded>"]
    # A CSV of the held-out records plus three bad rows: no label, an unknown label, an empty text.
    path = tmp_path / "langs.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows([[r["text"], r["label"]] for r in held_out[:20]])
        w.writerows([["Bonjour tout le monde", ""], ["Hej verden", "da"], ["", "fr"]])
        w.writerows([[r["text"], r["label"]] for r in held_out[20:]])
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", export, f"run.output_dir={out}", f"eval.classification_paths=[{path}]",
                 "eval.num_workers=1", "eval.batch_size=8"]) == 0
    report = json.loads((out / "report.json").read_text())
    (label, result), = report["models"].items()
    scores = result["classification"]["classification"]
    truth = [r["label"] for r in held_out]
    pred = direct_predictions(export, [r["text"] for r in held_out])
    names = scores["labels"]
    assert names == sorted(run_cfg.finetune.languages) and scores["examples"] == len(held_out)
    assert scores["accuracy"] == pytest.approx(accuracy_score(truth, pred))
    assert scores["accuracy"] > scores["majority_baseline"] + 0.25  # majority: 0.125 (5 of each of 8 languages)
    assert scores["macro_f1"] == pytest.approx(f1_score(truth, pred, labels=names, average="macro", zero_division=0))
    assert scores["confusion_matrix"] == confusion_matrix(truth, pred, labels=names).tolist()
    fr = scores["per_class"]["fr"]
    assert fr["precision"] == pytest.approx(precision_score(truth, pred, labels=["fr"], average=None,
                                                            zero_division=0)[0])
    assert fr["recall"] == pytest.approx(recall_score(truth, pred, labels=["fr"], average=None, zero_division=0)[0])
    assert scores["bad_records"] == 3
    first = 2 + sum(1 + r["text"].count("\n") for r in held_out[:20])  # a record's first line; the header is 1
    assert [b["line"] for b in scores["bad"]] == [first, first + 1, first + 2]
    assert all(b["file"].endswith("langs.csv") for b in scores["bad"])
    assert "not one the model was trained on" in scores["bad"][1]["reason"]
    printed = capsys.readouterr().out
    assert "classification/accuracy" in printed and "classification/macro_f1" in printed
    assert f"confusion matrix of {label} on classification" in printed
    assert np.sum(scores["confusion_matrix"]) == len(held_out)
