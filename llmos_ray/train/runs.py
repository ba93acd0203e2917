"""Runs on disk: what a run directory holds, what state it is in, and what a new command may do with it.

A run is `run.output_dir` (default runs/<run.name>): `config.yaml` (what the run trained on, written
once when it starts), `metrics.jsonl`, `data_stats.json`, `export/`, and its checkpoints under
`run.storage_path/<run.name>/checkpoint_*` (local or s3://). Before a command trains, `check_run`
decides from the saved config and the newest checkpoint, without starting anything:

    new           nothing there: start
    resumable     checkpoints below train.max_steps, same data/model/tokenizer/task: continue
    finished      its newest checkpoint is at train.max_steps already: say so, train nothing
    incompatible  the data, model, tokenizer or task settings differ from what it trained on:
                  refuse, naming the keys (a new run.name, or run.resume=never for a fresh directory)

`describe_run` and `list_runs` are what `llmos runs show|list` print; `plot_run` draws the loss and
perplexity curves as a PNG.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from llmos_ray.config import Config, from_dict
from llmos_ray.errors import ConfigError

log = logging.getLogger(__name__)

RunState = Literal["new", "resumable", "finished", "incompatible"]
IDENTITY_KEYS = (
    "data.paths", "data.format", "data.text_field", "data.txt_mode", "data.min_chars", "data.dedup",
    "data.max_documents", "data.hf_split", "data.tokenizer", "data.vocab_size", "data.tokenizer_sample_bytes",
    "data.seq_len", "data.val_fraction", "data.val_paths", "model.family", "model.size", "model.base",
    "model.overrides", "finetune.paths", "finetune.format", "finetune.lora", "finetune.lora_r",
    "finetune.lora_alpha", "finetune.lora_target_modules", "distill.teacher", "finetune.task",
    "finetune.multi_label", "finetune.class_weights", "finetune.languages", "finetune.examples_per_label",
    "data.mask_probability", "data.whole_word_masking", "finetune.source_lang", "finetune.target_lang",
    "finetune.task_prefix", "finetune.max_source_len", "finetune.max_target_len", "finetune.max_pairs",
)
"""What a run is: resuming with any of these changed would train another model under the old name."""


@dataclass
class Checkpoint:
    step: int
    uri: str


@dataclass
class RunInfo:
    """What is on disk for one run (`llmos runs show`)."""

    name: str
    output_dir: str
    job: Optional[str] = None
    config: Optional[dict] = None
    checkpoints: list[Checkpoint] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    export_dir: Optional[str] = None
    data_stats: Optional[dict] = None

    @property
    def step(self) -> int:
        return self.checkpoints[-1].step if self.checkpoints else 0

    @property
    def max_steps(self) -> Optional[int]:
        return ((self.config or {}).get("train") or {}).get("max_steps")

    def metric(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of every logged `key`, a step logged twice (a restart) keeping its last value."""
        return sorted({m["step"]: m[key] for m in self.history if m.get(key) is not None}.items())


def _read_text(uri: str) -> Optional[str]:
    import fsspec

    try:
        with fsspec.open(uri, "r") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None


def checkpoints_of(cfg: Config) -> list[Checkpoint]:
    """The run's checkpoints that finished writing (their llmos_state.json exists) and that Ray Train
    registered, oldest first: run.resume=auto restores the newest registered one, so a checkpoint that
    finished writing while the run was being stopped (never registered) is not one to resume from.
    (A checkpoint damaged later is found, and skipped, when a resume validates it.)"""
    import fsspec

    root = f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"
    fs, path = fsspec.core.url_to_fs(root)
    registered = _registered(f"{root}/checkpoint_manager_snapshot.json")
    out = []
    for state in sorted(fs.glob(f"{path}/checkpoint_*/llmos_state.json")):
        folder = state.rsplit("/", 1)[0]
        if registered is not None and folder.rsplit("/", 1)[-1] not in registered:
            continue
        with fs.open(state) as f:
            out.append(Checkpoint(int(json.load(f)["step"]), fs.unstrip_protocol(folder).removeprefix("file://")))
    return out


def _registered(snapshot_uri: str) -> Optional[set[str]]:
    """Checkpoint folder names in Ray Train's checkpoint manager snapshot, or None without one (a
    run Ray Train never checkpointed, or checkpoints written by other means: all count)."""
    text = _read_text(snapshot_uri)
    if text is None:
        return None
    snapshot = json.loads(text)
    results = [*snapshot.get("checkpoint_results", []), snapshot.get("latest_checkpoint_result") or {}]
    return {r["checkpoint_dir_name"] for r in results if r.get("checkpoint_dir_name")}


def last_complete(info: "RunInfo") -> Optional[Checkpoint]:
    """The newest checkpoint whose every rank's files are there with the sizes written (the one a
    resume would start from), or None."""
    from llmos_ray.errors import CheckpointError
    from llmos_ray.train.checkpoint import validate

    for ckpt in reversed(info.checkpoints):
        try:
            validate(ckpt.uri)
            return ckpt
        except CheckpointError:
            continue
    return None


def read_run(cfg: Config) -> RunInfo:
    """Everything on disk for the run of a resolved config."""
    out = cfg.run.output_dir.rstrip("/")
    text = _read_text(f"{out}/config.yaml")
    saved = yaml.safe_load(text) if text else None
    info = RunInfo(name=cfg.run.name, output_dir=out, config=saved, checkpoints=checkpoints_of(cfg))
    metrics = _read_text(f"{out}/metrics.jsonl") or ""
    info.history = [json.loads(line) for line in metrics.splitlines() if line.strip()]
    stats = _read_text(f"{out}/data_stats.json")
    info.data_stats = json.loads(stats) if stats else None
    if _read_text(f"{out}/export/config.json") is not None:
        info.export_dir = f"{out}/export"
    if info.checkpoints:
        state = _read_text(f"{info.checkpoints[-1].uri}/llmos_state.json")
        info.job = json.loads(state).get("job", "pretrain") if state else None
    return info


def changed_identity(saved: dict, cfg: Config) -> dict[str, tuple[Any, Any]]:
    """{key: (what the run trained with, what the config now says)} for every IDENTITY_KEYS that differs."""
    old = from_dict(saved).flat()  # defaults filled in, as the new config has them
    new = cfg.flat()
    return {k: (old.get(k), new.get(k)) for k in IDENTITY_KEYS if old.get(k) != new.get(k)}


def check_run(cfg: Config, job: str) -> tuple[RunState, RunInfo]:
    """The state of `cfg`'s run for a `job` command (see the module doc); ConfigError when it is
    incompatible or belongs to another kind of job. Reads files only."""
    info = read_run(cfg)
    if not info.checkpoints:
        return "new", info
    if info.job is not None and info.job != job:
        raise ConfigError(f"run {cfg.run.name!r} in {cfg.run.output_dir} is a {info.job} run; give this {job} run "
                          f"another run.name")
    if info.config is not None:
        changed = changed_identity(info.config, cfg)
        if changed:
            what = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ConfigError(
                f"run {cfg.run.name!r} ({cfg.run.output_dir}) was trained with other settings ({what}); resuming "
                f"would train another model under its name. Give this run a new run.name, or set "
                f"run.resume=never to start over in a fresh directory")
    return ("finished" if info.step >= cfg.train.max_steps else "resumable"), info


def fresh_run(cfg: Config) -> Config:
    """`cfg` moved to the first unused run name `<name>-2`, `-3`, … (and output directory), so a
    run.resume=never command starts over without touching the existing run."""
    import copy

    explicit_dir = cfg.run.output_dir.rstrip("/") != os.path.abspath(os.path.join("runs", cfg.run.name))
    for n in range(2, 10_000):
        new = copy.deepcopy(cfg)
        new.run.name = f"{cfg.run.name}-{n}"
        new.run.output_dir = f"{cfg.run.output_dir.rstrip('/')}-{n}" if explicit_dir else \
            os.path.abspath(os.path.join("runs", new.run.name))
        new.run.storage_path = None if cfg.run.storage_path.startswith(cfg.run.output_dir) else cfg.run.storage_path
        new = new.resolved()
        if not checkpoints_of(new) and _read_text(f"{new.run.output_dir}/config.yaml") is None:
            return new
    raise ConfigError(f"no free run name after {cfg.run.name}-9999; choose a run.name")


# ---------------------------------------------------------------------------------------------
# Looking at runs


def list_runs(root: str = "runs") -> list[RunInfo]:
    """The runs under `root` (each a directory with a config.yaml), newest first."""
    if not os.path.isdir(root):
        return []
    infos = []
    for name in os.listdir(root):
        path = os.path.join(root, name, "config.yaml")
        if os.path.isfile(path):
            cfg = _config_of(os.path.join(root, name))
            if cfg is not None:
                infos.append((os.path.getmtime(path), read_run(cfg)))
    return [info for _, info in sorted(infos, key=lambda t: t[0], reverse=True)]


def _config_of(run_dir: str) -> Optional[Config]:
    try:
        with open(os.path.join(run_dir, "config.yaml")) as f:
            cfg = from_dict(yaml.safe_load(f) or {})
    except (OSError, yaml.YAMLError, ConfigError) as e:
        log.warning("%s: not a readable run (%s)", run_dir, e)
        return None
    saved_dir, cfg.run.output_dir = cfg.run.output_dir, os.path.abspath(run_dir)  # it may have moved since
    if cfg.run.storage_path is None or cfg.run.storage_path == os.path.join(saved_dir or "", "checkpoints"):
        cfg.run.storage_path = os.path.join(cfg.run.output_dir, "checkpoints")
    return cfg.resolved()


def find_run(name_or_dir: str, root: str = "runs") -> RunInfo:
    """A run by directory or by name under `root`; ConfigError naming the runs there otherwise."""
    for candidate in (name_or_dir, os.path.join(root, name_or_dir)):
        if os.path.isfile(os.path.join(candidate, "config.yaml")):
            cfg = _config_of(candidate)
            if cfg is not None:
                return read_run(cfg)
    names = [r.name for r in list_runs(root)]
    raise ConfigError(f"no run {name_or_dir!r} (a directory with config.yaml, or a name under {root}/); runs: "
                      f"{', '.join(names) or 'none yet'}")


SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 40) -> str:
    """`values` (resampled to at most `width`) as a line of block characters, low to high."""
    if not values:
        return ""
    if len(values) > width:
        values = [values[int(i * len(values) / width)] for i in range(width)]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARKS[min(len(SPARKS) - 1, int((v - lo) / span * len(SPARKS)))] for v in values)


def plot_run(info: RunInfo, path: str, size: tuple[int, int] = (900, 400)) -> str:
    """Training loss and validation perplexity against the step, as a PNG of `size` pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpi = 100
    fig, loss_ax = plt.subplots(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    try:
        for key, style in (("loss", "-"), ("val_loss", "o-")):
            points = info.metric(key)
            if points:
                loss_ax.plot(*zip(*points), style, label=key, markersize=3)
        loss_ax.set_xlabel("step")
        loss_ax.set_ylabel("loss (nats/token)")
        ppl = info.metric("val_ppl")
        if ppl:
            ppl_ax = loss_ax.twinx()
            ppl_ax.plot(*zip(*ppl), "s--", color="tab:red", label="val_ppl", markersize=3)
            ppl_ax.set_ylabel("validation perplexity")
            ppl_ax.legend(loc="upper center")
        loss_ax.legend(loc="upper right")
        loss_ax.set_title(f"run {info.name}")
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
    return path


def describe_run(info: RunInfo) -> str:
    """`llmos runs show`: the config summary, progress, losses, throughput, checkpoints and export."""
    c = info.config or {}
    model = c.get("model", {})
    data = c.get("data", {})
    preset = f"{model.get('family')}-{model.get('size')}"
    lines = [f"run {info.name} ({info.job or 'not started'}): {info.output_dir}",
             f"  model       {model.get('base') or preset}",
             f"  data        {', '.join(data.get('paths') or []) or 'default corpus (Python standard library)'}"
             f", seq_len {data.get('seq_len')}",
             f"  steps       {info.step} of {info.max_steps}"]
    losses, vals = info.metric("loss"), info.metric("val_loss")
    if losses:
        lines.append(f"  loss        {losses[-1][1]:.4f} last  {sparkline([v for _, v in losses])}")
    if vals:
        best = min(vals, key=lambda p: p[1])
        lines.append(f"  val_loss    {vals[-1][1]:.4f} last, {best[1]:.4f} best (step {best[0]})")
    tps = [v for _, v in info.metric("tokens_per_s")]
    if tps:
        lines.append(f"  throughput  {statistics.median(tps):,.0f} tokens/s (median of {len(tps)} logs)")
    lines.append(f"  checkpoints {len(info.checkpoints)}" + (f", newest {info.checkpoints[-1].uri}"
                                                             if info.checkpoints else ""))
    lines.append(f"  export      {info.export_dir or '-'}")
    return "\n".join(lines)
