"""One typed root `Config`, a section per stage, loaded from YAML plus dotted overrides.

    cfg = load_config("jobs/configs/pretrain_tiny.yaml", ["train.lr=3e-4", 'data.paths=["a.txt"]'])

Unknown keys and wrong types are errors at load time that name the key and the closest valid
one (the typed-dataclass machinery is `llmos_ray.schema`). Each field carries a one-line docstring
(`llmos config show --docs` prints them), and each section checks its own values (`validate`).
`load_config` returns the config as written; an entry point fills in what depends on the job
(`Config.resolved(job)`: run name, output and storage paths), so one loaded config can drive
`pretrain` and then `finetune` without the second landing in the first's run.

Why one module: it is the one table of every setting a user can give, section by section, each
field with its type, default, docstring and checks; the loading machinery lives in `schema`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml

from llmos_ray import schema
from llmos_ray.errors import ConfigError
from llmos_ray.storage import write_text


def _positive(section: str, obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ConfigError(f"{section}.{name} must be > 0, got {value}")


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

    def validate(self) -> None:
        if self.resume == "":
            raise ConfigError("run.resume must be 'auto', 'never' or a checkpoint URI, got ''")


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)
    """Corpus files, directories or globs (local, file://, s3://, gs://, memory://); empty = embedded default."""
    mix: list[dict[str, Any]] = field(default_factory=list)
    """Weighted mixture instead of `paths`: [{name, paths, weight}, ...]; documents interleave deterministically in
    proportion to the weights (a pass ends when one component runs out); realized shares in the stats."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options per protocol for corpus paths, e.g. {s3: {endpoint_url: "http://localhost:9000"}}."""
    format: Literal["auto", "txt", "jsonl", "json", "parquet", "csv", "hf"] = "auto"
    """File format; 'auto' infers it from the extension (.txt, .jsonl/.json, .parquet, .csv, HF datasets dir)."""
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
    mask_probability: float = 0.15
    """Masked-LM pretraining (bert): share of tokens selected for prediction (80% [MASK], 10% random, 10% kept)."""
    whole_word_masking: bool = False
    """Masked-LM pretraining: select whole words (all tokens of a word together) instead of single tokens."""
    tokenizer: Optional[str] = None
    """Existing tokenizer directory or hub name; None = train a byte-level BPE on the corpus."""
    vocab_size: int = 8192
    """Vocabulary size of a tokenizer trained on the corpus."""
    tokenizer_sample_bytes: int = 20_000_000
    """How much corpus text (bytes, in corpus order) trains the tokenizer."""
    seq_len: int = 256
    """Training sequence length; documents are packed into blocks of seq_len + 1 tokens."""
    packing: Literal["concat", "reset"] = "concat"
    """'concat': packed documents attend across their EOS; 'reset': each document (pretraining) or example
    (fine-tuning, several per row instead of one padded row each) attends only to itself, positions restarting."""
    val_fraction: float = 0.02
    """Share of documents held out for validation, chosen by a hash of the text."""
    val_paths: list[str] = field(default_factory=list)
    """Separate validation corpus; when set, no documents are held out of `paths`."""
    val_max_blocks: int = 256
    """At most this many validation blocks are kept."""
    batch_docs: int = 128
    """Documents per Ray Data tokenize-and-pack batch."""

    def validate(self) -> None:
        _positive("data", self, "seq_len", "vocab_size", "batch_docs", "val_max_blocks", "tokenizer_sample_bytes")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.max_documents is not None and self.max_documents < 1:
            raise ConfigError(f"data.max_documents must be >= 1 or null, got {self.max_documents}")
        if not 0 < self.mask_probability < 1:
            raise ConfigError(f"data.mask_probability must be in (0, 1), got {self.mask_probability}")
        if self.mix:
            if self.paths:
                raise ConfigError("data.paths and data.mix are both set: a mixture lists its corpora in data.mix")
            mix_components(self.mix, "data.mix")


MIX_KEYS = ("name", "paths", "weight")


@dataclass(frozen=True)
class MixComponent:
    """One corpus of a mixture."""

    name: str
    paths: tuple[str, ...]
    weight: float


def mix_components(mix: list, key: str = "data.mix") -> list["MixComponent"]:
    """The checked components of a data.mix / finetune.mix list (ConfigError naming what is wrong)."""
    out: list[MixComponent] = []
    for i, entry in enumerate(mix):
        where = f"{key}[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a mapping {{name, paths, weight}}, got {entry!r}")
        unknown = sorted(set(entry) - set(MIX_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} (valid keys: {', '.join(MIX_KEYS)})")
        paths = entry.get("paths")
        if isinstance(paths, str):
            paths = [paths]
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
            raise ConfigError(f"{where}.paths must be a non-empty list of corpus paths, got {paths!r}")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ConfigError(f"{where}.weight must be a number > 0, got {weight!r}")
        name = entry.get("name", f"mix{i}")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}.name must be a non-empty string, got {name!r}")
        if any(c.name == name for c in out):
            raise ConfigError(f"{key}: two components are named {name!r}")
        out.append(MixComponent(name, tuple(paths), float(weight)))
    if len(out) == 1:
        raise ConfigError(f"{key} needs at least two components (one corpus is data.paths)")
    return out


@dataclass
class ModelConfig:
    family: Optional[Literal["gpt2", "llama", "bert", "t5"]] = None
    """Architecture family of a preset; None = the job's: bert for finetune.task=classification, t5 for
    finetune.task=seq2seq, else gpt2."""
    size: Literal["tiny", "small", "medium", "base", "125m", "350m", "1b", "7b"] = "small"
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
    min_workers: Optional[int] = None
    """Elastic training: when nodes are lost, continue on as few as this many workers (and grow back to
    num_workers when they return), the global batch kept by more accumulation; None = always num_workers."""
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
    balance_lengths: bool = True
    """Classification and seq2seq fine-tuning: split each micro-step's examples among the workers
    by length (the one with the longest takes fewer), each worker's loss weighted so the gradient
    is the whole micro-step's mean; off = `micro_batch_size` rows per worker in stored order."""
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

    def validate(self) -> None:
        _positive("train", self, "num_workers", "max_steps", "micro_batch_size", "log_every", "eval_every",
                  "checkpoint_every", "lr")
        if self.global_batch_size is not None and self.global_batch_size % (self.micro_batch_size * self.num_workers):
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} must be a multiple of "
                f"train.micro_batch_size * train.num_workers = {self.micro_batch_size * self.num_workers}")
        if self.min_workers is not None:
            if not 1 <= self.min_workers <= self.num_workers:
                raise ConfigError(f"train.min_workers must be in [1, train.num_workers={self.num_workers}], got "
                                  f"{self.min_workers}")
            batch = self.global_batch_size or self.micro_batch_size * self.num_workers
            odd = [w for w in range(self.min_workers, self.num_workers + 1) if batch % (self.micro_batch_size * w)]
            if odd:
                raise ConfigError(f"elastic training keeps the global batch ({batch}) on {self.min_workers} to "
                                  f"{self.num_workers} workers: it must be a multiple of train.micro_batch_size * "
                                  f"workers for each, not for {odd[0]} workers; set train.global_batch_size")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ConfigError(f"train.cpus_per_worker must be > 0 or null, got {self.cpus_per_worker}")


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

    def validate(self) -> None:
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("deepspeed.offload_params needs deepspeed.zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")


@dataclass
class FinetuneConfig:
    task: Literal["causal_lm", "classification", "seq2seq"] = "causal_lm"
    """What fine-tuning trains: 'causal_lm' (instructions, chat), 'classification' ({text, label} records)
    or 'seq2seq' (an encoder-decoder on {source, target}, {translation: {..}} or {text, summary} records)."""
    paths: list[str] = field(default_factory=list)
    """Training records (JSONL, parquet or CSV; fsspec URIs); empty = the task's embedded default set."""
    mix: list[dict[str, Any]] = field(default_factory=list)
    """Weighted mixture of training sets instead of `paths`: [{name, paths, weight}, ...] (as data.mix)."""
    format: Literal["auto", "prompt_completion", "alpaca", "chat"] = "auto"
    """Record format of causal_lm records; 'auto' detects it per record."""
    multi_label: bool = False
    """Classification: records carry `labels: [...]` (any number per text), trained with binary cross-entropy."""
    class_weights: Literal["none", "balanced"] = "none"
    """Classification: 'balanced' weights each label's loss by n / (labels * count) in the training split."""
    languages: list[str] = field(default_factory=lambda: ["en", "fr", "de", "es", "it", "pt_BR", "ru", "zh_CN"])
    """Classification with no paths: the labels of the embedded language-ID set (gettext catalog languages)."""
    examples_per_label: int = 2000
    """Classification with no paths: training records per language of the embedded set (held out: 1/9 more)."""
    source_lang: str = "en"
    """Seq2seq: the source language of {"translation": {lang: text}} records (the embedded pairs: always en)."""
    target_lang: str = "fr"
    """Seq2seq: the target language of {"translation": ...} records and of the embedded gettext pairs."""
    task_prefix: Optional[str] = None
    """Seq2seq: text put before every source, e.g. "translate English to French: " (None: no prefix)."""
    max_source_len: Optional[int] = None
    """Seq2seq: source tokens (EOS included) kept; longer sources are truncated and counted. None = data.seq_len."""
    max_target_len: Optional[int] = None
    """Seq2seq: target tokens (EOS included) kept; longer targets are truncated and counted. None = data.seq_len."""
    max_pairs: Optional[int] = 20000
    """Seq2seq with no paths: training pairs taken from the embedded set (held out: 1/9 more); None = all."""
    locale_root: str = "/usr/share/locale"
    """Where the embedded sets read gettext catalogs; a directory with none gives the shipped samples."""
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

    def validate(self) -> None:
        _positive("finetune", self, "examples_per_label")
        for name in ("max_source_len", "max_target_len", "max_pairs"):
            if getattr(self, name) is not None and getattr(self, name) < (2 if name != "max_pairs" else 1):
                raise ConfigError(f"finetune.{name} must be null or >= {2 if name != 'max_pairs' else 1}, "
                                  f"got {getattr(self, name)}")
        if self.source_lang == self.target_lang:
            raise ConfigError(f"finetune.source_lang and finetune.target_lang are both {self.source_lang!r}")
        if self.multi_label and self.task != "classification":
            raise ConfigError("finetune.multi_label needs finetune.task=classification")
        if self.mix:
            if self.paths:
                raise ConfigError("finetune.paths and finetune.mix are both set: a mixture lists its sets in "
                                  "finetune.mix")
            if self.task != "causal_lm":
                raise ConfigError(f"finetune.mix mixes instruction sets (finetune.task=causal_lm); for "
                                  f"finetune.task={self.task} list the files in finetune.paths")
            mix_components(self.mix, "finetune.mix")


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
    classification_paths: list[str] = field(default_factory=list)
    """Labelled {text, label} records (JSONL, parquet, CSV) for classifiers; empty = the held-out split they trained
    beside."""
    pair_paths: list[str] = field(default_factory=list)
    """Source -> target records ({source, target}, {translation}, {text, summary}) for seq2seq models (BLEU, chrF,
    ROUGE); empty = the held-out pairs of the first one's training run."""
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

    def validate(self) -> None:
        _positive("eval", self, "batch_size", "num_workers", "max_new_tokens")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"eval.max_length must be >= 2 (or null for the model's context), got {self.max_length}")
        longest = self.max_length if self.max_length is not None else float("inf")
        if self.stride is not None and not 1 <= self.stride <= longest:
            raise ConfigError(f"eval.stride must be in [1, eval.max_length], got {self.stride}")
        if self.max_documents is not None and self.max_documents < 1:
            raise ConfigError(f"eval.max_documents must be >= 1 or null, got {self.max_documents}")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ConfigError(f"eval.cpus_per_worker must be > 0 or null, got {self.cpus_per_worker}")


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
    stream_interval_s: float = 0.1
    """Per model: a stream's chunks leave the replica at most this often, the tokens decoded meanwhile in one
    chunk (the first at once): fewer messages through ingress and proxy for at most this much added latency
    per chunk. 0 = each token as soon as it is decoded."""
    max_tokens_limit: int = 1024
    """Per model: cap on max_tokens; larger requests get 400."""
    default_max_tokens: int = 16
    """Per model: max_tokens of a completion request that sets none (OpenAI's default); chat fills the context
    up to max_tokens_limit."""
    engine: Literal["transformers", "vllm"] = "transformers"
    """Per model: generation engine; 'vllm' runs ray.serve.llm's vLLM deployment (GPU, vllm installed)."""
    lora: Literal["shared", "merge"] = "shared"
    """Per model: a LoRA adapter is served beside its base and the base's other adapters by one deployment that
    holds the base once, rows of different adapters decoding in one batch ('shared'), or merged into its own copy
    of the base in a deployment of its own ('merge': any peft adapter, the base's speed)."""
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
    embedding_pooling: Literal["mean", "last"] = "mean"
    """Per model: /v1/embeddings pools the last hidden states by their mean or takes the last token's."""

    def validate(self, where: str = "serve") -> None:
        """Check the per-model keys; `where` names them in errors (e.g. "serve (model 'tiny')")."""
        for key in ("max_ongoing_requests", "max_batch_size", "max_tokens_limit", "default_max_tokens",
                    "max_replicas"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}: {key} must be > 0, got {getattr(self, key)}")
        if self.min_replicas < 0 or self.min_replicas > self.max_replicas:
            raise ConfigError(f"{where}: need 0 <= min_replicas <= max_replicas, got {self.min_replicas} and "
                              f"{self.max_replicas}")
        if self.max_queued_requests == 0 or self.max_queued_requests < -1:
            raise ConfigError(f"{where}: max_queued_requests must be > 0 or -1 (unbounded), got "
                              f"{self.max_queued_requests}")
        if self.batch_wait_timeout_s < 0 or self.stream_interval_s < 0 or self.target_ongoing_requests <= 0:
            raise ConfigError(f"{where}: batch_wait_timeout_s and stream_interval_s must be >= 0 and "
                              "target_ongoing_requests > 0")
        if self.num_cpus <= 0:
            raise ConfigError(f"{where}: num_cpus must be > 0, got {self.num_cpus}")
        if self.quantize == "int8" and self.device == "cuda":
            raise ConfigError(f"{where}: quantize=int8 is CPU dynamic quantization; use device=cpu or quantize=none")
        for key in ("safety_input_patterns", "safety_output_patterns"):
            for pattern in getattr(self, key):
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ConfigError(f"{where}: {key} has an invalid regular expression {pattern!r}: {e}") from None


@dataclass
class ServeConfig(ServedModelOptions):
    models: list[str] = field(default_factory=list)
    """Models to serve: export directories, fsspec URIs, registry names or hub ids; 'name=SOURCE' sets the
    served name."""
    host: str = "127.0.0.1"
    """HTTP host."""
    port: int = 8000
    """HTTP port."""
    app_name: str = "llmos"
    """Ray Serve application name (`serve status`, `serve delete`)."""
    route_prefix: str = "/"
    """URL prefix of the HTTP API."""
    api_keys: list[Union[str, dict[str, Any]]] = field(default_factory=list)
    """Accepted API keys, also read from LLMOS_API_KEYS (comma separated) and api_keys_file; none at all = open.
    A key is a string or a record {name, key | sha256, tenant, models, apps, rpm, tpm, budget_tokens,
    budget_period, admin} (see llmos_ray.serve.keys)."""
    api_keys_file: Optional[str] = None
    """File of API keys: YAML/JSON records (`keys: [...]`) or one key per line (blank lines and # comments ignored)."""
    metering: bool = True
    """Record every request in the usage ledger and enforce the keys' limits (rpm, tpm, budgets)."""
    usage_db: Optional[str] = None
    """The usage ledger's SQLAlchemy URL (e.g. postgresql://...); None = sqlite usage.db beside the model library."""
    max_request_bytes: int = 1_000_000
    """Largest accepted request body in bytes; larger requests get 413."""
    retry_after_s: int = 1
    """Seconds a client is told to wait (Retry-After) when a model is over capacity (503)."""
    ingress_max_ongoing_requests: int = 1000
    """Requests one HTTP ingress replica handles at once before the proxy answers 503."""
    ingress_replicas: int = 1
    """HTTP ingress replicas (they share one usage meter: limits hold across them)."""
    model_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-model overrides of the 'Per model' keys by served name, e.g. {tiny: {max_replicas: 4, quantize: int8}}."""
    apps_refresh_s: float = 2.0
    """How often (seconds, at most) a running server re-checks the model library for new or changed apps."""

    def validate(self, where: str = "serve") -> None:
        for key in ("port", "max_request_bytes", "ingress_max_ongoing_requests", "ingress_replicas"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"serve.{key} must be > 0, got {getattr(self, key)}")
        if self.retry_after_s < 0 or self.apps_refresh_s < 0:
            raise ConfigError(f"serve.retry_after_s and serve.apps_refresh_s must be >= 0, got {self.retry_after_s} "
                              f"and {self.apps_refresh_s}")
        if not self.route_prefix.startswith("/"):
            raise ConfigError(f"serve.route_prefix must start with '/', got {self.route_prefix!r}")
        super().validate(where)


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

    def flat(self) -> dict[str, Any]:
        """{'train.lr': 0.001, …}: every key of `all_keys()` with its value (dict-valued settings whole)."""
        values = self.to_dict()
        out: dict[str, Any] = {}
        for key in all_keys():
            node: Any = values
            for part in key.split("."):
                node = node[part]
            out[key] = node
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> "Config":
        """Check every section (each knows its own rules); returns self."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        return self

    def resolved(self, job: str = "pretrain") -> "Config":
        """A copy with what depends on the job filled in — run name (DEFAULT_RUN_NAMES), output_dir,
        storage_path, local model paths made absolute — and checked."""
        cfg = copy.deepcopy(self)
        if cfg.model.family is None:
            task = cfg.finetune.task if job == "finetune" else None
            cfg.model.family = {"classification": "bert", "seq2seq": "t5"}.get(task, "gpt2")
        if cfg.run.name is None:
            # a fine-tuning task other than causal_lm runs in its own directory (runs/classification)
            task = cfg.finetune.task if job == "finetune" and cfg.finetune.task != "causal_lm" else None
            cfg.run.name = task or DEFAULT_RUN_NAMES.get(job, job)
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
        return cfg.validate()


def _abs_if_local(path: Optional[str]) -> Optional[str]:
    if path and "://" not in path and os.path.exists(os.path.expanduser(path)):
        return os.path.abspath(os.path.expanduser(path))
    return path


DEFAULT_RUN_NAMES = {"pretrain": "default", "prepare": "default"}
"""Run names when run.name is not set: `llmos pretrain` and `llmos data prepare` share runs/default;
other commands use their own name (runs/finetune, runs/evaluate, …), so they never mix."""


# ---------------------------------------------------------------------------------------------
# Loading: YAML + overrides -> raw dict -> typed dataclasses (llmos_ray.schema) -> validated.


def load_config(path: Optional[str] = None, overrides: Union[list[str], tuple[str, ...], dict, None] = None
                ) -> Config:
    """Read `path` (YAML; optional), apply `overrides` ("a.b=value" strings or {"a.b": value}),
    type-check and validate everything. The result is not yet resolved for a job: `pretrain()`,
    `finetune()` … call `cfg.resolved(job)` themselves (see the module doc)."""
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
    for key, value in schema.parse_overrides(overrides):
        schema.set_dotted(raw, key, value)
    return from_dict(raw).validate()


KEY_SYNONYMS = {
    "learning_rate": "lr", "lr_rate": "lr", "max_lr": "lr", "batch_size": "micro_batch_size",
    "per_device_train_batch_size": "micro_batch_size", "steps": "max_steps", "num_steps": "max_steps",
    "max_train_steps": "max_steps", "epochs": "max_steps", "num_train_epochs": "max_steps", "max_seq_len": "seq_len",
    "max_seq_length": "seq_len", "seq_length": "seq_len", "block_size": "seq_len", "context_length": "seq_len",
    "max_length": "seq_len", "workers": "num_workers", "world_size": "num_workers", "zero": "zero_stage",
    "stage": "zero_stage", "warmup": "warmup_steps", "num_warmup_steps": "warmup_steps", "max_grad_norm": "grad_clip",
    "gradient_clipping": "grad_clip", "clip_grad": "grad_clip", "bf16": "precision", "fp16": "precision",
    "mixed_precision": "precision", "gradient_checkpointing": "activation_checkpointing",
    "output": "output_dir", "out_dir": "output_dir", "resume_from_checkpoint": "resume",
    "model_name_or_path": "base", "pretrained": "base", "dataset": "paths", "data_files": "paths",
    "train_files": "paths", "lora_rank": "lora_r", "rank": "lora_r",
}
"""Names users bring from other trainers (HF Trainer, DeepSpeed, nanoGPT), for "did you mean"."""


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from nested plain data, rejecting unknown keys and wrong types."""
    return schema.build(Config, raw, synonyms=KEY_SYNONYMS)


def all_keys() -> list[str]:
    """Every dotted leaf key of the config, e.g. 'train.lr'."""
    return schema.all_keys(Config)


def field_docs() -> dict[str, str]:
    """{'train.lr': 'Peak learning rate (AdamW).', ...}: every key's one-line docstring."""
    return schema.field_docs(Config)


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML (any fsspec URI), atomically for local paths."""
    write_text(path, cfg.to_yaml())
