"""Fixtures for the evaluation tests: the tiny model loaded in-process, a second tiny model with
other weights (to compare side by side), and texts longer than the tiny model's context."""

from __future__ import annotations

import pytest

from tests.conftest import stdlib_texts


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """(model, tokenizer) of `tiny_model_dir` (gpt2-tiny, 512 positions), in eval mode on CPU."""
    from llmos_ray.data.tokenizer import load_tokenizer
    from llmos_ray.models import load_pretrained

    return load_pretrained(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def second_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The same architecture and tokenizer as `tiny_model_dir`, other random weights (seed 1)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmos_ray.data.tokenizer import load_tokenizer

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    out = str(tmp_path_factory.mktemp("model") / "tiny-b")
    model.save_pretrained(out)
    load_tokenizer(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def long_text() -> str:
    """Python source of well over 512 tokens (the tiny model's context) with the tiny tokenizer."""
    return "\n\n".join(stdlib_texts(12))[:6000]
