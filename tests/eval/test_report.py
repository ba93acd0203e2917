"""The evaluation table says what each figure is measured on and its scale (and report.json keeps it)."""

from __future__ import annotations

from llmos_ray.eval.report import format_table, legend

REPORT = {
    "inputs": {"perplexity": {"documents": 42, "source": "data.val_fraction=0.02 of data.paths",
                              "paths": ["<default corpus>"]},
               "tasks": {"qa": {"path": "/data/qa.jsonl", "examples": 7}}},
    "models": {
        "base": {"perplexity": {"perplexity": 300.5, "bits_per_byte": 1.25, "tokens": 9000},
                 "tasks": {"qa": {"bleu": 3.5, "rouge1": 0.2, "rouge2": 0.05, "rougeL": 0.18}}},
        "finetune": {"perplexity": {"perplexity": 420.0, "bits_per_byte": 1.4, "tokens": 9000},
                     "tasks": {"qa": {"bleu": 12.25, "rouge1": 0.4, "rouge2": 0.15, "rougeL": 0.37}}},
    },
}


def test_the_table_has_a_legend_naming_the_text_and_the_scale():
    table = format_table(REPORT)
    head, _, meaning = table.partition("\nlegend:\n")
    assert head.splitlines()[0].split() == ["metric", "base", "finetune"]
    assert "perplexity" in head and "12.25" in head
    assert "42 held-out documents of data.val_fraction=0.02 of data.paths (<default corpus>)" in meaning
    assert "usually worse than its base" in meaning  # why fine-tuning moves perplexity up
    assert "qa/bleu: sacreBLEU corpus BLEU, 0-100, of greedy answers to 7 prompts of /data/qa.jsonl" in meaning
    assert "qa/rougeL: mean ROUGE-L F1, 0-1" in meaning
    assert legend(REPORT)["qa/chrf"].startswith("sacreBLEU corpus chrF (character 6-grams), 0-100")
    assert set(legend(REPORT)) == {"perplexity", "bits_per_byte", "perplexity_tokens", "qa/bleu", "qa/chrf",
                                   "qa/rouge1", "qa/rouge2", "qa/rougeL"}
