"""`llmos evaluate` on an encoder-decoder (the session's fine-tuned translator, tests/conftest.py
`seq2seq_run`): its batched greedy translations through Ray Data equal an unbatched
`model.generate` of each prefixed source, and BLEU, chrF and ROUGE equal sacrebleu's and
rouge-score's on those outputs; bad pair records counted with file and line; the default pairs
are the held-out split it trained beside."""

from __future__ import annotations

import json
import os

import pytest

from llmos_ray.config import load_config
from tests.conftest import SEQ2SEQ_PREFIX

pytestmark = pytest.mark.slow

MAX_NEW = 12


def unbatched_greedy(export_dir: str, prompts: list[str]) -> list[str]:
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(export_dir).eval()
    tok = AutoTokenizer.from_pretrained(export_dir)
    with torch.no_grad():
        return [tok.decode(model.generate(tok.encode(p, return_tensors="pt"), max_new_tokens=MAX_NEW,
                                          do_sample=False)[0], skip_special_tokens=True).strip() for p in prompts]


def test_evaluate_a_translator_reports_bleu_chrf_rouge_of_its_greedy_outputs(seq2seq_run, tmp_path, capsys):
    import sacrebleu
    from rouge_score import rouge_scorer

    from llmos_ray.cli import main
    from llmos_ray.data.seq2seq import pair_records
    from llmos_ray.eval.seq2seq import seq2seq_inputs

    export = seq2seq_run.export_dir
    run_cfg = load_config(os.path.join(export, "llmos_config.yaml"))
    held_out = [r for _, _, r in pair_records(run_cfg).val]
    # The default pairs of `llmos evaluate` on it: that held-out split, named as such.
    pairs, info = seq2seq_inputs(load_config(None), [{"uri": export, "source": export, "label": "en-fr"}])
    assert [(p["source"], p["reference"]) for p in pairs] == [(r["source"], r["target"]) for r in held_out]
    assert list(info) == ["heldout"] and info["heldout"]["examples"] == len(held_out) == 40
    # eval.pair_paths in Hugging Face's translation shape, with one bad record at line 3
    path = tmp_path / "pairs.jsonl"
    lines = [json.dumps({"translation": {"en": r["source"], "fr": r["target"]}}) for r in held_out]
    lines.insert(2, json.dumps({"translation": {"en": "no French here"}}))
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", export, f"run.output_dir={out}", f"eval.pair_paths=[{path}]",
                 "eval.num_workers=1", "eval.batch_size=8", f"eval.max_new_tokens={MAX_NEW}"]) == 0
    report = json.loads((out / "report.json").read_text())
    (label, result), = report["models"].items()
    scores = result["tasks"]["pairs"]
    assert scores["examples"] == len(held_out) and result["perplexity"] is None
    bad = report["inputs"]["tasks"]["pairs"]
    assert bad["bad_records"] == 1 and bad["bad"][0]["line"] == 3 and "has no 'fr'" in bad["bad"][0]["reason"]
    rows = [json.loads(x) for x in open(result["generations"])]
    assert [r["prompt"] for r in rows] == [SEQ2SEQ_PREFIX + r["source"] for r in held_out]
    outputs = [r["output"] for r in rows]
    assert outputs == unbatched_greedy(export, [r["prompt"] for r in rows])  # batched (8, padded) = one by one
    refs = [r["target"] for r in held_out]
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(outputs, [refs]).score)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(outputs, [refs]).score)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert scores["rougeL"] == pytest.approx(sum(scorer.score(r, o)["rougeL"].fmeasure
                                                 for r, o in zip(refs, outputs)) / len(refs))
    assert 0 < scores["chrf"] <= 100  # something was produced: chrF is not 0 on character overlap
    printed = capsys.readouterr().out
    assert "pairs/bleu" in printed and "pairs/chrf" in printed and "pairs/rougeL" in printed
