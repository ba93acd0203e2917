"""One typed root `Config`, a section per stage, loaded from YAML plus dotted overrides.

    cfg = load_config("jobs/configs/pretrain_tiny.yaml", ["train.lr=3e-4", 'data.paths=["a.txt"]'])

Unknown keys and wrong types are errors at load time that name the key and the closest valid
one. Each field carries a one-line docstring (`llmos config show --docs` prints them).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import inspect
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml

from llmos_ray.errors import ConfigError


@dataclass
class RunConfig:
    name: Optional[str] = None
    """Run name (output directory, Ray Train run, resume); default: 'default' for pretrain, else the command."""
    output_dir: Optional[str] = None
    """Where metrics, the resolved config, the tokenizer and the export go (default runs/<name>)."""
    storage_path: Optional[str] = None
    """Ray Train storage for checkpoints: a local path or s3://, gs:// (default <output_dir>/checkpoints)."""
    seed: int = 0
    """Seed for model init, data order and dropout."""
    resume: str = "auto"
    """'auto' (continue this run's latest complete checkpoint if any), 'never', or a checkpoint URI."""
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    """Weights & Biases logging: 'auto' is online with WANDB_API_KEY set, offline otherwise."""
    wandb_project: str = "llmos-ray"
    """Weights & Biases project name."""


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)
    """Corpus files, directories or globs (local, file://, s3://, gs://, memory://); empty = embedded default."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options per protocol for corpus paths, e.g. {s3: {endpoint_url: "http://localhost:9000"}}."""
    format: Literal["auto", "txt", "jsonl", "json", "parquet", "hf"] = "auto"
    """File format; 'auto' infers it from the extension (.txt, .jsonl/.json, .parquet, HF datasets dir)."""
    text_field: str = "text"
    """Field (JSONL) or column (parquet, HF datasets) holding the document text."""
    txt_mode: Literal["file", "line"] = "file"
    """For .txt: one document per file, or one per line."""
    min_chars: int = 16
    """Documents shorter than this after stripping are dropped (and counted)."""
    dedup: bool = False
    """Drop exact duplicate documents (counted)."""
    max_bad_fraction: float = 0.01
    """Fail when a file's share of bad records (malformed, missing field, undecodable) exceeds this."""
    max_documents: Optional[int] = None
    """Use at most this many documents (in corpus order); None = all."""
    hf_split: str = "train"
    """Split to read from a Hugging Face hub dataset or DatasetDict directory."""
    tokenizer: Optional[str] = None
    """Existing tokenizer directory or hub name; None = train a byte-level BPE on the corpus."""
    vocab_size: int = 8192
    """Vocabulary size of a tokenizer trained on the corpus."""
    tokenizer_sample_bytes: int = 20_000_000
    """How much corpus text (bytes, in corpus order) trains the tokenizer."""
    seq_len: int = 256
    """Training sequence length; documents are packed into blocks of seq_len + 1 tokens."""
    val_fraction: float = 0.02
    """Share of documents held out for validation, chosen by a hash of the text."""
    val_paths: list[str] = field(default_factory=list)
    """Separate validation corpus; when set, no documents are held out of `paths`."""
    val_max_blocks: int = 256
    """At most this many validation blocks are kept."""
    batch_docs: int = 128
    """Documents per Ray Data tokenize-and-pack batch."""


@dataclass
class ModelConfig:
    family: Literal["gpt2", "llama"] = "gpt2"
    """Architecture family of a preset."""
    size: Literal["tiny", "small", "125m", "350m", "1b", "7b"] = "small"
    """Preset size (see llmos_ray.models.PRESETS)."""
    base: Optional[str] = None
    """Start from this Hugging Face directory, export or hub id instead of a fresh preset."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Extra transformers config attributes, e.g. {n_layer: 4}."""
    trust_remote_code: bool = False
    """Allow custom model code from the hub when loading `base`."""


@dataclass
class TrainConfig:
    num_workers: int = 2
    """Ray Train workers (one per GPU on a GPU cluster)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """'auto' uses GPUs when the cluster has them at submission, CPU otherwise; 'cuda' waits for GPU
    workers (an autoscaling cluster adds the nodes)."""
    cpus_per_worker: Optional[float] = None
    """CPUs reserved per worker; None = at most 1, leaving at least one CPU to Ray Data."""
    max_steps: int = 200
    """Optimizer steps to train for."""
    micro_batch_size: int = 8
    """Sequences per worker per forward pass."""
    global_batch_size: Optional[int] = None
    """Sequences per optimizer step across workers; gradient accumulation makes up the rest."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """'auto': bf16 on GPUs that support it, fp16 with loss scaling on older GPUs, fp32 on CPU."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    log_every: int = 10
    """Log metrics every this many steps."""
    eval_every: int = 50
    """Compute validation loss and perplexity every this many steps (and at the end)."""
    eval_batches: int = 8
    """Validation micro-batches per evaluation, per worker."""
    checkpoint_every: int = 100
    """Save a checkpoint every this many steps (and at the end)."""
    num_to_keep: Optional[int] = 2
    """Checkpoints kept in storage; None keeps all."""
    max_failures: int = 2
    """Worker-group restarts from the last checkpoint before the run fails; -1 = unlimited."""
    export: bool = True
    """Export the final model as a Hugging Face directory under <output_dir>/export."""


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 0 = DDP, 1 = shard optimizer states, 2 = + gradients, 3 = + parameters."""
    offload_optimizer: bool = False
    """Keep optimizer states in CPU memory (ZeRO 1-3)."""
    offload_params: bool = False
    """Keep parameters in CPU memory (ZeRO-3 only)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed config merged over ours, for settings we do not expose."""


@dataclass
class FinetuneConfig:
    paths: list[str] = field(default_factory=list)
    """Instruction data (JSONL or parquet; fsspec URIs); empty = the embedded default set."""
    format: Literal["auto", "prompt_completion", "alpaca", "chat"] = "auto"
    """Record format; 'auto' detects it per record."""
    lora: bool = False
    """Train LoRA adapters (peft) instead of all weights."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling alpha."""
    lora_dropout: float = 0.05
    """LoRA dropout."""
    lora_target_modules: list[str] = field(default_factory=list)
    """Modules that get adapters; empty = the family's attention projections."""
    merge_lora: bool = True
    """Export merged weights (True) or the adapter alone (False)."""


@dataclass
class DistillConfig:
    teacher: Optional[str] = None
    """Teacher model directory or hub id."""
    temperature: float = 2.0
    """Softmax temperature for the KL term."""
    alpha: float = 0.5
    """Weight of the KL term; (1 - alpha) weights cross-entropy on the data."""


@dataclass
class EvalConfig:
    model: list[str] = field(default_factory=list)
    """Models to evaluate (directories, fsspec URIs, registry names, hub ids); several are compared side by side."""
    perplexity_paths: list[str] = field(default_factory=list)
    """Held-out text for perplexity, read like data.paths; empty = the validation documents of the data section."""
    task_paths: list[str] = field(default_factory=list)
    """JSONL files of {prompt, reference} scored with BLEU and ROUGE; each file is a task named after it."""
    max_new_tokens: int = 64
    """Tokens generated per task prompt."""
    batch_size: int = 8
    """Prompts or windows per inference batch."""
    num_workers: int = 1
    """Ray Data inference actors."""
    max_length: Optional[int] = None
    """Perplexity window in tokens; None = the data.seq_len it was trained with (our exports), else its context."""
    stride: Optional[int] = None
    """Tokens a perplexity window advances by (the rest is context); None = half the window."""
    max_documents: Optional[int] = None
    """Score at most this many perplexity documents (in corpus order); None = all."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a generated answer (it is cut before the first); empty = EOS or max_new_tokens."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """'auto' gives each inference actor a GPU when the cluster has them, else runs on CPU."""
    cpus_per_worker: Optional[float] = None
    """CPUs per inference actor (its torch threads); None = 1, less when the cluster has fewer than num_workers."""
    attach_results: bool = True
    """Store the results of models given by registry name in their registry entry."""


@dataclass
class ServedModelOptions:
    """The per-model serving keys: defaults for every served model in `serve`, overridden by name in
    `serve.model_options`; each served model's resolved values are a `serve.spec.ModelSpec`."""

    max_ongoing_requests: int = 32
    """Per model: requests one replica holds (running + waiting for a batch slot); raised to max_batch_size if lower."""
    max_queued_requests: int = 64
    """Per model: requests queued in front of the replicas before new ones get 503 + Retry-After; -1 = unbounded."""
    min_replicas: int = 1
    """Per model: autoscaling lower bound."""
    max_replicas: int = 1
    """Per model: autoscaling upper bound."""
    target_ongoing_requests: float = 8.0
    """Per model: autoscaling target of ongoing requests per replica."""
    max_batch_size: int = 16
    """Per model: most sequences decoded together; requests join a running batch between tokens."""
    batch_wait_timeout_s: float = 0.0
    """Per model: how long @serve.batch waits to group arrivals into one prefill (0 = admit at once)."""
    max_tokens_limit: int = 1024
    """Per model: cap on max_tokens; larger requests get 400."""
    default_max_tokens: int = 16
    """Per model: max_tokens of a completion request that sets none (OpenAI's default); chat fills the context up to max_tokens_limit."""
    engine: Literal["transformers", "vllm"] = "transformers"
    """Per model: generation engine; 'vllm' runs ray.serve.llm's vLLM deployment (GPU, vllm installed)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Per model: 'auto' uses a GPU when the replica has one."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Per model: weights dtype; 'auto' is bfloat16 (or float16) on GPU, float32 on CPU."""
    quantize: Literal["none", "int8"] = "none"
    """Per model: 'int8' applies dynamic int8 quantization of linear layers on CPU."""
    num_cpus: float = 1.0
    """Per model: CPUs reserved per replica (also its torch threads, at least 1)."""
    num_gpus: Optional[float] = None
    """Per model: GPUs per replica; None = 1 when device is cuda, or auto and the cluster has GPUs."""
    trust_remote_code: bool = False
    """Per model: allow custom model code from the hub."""
    safety_input_blocklist: list[str] = field(default_factory=list)
    """Per model: words or phrases (case-insensitive, whole words) that block a prompt."""
    safety_input_patterns: list[str] = field(default_factory=list)
    """Per model: regular expressions that block a prompt."""
    safety_output_blocklist: list[str] = field(default_factory=list)
    """Per model: words or phrases that end a completion with finish_reason 'content_filter'."""
    safety_output_patterns: list[str] = field(default_factory=list)
    """Per model: regular expressions that end a completion with finish_reason 'content_filter'."""
    safety_max_output_chars: Optional[int] = None
    """Per model: completions are cut at this many characters (finish_reason 'length')."""


@dataclass
class ServeConfig(ServedModelOptions):
    models: list[str] = field(default_factory=list)
    """Models to serve: export directories, fsspec URIs, registry names or hub ids; 'name=SOURCE' sets the served name."""
    host: str = "127.0.0.1"
    """HTTP host."""
    port: int = 8000
    """HTTP port."""
    app_name: str = "llmos"
    """Ray Serve application name (`serve status`, `serve delete`)."""
    route_prefix: str = "/"
    """URL prefix of the HTTP API."""
    api_keys: list[str] = field(default_factory=list)
    """Accepted API keys, also read from LLMOS_API_KEYS (comma separated) and api_keys_file; none at all = open."""
    api_keys_file: Optional[str] = None
    """File with one API key per line (blank lines and # comments ignored)."""
    max_request_bytes: int = 1_000_000
    """Largest accepted request body in bytes; larger requests get 413."""
    retry_after_s: int = 1
    """Seconds a client is told to wait (Retry-After) when a model is over capacity (503)."""
    ingress_max_ongoing_requests: int = 1000
    """Requests one HTTP ingress replica handles at once before the proxy answers 503."""
    model_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-model overrides of the 'Per model' keys by served name, e.g. {tiny: {max_replicas: 4, quantize: int8}}."""


@dataclass
class RegistryConfig:
    uri: Optional[str] = None
    """Model library JSON file (local path or fsspec URI); None = $LLMOS_REGISTRY or ~/.llmos/models.json."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    """Run identity, output locations, seed and resume policy."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus reading, cleaning, tokenizer and packing."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model preset or base model."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Ray Train scaling, optimisation and checkpointing."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed ZeRO settings."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Supervised fine-tuning and LoRA."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Knowledge distillation."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation: perplexity, BLEU, ROUGE."""
    serve: ServeConfig = field(default_factory=ServeConfig)
    """Ray Serve deployment."""
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    """The model library (named models)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def resolved(self, job: str = "pretrain") -> "Config":
        """A copy with derived defaults filled in (run name for `job`, output_dir, storage_path) and checked."""
        cfg = copy.deepcopy(self)
        if cfg.run.name is None:
            cfg.run.name = DEFAULT_RUN_NAMES.get(job, job)
        if cfg.run.output_dir is None:
            cfg.run.output_dir = os.path.join("runs", cfg.run.name)
        if "://" not in cfg.run.output_dir:
            cfg.run.output_dir = os.path.abspath(os.path.expanduser(cfg.run.output_dir))
        if cfg.run.storage_path is None:
            cfg.run.storage_path = os.path.join(cfg.run.output_dir, "checkpoints")
        elif "://" not in cfg.run.storage_path:
            cfg.run.storage_path = os.path.abspath(os.path.expanduser(cfg.run.storage_path))
        # Local model paths become absolute: Ray workers run in another directory.
        cfg.model.base = _abs_if_local(cfg.model.base)
        cfg.distill.teacher = _abs_if_local(cfg.distill.teacher)
        cfg.data.tokenizer = _abs_if_local(cfg.data.tokenizer)
        _check(cfg)
        return cfg


def _abs_if_local(path: Optional[str]) -> Optional[str]:
    if path and "://" not in path and os.path.exists(os.path.expanduser(path)):
        return os.path.abspath(os.path.expanduser(path))
    return path


DEFAULT_RUN_NAMES = {"pretrain": "default", "prepare": "default"}
"""Run names when run.name is not set: `llmos pretrain` and `llmos data prepare` share runs/default;
other commands use their own name (runs/finetune, runs/evaluate, …), so they never mix."""


def _check(cfg: Config) -> None:
    """Cross-field rules that a type alone cannot express."""
    t = cfg.train
    positive = {
        "train.num_workers": t.num_workers, "train.max_steps": t.max_steps,
        "train.micro_batch_size": t.micro_batch_size, "train.log_every": t.log_every,
        "train.eval_every": t.eval_every, "train.checkpoint_every": t.checkpoint_every,
        "data.seq_len": cfg.data.seq_len, "data.vocab_size": cfg.data.vocab_size,
        "data.batch_docs": cfg.data.batch_docs,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    if t.global_batch_size is not None and t.global_batch_size % (t.micro_batch_size * t.num_workers):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} must be a multiple of "
            f"train.micro_batch_size * train.num_workers = {t.micro_batch_size * t.num_workers}"
        )
    if not 0 <= cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction}")
    if not 0 <= cfg.data.max_bad_fraction <= 1:
        raise ConfigError(f"data.max_bad_fraction must be in [0, 1], got {cfg.data.max_bad_fraction}")
    if cfg.deepspeed.offload_params and cfg.deepspeed.zero_stage != 3:
        raise ConfigError("deepspeed.offload_params needs deepspeed.zero_stage=3")
    if cfg.run.resume == "":
        raise ConfigError("run.resume must be 'auto', 'never' or a checkpoint URI, got ''")


# ---------------------------------------------------------------------------------------------
# Loading: YAML + overrides -> raw dict -> typed dataclasses.


def load_config(path: Optional[str] = None, overrides: Union[list[str], tuple[str, ...], dict, None] = None,
                job: str = "pretrain") -> Config:
    """Read `path` (YAML; optional), apply `overrides` ("a.b=value" strings or {"a.b": value}),
    type-check everything and return the Config resolved for `job` (its default run name)."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping of sections, got {type(raw).__name__}")
    for key, value in _parse_overrides(overrides):
        _set_dotted(raw, key, value)
    return from_dict(raw).resolved(job)


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from nested plain data, rejecting unknown keys and wrong types."""
    return _build(Config, raw, "")


def _parse_overrides(overrides) -> list[tuple[str, Any]]:
    if not overrides:
        return []
    if isinstance(overrides, dict):
        return list(overrides.items())
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.lr=3e-4)")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: value {text!r} is not valid YAML: {e}") from None
        parsed.append((key.strip(), value))
    return parsed


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls, raw: Any, prefix: str):
    where = prefix.rstrip(".") or "config"
    if isinstance(raw, cls):
        return raw
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            raise ConfigError(_unknown_key_message(prefix + str(key), [prefix + n for n in names], cls))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, prefix + key)
    return cls(**kwargs)


def _unknown_key_message(key: str, valid: list[str], cls) -> str:
    leaf = key.rsplit(".", 1)[-1]
    elsewhere = [k for k in all_keys() if k.endswith("." + leaf)]  # train.zero_stage -> deepspeed.zero_stage
    close = elsewhere or difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    names = ", ".join(v.rsplit(".", 1)[-1] for v in valid)
    return f"unknown config key {key!r}{hint} (valid keys of {cls.__name__}: {names})"


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the config, e.g. 'train.lr'."""
    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys += all_keys(hint, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(hint))}]"
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint, key: str):
    """Return `value` checked against `hint` (ints are accepted for floats)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)

    def bad():
        return ConfigError(f"{key}: expected {_type_name(hint)}, got {type(value).__name__} {value!r}")

    if hint is Any:
        return value
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise bad()
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise bad()
    if origin is list:
        if isinstance(value, str):  # a single path where a list is expected: accept it
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise bad()
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad()
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a run name of 7 is fine as "7"
        raise bad()
    raise bad()


def field_docs(cls=Config) -> dict[str, str]:
    """{'train.lr': 'Peak learning rate (AdamW).', ...} read from the fields' docstrings."""
    docs: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(inspect.getmodule(cls)))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}

    def walk(klass, prefix):
        # a section's own fields and those it inherits (ServeConfig's per-model keys), bases first
        body = [stmt for k in reversed(klass.__mro__) if k.__name__ in classes for stmt in classes[k.__name__].body]
        hints = typing.get_type_hints(klass)
        for stmt, nxt in zip(body, body[1:] + [None]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                name = stmt.target.id
                doc = ""
                if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                    doc = str(nxt.value.value)
                docs[prefix + name] = doc
                if dataclasses.is_dataclass(hints[name]):
                    walk(hints[name], f"{prefix}{name}.")

    walk(cls, "")
    return docs


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML (any fsspec URI), atomically for local paths."""
    write_text(path, cfg.to_yaml())


def write_text(uri: str, text: str) -> None:
    """Write a small text file (config, report) at a local path — atomically, so a reader never sees
    half of it — or at any fsspec URI."""
    if "://" in uri and not uri.startswith("file://"):
        import fsspec

        with fsspec.open(uri, "w") as f:
            f.write(text)
        return
    path = uri.removeprefix("file://")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
