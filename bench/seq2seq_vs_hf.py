"""Benchmark: target tokens/s of `llmos finetune finetune.task=seq2seq` against Hugging Face's
`Seq2SeqTrainer` fine-tuning the same model on the same pairs.

    ours      finetune(): the user path of `llmos finetune finetune.task=seq2seq`, Ray Train,
              2 workers x 1 torch thread, DeepSpeed ZeRO-2, fp32 on CPU, a fresh t5 preset trained
              from scratch on the embedded en->fr gettext pairs. Steady state: the loop's own
              per-window step times (result.history), the first --skip-windows windows dropped.
    baseline  transformers.Seq2SeqTrainer (AutoModelForSeq2SeqLM + DataCollatorForSeq2Seq), one
              process x 2 torch threads (the same 2 threads in all), the same preset config,
              tokenizer, training pairs (token ids), global batch, steps, AdamW settings, warmup +
              cosine schedule and gradient clipping; timed per optimizer step by a callback over
              the same steps as ours.

Both train on the same global batches: the baseline pads each to its longest source and target;
our workers split each by length (train.balance_lengths: the one with the longest pairs takes
fewer), each padding its share to its own longest, losses weighted to the batch's mean per target
token, the baseline's loss. The last window's training loss of both is printed.
Target tokens/s = examples/s x the mean target length (EOS included) of the training pairs, the
same factor for both. Prints both figures, the machine and `ratio=<ours/baseline>` last. Goal: >= 0.9.

    .venv/bin/python bench/seq2seq_vs_hf.py [--steps 100] [--size small] [--pairs 4000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

# bench/ is on sys.path: it is the script's directory.
from _common import hf_training_args, machine, our_order, start_ray, timed_finetune, timed_hf_train


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100, help="optimizer steps in each run (default 100)")
    p.add_argument("--log-every", type=int, default=10, help="ours' metrics window, in steps (default 10)")
    p.add_argument("--skip-windows", type=int, default=1, help="leading windows left out of the figure (default 1)")
    p.add_argument("--size", default="small", help="t5 preset (default small)")
    p.add_argument("--micro-batch", type=int, default=16, help="pairs per worker per forward (default 16)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--pairs", type=int, default=4000, help="training pairs of the embedded set (default 4000)")
    p.add_argument("--locale-root", default="/usr/share/locale", help="gettext catalogs (none: the shipped sample)")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs given to Ray (default 4)")
    return p.parse_args()


def run_config(out_dir: str, args):
    from llmos_ray.config import load_config

    return load_config(None, {
        "run.name": "bench-seq2seq", "run.output_dir": out_dir, "run.wandb": "disabled", "run.resume": "never",
        "train.max_failures": 0, "train.device": "cpu", "finetune.task": "seq2seq", "model.size": args.size,
        "finetune.max_pairs": args.pairs, "finetune.locale_root": args.locale_root, "finetune.max_source_len": 64,
        "finetune.max_target_len": 64, "train.num_workers": args.workers, "train.micro_batch_size": args.micro_batch,
        "train.max_steps": args.steps, "train.log_every": args.log_every, "train.eval_every": args.steps,
        "train.checkpoint_every": args.steps, "train.warmup_steps": max(1, args.steps // 10),
        "deepspeed.zero_stage": 2}).resolved("finetune")


def baseline(cfg, tokenizer, train, threads: int, skip_steps: int) -> dict:
    """Seq2SeqTrainer in this process: examples/s over steps skip_steps+1 .. max_steps."""
    import datasets
    import torch
    from transformers import (
        AutoModelForSeq2SeqLM,
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
    )

    from llmos_ray.models import preset_config

    torch.set_num_threads(threads)
    config = preset_config(cfg.model.family, cfg.model.size, len(tokenizer), cfg.data.seq_len,
                           bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    torch.manual_seed(cfg.run.seed)
    model = AutoModelForSeq2SeqLM.from_config(config)
    a = train.array[our_order(len(train.array), cfg)]  # our batches, in our order
    src_len, tgt_len = a["attention_mask"].sum(axis=1), (a["labels"] != -100).sum(axis=1)
    rows = {"input_ids": [ids[:n].tolist() for ids, n in zip(a["input_ids"], src_len)],
            "labels": [ids[:n].tolist() for ids, n in zip(a["labels"], tgt_len)]}
    rows["attention_mask"] = [[1] * len(ids) for ids in rows["input_ids"]]
    trainer = Seq2SeqTrainer(model=model, args=hf_training_args(cfg, Seq2SeqTrainingArguments),
                             train_dataset=datasets.Dataset.from_dict(rows),
                             data_collator=DataCollatorForSeq2Seq(tokenizer, model=model))
    return {**timed_hf_train(trainer, skip_steps),
            "params": sum(p.numel() for p in model.parameters())}


def main() -> int:
    args = parse_args()
    load_at_start = os.getloadavg()[0]
    import ray

    from llmos_ray.train.seq2seq import seq2seq_data

    out = tempfile.mkdtemp(prefix="llmos-bench-seq2seq-")
    cfg = run_config(os.path.join(out, "run"), args)
    tokenizer, train, _, _, source = seq2seq_data(cfg)  # trains and saves the run's tokenizer
    per_target = train.counts["target_tokens"] / train.counts["examples"]
    skip = args.log_every * args.skip_windows
    base = baseline(cfg, tokenizer, train, threads=args.workers, skip_steps=skip)
    start_ray(args.num_cpus)
    try:
        mine = timed_finetune(cfg, skip)  # reuses the tokenizer saved above: the same token ids
    finally:
        ray.shutdown()
    shutil.rmtree(out, ignore_errors=True)

    g = args.micro_batch * args.workers
    print(f"\ndata: {train.counts['examples']} training pairs ({source.get('source')}), {per_target:.1f} target "
          "tokens each on average; the same batches: the baseline's padded to their longest source and target, "
          "ours per worker's length-balanced share")
    print(f"model: t5 {args.size} from scratch, {base['params'] / 1e6:.2f}M parameters, vocab {len(tokenizer)}; "
          f"global batch {g}; {args.steps} steps, steps {skip + 1}-{args.steps} measured; fp32, CPU")
    b, m = base["examples_per_s"] * per_target, mine["examples_per_s"] * per_target
    print(f"baseline, Seq2SeqTrainer, 1 process x {args.workers} threads: {b:8,.1f} target tok/s "
          f"({base['step_s']:.3f} s/step; whole train() {base['wall_s']:.0f} s)")
    print(f"ours, llmos finetune finetune.task=seq2seq, {args.workers} workers x 1 thread, ZeRO-2: {m:8,.1f} target "
          f"tok/s ({mine['step_s']:.3f} s/step; whole finetune() {mine['wall_s']:.0f} s with Ray start-up and export)")
    print(f"training loss of the last {args.log_every} steps (mean per target token): ours {mine['last_loss']:.4f}, "
          f"baseline {base['last_loss']:.4f}")
    if load_at_start > 0.5:
        print(f"WARNING: the machine was busy (load average {load_at_start:.1f} at start): these timings are noise; "
              "measure on a quiet machine.")
    print(machine())
    print(f"ratio={m / b:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
