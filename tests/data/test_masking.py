"""Masked-LM masking statistics, T5 span corruption that undoes exactly, and the special tokens
they need surviving a tokenizer's save and reload."""

import math

import numpy as np
import pytest

from llmos_ray.data.masking import (
    IGNORE_INDEX,
    add_mask_token,
    add_sentinel_tokens,
    compute_input_and_target_lengths,
    continuation_table,
    corrupted_lengths,
    mask_tokens,
    noise_span_counts,
    random_spans_noise_mask,
    sentinel_ids,
    span_corrupt,
    span_corrupt_batch,
)
from llmos_ray.errors import DataError

VOCAB, SPECIALS, MASK = 1000, (0, 1, 2), 3
BOUND = 4.5  # standard deviations: a correct implementation fails with probability < 1e-5 per share


def within_binomial(successes: int, trials: int, p: float) -> bool:
    """Whether successes/trials is within BOUND standard deviations of p, sd = sqrt(p(1-p)/trials):
    every share below counts independent Bernoulli(p) draws, so it is a binomial proportion."""
    return abs(successes / trials - p) <= BOUND * math.sqrt(p * (1 - p) / trials)


def batch(seed: int = 0, shape=(100, 2000)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, VOCAB, size=shape)
    ids[rng.random(shape) < 0.05] = 1  # padding-like specials sprinkled in
    ids[:, 0] = 0
    return ids


def test_mlm_shares_are_15_percent_then_80_10_10_and_specials_never_masked():
    ids = batch()
    inputs, labels = mask_tokens(ids, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS,
                                 rng=np.random.default_rng(1234))
    special = np.isin(ids, SPECIALS)
    selected = labels != IGNORE_INDEX
    n, k = int((~special).sum()), int(selected.sum())
    assert n > 180_000 and within_binomial(k, n, 0.15), k / n  # sd ≈ 0.0008: 0.15 ± 0.0037
    assert not (selected & special).any() and (inputs[special] == ids[special]).all()
    assert (labels[selected] == ids[selected]).all() and (inputs[~selected] == ids[~selected]).all()
    masked = inputs[selected] == MASK
    kept = inputs[selected] == ids[selected]
    random = ~masked & ~kept
    pool = VOCAB - len(SPECIALS) - 1
    # a random replacement equals the original with probability 1/pool: those look kept
    assert within_binomial(int(masked.sum()), k, 0.8), masked.mean()  # sd ≈ 0.0024
    assert within_binomial(int(random.sum()), k, 0.1 * (1 - 1 / pool)), random.mean()  # sd ≈ 0.0018
    assert within_binomial(int(kept.sum()), k, 0.1 + 0.1 / pool), kept.mean()
    replaced = inputs[selected][random]
    assert not np.isin(replaced, [*SPECIALS, MASK]).any() and replaced.max() < VOCAB
    assert len(np.unique(replaced)) > 0.9 * pool  # spread over the vocabulary
    again = mask_tokens(ids, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS, rng=np.random.default_rng(1234))
    assert all((a == b).all() for a, b in zip(again, (inputs, labels)))
    other = mask_tokens(ids, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS, rng=np.random.default_rng(5))
    assert (other[1] != labels).any()


def test_whole_word_masking_selects_whole_words_at_15_percent_of_tokens():
    continuation = np.zeros(VOCAB, dtype=bool)
    continuation[500:] = True  # ids >= 500 continue the word before them
    ids = batch(seed=7, shape=(50, 1000))
    inputs, labels = mask_tokens(ids, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS,
                                 rng=np.random.default_rng(99), continuation=continuation)
    selected = labels != IGNORE_INDEX
    special = np.isin(ids, SPECIALS)
    starts = ~continuation[ids] | special
    starts[:, 0] = True
    starts[:, 1:] |= special[:, :-1]
    word = np.cumsum(starts.ravel()).reshape(ids.shape)[~special]
    lengths = np.bincount(word)[np.unique(word)]
    chosen = np.bincount(word, weights=selected[~special])[np.unique(word)]
    assert ((chosen == 0) | (chosen == lengths)).all()  # a word is masked whole or not at all
    # one Bernoulli(0.15) per word: the selected words are binomial, and so (weighted) are the tokens
    assert within_binomial(int((chosen > 0).sum()), len(lengths), 0.15)
    sd = math.sqrt(0.15 * 0.85 * (lengths**2).sum()) / lengths.sum()
    assert abs(selected.sum() / lengths.sum() - 0.15) <= BOUND * sd and lengths.mean() > 1.5


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> str:
    """Our byte-level BPE, trained on the shipped sample corpus (fast: a few dozen documents)."""
    from llmos_ray.data.tokenizer import train_tokenizer
    from tests.data.conftest import sample_docs

    out = str(tmp_path_factory.mktemp("bpe") / "tokenizer")
    train_tokenizer(sample_docs(36) + ["print(value) and returned"] * 3, vocab_size=400, out_dir=out)
    return out


@pytest.fixture
def tiny_tokenizer(bpe_dir):
    from llmos_ray.data.tokenizer import load_tokenizer

    return load_tokenizer(bpe_dir)


def test_continuation_table_of_our_byte_level_tokenizer(tiny_tokenizer):
    table = continuation_table(tiny_tokenizer)
    assert len(table) == len(tiny_tokenizer)
    tokens = tiny_tokenizer.convert_ids_to_tokens(list(range(len(tiny_tokenizer))))
    for i, token in enumerate(tokens):
        assert table[i] == (not token.startswith(("Ġ", "Ċ", "ĉ", "č")) and i not in tiny_tokenizer.all_special_ids)
    ids = tiny_tokenizer("print(value) and returned", add_special_tokens=False)["input_ids"]
    starts = [tokens[i] for i in ids if not table[i]]
    assert "".join(tokens[i] for i in ids).count("Ġ") == sum(t.startswith("Ġ") for t in starts) == 2


def reconstruct(inputs: np.ndarray, targets: np.ndarray, sentinels: list[int], eos: int) -> list[int]:
    """Undo span corruption: each sentinel in the inputs by the tokens after it in the targets."""
    assert inputs[-1] == eos and targets[-1] == eos
    index = {s: i for i, s in enumerate(sentinels)}
    spans, current = {}, None
    for t in targets[:-1].tolist():
        if t in index:
            current = index[t]
            spans[current] = []
        else:
            spans[current].append(int(t))
    out, used = [], []
    for t in inputs[:-1].tolist():
        if t in index:
            used.append(index[t])
            out += spans[used[-1]]
        else:
            out.append(t)
    assert used == list(range(len(spans)))  # sentinels in order, each once, in inputs and targets
    return out


def test_span_corruption_undoes_exactly_on_many_random_sequences():
    rng = np.random.default_rng(0)
    sentinels, eos = list(range(900, 1000)), 1
    noise = spans = 0
    for _ in range(300):
        length = int(rng.integers(2, 600))
        tokens = rng.integers(2, 900, size=length)
        inputs, targets = span_corrupt(tokens, sentinel_ids=sentinels, eos_id=eos, rng=rng)
        assert reconstruct(inputs, targets, sentinels, eos) == tokens.tolist()
        assert (len(inputs), len(targets)) == corrupted_lengths(length)
        n_noise, n_spans = noise_span_counts(length)
        noise, spans = noise + n_noise, spans + n_spans
        assert inputs[0] == tokens[0]  # T5's mask never starts with noise
    assert abs(noise / spans - 3.0) < 0.1  # mean span length
    assert noise_span_counts(568) == (85, 28)


def test_noise_spans_are_a_uniform_random_composition():
    # 100 tokens: 15 noise tokens in 5 spans, 85 kept in 5 spans, interleaved kept-first (T5), so the
    # first token is kept and the last is noise. With every composition of 15 into 5 parts equally
    # likely, the first span has length 1 with probability C(13,3)/C(14,4) = 286/1001.
    rng = np.random.default_rng(3)
    first_is_one, trials = 0, 3000
    for _ in range(trials):
        mask = random_spans_noise_mask(100, rng)
        starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
        assert mask.sum() == 15 and len(starts) == 5 and not mask[0] and mask[-1]
        first_is_one += not mask[starts[0] + 1]
    assert within_binomial(first_is_one, trials, 286 / 1001)


def test_block_lengths_give_fixed_size_inputs_and_targets():
    assert compute_input_and_target_lengths(512) == (568, 114)  # T5's and HF run_t5_mlm_flax's numbers
    rng = np.random.default_rng(1)
    sentinels = list(range(3000, 3100))
    for inputs_length in (16, 31, 64, 100, 128, 255, 512):
        tokens_length, targets_length = compute_input_and_target_lengths(inputs_length)
        blocks = rng.integers(2, 3000, size=(4, tokens_length))
        inputs, targets = span_corrupt_batch(blocks, sentinel_ids=sentinels, eos_id=1, rng=rng)
        assert inputs.shape == (4, inputs_length) and targets.shape == (4, targets_length)
    with pytest.raises(DataError, match="no block length"):
        compute_input_and_target_lengths(5)


def test_span_corruption_refuses_what_it_could_not_undo():
    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match="sentinel tokens, only 2 given"):
        span_corrupt(np.arange(5, 205), sentinel_ids=[1000, 1001], eos_id=1, rng=rng)
    with pytest.raises(DataError, match="already contains sentinel"):
        span_corrupt(np.array([5, 6, 1000, 7, 8, 9, 10, 11]), sentinel_ids=list(range(1000, 1010)), eos_id=1, rng=rng)
    with pytest.raises(DataError, match="at least 2 tokens"):
        span_corrupt(np.array([5]), sentinel_ids=[1000], eos_id=1, rng=rng)


def test_mask_and_sentinel_tokens_survive_save_and_reload(tiny_tokenizer, tmp_path):
    from llmos_ray.data.tokenizer import load_tokenizer, save_tokenizer

    tok = tiny_tokenizer
    before = len(tok)
    mask_id = add_mask_token(tok)
    ids = add_sentinel_tokens(tok, 8)
    assert (add_mask_token(tok), add_sentinel_tokens(tok, 8), len(tok)) == (mask_id, ids, before + 9)  # idempotent
    save_tokenizer(tok, str(tmp_path / "tok"))
    again = load_tokenizer(str(tmp_path / "tok"))
    assert (again.mask_token, again.mask_token_id, sentinel_ids(again)) == ("[MASK]", mask_id, ids)
    assert len(again) == len(tok)
    assert {"<|user|>", "[MASK]", "<extra_id_7>"} <= set(again.all_special_tokens)  # chat tokens kept
    encoded = again("a [MASK] b <extra_id_0> c", add_special_tokens=False)["input_ids"]
    tokens = again.convert_ids_to_tokens(encoded)
    assert tokens[tokens.index("[MASK]") - 1] != "Ġ"  # the mask absorbs the space before it
    assert again.decode(encoded, skip_special_tokens=True).split() == ["a", "b", "c"]
