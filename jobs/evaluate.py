"""Evaluation entry point for `ray job submit` (same arguments as `llmos evaluate`).

    ray job submit --working-dir . -- python jobs/evaluate.py --config jobs/configs/evaluate_tiny.yaml \
        'eval.model=[runs/pretrain-tiny/export, my-registered-model]'

Writes <run.output_dir>/report.json (perplexity, BLEU, ROUGE per model) and prints the models side by side.
"""

import sys

from llmos_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
