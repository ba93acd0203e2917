"""Sequence classification and masked-LM pretraining through Ray Train + DeepSpeed, end to end.

One classifier is fine-tuned per session (tests/conftest.py `classifier_run`: bert-tiny from
scratch on the embedded language-ID set's shipped sample, ZeRO-2, 2 workers); a second run
resumes its step-40 checkpoint on one worker (the same global batch), so the second
half of its loss curve must be the first run's, and a third trains it under ZeRO-3, whose every
logged loss must be the ZeRO-2 run's. Beating the majority class: the held-out split
has 5 records of each of 8 languages (majority 0.125); the bar of 0.4 is well below what 80 steps
reach (0.6-0.7 in a plain torch loop of the same model, data and schedule, 2026-12-02) and far above chance.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from llmos_ray.config import load_config
from tests.conftest import CLASSIFIER_STEPS, classifier_overrides

pytestmark = pytest.mark.slow


def held_out(classifier_run):
    from llmos_ray.data.classification import labelled_records

    cfg = load_config(os.path.join(classifier_run.export_dir, "llmos_config.yaml"))
    return [r for _, _, r in labelled_records(cfg).val]


def accuracy(export_dir: str, records: list[dict]) -> float:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(export_dir).eval()
    tok = AutoTokenizer.from_pretrained(export_dir)
    with torch.no_grad():
        enc = tok([r["text"] for r in records], padding=True, return_tensors="pt")
        pred = model(**enc).logits.argmax(-1).tolist()
    return float(np.mean([model.config.id2label[p] == r["label"] for p, r in zip(pred, records)]))


def test_classifier_learns_exports_with_its_labels_and_works_in_pipelines(classifier_run):
    from transformers import AutoConfig, pipeline

    result = classifier_run
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert losses[-1] < 0.5 * losses[0]
    # examples/s, not tokens/s or MFU: micro-batches are cut to their longest example, not seq_len
    assert all(h.get("mfu") is None and h["examples_per_s"] > 0 for h in result.history if "loss" in h)
    vals = [h["val_loss"] for h in result.history if "val_loss" in h]
    assert len(vals) == 2 and vals[1] < vals[0] and "val_ppl" not in result.history[-1]
    config = AutoConfig.from_pretrained(result.export_dir)
    languages = sorted(load_config(None).finetune.languages)
    assert config.architectures == ["BertForSequenceClassification"]
    assert list(config.id2label.values()) == languages and config.label2id == {n: i for i, n in enumerate(languages)}
    records = held_out(result)
    assert accuracy(result.export_dir, records) >= 0.4  # majority class: 0.125 (module doc)
    clf = pipeline("text-classification", model=result.export_dir)
    got = clf([r["text"] for r in records[:4]])
    assert all(g["label"] in languages and 0 < g["score"] <= 1 for g in got)
    stats = json.load(open(os.path.join(result.output_dir, "data_stats.json")))
    assert stats["train"]["examples"] == 360 and stats["labels"] == languages
    assert stats["source"]["source"].startswith("sample:")


def test_resume_on_one_worker_continues_the_same_loss(classifier_run, tmp_path):
    """Step 40 of the 2-worker ZeRO-2 run, resumed on one worker (universal checkpoint, same
    global batch of 32): steps 41-80 repeat the uninterrupted run's losses."""
    from llmos_ray.train.finetune import finetune
    from llmos_ray.train.runs import checkpoints_of

    first = classifier_run
    ckpts = checkpoints_of(load_config(os.path.join(first.output_dir, "config.yaml")))
    start = next(c.uri for c in ckpts if c.step == CLASSIFIER_STEPS // 2)
    cfg = load_config(None, classifier_overrides(tmp_path, "resumed", "train.num_workers=1",
                                                 f"run.resume={start}"))
    resumed = finetune(cfg)
    assert next(h["resumed_via"] for h in resumed.history if "resumed_via" in h) == "universal"
    before = {h["step"]: h["loss"] for h in first.history if "loss" in h}
    after = {h["step"]: h["loss"] for h in resumed.history if "loss" in h}
    assert sorted(after) == list(range(CLASSIFIER_STEPS // 2 + 2, CLASSIFIER_STEPS + 1, 2))
    for step, loss in after.items():
        assert loss == pytest.approx(before[step], abs=2e-3), step
    assert accuracy(resumed.export_dir, held_out(first)) >= 0.4


def test_zero3_trains_the_classifier_as_zero2_does(classifier_run, tmp_path):
    """The same run under ZeRO-3 (parameters partitioned, the classification head gathered for each
    forward) repeats the ZeRO-2 run. Measured (2026-12-02): the first 18 steps agree to 6e-8 in the
    loss and 5e-7 (relative) in the gradient norm; then fp32 reorderings of the sums compound at lr
    5e-3 (up to 5.5e-3 in the loss by step 54), hence a tight bound early and a loose one after."""
    from transformers import AutoConfig

    from llmos_ray.train.finetune import finetune

    zero3 = finetune(load_config(None, classifier_overrides(tmp_path, "zero3", "deepspeed.zero_stage=3")))
    want = {h["step"]: h for h in classifier_run.history if "loss" in h}
    got = {h["step"]: h for h in zero3.history if "loss" in h}
    assert sorted(got) == sorted(want) == list(range(2, CLASSIFIER_STEPS + 1, 2))
    for step in range(2, 17, 2):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], abs=1e-6), step
        assert got[step]["grad_norm"] == pytest.approx(want[step]["grad_norm"], rel=1e-5), step
    for step in got:
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], abs=2e-2), step
    assert AutoConfig.from_pretrained(zero3.export_dir).architectures == ["BertForSequenceClassification"]
    assert accuracy(zero3.export_dir, held_out(classifier_run)) >= 0.4


def test_bert_pretraining_masked_lm_loss_falls_and_the_export_fills_masks(ray_session, tmp_path):
    from transformers import AutoModelForMaskedLM, pipeline

    from llmos_ray.train import pretrain

    cfg = load_config(None, [
        "run.name=mlm", f"run.output_dir={tmp_path / 'mlm'}", "run.wandb=disabled", "model.family=bert",
        "model.size=tiny", "data.max_documents=60", "data.vocab_size=1000", "data.seq_len=64",
        "data.whole_word_masking=true", "train.num_workers=2", "train.micro_batch_size=8", "train.max_steps=30",
        "train.lr=3e-3", "train.warmup_steps=3", "train.log_every=5", "train.eval_every=15", "train.eval_batches=2",
        "train.checkpoint_every=30"])
    result = pretrain(cfg)
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert losses[-1] < losses[0] - 0.4  # from about ln(1000) = 6.9 towards the tokens' unigram entropy in 30 steps
    vals = [h["val_loss"] for h in result.history if "val_loss" in h]
    assert len(vals) == 2 and vals[1] < vals[0]  # validation masks are the same at both evaluations
    model = AutoModelForMaskedLM.from_pretrained(result.export_dir)
    assert type(model).__name__ == "BertForMaskedLM"
    fill = pipeline("fill-mask", model=result.export_dir, top_k=3)
    answers = fill("import os\nimport [MASK]\n")
    assert len(answers) == 3 and all("[MASK]" not in a["sequence"] for a in answers)
    assert answers[0]["score"] >= answers[-1]["score"] > 0
