"""Length-balanced micro-batches across workers (train/balance.py, readers.ArrayReader(balance=)):
the split covers each micro-step's rows once, lowers the slowest worker's padded cost to the best
contiguous cut, and the weighted per-worker losses give the gradient of the whole micro-step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmos_ray.train.balance import balanced_groups
from llmos_ray.train.readers import ArrayReader
from llmos_ray.train.tasks import Seq2SeqLM, SequenceClassification


def cost(lengths: np.ndarray, group: np.ndarray) -> int:
    return len(group) * int(lengths.reshape(len(lengths), -1)[group].max(axis=0).sum())


@pytest.mark.parametrize("shape", [(32,), (32, 2), (7, 2)])
def test_two_groups_are_the_best_contiguous_cut_of_the_longest_first_order(shape):
    rng = np.random.default_rng(len(shape) * 100 + shape[0])
    lengths = rng.integers(1, 128, size=shape)
    groups = balanced_groups(lengths, 2)
    assert sorted(np.concatenate(groups).tolist()) == list(range(shape[0]))
    assert all(len(g) and (np.diff(g) > 0).all() for g in groups)
    flat = lengths.reshape(shape[0], -1)
    order = np.argsort(-flat.sum(axis=1), kind="stable")
    best = min(max(cost(flat, order[:k]), cost(flat, order[k:])) for k in range(1, shape[0]))
    assert max(cost(flat, g) for g in groups) == best
    half = shape[0] // 2  # the stored-order split it replaces is never better
    assert best <= max(cost(flat, np.arange(half)), cost(flat, np.arange(half, shape[0])))


def test_many_groups_are_non_empty_and_one_long_row_gets_a_worker_to_itself():
    lengths = np.array([100] + [10] * 15)
    groups = balanced_groups(lengths, 4)
    assert [0] in [g.tolist() for g in groups] and all(len(g) for g in groups)
    assert sorted(np.concatenate(groups).tolist()) == list(range(16))
    assert [len(g) for g in balanced_groups(np.ones(5, int), 5)] == [1] * 5
    assert balanced_groups(np.arange(1, 4), 1)[0].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="3 rows into 4"):
        balanced_groups(np.arange(3), 4)


def pairs(n: int, seed: int) -> np.ndarray:
    """Seq2seq pairs as data/seq2seq.encode_pairs lays them out, of random lengths."""
    rng = np.random.default_rng(seed)
    out = np.zeros(n, dtype=[("input_ids", np.int32, (24,)), ("attention_mask", np.int8, (24,)),
                             ("labels", np.int32, (12,))])
    out["labels"] = -100
    for i in range(n):
        s, t = rng.integers(1, 25), rng.integers(1, 13)
        out["input_ids"][i, :s] = rng.integers(3, 60, size=s)
        out["attention_mask"][i, :s] = 1
        out["labels"][i, :t] = rng.integers(3, 60, size=t)
    return out


def test_the_readers_of_all_ranks_share_out_each_micro_step_and_weigh_by_target_tokens():
    data, task, world, micro = pairs(64, 0), Seq2SeqLM(decoder_start_id=0, pad_id=0), 2, 8
    plain = [ArrayReader(data, micro, r, world, shuffle_seed=3) for r in range(world)]
    balanced = [ArrayReader(data, micro, r, world, shuffle_seed=3, balance=task) for r in range(world)]
    sizes = set()
    for _ in range(6):  # beyond one epoch (4 micro-steps): the next epoch's order too
        want = np.concatenate([r.next_agreed() for r in plain])
        got = [r.next_agreed() for r in balanced]
        key = lambda a: sorted(map(bytes, a))  # noqa: E731
        assert key(np.concatenate(got)) == key(want)
        tokens = [task.loss_units(g) for g in got]
        assert [r.loss_weight for r in balanced] == pytest.approx([world * t / sum(tokens) for t in tokens])
        sizes.update(len(g) for g in got)
        assert max(cost(task.lengths(g), np.arange(len(g))) for g in got) <= max(
            cost(task.lengths(want[i * micro:(i + 1) * micro]), np.arange(micro)) for i in range(world))
    assert sizes != {micro}  # the split did move rows between workers


def test_weighted_worker_losses_give_the_whole_micro_steps_gradient():
    """Seq2seq (mean per target token) and weighted classification (mean per label weight): the
    average over workers of weight x each worker's mean-loss gradient, as DeepSpeed averages it, is
    the gradient of one mean loss over all the micro-step's rows (fp32 sums reordered: 1e-6)."""
    from transformers import BertConfig, BertForSequenceClassification, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                             d_kv=8, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0))
    seq2seq = (t5, Seq2SeqLM(decoder_start_id=0, pad_id=0), pairs(16, 1))
    bert = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=3,
                                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    examples = np.zeros(16, dtype=[("input_ids", np.int32, (24,)), ("attention_mask", np.int8, (24,)),
                                   ("labels", np.int64)])
    source = pairs(16, 2)
    examples["input_ids"], examples["attention_mask"] = source["input_ids"], source["attention_mask"]
    examples["labels"] = np.arange(16) % 3
    classify = (bert, SequenceClassification(class_weights=[0.5, 1.0, 2.0]), examples)
    for model, task, rows in (seq2seq, classify):
        def grads(micro_rows, scale=1.0):
            model.zero_grad()
            (task.loss(model, task.batch(micro_rows, "cpu"))[0] * scale).backward()
            return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone()

        want = grads(rows)
        readers = [ArrayReader(rows, 8, r, 2, balance=task) for r in range(2)]
        parts = [(reader.next_agreed(), reader.loss_weight) for reader in readers]
        assert {len(p) for p, _ in parts} != {8}
        got = sum(grads(part, weight) for part, weight in parts) / 2
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
