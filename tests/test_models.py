"""Presets, parameter counts and FLOPs against instantiated models and hand-computed values."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmos_ray.errors import ModelError
from llmos_ray.models import (
    OBJECTIVES,
    PRESETS,
    context_length,
    count_parameters,
    flops_per_token,
    gpu_peak_flops,
    load_pretrained,
    mfu,
    param_counts,
    preset_config,
    pretraining_model_class,
    zero_memory_per_device,
)

DECODERS = sorted(f for f in PRESETS if OBJECTIVES[f] == "causal_lm")
ENCODERS = sorted(f for f in PRESETS if OBJECTIVES[f] != "causal_lm")


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("size", ["tiny", "small", "125m", "350m", "1b", "7b"])
def test_param_count_matches_instantiated_model(family, size):
    cfg = preset_config(family, size, vocab_size=512 if size == "tiny" else 32000, seq_len=128)
    with torch.device("meta"):  # shapes only: a 7B model costs no memory here
        model = AutoModelForCausalLM.from_config(cfg)
    assert param_counts(cfg)["total"] == count_parameters(model)


def test_tiny_is_under_a_million_and_sizes_grow():
    for family in DECODERS:
        counts = [param_counts(preset_config(family, s, 8192, 256))["total"] for s in PRESETS[family]]
        assert counts == sorted(counts)
        assert counts[0] < 1_000_000
        assert 5e9 < counts[-1] < 8e9  # "7b"


def test_flops_per_token_by_hand():
    # gpt2: d=64, L=2, V=512, P=512 positions, tied head. N = total - wpe.
    cfg = preset_config("gpt2", "tiny", vocab_size=512, seq_len=128)
    d, L, V = 64, 2, 512
    block = 12 * d * d + 13 * d
    total = V * d + 512 * d + L * block + 2 * d
    assert param_counts(cfg)["total"] == total
    assert flops_per_token(cfg, 128) == 6 * (total - 512 * d) + 12 * L * d * 128


def test_mfu_and_gpu_peak():
    assert mfu(1e9, 1000.0, 4e12) == pytest.approx(0.25)
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_peak_flops("NVIDIA A10G") == 125e12  # not mistaken for A100
    assert gpu_peak_flops("Mystery GPU") is None


def test_zero_memory_formulas():
    psi, n = 1_000_000, 4
    assert zero_memory_per_device(psi, 0, n)["total"] == 16 * psi
    assert zero_memory_per_device(psi, 1, n)["total"] == 4 * psi + 12 * psi / n
    assert zero_memory_per_device(psi, 2, n)["total"] == 2 * psi + 14 * psi / n
    assert zero_memory_per_device(psi, 3, n)["total"] == 16 * psi / n


def test_bad_preset_and_missing_model_dir(tmp_path):
    with pytest.raises(ModelError, match="model.size 'huge' is unknown"):
        preset_config("gpt2", "huge", 100, 16)
    with pytest.raises(ModelError, match="model.overrides"):
        preset_config("gpt2", "tiny", 100, 16, overrides={"not_a_field": 1})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError):
        load_pretrained(str(tmp_path / "empty"))


def test_load_pretrained_local_dir(tiny_model_dir):
    model = load_pretrained(tiny_model_dir)
    assert model.config.model_type == "gpt2"


# ---------------------------------------------------------------------------------------------
# Encoder (bert) and encoder-decoder (t5) families


def test_encoder_families_have_tiny_to_base():
    assert ENCODERS == ["bert", "t5"]
    for family in ENCODERS:
        assert list(PRESETS[family]) == ["tiny", "small", "medium", "base"]
        counts = [param_counts(preset_config(family, s, 8192, 256))["total"] for s in PRESETS[family]]
        assert counts == sorted(counts) and counts[0] < 1_000_000


@pytest.mark.parametrize("family", ENCODERS)
@pytest.mark.parametrize("size", ["tiny", "small"])
def test_encoder_param_count_matches_a_built_model(family, size):
    cfg = preset_config(family, size, vocab_size=512 if size == "tiny" else 8192, seq_len=128, pad_id=1, eos_id=0)
    model = pretraining_model_class(family).from_config(cfg)  # real weights on the CPU
    assert type(model).__name__ == {"bert": "BertForMaskedLM", "t5": "T5ForConditionalGeneration"}[family]
    assert param_counts(cfg)["total"] == count_parameters(model)


@pytest.mark.parametrize("family, vocab", [("bert", 30522), ("t5", 32128)])  # BERT's and T5's vocabularies
def test_every_encoder_preset_matches_transformers_own_count(family, vocab):
    for size in PRESETS[family]:
        cfg = preset_config(family, size, vocab_size=vocab, seq_len=512, pad_id=0, eos_id=1)
        with torch.device("meta"):  # shapes only
            model = pretraining_model_class(family).from_config(cfg)
        assert param_counts(cfg)["total"] == model.num_parameters(), size
    # the published sizes of the shapes at the top: BERT-base "110M" (Devlin et al.), T5 v1.1-base
    # 248M with its separate head (ours ties it: see llmos_ray/models.py)
    if family == "bert":
        assert abs(param_counts(cfg)["total"] / 110e6 - 1) < 0.01
    else:
        assert abs((param_counts(cfg)["total"] + vocab * 768) / 248e6 - 1) < 0.01


def test_encoder_presets_have_the_documented_architecture():
    bert = preset_config("bert", "base", 30522, 128, pad_id=0)
    assert (bert.num_hidden_layers, bert.hidden_size, bert.num_attention_heads, bert.intermediate_size,
            bert.max_position_embeddings, bert.hidden_dropout_prob) == (12, 768, 12, 3072, 512, 0.0)
    t5 = preset_config("t5", "base", 32128, 1024, pad_id=0, eos_id=1)
    assert (t5.num_layers, t5.num_decoder_layers, t5.d_model, t5.d_ff, t5.num_heads, t5.d_kv) == \
        (12, 12, 768, 2048, 12, 64)
    assert (t5.feed_forward_proj, t5.is_gated_act, t5.relative_attention_num_buckets,
            t5.relative_attention_max_distance, t5.dropout_rate) == ("gated-gelu", True, 32, 128, 0.0)
    assert t5.decoder_start_token_id == 0 and t5.scale_decoder_outputs  # tied head scaled by d**-0.5
    assert context_length(t5) == 1024 and context_length(preset_config("bert", "tiny", 100, 2048)) == 2048
    with torch.device("meta"):
        model = pretraining_model_class("t5").from_config(preset_config("t5", "tiny", 512, 64))
    assert model.lm_head.weight is model.shared.weight


@pytest.mark.parametrize("family, seq_len, target_len", [("bert", 128, None), ("t5", 128, 32)])
def test_encoder_flops_match_torch_flop_counter(family, seq_len, target_len):
    # torch counts every matmul of one forward + backward: our formula must agree (it also counts
    # biases and norms as 6 FLOPs per parameter: 1.5% of bert-tiny, 0.1% at base size)
    from torch.utils.flop_counter import FlopCounterMode

    cfg = preset_config(family, "tiny", vocab_size=8192, seq_len=seq_len, pad_id=0, eos_id=1)
    cfg._attn_implementation = "eager"
    with torch.device("meta"):
        model = pretraining_model_class(family).from_config(cfg)
        ids = torch.randint(0, 8192, (1, seq_len))
        labels = ids if target_len is None else torch.randint(0, 8192, (1, target_len))
        with FlopCounterMode(display=False) as counter:
            model(input_ids=ids, labels=labels).loss.backward()
    tokens = seq_len + (target_len or 0)
    assert flops_per_token(cfg, seq_len, target_len) * tokens == pytest.approx(counter.get_total_flops(), rel=0.02)


def test_pretraining_model_class():
    names = {f: pretraining_model_class(f).__name__ for f in PRESETS}
    assert names == {"gpt2": "AutoModelForCausalLM", "llama": "AutoModelForCausalLM",
                     "bert": "AutoModelForMaskedLM", "t5": "AutoModelForSeq2SeqLM"}
    with pytest.raises(ModelError, match="model.family 'rnn' is unknown"):
        pretraining_model_class("rnn")
