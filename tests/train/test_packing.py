"""data.packing=reset: packed rows whose segments (documents, fine-tuning examples) each get exactly
the per-token loss they get alone, through the task the loop uses (no Ray: plain tiny models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmos_ray.data.sft import pack_examples
from llmos_ray.models import preset_config
from llmos_ray.train.packing import boundary_batch, model_inputs, positions, segments_from_eos
from llmos_ray.train.tasks import CausalLM

EOS, VOCAB = 1, 96


def tiny(family):
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(preset_config(family, "tiny", VOCAB, 64, eos_id=EOS)).eval()


def per_token_nll(model, task, micro):
    batch = task.batch(micro, "cpu")
    with torch.no_grad():
        logits = model(**model_inputs(model, batch)).logits.float()
    flat = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["targets"].reshape(-1),
                                             reduction="none", ignore_index=-100)
    return flat.reshape(batch["targets"].shape), batch["targets"]


def test_segments_and_positions_restart_after_each_eos():
    tokens = np.array([[5, 6, EOS, 7, EOS, EOS, 8, 9]])
    seg = segments_from_eos(tokens, EOS)
    assert seg.tolist() == [[1, 1, 1, 2, 2, 3, 4, 4]]  # each EOS ends (belongs to) its document
    assert positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    targets = boundary_batch(tokens, "cpu", EOS)["targets"].tolist()
    assert targets == [[6, EOS, -100, EOS, -100, -100, 9]]  # nothing predicted across a boundary


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_packed_row_gives_each_document_its_loss_alone(family):
    model = tiny(family)
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(2, VOCAB, n)) + [EOS] for n in (9, 4, 13, 6)]
    row = np.array([sum(docs, [])], dtype=np.int64)  # 36 tokens: 4 whole documents
    packed, targets = per_token_nll(model, CausalLM(reset_at=EOS), row)
    at, checked = 0, 0
    for doc in docs:
        alone, _ = per_token_nll(model, CausalLM(), np.array([doc]))  # one document: plain causal attention
        n = len(doc) - 1
        torch.testing.assert_close(packed[0, at:at + n], alone[0], atol=1e-5, rtol=0)
        assert at + n == row.shape[1] - 1 or targets[0, at + n].item() == -100  # EOS -> next document: no target
        at, checked = at + len(doc), checked + n
    assert checked == int((targets != -100).sum())
    concat, _ = per_token_nll(model, CausalLM(), row)  # without boundaries the later documents see the earlier
    assert (concat[0, len(docs[0]):] - packed[0, len(docs[0]):]).abs().max() > 1e-3


def test_packed_fine_tuning_examples_keep_their_masks_and_losses():
    model = tiny("gpt2")
    rng = np.random.default_rng(1)
    width, lengths = 24, [10, 7, 20, 5, 3, 12]
    tokens = np.zeros((len(lengths), width), np.int32)
    mask = np.zeros_like(tokens)
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.integers(2, VOCAB, n)
        mask[i, n // 2:n] = 1  # the "answer": second half
    rows = pack_examples(tokens, mask, np.array(lengths), pad_id=0)
    assert rows.shape == (3, 3, width) and (rows[:, 2] > 0).sum() == sum(lengths)  # 77 tokens in 3 rows, not 6
    padded, pad_targets = per_token_nll(model, CausalLM(), np.stack([tokens, mask], axis=1))
    packed, targets = per_token_nll(model, CausalLM(), rows)
    assert int((targets != -100).sum()) == int((pad_targets != -100).sum())
    got = sorted(packed[targets != -100].tolist())
    np.testing.assert_allclose(got, sorted(padded[pad_targets != -100].tolist()), atol=1e-5)


def test_flash_attention_models_get_one_row_with_restarting_positions():
    """The same code path on a GPU with flash_attn: no mask; transformers runs flash_attn_varlen_func
    over the sequences the restarting position ids delimit (cannot run here: no GPU)."""
    model = tiny("llama")
    batch = CausalLM(reset_at=EOS).batch(np.array([[5, 6, EOS, 7, 8], [9, EOS, 4, 4, EOS]]), "cpu")
    model.config._attn_implementation = "flash_attention_2"
    kwargs = model_inputs(model, batch)
    assert set(kwargs) == {"input_ids", "position_ids"} and kwargs["input_ids"].shape == (1, 8)
    assert kwargs["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1, 0, 1]]
    model.config._attn_implementation = "sdpa"
    mask = model_inputs(model, batch)["attention_mask"]
    assert mask.shape == (2, 1, 4, 4) and mask.dtype == torch.bool
    assert mask[0, 0].tolist() == [[True, False, False, False], [True, True, False, False],
                                   [True, True, True, False], [False, False, False, True]]
