"""The self-supervised objectives of encoder models: BERT's masked LM and T5's span corruption.

Pure numpy functions, deterministic given a `numpy.random.Generator` (no global random state), for
the collate step of a training loop: token ids in, model inputs and labels out.

- `mask_tokens` (BERT, Devlin et al. 2019, §3.1): every token that is not special is selected
  with probability 0.15 (an independent draw per token, as Hugging Face's
  DataCollatorForLanguageModeling; with whole-word masking one draw per word, so each token is
  still selected with 0.15); of the selected, 80% become the mask token, 10% a random non-special
  token and 10% stay; labels are the original ids where selected and -100 elsewhere.
  A word is a run of tokens whose later members are continuation tokens
  (`continuation_table`: byte-level BPE tokens not starting with a whitespace byte such as "Ġ",
  WordPiece "##" tokens, SentencePiece tokens without "▁"); a special token is never part of one.
- `span_corrupt` (T5, Raffel et al. 2020, §3.1.4): a share `noise_density` of the tokens, in
  spans of mean length `mean_span_length`, is dropped from the input; each span is replaced by
  one sentinel (`<extra_id_0>` for the first span, `<extra_id_1>` …) and the target lists each
  sentinel followed by its span; both end with EOS. The noise mask follows T5's
  `random_spans_noise_mask`: the numbers of noise tokens and spans depend only on the length
  (`noise_span_counts`), noise and non-noise tokens are each split into that many non-empty spans
  uniformly at random, interleaved starting with a non-noise span. So every sequence of a given
  length has inputs and targets of one fixed length (`compute_input_and_target_lengths` chooses
  the raw block length that gives inputs of a wanted length, as HF's `run_t5_mlm_flax.py`).
- `add_mask_token`, `add_sentinel_tokens`, `sentinel_ids`: the special tokens these need, added
  to a Hugging Face tokenizer (ours or any) so that save_pretrained/from_pretrained keep them.
"""

from __future__ import annotations

from typing import Collection, Optional, Sequence

import numpy as np

from llmos_ray.errors import DataError

IGNORE_INDEX = -100
"""Label of a position that carries no loss (torch's cross_entropy default ignore_index)."""
MASK_TOKEN = "[MASK]"
SENTINEL = "<extra_id_{}>"
_BYTE_LEVEL_WHITESPACE = ("Ġ", "Ċ", "ĉ", "č")  # space, \n, \t, \r in byte-level BPE's alphabet


# ---------------------------------------------------------------------------------------------
# Masked LM


def mask_tokens(input_ids, *, mask_id: int, vocab_size: int, special_ids: Collection[int],
                rng: np.random.Generator, probability: float = 0.15, mask_share: float = 0.8,
                random_share: float = 0.1, continuation: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) for masked-LM training from `input_ids` (any int array, e.g. [batch, seq]).

    `special_ids` (padding, EOS, …; the mask id is added) are never selected, and random
    replacements are drawn from the other ids below `vocab_size`. `continuation` (a bool per
    vocabulary id, see `continuation_table`) turns on whole-word masking."""
    if not 0 <= probability <= 1 or mask_share < 0 or random_share < 0 or mask_share + random_share > 1:
        raise DataError(f"masking shares must be probabilities with mask_share + random_share <= 1, got "
                        f"probability={probability}, mask_share={mask_share}, random_share={random_share}")
    ids = np.asarray(input_ids)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise DataError(f"token ids must be in [0, vocab_size={vocab_size}), got [{ids.min()}, {ids.max()}]")
    specials = np.array(sorted({*special_ids, mask_id}), dtype=np.int64)
    special = np.isin(ids, specials)
    if continuation is None:
        selected = rng.random(ids.shape) < probability
    else:
        words = _word_index(ids, special, continuation)
        selected = (rng.random(int(words.max()) + 1 if words.size else 0) < probability)[words]
    selected &= ~special
    labels = np.where(selected, ids, IGNORE_INDEX).astype(np.int64)
    draw = rng.random(ids.shape)
    to_mask = selected & (draw < mask_share)
    to_random = selected & (draw >= mask_share) & (draw < mask_share + random_share)
    inputs = ids.astype(np.int64, copy=True)
    inputs[to_mask] = mask_id
    pool = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), specials)
    inputs[to_random] = pool[rng.integers(len(pool), size=int(to_random.sum()))]
    return inputs, labels


def _word_index(ids: np.ndarray, special: np.ndarray, continuation: np.ndarray) -> np.ndarray:
    """The number of the word each token belongs to, counted over the whole array; a word never
    crosses a row (last axis) or a special token."""
    if ids.size and ids.max() >= len(continuation):
        raise DataError(f"continuation table has {len(continuation)} entries but a token id is {ids.max()}")
    continues = continuation[ids] & ~special
    if ids.ndim:
        continues[..., 0] = False
        continues[..., 1:] &= ~special[..., :-1]
    return (np.cumsum(~continues.ravel()) - 1).reshape(ids.shape)


def continuation_table(tokenizer) -> np.ndarray:
    """A bool per vocabulary id: True where the token continues the word before it. The scheme is
    read from the vocabulary: WordPiece ("##"), SentencePiece ("▁" starts a word) or byte-level BPE
    (a token starting with the byte of a space, newline, tab or CR starts a word). Special and
    added tokens are never continuations."""
    vocab = tokenizer.get_vocab()
    table = np.zeros(max(len(tokenizer), max(vocab.values(), default=-1) + 1), dtype=bool)
    tokens = list(vocab)
    wordpiece = sum(t.startswith("##") for t in tokens)
    sentencepiece = sum(t.startswith("▁") for t in tokens)
    byte_level = sum(t.startswith(_BYTE_LEVEL_WHITESPACE) for t in tokens)
    scheme = max((wordpiece, "wordpiece"), (sentencepiece, "sentencepiece"), (byte_level, "byte_level"))[1]
    added = set(getattr(tokenizer, "added_tokens_encoder", {}) or {})
    for token, i in vocab.items():
        if token in added:
            continue
        if scheme == "wordpiece":
            table[i] = token.startswith("##")
        elif scheme == "sentencepiece":
            table[i] = not token.startswith("▁")
        else:
            table[i] = not token.startswith(_BYTE_LEVEL_WHITESPACE)
    table[list(getattr(tokenizer, "all_special_ids", []))] = False
    return table


# ---------------------------------------------------------------------------------------------
# Span corruption


def noise_span_counts(length: int, noise_density: float = 0.15, mean_span_length: float = 3.0) -> tuple[int, int]:
    """(noise tokens, noise spans) for a sequence of `length` tokens: round(length * density),
    at least 1 and at most length - 1; round(min(noise, non-noise) / mean span), at least 1."""
    if length < 2:
        raise DataError(f"span corruption needs sequences of at least 2 tokens, got {length}")
    if not 0 < noise_density < 1 or mean_span_length < 1:
        raise DataError(f"noise_density must be in (0, 1) and mean_span_length >= 1, got {noise_density}, "
                        f"{mean_span_length}")
    noise = min(max(int(round(length * noise_density)), 1), length - 1)
    spans = max(int(round(min(noise, length - noise) / mean_span_length)), 1)
    return noise, min(spans, noise, length - noise)


def random_spans_noise_mask(length: int, rng: np.random.Generator, noise_density: float = 0.15,
                            mean_span_length: float = 3.0) -> np.ndarray:
    """A bool mask of `length` with noise_span_counts(length) noise tokens in that many spans,
    placed uniformly at random; the first token is never noise."""
    noise, spans = noise_span_counts(length, noise_density, mean_span_length)
    noise_lengths = _random_segmentation(noise, spans, rng)
    kept_lengths = _random_segmentation(length - noise, spans, rng)
    interleaved = np.stack([kept_lengths, noise_lengths], axis=1).ravel()
    return np.repeat(np.tile([False, True], spans), interleaved)


def _random_segmentation(items: int, segments: int, rng: np.random.Generator) -> np.ndarray:
    """`items` split into `segments` non-empty parts, every such composition equally likely."""
    cuts = np.sort(rng.choice(np.arange(1, items), size=segments - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [items]]))


def span_corrupt(tokens, *, sentinel_ids: Sequence[int], eos_id: int, rng: np.random.Generator,
                 noise_density: float = 0.15, mean_span_length: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of T5's span corruption for one 1-D token sequence. Replacing each sentinel
    in the inputs (without the final EOS) by the tokens that follow it in the targets gives
    `tokens` back exactly."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.ndim != 1:
        raise DataError(f"span_corrupt takes one sequence (1-D); got shape {tokens.shape}: use span_corrupt_batch")
    mask = random_spans_noise_mask(len(tokens), rng, noise_density, mean_span_length)
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    n_spans = int(starts.sum())
    sentinels = np.asarray(sentinel_ids, dtype=np.int64)
    if len(sentinels) < n_spans:
        raise DataError(f"{len(tokens)} tokens need {n_spans} sentinel tokens, only {len(sentinels)} given: add "
                        "more with add_sentinel_tokens or use shorter sequences")
    if np.isin(tokens, sentinels).any():
        raise DataError("the sequence already contains sentinel tokens: its corruption could not be undone; "
                        "remove '<extra_id_N>' strings from the corpus")
    per_position = np.where(starts, sentinels[np.maximum(np.cumsum(starts) - 1, 0)], tokens)
    inputs = per_position[~mask | starts]
    targets = np.insert(tokens[mask], np.flatnonzero(starts[mask]), sentinels[:n_spans])
    eos = np.array([eos_id], dtype=np.int64)
    return np.concatenate([inputs, eos]), np.concatenate([targets, eos])


def span_corrupt_batch(blocks, *, sentinel_ids: Sequence[int], eos_id: int, rng: np.random.Generator,
                       noise_density: float = 0.15, mean_span_length: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """`span_corrupt` of every row of a [batch, length] array: [batch, inputs] and [batch, targets]
    arrays (every row of one length corrupts to the same two lengths)."""
    blocks = np.asarray(blocks)
    if blocks.ndim != 2:
        raise DataError(f"span_corrupt_batch takes a [batch, length] array, got shape {blocks.shape}")
    pairs = [span_corrupt(row, sentinel_ids=sentinel_ids, eos_id=eos_id, rng=rng, noise_density=noise_density,
                          mean_span_length=mean_span_length) for row in blocks]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def corrupted_lengths(length: int, noise_density: float = 0.15, mean_span_length: float = 3.0) -> tuple[int, int]:
    """(inputs, targets) lengths, EOS included, that `span_corrupt` gives a sequence of `length`."""
    noise, spans = noise_span_counts(length, noise_density, mean_span_length)
    return length - noise + spans + 1, noise + spans + 1


def compute_input_and_target_lengths(inputs_length: int, noise_density: float = 0.15,
                                     mean_span_length: float = 3.0) -> tuple[int, int]:
    """(tokens_length, targets_length): pack the corpus into blocks of `tokens_length` tokens and
    span corruption gives inputs of `inputs_length` tokens and targets of `targets_length` (EOS
    included), e.g. 512 -> (568, 114) for T5's defaults. DataError when no block length gives
    exactly `inputs_length` (then take the length this names as the closest)."""
    tokens_length = inputs_length
    while corrupted_lengths(tokens_length + 1, noise_density, mean_span_length)[0] <= inputs_length:
        tokens_length += 1
    got, targets_length = corrupted_lengths(tokens_length, noise_density, mean_span_length)
    if got != inputs_length:
        raise DataError(f"no block length gives span-corrupted inputs of exactly {inputs_length} tokens "
                        f"({tokens_length} tokens give {got}); choose inputs_length={got} or {got + 2}")
    return tokens_length, targets_length


# ---------------------------------------------------------------------------------------------
# Special tokens


def add_mask_token(tokenizer, token: str = MASK_TOKEN) -> int:
    """Make `token` the tokenizer's mask token (added as a special token when new; it absorbs the
    space before it, like RoBERTa's <mask>, so "a [MASK] b" fills as "a word b"). Returns its id."""
    from tokenizers import AddedToken

    if tokenizer.mask_token != token:
        tokenizer.add_special_tokens({"mask_token": AddedToken(token, lstrip=True, special=True)})
    return tokenizer.mask_token_id


def add_sentinel_tokens(tokenizer, n: int = 100) -> list[int]:
    """Add T5's sentinels <extra_id_0> … <extra_id_{n-1}> as extra special tokens (kept beside the
    tokenizer's existing ones; the ones already there are not added twice). Returns their ids, in
    sentinel order (ours ascend; T5's own tokenizer counts down from the end of its vocabulary)."""
    if n < 1:
        raise DataError(f"add_sentinel_tokens: n must be >= 1, got {n}")
    wanted = [SENTINEL.format(i) for i in range(n)]
    vocab = tokenizer.get_vocab()
    missing = [t for t in wanted if t not in vocab]
    if missing:
        key = "extra_special_tokens" if hasattr(tokenizer, "extra_special_tokens") else "additional_special_tokens"
        tokenizer.add_special_tokens({key: missing}, False)  # False: extend the list, don't replace it
    return tokenizer.convert_tokens_to_ids(wanted)


def sentinel_ids(tokenizer) -> list[int]:
    """The ids of <extra_id_0>, <extra_id_1>, … that the tokenizer has, in sentinel order."""
    vocab = tokenizer.get_vocab()
    out = []
    while SENTINEL.format(len(out)) in vocab:
        out.append(vocab[SENTINEL.format(len(out))])
    return out
