"""The driver side of training: data → TorchTrainer(train_loop) → checkpoints → Hugging Face export.

    result = pretrain(load_config("jobs/configs/pretrain_tiny.yaml"))
    result.export_dir, result.checkpoint, result.metrics
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from ray.train import UserCallback

from llmos_ray.config import Config, from_dict, save_config
from llmos_ray.errors import reraise_ours
from llmos_ray.storage import write_text
from llmos_ray.train.loop import Job, train_loop
from llmos_ray.train.tasks import objective

log = logging.getLogger(__name__)

CONTROLLER_POLL_S = "0.2"
"""How often Ray Train's controller polls the workers. Each worker's `ray.train.report` waits until
the controller has taken its previous report (a queue of one), once per poll: at Ray's default of
2 s a run that logs more often trains at the controller's pace (a tiny run logging every other step
spent ~90% of its loop waiting). RAY_TRAIN_HEALTH_CHECK_INTERVAL_S set by the user wins."""


@dataclass
class TrainResult:
    metrics: dict[str, Any]
    """The last metrics rank 0 reported (step, loss, val_loss, tokens_per_s, mfu, …)."""
    checkpoint: Optional[str]
    """URI of the latest checkpoint in the run's storage."""
    export_dir: Optional[str]
    """The Hugging Face model directory, when train.export is on."""
    output_dir: str
    """The run's output directory (metrics.jsonl, config.yaml, export/)."""
    history: list[dict] = field(default_factory=list)
    """Every logged metrics record of this run (as in metrics.jsonl)."""
    run_name: str = ""
    """run.name of the run."""
    seconds: float = 0.0
    """Wall time of training (Ray Train's fit) and export."""
    data_counts: Optional[dict] = None
    """What the training data pass read and dropped (as in data_stats.json)."""
    already_finished: bool = False
    """The run had reached train.max_steps before this command: nothing was trained."""

    def summary(self, command: str = "llmos") -> str:
        """What a user needs at the end: where everything went and the next command (`command` is
        how the user's shell reaches llmos)."""
        m = self.metrics
        done = f"run {self.run_name!r} already finished at step {m.get('step')}; nothing trained (raise " \
            "train.max_steps to train longer, or give a new run.name)" if self.already_finished else \
            f"finished {self.run_name}: step {m.get('step')} in {self.seconds / 60:.1f} min"
        lines = [done
                 + (f", val_loss {m['val_loss']:.3f}" if m.get("val_loss") is not None else "")
                 + (f" (ppl {m['val_ppl']:.1f})" if m.get("val_ppl") is not None else ""),
                 f"  metrics:    {os.path.join(self.output_dir, 'metrics.jsonl')}",
                 f"  checkpoint: {self.checkpoint}"]
        counts = self.data_counts or {}
        if "documents" in counts:
            lines.append(f"  data:       {counts.get('documents', 0):,} documents read in the last pass, "
                         f"{counts.get('bad_records', 0):,} bad records, {counts.get('dropped_short', 0):,} too "
                         f"short, {counts.get('duplicates', 0):,} duplicates "
                         f"({os.path.join(self.output_dir, 'data_stats.json')})")
        if self.export_dir:
            lines += [f"  model:      {self.export_dir}", f"next: {command} serve --model {self.export_dir}"]
        return "\n".join(lines)


SENTINELS = 100
"""Sentinel tokens added for span corruption (T5's 100: enough for 2,000-token blocks at density 0.15)."""


def pretrain(cfg: Config) -> TrainResult:
    """Pretrain `cfg.model` on `cfg.data` with Ray Train + DeepSpeed ZeRO, with the family's objective
    (next-token prediction; masked LM for bert; span corruption for t5); export at the end."""
    from llmos_ray import data
    from llmos_ray.data.corpus import check_corpus
    from llmos_ray.runtime import init_ray, run_log

    cfg, resume_from, finished = resolve_resume(cfg.resolved(), "pretrain")  # before anything starts
    if finished is not None:
        return finished
    with run_log(cfg.run.output_dir):
        check_corpus(cfg.data)
        tokenizer = data.get_tokenizer(cfg)
        if objective(cfg, "pretrain") == "masked_lm":  # bert: the [MASK] token, saved with every checkpoint
            from llmos_ray.data.masking import add_mask_token

            add_mask_token(tokenizer)
        elif objective(cfg, "pretrain") == "span_corruption":  # t5: the sentinels <extra_id_0> ... <extra_id_99>
            from llmos_ray.data.masking import add_sentinel_tokens

            add_sentinel_tokens(tokenizer, SENTINELS)
        init_ray()
        train_ds, val_blocks = corpus_datasets(cfg, tokenizer)
        result = run_training(cfg, tokenizer, {"train": train_ds}, val_blocks, resume_from)
        result.data_counts = report_data_counts(cfg)
    return result


def corpus_datasets(cfg: Config, tokenizer) -> tuple[Any, Optional[np.ndarray]]:
    """The streaming training dataset of packed blocks and the (small, collected) validation blocks."""
    from llmos_ray import data

    train_ds = data.packed_dataset(cfg, tokenizer, "train")
    val_blocks = None
    if data.has_validation(cfg.data):
        with reraise_ours():
            val_blocks = collect_blocks(data.packed_dataset(cfg, tokenizer, "val"), cfg.data.seq_len + 1,
                                        cfg.data.val_max_blocks)
        log.info("validation: %d blocks of %d tokens", len(val_blocks), cfg.data.seq_len + 1)
        if len(val_blocks) < MIN_VAL_BLOCKS:
            log.warning("only %d validation block(s) of %d tokens: val_loss and val_ppl will be noisy; raise "
                        "data.val_fraction or set data.val_paths", len(val_blocks), cfg.data.seq_len + 1)
    return train_ds, val_blocks


MIN_VAL_BLOCKS = 16
"""Fewer validation blocks than this give a noisy validation loss: warned."""


def report_data_counts(cfg: Config) -> Optional[dict]:
    """Write what the training stream read and dropped (bad, short, duplicate records, per file) to
    <output_dir>/data_stats.json and return it (the result's summary says it): nothing is dropped
    silently."""
    from llmos_ray.data import corpus_stats

    try:
        counts = corpus_stats(cfg, "train")
    except Exception as e:  # the counts live in a Ray actor of this job; a restarted job may not have them
        log.warning("data counts unavailable: %s", e)
        return None
    write_text(os.path.join(cfg.run.output_dir, "data_stats.json"), json.dumps(counts, indent=1))
    return counts


def run_training(cfg: Config, tokenizer, datasets: dict, val_blocks: Optional[np.ndarray],
                 resume_from: Optional[str], train_fn=None, job: Job = "pretrain",
                 data_counts: Optional[dict] = None, task_info: Optional[dict] = None) -> TrainResult:
    """Start the TorchTrainer on `datasets` (Ray Datasets, or in-memory block arrays) and export the
    result. `job` ('pretrain', 'finetune', 'distill') selects the loss and adapters in the loop;
    `data_counts` (what was read and dropped) is saved as <output_dir>/data_stats.json; `task_info`
    is what the objective needs from the driver (tasks.task_for: a classifier's label names)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from llmos_ray.runtime import worker_resources

    cfg = cfg.resolved(job)
    os.makedirs(cfg.run.output_dir, exist_ok=True)
    record_config(cfg)
    if data_counts is not None:
        write_text(os.path.join(cfg.run.output_dir, "data_stats.json"), json.dumps(data_counts, indent=1))
    use_gpu = _use_gpu(cfg)
    resources = worker_resources(cfg.train.cpus_per_worker, cfg.train.num_workers, use_gpu)
    metrics_log = MetricsLog(os.path.join(cfg.run.output_dir, "metrics.jsonl"), cfg.train.max_steps)
    arrays = {k: v for k, v in datasets.items() if isinstance(v, np.ndarray)}
    datasets = {k: v for k, v in datasets.items() if k not in arrays}
    from llmos_ray.data import ingest_options

    # Read by TorchTrainer from the driver's environment and passed on to its controller.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", CONTROLLER_POLL_S)
    trainer = TorchTrainer(
        train_fn or train_loop,
        train_loop_config={"config": cfg.to_dict(), "tokenizer": tokenizer,
                           "val_blocks": val_blocks if val_blocks is not None and len(val_blocks) else None,
                           "resume_from": resume_from, "train_array": arrays.get("train"), "job": job,
                           "task_info": task_info or {}},
        scaling_config=ScalingConfig(num_workers=scaling_workers(cfg), use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=cfg.run.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=[metrics_log]),
        datasets=datasets or None,
        dataset_config=DataConfig(datasets_to_split=list(datasets), execution_options=ingest_options(),
                                  enable_shard_locality=False),
    )
    log.info("training %s/%s on %d workers (%s each), ZeRO-%d, %d steps",
             cfg.model.family, cfg.model.size, cfg.train.num_workers, resources, cfg.deepspeed.zero_stage,
             cfg.train.max_steps)
    t0 = time.time()
    with follow_progress(metrics_log.path, cfg.train.max_steps), reraise_ours():
        try:
            result = trainer.fit()
        except SystemExit:
            # Ray Train's own SIGINT handler aborts the run and exits through sys.exit: the user
            # pressed Ctrl-C. Nothing is exported; the newest complete checkpoint resumes.
            raise KeyboardInterrupt from None
        if result.error is not None:
            raise result.error
    if train_fn is None and (result.metrics or {}).get("step", 0) < cfg.train.max_steps:
        # Aborted the other way: fit() returned early without an error. (Result.metrics are those of
        # the newest checkpoint; a custom train_fn, e.g. the tests' parity harness, ends as it defines.)
        raise KeyboardInterrupt
    checkpoint = checkpoint_uri(result.checkpoint) if result.checkpoint is not None else None
    export_dir = None
    if cfg.train.export and result.checkpoint is not None:
        from llmos_ray.train.checkpoint import export

        export_dir = export(result.checkpoint, os.path.join(cfg.run.output_dir, "export"))
    history = read_metrics(os.path.join(cfg.run.output_dir, "metrics.jsonl"))
    return TrainResult(metrics=dict(result.metrics or {}), checkpoint=checkpoint, export_dir=export_dir,
                       output_dir=cfg.run.output_dir, history=history, run_name=cfg.run.name,
                       seconds=time.time() - t0, data_counts=data_counts)


def scaling_workers(cfg: Config):
    """Ray Train's num_workers: train.num_workers, or (min, max) for elastic training (train.min_workers):
    a lost node's workers are not waited for, the group restarts on what is left and grows back later."""
    t = cfg.train
    return t.num_workers if t.min_workers is None or t.min_workers == t.num_workers else (t.min_workers,
                                                                                          t.num_workers)


def checkpoint_uri(ckpt) -> str:
    """A Ray Train checkpoint as a URI a user can pass back (run.resume, llmos export)."""
    kind = ckpt.filesystem.type_name
    if kind == "local":
        return os.path.abspath(ckpt.path)
    return f"{'gs' if kind == 'gcs' else kind}://{ckpt.path}"


def resolve_resume(cfg: Config, job: Job = "pretrain") -> tuple[Config, Optional[str], Optional[TrainResult]]:
    """What this command does with its run, decided from the files before anything starts
    (`runs.check_run`): `(config, checkpoint URI to start from or None, result if finished)`.

    run.resume=auto: a new run starts; a resumable one continues from its latest checkpoint (Ray
    Train does it by itself for the same name and storage); a finished one trains nothing and comes
    back as its result; one whose data, model, tokenizer or task settings differ is refused.
    run.resume=never: an existing run is left alone and this one starts over in a fresh directory
    (`<name>-2`, …). Else run.resume is a checkpoint URI to start a new run from (checked now)."""
    from llmos_ray.train import runs

    if cfg.run.resume == "never":
        if runs.checkpoints_of(cfg):
            fresh = runs.fresh_run(cfg)
            log.warning("run %r already exists in %s; starting over as %r in %s (run.resume=never)", cfg.run.name,
                        cfg.run.output_dir, fresh.run.name, fresh.run.output_dir)
            cfg = fresh
        return cfg, None, None
    if cfg.run.resume != "auto":
        from llmos_ray.train.checkpoint import validate

        validate(cfg.run.resume)
        return cfg, cfg.run.resume, None
    state, info = runs.check_run(cfg, job)
    if state == "finished":
        log.warning("run %r already finished at step %d (train.max_steps=%d): nothing to train. Raise "
                    "train.max_steps to train it longer, or give a new run.name", cfg.run.name, info.step,
                    cfg.train.max_steps)
        return cfg, None, TrainResult(metrics=dict(info.history[-1]) if info.history else {"step": info.step},
                                      checkpoint=info.checkpoints[-1].uri, export_dir=info.export_dir,
                                      output_dir=cfg.run.output_dir, history=info.history, run_name=cfg.run.name,
                                      data_counts=info.data_stats, already_finished=True)
    if state == "resumable":
        log.info("run %r: continuing from step %d of %d (run.resume=auto)", cfg.run.name, info.step,
                 cfg.train.max_steps)
    return cfg, None, None


def record_config(cfg: Config) -> None:
    """A run's config.yaml says what it trained on and is written when it starts (over what `llmos
    data prepare` left there); a resume with other (non-identity) settings, such as a longer
    train.max_steps, is appended to resumes.jsonl instead."""
    from llmos_ray.train import runs

    path = os.path.join(cfg.run.output_dir, "config.yaml")
    if not os.path.exists(path) or not runs.checkpoints_of(cfg):
        save_config(cfg, path)
        return
    import yaml

    with open(path) as f:
        saved = from_dict(yaml.safe_load(f) or {}).flat()
    now = cfg.flat()
    changed = {k: [saved.get(k), v] for k, v in now.items() if saved.get(k) != v}
    with open(os.path.join(cfg.run.output_dir, "resumes.jsonl"), "a") as f:
        f.write(json.dumps({"time": time.time(), "changed": changed}, default=str) + "\n")


def collect_blocks(ds, block_len: int, max_blocks: int) -> np.ndarray:
    """Up to `max_blocks` full blocks of a (small) packed dataset, in order, as one int32 array."""
    from llmos_ray.data import iter_blocks

    blocks = []
    for block in iter_blocks(ds.iter_batches(batch_size=256, batch_format="numpy"), block_len):
        blocks.append(block)
        if len(blocks) >= max_blocks:
            break
    return np.stack(blocks).astype(np.int32) if blocks else np.zeros((0, block_len), np.int32)


def _use_gpu(cfg: Config) -> bool:
    """'cuda': GPU workers, whatever the cluster has now — on an autoscaling cluster the pending
    workers make the autoscaler add GPU nodes. 'auto': GPUs if the cluster has any right now."""
    import ray

    if cfg.train.device == "cpu":
        return False
    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.train.device == "cuda":
        if gpus < cfg.train.num_workers:
            log.warning("train.device=cuda: %d GPU workers requested, the cluster has %g GPUs now; waiting for the "
                        "autoscaler to add GPU nodes (on a fixed cluster without them this waits forever: use "
                        "train.device=auto or fewer train.num_workers)", cfg.train.num_workers, gpus)
        return True
    return gpus >= 1


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLog(UserCallback):
    """Ray Train callback on the controller (an actor on the driver's node): appends rank 0's
    metrics to metrics.jsonl and publishes them as Ray metrics for the dashboard. The driver shows
    progress by following the file (`follow_progress`)."""

    def __init__(self, path: str, max_steps: int):
        self.path, self.max_steps = path, max_steps
        self._gauges = None

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        m = dict(metrics[0]) if metrics else {}
        if "step" not in m:
            return
        m["time"] = time.time()
        if checkpoint is not None:
            m["checkpoint"] = checkpoint.path
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(m) + "\n")
        self._publish(m)

    def after_exception(self, run_context, worker_exceptions) -> None:
        for rank, exc in worker_exceptions.items():
            log.warning("worker %s failed: %r", rank, exc)

    def _publish(self, m: dict) -> None:
        try:
            from ray.util.metrics import Gauge

            if self._gauges is None:
                self._gauges = {k: Gauge(f"llmos_train_{k}", description=f"llmos training {k}", tag_keys=("run",))
                                for k in ("step", "loss", "tokens_per_s", "mfu", "val_loss")}
            run = os.path.basename(os.path.dirname(self.path))
            for k, g in self._gauges.items():
                if m.get(k) is not None:
                    g.set(float(m[k]), tags={"run": run})
        except Exception as e:  # metrics are best effort; training goes on
            log.debug("ray metrics unavailable: %s", e)


progress_log = logging.getLogger("llmos_ray.progress")
"""Progress lines (one per logged step) of commands that run for a while; the CLI prints them."""


def progress_line(m: dict, max_steps: int, eta_s: Optional[float]) -> str:
    """`step 50/200 | loss 6.1742 | val_loss … | 3,652 tok/s | mfu 49.2% | ETA 5m25s` for a metrics record
(`step 60/200 | checkpoint saved | ETA …` for a checkpoint's)."""
    parts = [f"step {m['step']}/{max_steps}"]
    for key, fmt in (("loss", "loss {:.4f}"), ("val_loss", "val_loss {:.4f}"), ("val_ppl", "val_ppl {:.1f}"),
                     ("tokens_per_s", "{:,.0f} tok/s"), ("examples_per_s", "{:,.1f} examples/s"),
                     ("mfu", "mfu {:.1%}")):
        if m.get(key) is not None:
            parts.append(fmt.format(m[key]))
    if m.get("checkpoint"):
        parts.append("checkpoint saved")
    if eta_s is not None and eta_s == eta_s:
        parts.append(f"ETA {int(eta_s) // 60}m{int(eta_s) % 60:02d}s")
    return " | ".join(parts)


@contextlib.contextmanager
def follow_progress(path: str, max_steps: int, poll_s: float = 0.5):
    """While the block runs, log a progress line (`progress_log`) for each record appended to the
    metrics file at `path`, with an ETA from the steps seen so far."""
    import threading

    stop = threading.Event()
    start = os.path.getsize(path) if os.path.exists(path) else 0

    def follow():
        offset, first, pending = start, None, ""
        while True:
            stopping = stop.wait(poll_s)
            if os.path.exists(path):
                with open(path) as f:
                    f.seek(offset)
                    pending += f.read()
                    offset = f.tell()
            *lines, pending = pending.split("\n")
            for line in filter(None, lines):
                m = json.loads(line)
                now = time.time()
                first = first or (now, m["step"])
                rate = (m["step"] - first[1]) / max(1e-9, now - first[0])
                progress_log.info(progress_line(m, max_steps, (max_steps - m["step"]) / rate if rate > 0 else None))
            if stopping:
                return

    thread = threading.Thread(target=follow, name="llmos-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
