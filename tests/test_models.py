"""Presets, parameter counts and FLOPs against instantiated models and hand-computed values."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmos_ray.errors import ModelError
from llmos_ray.models import (
    PRESETS,
    count_parameters,
    flops_per_token,
    gpu_peak_flops,
    load_pretrained,
    mfu,
    param_counts,
    preset_config,
    zero_memory_per_device,
)


@pytest.mark.parametrize("family", sorted(PRESETS))
@pytest.mark.parametrize("size", ["tiny", "small", "125m", "350m", "1b", "7b"])
def test_param_count_matches_instantiated_model(family, size):
    cfg = preset_config(family, size, vocab_size=512 if size == "tiny" else 32000, seq_len=128)
    with torch.device("meta"):  # shapes only: a 7B model costs no memory here
        model = AutoModelForCausalLM.from_config(cfg)
    assert param_counts(cfg)["total"] == count_parameters(model)


def test_tiny_is_under_a_million_and_sizes_grow():
    for family in PRESETS:
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
