"""Benchmark: training examples/s of `llmos finetune finetune.task=classification` against Hugging
Face's `Trainer` fine-tuning the same model on the same examples, and the held-out accuracy of both.

    ours      finetune(): the user path of `llmos finetune finetune.task=classification`, Ray Train,
              2 workers x 1 torch thread, DeepSpeed ZeRO-2, fp32 on CPU, a fresh bert preset trained
              from scratch on the embedded language-ID set. Steady state: the loop's own per-window
              step times (result.history), the first --skip-windows windows dropped.
    baseline  transformers.Trainer (the design documents' code: AutoModelForSequenceClassification
              + Trainer + DataCollatorWithPadding), one process x 2 torch threads (the same 2 threads
              in all), the same preset config, tokenizer, training examples in the same batches and
              order (read sequentially: the order alone moves accuracy ~±2 points here), global batch, steps,
              AdamW settings and warmup + cosine schedule (to lr * train.min_lr_ratio), gradient
              clipping; timed per optimizer step by a callback over the same steps as ours.

Both train on the same global batches: the baseline pads each to its longest example; our workers
split each by length (train.balance_lengths: the one with the longest examples takes fewer), each
padding its share to its own longest, losses weighted to the batch's mean.
Accuracy: each trained model's argmax on the same held-out records (the embedded set's own
split), in one process. Prints both figures, the machine and `ratio=<ours/baseline>` (examples/s)
last. Goal: >= 1.0 with accuracy within 1 point.

    .venv/bin/python bench/classify_vs_hf_trainer.py [--steps 600] [--size small] [--per-label 1000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

# bench/ is on sys.path: it is the script's directory.
from _common import hf_training_args, machine, our_order, start_ray, timed_finetune, timed_hf_train


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600, help="optimizer steps in each run (default 600: at 150 "
                   "the accuracy of one run moves ~±2 points with the data order and dropout)")
    p.add_argument("--log-every", type=int, default=20, help="ours' metrics window, in steps (default 20)")
    p.add_argument("--skip-windows", type=int, default=1, help="leading windows left out of the figure (default 1)")
    p.add_argument("--size", default="small", help="bert preset (default small)")
    p.add_argument("--micro-batch", type=int, default=16, help="examples per worker per forward (default 16)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--per-label", type=int, default=1000, help="training records per language (default 1000)")
    p.add_argument("--locale-root", default="/usr/share/locale", help="gettext catalogs (none: the shipped sample)")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs given to Ray (default 4)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for both runs (e.g. run.seed=1), repeatable")
    return p.parse_args()


def run_config(out_dir: str, args):
    import yaml

    from llmos_ray.config import load_config

    return load_config(None, {
        "run.name": "bench-classify", "run.output_dir": out_dir, "run.wandb": "disabled", "run.resume": "never",
        "train.max_failures": 0, "train.device": "cpu", "finetune.task": "classification", "model.size": args.size,
        "finetune.examples_per_label": args.per_label, "finetune.locale_root": args.locale_root,
        "train.num_workers": args.workers, "train.micro_batch_size": args.micro_batch, "train.max_steps": args.steps,
        "train.log_every": args.log_every, "train.eval_every": args.steps, "train.checkpoint_every": args.steps,
        "train.warmup_steps": max(1, args.steps // 10), "data.seq_len": 128,
        **{k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}}).resolved("finetune")


def baseline(cfg, tokenizer, train, labels: list[str], threads: int, skip_steps: int) -> dict:
    """transformers.Trainer in this process: examples/s over steps skip_steps+1 .. max_steps, and the model."""
    import datasets
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from llmos_ray.models import preset_config

    torch.set_num_threads(threads)
    config = preset_config(cfg.model.family, cfg.model.size, len(tokenizer), cfg.data.seq_len,
                           bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    config.num_labels, config.id2label = len(labels), dict(enumerate(labels))
    config.label2id = {n: i for i, n in enumerate(labels)}
    torch.manual_seed(cfg.run.seed)
    model = AutoModelForSequenceClassification.from_config(config)
    examples = train.array[our_order(len(train.array), cfg)]  # our batches, in our order
    lengths = examples["attention_mask"].sum(axis=1)
    rows = {"input_ids": [ids[:n].tolist() for ids, n in zip(examples["input_ids"], lengths)],
            "labels": examples["labels"].tolist()}
    rows["attention_mask"] = [[1] * len(ids) for ids in rows["input_ids"]]
    trainer = Trainer(model=model, args=hf_training_args(cfg, TrainingArguments),
                      train_dataset=datasets.Dataset.from_dict(rows), data_collator=DataCollatorWithPadding(tokenizer))
    return {**timed_hf_train(trainer, skip_steps),
            "model": model.eval(), "params": sum(p.numel() for p in model.parameters())}


def accuracy(model, tokenizer, val, labels: list[str]) -> float:
    """Argmax accuracy on the held-out examples, 64 at a time, each batch cut to its longest."""
    import numpy as np
    import torch

    torch.set_num_threads(2)
    right = 0
    with torch.no_grad():
        for start in range(0, len(val.array), 64):
            rows = val.array[start:start + 64]
            width = int(rows["attention_mask"].sum(axis=1).max())
            logits = model(input_ids=torch.tensor(rows["input_ids"][:, :width].astype(np.int64)),
                           attention_mask=torch.tensor(rows["attention_mask"][:, :width].astype(np.int64))).logits
            right += int((logits.argmax(-1).numpy() == rows["labels"]).sum())
    return right / len(val.array)


def main() -> int:
    args = parse_args()
    load_at_start = os.getloadavg()[0]
    import ray
    from transformers import AutoModelForSequenceClassification

    from llmos_ray.train.classification import classification_data

    out = tempfile.mkdtemp(prefix="llmos-bench-classify-")
    cfg = run_config(os.path.join(out, "run"), args)
    t0 = time.perf_counter()
    tokenizer, train, val, info, source = classification_data(cfg)  # trains and saves the run's tokenizer
    data_s = time.perf_counter() - t0
    labels = info["labels"]
    skip = args.log_every * args.skip_windows
    base = baseline(cfg, tokenizer, train, labels, threads=args.workers, skip_steps=skip)
    base_acc = accuracy(base.pop("model"), tokenizer, val, labels)
    start_ray(args.num_cpus)
    try:
        mine = timed_finetune(cfg, skip)  # reuses the tokenizer saved above: the same token ids
    finally:
        ray.shutdown()
    mine_acc = accuracy(AutoModelForSequenceClassification.from_pretrained(mine["export"]).eval(), tokenizer, val,
                        labels)
    shutil.rmtree(out, ignore_errors=True)

    g = args.micro_batch * args.workers
    print(f"\ndata: {len(train.array)} training / {len(val.array)} held-out records of {len(labels)} languages "
          f"({source.get('source')}), {data_s:.0f} s to read and tokenize; the same batches: the baseline's "
          "padded to their longest, ours per worker's length-balanced share")
    print(f"model: bert {args.size} from scratch, {base['params'] / 1e6:.2f}M parameters, vocab {len(tokenizer)}; "
          f"global batch {g}; {args.steps} steps, steps {skip + 1}-{args.steps} measured; fp32, CPU")
    print(f"baseline, transformers.Trainer, 1 process x {args.workers} threads: {base['examples_per_s']:8,.1f} "
          f"examples/s ({base['step_s']:.3f} s/step; whole train() {base['wall_s']:.0f} s); "
          f"held-out accuracy {base_acc:.4f}")
    print(f"ours, llmos finetune finetune.task=classification, {args.workers} workers x 1 thread, ZeRO-2: "
          f"{mine['examples_per_s']:8,.1f} examples/s ({mine['step_s']:.3f} s/step; whole finetune() "
          f"{mine['wall_s']:.0f} s with Ray start-up and export); held-out accuracy {mine_acc:.4f}")
    gap = (base_acc - mine_acc) * 100
    n = len(val.array)
    noise = 100 * (sum(a * (1 - a) for a in (mine_acc, base_acc)) / n) ** 0.5  # binomial standard error of the gap
    print(f"accuracy: ours {-gap:+.2f} points against the baseline ({'within' if gap <= 1 else 'NOT within'} 1 point "
          f"below it); standard error of the difference on {n} held-out records {noise:.2f} points")
    if load_at_start > 0.5:
        print(f"WARNING: the machine was busy (load average {load_at_start:.1f} at start): these timings are noise; "
              "measure on a quiet machine.")
    print(machine())
    print(f"ratio={mine['examples_per_s'] / base['examples_per_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
