"""Embeddings' maths without Ray: one left-padded batch equals each input's own forward pass."""

from __future__ import annotations

import pytest

from llmos_ray.serve.embeddings import embed
from tests.serve.reference import load


def reference(model, ids: list[int], pooling: str):
    """The unit-length pooled last hidden state of one unpadded forward pass."""
    import torch

    with torch.no_grad():
        hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    pooled = hidden.mean(0) if pooling == "mean" else hidden[-1]
    return pooled / pooled.norm()


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_a_padded_batch_equals_each_inputs_own_forward_pass(tiny_model_dir, pooling):
    model, tok = load(tiny_model_dir)
    inputs = [tok.encode(t) for t in ("def main():\n    return 1", "x", "The quick brown fox")]
    got = embed(model, inputs, pooling, tok.pad_token_id)
    assert got.shape == (3, model.config.hidden_size)
    for row, ids in zip(got, inputs):
        assert (row - reference(model, ids, pooling)).abs().max().item() < 1e-5  # float32 rounding only
        assert abs(row.norm().item() - 1) < 1e-5
    mean, last = (embed(model, inputs[:1], p, tok.pad_token_id) for p in ("mean", "last"))
    assert (mean - last).abs().max().item() > 1e-2  # the option changes the vector
