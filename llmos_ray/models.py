"""Model presets (one table), Hugging Face loading, parameter counts and FLOPs per token.

Decoder families (gpt2, llama) have every size from `tiny` (tests, < 1M parameters) to `7b`; the
shapes of the large ones follow the public models they are named after (GPT-2, Llama 3.2 1B,
Llama 2 7B). The encoder family `bert` (masked LM) and the encoder-decoder family `t5` (span
corruption) go from `tiny` to `base`, the shapes of BERT-base and T5 v1.1-base; their `medium` is
BERT-medium (Turc et al. 2019) and T5 v1.1-small (named `medium` because our `small` is the CPU size).

T5 presets are v1.1 in their feed-forward (gated GELU, d_ff 2048 at base), dropout off for
pretraining (as v1.1), relative position buckets (32, max distance 128), and a head that shares
the input embedding: transformers >= 5 always ties T5's head in a model built from a config (its
T5Config forces tie_word_embeddings=True, PR #42815) and resize_token_embeddings re-ties one
untied by hand, so an untied v1.1 head cannot be kept; the tied head scales the decoder output by
d_model**-0.5 (T5 1.0's rule for a tied head). T5 v1.1-base's published 247.6M parameters include
its separate 24.7M head; our t5 base has 223M.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from llmos_ray.errors import ModelError


@dataclass(frozen=True)
class Shape:
    n_layer: int
    """Transformer blocks."""
    d_model: int
    """Hidden size."""
    n_head: int
    """Attention heads."""
    context: int
    """Maximum positions the preset is built for (raised to seq_len when that is longer)."""
    n_kv_head: Optional[int] = None
    """Key/value heads (grouped-query attention, llama); None = n_head."""
    d_ff: Optional[int] = None
    """MLP hidden size; None = 4 * d_model (gpt2) or the llama rule (8/3 d rounded to 64)."""
    head_dim: Optional[int] = None
    """Size of one attention head (t5's d_kv); None = d_model / n_head."""


PRESETS: dict[str, dict[str, Shape]] = {
    "gpt2": {
        "tiny": Shape(2, 64, 2, 512),
        "small": Shape(4, 256, 4, 1024),
        "125m": Shape(12, 768, 12, 1024),
        "350m": Shape(24, 1024, 16, 1024),
        "1b": Shape(24, 2048, 16, 2048),
        "7b": Shape(32, 4096, 32, 2048),
    },
    "llama": {
        "tiny": Shape(2, 64, 2, 512, n_kv_head=1),
        "small": Shape(4, 256, 4, 1024, n_kv_head=2),
        "125m": Shape(12, 768, 12, 2048, n_kv_head=4),
        "350m": Shape(24, 1024, 16, 2048, n_kv_head=8),
        "1b": Shape(16, 2048, 32, 4096, n_kv_head=8, d_ff=8192),
        "7b": Shape(32, 4096, 32, 4096, d_ff=11008),
    },
    "bert": {
        "tiny": Shape(2, 64, 2, 512, d_ff=256),
        "small": Shape(4, 256, 4, 512, d_ff=1024),
        "medium": Shape(8, 512, 8, 512, d_ff=2048),
        "base": Shape(12, 768, 12, 512, d_ff=3072),
    },
    "t5": {  # n_layer blocks in the encoder and as many in the decoder
        "tiny": Shape(2, 64, 2, 512, d_ff=192, head_dim=32),
        "small": Shape(4, 256, 4, 512, d_ff=704, head_dim=64),
        "medium": Shape(8, 512, 6, 512, d_ff=1024, head_dim=64),
        "base": Shape(12, 768, 12, 512, d_ff=2048, head_dim=64),
    },
}
OBJECTIVES = {"gpt2": "causal_lm", "llama": "causal_lm", "bert": "masked_lm", "t5": "span_corruption"}
"""The pretraining objective of each family (what `pretraining_model_class` builds)."""


def _llama_ff(d_model: int) -> int:
    return 64 * ((8 * d_model // 3 + 63) // 64)


def preset_config(family: str, size: str, vocab_size: int, seq_len: int, bos_id: int = 0,
                  eos_id: int = 0, pad_id: Optional[int] = None, overrides: Optional[dict] = None):
    """The transformers config of a preset, sized for `vocab_size` and at least `seq_len` positions."""
    from transformers import BertConfig, GPT2Config, LlamaConfig, T5Config

    if family not in PRESETS:
        raise ModelError(f"model.family {family!r} is unknown; choose one of {sorted(PRESETS)}")
    if size not in PRESETS[family]:
        raise ModelError(f"model.size {size!r} is unknown; choose one of {list(PRESETS[family])}")
    s = PRESETS[family][size]
    positions = max(s.context, seq_len)
    special = dict(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    if family == "gpt2":
        # No dropout: the norm for pretraining (nanoGPT, Llama); fine-tuning can set it through model.overrides.
        config = GPT2Config(vocab_size=vocab_size, n_positions=positions, n_embd=s.d_model, n_layer=s.n_layer,
                            n_head=s.n_head, n_inner=s.d_ff, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            **special)
    elif family == "bert":
        config = BertConfig(vocab_size=vocab_size, hidden_size=s.d_model, num_hidden_layers=s.n_layer,
                            num_attention_heads=s.n_head, intermediate_size=s.d_ff, max_position_embeddings=positions,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **special)
    elif family == "t5":
        # n_positions is not a T5 weight (positions are relative): it tells context_length() what the preset is for.
        config = T5Config(vocab_size=vocab_size, d_model=s.d_model, d_kv=s.head_dim, d_ff=s.d_ff,
                          num_layers=s.n_layer, num_decoder_layers=s.n_layer, num_heads=s.n_head,
                          relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
                          feed_forward_proj="gated-gelu", n_positions=positions,
                          decoder_start_token_id=pad_id if pad_id is not None else bos_id, **special)
    else:
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=s.d_model, num_hidden_layers=s.n_layer,
                             num_attention_heads=s.n_head, num_key_value_heads=s.n_kv_head or s.n_head,
                             intermediate_size=s.d_ff or _llama_ff(s.d_model), max_position_embeddings=positions,
                             tie_word_embeddings=size in ("tiny", "small", "125m", "350m", "1b"), **special)
    for key, value in (overrides or {}).items():
        if not hasattr(config, key):
            raise ModelError(f"model.overrides: {type(config).__name__} has no attribute {key!r}")
        setattr(config, key, value)
    return config


def pretraining_model_class(family: str):
    """The transformers Auto class that builds a family's pretraining model (also takes a config's
    model_type): AutoModelForCausalLM, AutoModelForMaskedLM (bert) or AutoModelForSeq2SeqLM (t5)."""
    import transformers

    objective = OBJECTIVES.get(family)
    if objective is None:
        raise ModelError(f"model.family {family!r} is unknown; choose one of {sorted(OBJECTIVES)}")
    name = {"causal_lm": "AutoModelForCausalLM", "masked_lm": "AutoModelForMaskedLM",
            "span_corruption": "AutoModelForSeq2SeqLM"}[objective]
    return getattr(transformers, name)


TASK_CLASSES = {"causal_lm": "AutoModelForCausalLM", "masked_lm": "AutoModelForMaskedLM",
                "classification": "AutoModelForSequenceClassification", "seq2seq": "AutoModelForSeq2SeqLM"}
"""The transformers Auto class of each kind of model (what `model_task` tells from a config)."""


def model_task(config) -> str:
    """What a model does, from its transformers config's `architectures` (written by save_pretrained,
    and by our trainer into every checkpoint): 'classification' (…ForSequenceClassification),
    'masked_lm' (…ForMaskedLM), 'seq2seq' (…ForConditionalGeneration of an encoder-decoder) or
    'causal_lm' (everything else, and configs that name no architecture). `config` may also be
    the dict of a config.json."""
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    for name in get("architectures") or []:
        if name.endswith("ForSequenceClassification"):
            return "classification"
        if name.endswith("ForMaskedLM"):
            return "masked_lm"
        if name.endswith(("ForConditionalGeneration", "ForSeq2SeqLM")) and get("is_encoder_decoder", False):
            return "seq2seq"
    return "causal_lm"


def auto_class(task: str):
    """The transformers Auto class that builds or loads a model of `task` (TASK_CLASSES)."""
    import transformers

    if task not in TASK_CLASSES:
        raise ModelError(f"unknown model task {task!r}; expected one of {sorted(TASK_CLASSES)}")
    return getattr(transformers, TASK_CLASSES[task])


def is_local_model(path: str) -> bool:
    return os.path.isfile(os.path.join(os.path.expanduser(path), "config.json"))


def load_pretrained(name_or_path: str, trust_remote_code: bool = False, task: Optional[str] = None, **kwargs):
    """Load a model from a local Hugging Face directory (our export included) or a hub id, with the
    Auto class of `task` (default: what its config's architectures say, `model_task`: a causal LM,
    a sequence classifier, a masked LM ...)."""
    from transformers import AutoConfig

    local = is_local_model(name_or_path)
    if not local and (os.path.sep in name_or_path.strip("/") and os.path.exists(os.path.dirname(name_or_path))):
        raise ModelError(f"model directory {name_or_path!r} has no config.json: is it a Hugging Face export?")
    where = os.path.expanduser(name_or_path) if local else name_or_path
    try:
        if task is None:
            task = model_task(AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code))
        return auto_class(task).from_pretrained(where, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as e:
        raise ModelError(
            f"cannot load model {name_or_path!r}: not a local Hugging Face directory and not reachable on the "
            f"hub ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None


CONTEXT_KEYS = ("n_positions", "max_position_embeddings", "max_sequence_length", "seq_length")


def context_length(config, tokenizer=None) -> int:
    """Positions a model attends over: its config's position table (n_positions,
    max_position_embeddings, …), else the tokenizer's model_max_length when it names a real one.
    ModelError when neither says (set eval.max_length, or a model config that names it)."""
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    raise ModelError(f"cannot tell the context length of a {getattr(config, 'model_type', 'model')!r} model: its "
                     f"config has none of {', '.join(CONTEXT_KEYS)}; set eval.max_length or add one to config.json")


def eos_token_ids(model, tokenizer) -> frozenset[int]:
    """Every token that ends generation: the model's generation config and config eos ids (an int or
    a list, e.g. a chat model's turn end) and the tokenizer's eos token."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


# ---------------------------------------------------------------------------------------------
# Sizes and FLOPs


def _dims(config) -> dict:
    """Family-independent shape of a transformers config."""
    get = lambda *names: next(getattr(config, n) for n in names if getattr(config, n, None) is not None)  # noqa: E731
    d = get("hidden_size", "n_embd")
    heads = get("num_attention_heads", "n_head")
    return dict(
        d=d, L=get("num_hidden_layers", "n_layer"), V=config.vocab_size, heads=heads,
        kv=getattr(config, "num_key_value_heads", None) or heads,
        ff=getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d,
        P=getattr(config, "n_positions", 0) if config.model_type == "gpt2" else 0,
        tied=bool(getattr(config, "tie_word_embeddings", True)),
    )


def param_counts(config) -> dict[str, int]:
    """{'total', 'embedding', 'non_embedding'} parameters of the family's pretraining model
    (`pretraining_model_class`: …ForCausalLM, BertForMaskedLM, T5ForConditionalGeneration) of a
    gpt2, llama, bert or t5 config, computed from its shape (no model is built, so this works for
    7B on a laptop). 'embedding' is the lookup tables (tokens, positions, token types)."""
    if config.model_type == "bert":
        return _bert_counts(config)
    if config.model_type == "t5":
        return _t5_counts(config)["counts"]
    x = _dims(config)
    d, L, V, ff = x["d"], x["L"], x["V"], x["ff"]
    if config.model_type == "gpt2":
        block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * ff + ff) + (ff * d + d)
        embedding = V * d + x["P"] * d
        total = embedding + L * block + 2 * d
        lm_head = 0 if x["tied"] else V * d
    elif config.model_type == "llama":
        kv_dim = d // x["heads"] * x["kv"]
        block = 2 * d * d + 2 * d * kv_dim + 3 * d * ff + 2 * d
        embedding = V * d
        lm_head = 0 if x["tied"] else V * d
        total = embedding + L * block + d
    else:
        raise ModelError(f"param_counts knows gpt2 and llama, not {config.model_type!r}; use count_parameters(model)")
    total += lm_head
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def _bert_counts(config) -> dict[str, int]:
    d, ff, V = config.hidden_size, config.intermediate_size, config.vocab_size
    tables = (V + config.max_position_embeddings + config.type_vocab_size) * d
    layer = 4 * (d * d + d) + 2 * d + (d * ff + ff) + (ff * d + d) + 2 * d  # q k v o, LN, FFN in/out, LN
    head = (d * d + d) + 2 * d + V + (0 if config.tie_word_embeddings else V * d)  # transform, LN, bias, decoder
    total = tables + 2 * d + config.num_hidden_layers * layer + head
    return {"total": total, "embedding": tables, "non_embedding": total - tables}


def _t5_counts(config) -> dict:
    """T5ForConditionalGeneration's parameters, and the parts FLOPs need: the weights applied per
    input token (encoder stack, and the decoder's cross-attention keys/values of the encoder
    output) and per target token (the rest of the decoder, and the head)."""
    d, V, inner = config.d_model, config.vocab_size, config.num_heads * config.d_kv
    attn = 4 * d * inner  # q k v o, no biases
    ff = (3 if config.is_gated_act else 2) * d * config.d_ff
    rel = config.relative_attention_num_buckets * config.num_heads  # block 0 of each stack
    encoder = config.num_layers * (attn + ff + 2 * d) + d + rel
    decoder = config.num_decoder_layers * (2 * attn + ff + 3 * d) + d + rel
    head = 0 if config.tie_word_embeddings else V * d
    total = V * d + encoder + decoder + head
    cross_kv = config.num_decoder_layers * 2 * d * inner
    return {"counts": {"total": total, "embedding": V * d, "non_embedding": total - V * d},
            "per_input": encoder - rel + cross_kv, "per_target": decoder - rel - cross_kv + V * d, "inner": inner}


def count_parameters(model) -> int:
    """Unique parameters of an instantiated model (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def flops_per_token(config, seq_len: int, target_len: Optional[int] = None) -> float:
    """Training FLOPs per token, forward + backward: 6N + 12·L·d·T (PaLM appendix B, nanoGPT's
    estimate_mfu), where N counts the weights used in matmuls: all parameters except the lookup
    tables (positions, bert's token types; the token embedding too when a separate head does the
    output matmul). Decoder-only and encoder-only (bert, whose attention also spans all T) alike.

    Encoder-decoder (t5), with T_in = seq_len encoder tokens and T_out = target_len decoder tokens
    (default seq_len), per token of T_in + T_out:
        [6·(N_in·T_in + N_out·T_out) + 12·a·(L_enc·T_in² + L_dec·(T_out² + T_out·T_in))] / (T_in + T_out)
    N_in: encoder weights and the decoder's cross-attention key/value projections (applied to the
    encoder's output); N_out: the rest of the decoder and the head (V·d, tied or not); a: the
    attention width heads·d_kv; the three attention terms are encoder self-, decoder self- and
    cross-attention. A trainer multiplies it by (input + target) tokens per second."""
    if config.model_type == "t5":
        t = _t5_counts(config)
        t_in, t_out = seq_len, seq_len if target_len is None else target_len
        L_enc, L_dec = config.num_layers, config.num_decoder_layers  # noqa: N806
        attention = 12 * t["inner"] * (L_enc * t_in**2 + L_dec * (t_out**2 + t_out * t_in))
        return (6 * (t["per_input"] * t_in + t["per_target"] * t_out) + attention) / (t_in + t_out)
    if config.model_type == "bert":
        d = config.hidden_size
        n = param_counts(config)["total"] - (config.max_position_embeddings + config.type_vocab_size) * d
        if not config.tie_word_embeddings:
            n -= config.vocab_size * d
        return 6 * n + 12 * config.num_hidden_layers * d * seq_len
    x = _dims(config)
    n = param_counts(config)["total"] - x["P"] * x["d"] - (0 if x["tied"] else x["V"] * x["d"])
    return 6 * n + 12 * x["L"] * x["d"] * seq_len


# Peak dense bf16/fp16 tensor FLOP/s by GPU name fragment (vendor datasheets, without sparsity).
GPU_PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "A10G": 125e12, "A10": 125e12,
    "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A6000": 155e12, "V100": 125e12, "T4": 65e12,
    "4090": 165e12, "3090": 71e12, "MI300X": 1307e12, "MI250X": 383e12,
}


def gpu_peak_flops(device_name: str) -> Optional[float]:
    """Datasheet peak for a GPU name as torch reports it, or None when unknown."""
    for key in sorted(GPU_PEAK_FLOPS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return GPU_PEAK_FLOPS[key]
    return None


def measure_cpu_peak_flops(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of this process's torch threads on a dense fp32 matmul: the CPU's practical peak."""
    import time

    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def mfu(flops_per_tok: float, tokens_per_s: float, peak_flops_total: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices used."""
    return flops_per_tok * tokens_per_s / peak_flops_total if peak_flops_total > 0 else 0.0


def zero_memory_per_device(n_params: int, stage: int, world: int, precision: str = "bf16") -> dict[str, float]:
    """Bytes per device for parameters, fp32 master weights, gradients and Adam moments under ZeRO
    (Rajbhandari et al.). Mixed precision (bf16/fp16): 2Ψ weights + 2Ψ gradients + 4Ψ fp32 master
    + 8Ψ moments = 16Ψ; fp32: 4Ψ + 4Ψ + 8Ψ (the weights are their own master) = 16Ψ too, split
    differently. ZeRO-1 partitions master and moments, ZeRO-2 also gradients, ZeRO-3 also weights."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise ModelError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    low = 4.0 if precision == "fp32" else 2.0
    p, g = low * n_params, low * n_params
    m, o = (0.0 if precision == "fp32" else 4.0 * n_params), 8.0 * n_params
    if stage >= 1:
        m, o = m / world, o / world
    if stage >= 2:
        g /= world
    if stage >= 3:
        p /= world
    return {"params": p, "master": m, "grads": g, "optimizer": o, "total": p + m + g + o}
