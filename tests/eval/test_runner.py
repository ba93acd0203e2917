"""`evaluate` end to end through Ray Data (`llmos evaluate` in-process, two models side by side), and
its inputs: task files with bad records, the default perplexity documents (the validation split)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pytest

from llmos_ray.config import load_config
from llmos_ray.errors import DataError
from llmos_ray.eval.inputs import perplexity_documents, read_tasks
from llmos_ray.eval.report import format_table

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = ["def main():\n    ", "import os\nimport sys\n\n\nclass Config:\n    def __init__(self", "for i in",
           "    return self._"]


def test_task_files_are_read_with_bad_records_counted_and_listed(tmp_path):
    lines = [json.dumps({"prompt": "2 + 2 =", "reference": "4"}), "",
             json.dumps({"prompt": "capital of France:", "reference": "Paris"}), "{not json",
             json.dumps({"prompt": "only a prompt"}), json.dumps({"prompt": "n", "reference": 7})]
    (tmp_path / "arith.jsonl.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    cfg = load_config(None, {"eval.task_paths": [str(tmp_path / "arith.jsonl.gz")], "data.max_bad_fraction": 0.6})
    examples, tasks = read_tasks(cfg)
    assert [(e["task"], e["line"], e["prompt"], e["reference"]) for e in examples] == [
        ("arith", 1, "2 + 2 =", "4"), ("arith", 3, "capital of France:", "Paris")]
    info = tasks["arith"]
    assert (info["records"], info["examples"], info["bad_records"]) == (5, 2, 3)
    assert [b["line"] for b in info["bad"]] == [4, 5, 6]
    assert "malformed JSON" in info["bad"][0]["reason"] and "missing field 'reference'" in info["bad"][1]["reason"]
    cfg = load_config(None, {"eval.task_paths": [str(tmp_path / "arith.jsonl.gz")], "data.max_bad_fraction": 0.1})
    with pytest.raises(DataError, match=r"arith\.jsonl\.gz: 3 of 5 task records are bad .*first at line 4"):
        read_tasks(cfg)


@pytest.mark.slow
def test_default_perplexity_documents_are_the_validation_split(ray_session, tmp_path):
    from llmos_ray.data.documents import is_held_out

    docs = [f"Document number {i}: " + "some words about a topic " * (i % 5 + 1) for i in range(60)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = load_config(None, {"run.name": "eval-val-split", "data.paths": [str(tmp_path / "corpus.jsonl")],
                             "data.val_fraction": 0.3})
    ds, info = perplexity_documents(cfg)
    held_out = [d.strip() for d in docs if is_held_out(d.strip(), 0.3)]  # documents are stripped
    assert 5 < len(held_out) < 40
    assert sorted(r["text"] for r in ds.take_all()) == sorted(held_out)
    assert info["documents"] == len(held_out) and info["counts"]["val_documents"] == len(held_out)
    assert info["source"] == "data.val_fraction=0.3 of data.paths"


@pytest.mark.slow
def test_evaluate_two_models_side_by_side_through_ray_data(ray_session, tiny, tiny_model_dir, second_model_dir,
                                                            long_text, tmp_path, capsys):
    import sacrebleu

    from llmos_ray import registry
    from llmos_ray.cli import main
    from llmos_ray.eval import greedy_generate, perplexity, rouge

    model, tok = tiny
    reg = str(tmp_path / "models.json")
    registry.register("tiny-a", tiny_model_dir, registry=reg)
    # Held-out text: one .txt document longer than the context, and JSONL documents with one bad
    # record and one too short to keep (data.min_chars).
    short = ["def add(a, b):\n    return a + b", "import os\nprint(os.getcwd())", "class A:\n    x = 1"]
    (tmp_path / "long.txt").write_text(long_text)
    (tmp_path / "short.jsonl").write_text("\n".join([json.dumps({"text": short[0]}), json.dumps({"text": "tiny"}),
                                                     json.dumps({"txt": "wrong field"}), json.dumps({"text": short[1]}),
                                                     json.dumps({"text": short[2]})]) + "\n")
    # Task: half the references are what the model answers (so BLEU/ROUGE are neither 0 nor 100).
    answers = [r["output"] for r in greedy_generate(model, tok, PROMPTS, max_new_tokens=8)]
    references = [answers[0], "return None", answers[2], "self._items"]
    (tmp_path / "code.jsonl").write_text("\n".join(
        [json.dumps({"prompt": p, "reference": r}) for p, r in zip(PROMPTS, references)]
        + [json.dumps({"prompt": "no reference"})]) + "\n")
    out = tmp_path / "eval"

    rc = main(["evaluate", "--model", "tiny-a", "--model", second_model_dir, f"run.output_dir={out}",
               f"registry.uri={reg}", f"eval.perplexity_paths=[{tmp_path / 'long.txt'}, {tmp_path / 'short.jsonl'}]",
               f"eval.task_paths=[{tmp_path / 'code.jsonl'}]", "eval.max_new_tokens=8", "eval.batch_size=2",
               "eval.num_workers=2", "data.max_bad_fraction=0.5"])
    assert rc == 0

    report = json.loads((out / "report.json").read_text())
    assert list(report["models"]) == ["tiny-a", "tiny-b"]
    a, b = report["models"]["tiny-a"], report["models"]["tiny-b"]
    assert (a["registry_name"], a["uri"], b["uri"]) == ("tiny-a", tiny_model_dir, second_model_dir)
    # Perplexity through Ray Data equals the in-process computation on the same (cleaned) documents.
    want = perplexity(model, tok, [long_text.strip(), *short])
    assert a["perplexity"]["tokens"] == want["tokens"] == b["perplexity"]["tokens"]
    assert a["perplexity"]["perplexity"] == pytest.approx(want["perplexity"], rel=0.01)
    assert a["perplexity"]["nll"] == pytest.approx(want["nll"], rel=1e-4)
    assert (a["perplexity"]["documents"], a["perplexity"]["max_length"]) == (4, model.config.n_positions)
    assert abs(b["perplexity"]["perplexity"] - a["perplexity"]["perplexity"]) > 1e-3  # other weights
    counts = report["inputs"]["perplexity"]["counts"]
    assert (counts["records"], counts["documents"], counts["bad_records"], counts["dropped_short"]) == (6, 4, 1, 1)
    # Generation through Ray Data equals in-process greedy decoding; scores equal the libraries'.
    gens = [json.loads(line) for line in open(a["generations"])]
    assert [g["output"] for g in gens] == answers and [g["line"] for g in gens] == [1, 2, 3, 4]
    task = a["tasks"]["code"]
    assert task["bleu"] == pytest.approx(sacrebleu.corpus_bleu(answers, [references]).score)
    assert 0 < task["bleu"] < 100
    assert {k: task[k] for k in ("rouge1", "rouge2", "rougeL")} == pytest.approx(rouge(answers, references))
    assert task["examples"] == 4 and report["inputs"]["tasks"]["code"]["bad_records"] == 1
    assert "code" in b["tasks"] and os.path.exists(b["generations"])
    assert report["config"]["eval"]["model"] == ["tiny-a", second_model_dir]
    assert report["settings"]["num_workers"] == 2 and report["seconds"] > 0
    # The registry entry got the figures; the table shows both models side by side.
    entry = registry.get("tiny-a", reg)
    assert entry.eval["perplexity"] == pytest.approx(a["perplexity"]["perplexity"])
    assert entry.eval["code/bleu"] == pytest.approx(task["bleu"])
    assert entry.eval["eval_report"] == str(out / "report.json")
    printed = capsys.readouterr().out
    assert format_table(report) in printed and f"report: {out / 'report.json'}" in printed
    header = next(line for line in printed.splitlines() if line.startswith("metric "))
    assert header.split() == ["metric", "tiny-a", "tiny-b"]


def test_job_entrypoint_is_the_cli():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "evaluate.py"), "--help"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0 and "--model" in proc.stdout and "key=value" in proc.stdout
