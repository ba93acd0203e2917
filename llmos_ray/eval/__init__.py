"""Evaluation: perplexity (sliding window), BLEU and ROUGE on generation tasks, models side by side.

    from llmos_ray.eval import evaluate, format_table
    report = evaluate(cfg)                 # cfg.eval.model = [dir_or_registry_name, ...]
    print(format_table(report))            # report.json is in cfg.run.output_dir

The metrics are plain functions (metrics.py, generation.py); runner.py runs them over Ray Data: inputs.py
reads the documents and tasks, worker.py is the actor that runs a model, report.py writes the results.
"""

from llmos_ray.eval.generation import greedy_generate
from llmos_ray.eval.metrics import bleu, document_nll, perplexity, rouge, sliding_windows, summarize_nll
from llmos_ray.eval.report import format_table
from llmos_ray.eval.runner import evaluate

__all__ = ["evaluate", "format_table", "perplexity", "document_nll", "summarize_nll", "sliding_windows", "bleu",
           "rouge", "greedy_generate"]
