"""Instruction data for supervised fine-tuning: records → chat messages → tokens with a loss mask.

Formats (detected per record, or fixed with finetune.format):
    prompt_completion  {"prompt": ..., "completion": ...}        raw text, loss on the completion + EOS
    alpaca             {"instruction", "input"?, "output"}        rendered with the chat template
    chat               {"messages": [{"role", "content"}, ...]}   system/user/assistant, multi-turn

Only what the assistant writes carries loss. An example is one row of two int32 arrays of
seq_len + 1: the tokens (right-padded with the pad id) and the loss mask; with data.packing=reset,
several examples share a row (`pack_examples`), each a segment of its own. Over-long examples keep
their last seq_len + 1 tokens — the final answer survives, the start of the context goes (counted
as `truncated`); one left with no target token is dropped (counted as `no_target`). Records that
fit no format are bad records, counted with file and line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np

from llmos_ray.errors import DataError

ROLES = ("system", "user", "assistant")


def detect_format(record: Any) -> Optional[str]:
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("messages"), list):
        return "chat"
    if isinstance(record.get("instruction"), str) and isinstance(record.get("output"), str):
        return "alpaca"
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return "prompt_completion"
    return None


def to_messages(record: dict, fmt: str) -> list[dict]:
    """The record as chat messages (prompt_completion: one user and one assistant turn). Raises
    ValueError naming what is wrong."""
    if fmt == "chat":
        msgs = record.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be {{role: system|user|assistant, content: str}}")
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in out):
            raise ValueError("no assistant message: nothing to learn from")
        return out
    if fmt == "alpaca":
        if not isinstance(record.get("instruction"), str) or not isinstance(record.get("output"), str):
            raise ValueError("alpaca records need string 'instruction' and 'output'")
        user = record["instruction"]
        if isinstance(record.get("input"), str) and record["input"].strip():
            user = f"{user}\n\n{record['input']}"
        return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    if fmt == "prompt_completion":
        if not isinstance(record.get("prompt"), str) or not isinstance(record.get("completion"), str):
            raise ValueError("prompt_completion records need string 'prompt' and 'completion'")
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    raise ValueError(f"unknown format {fmt!r}")


def ensure_chat_template(tokenizer) -> None:
    """Keep the tokenizer's own chat template; give ours to one that has none (it is then saved
    with every checkpoint and export, so serving renders prompts exactly as training did)."""
    from llmos_ray.data.tokenizer import CHAT_TEMPLATE, CHAT_TOKENS

    if tokenizer.chat_template:
        return
    missing = [t for t in CHAT_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    tokenizer.chat_template = CHAT_TEMPLATE


def encode(tokenizer, messages: list[dict], fmt: str) -> tuple[list[int], list[int]]:
    """Token ids and a 0/1 mask of the tokens that carry loss (what the assistant writes)."""
    if fmt == "prompt_completion":
        prompt = tokenizer(messages[0]["content"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(messages[1]["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return prompt + completion, [0] * len(prompt) + [1] * len(completion)
    if "{% generation %}" in (tokenizer.chat_template or ""):  # the template marks what the assistant writes
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(out["input_ids"]), list(out["assistant_masks"])
    ids: list[int] = []
    mask: list[int] = []
    # Render the conversation turn by turn: the tokens an assistant turn adds are its own. This works
    # for any chat template, with or without {% generation %} markers.
    for i, message in enumerate(messages):
        upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if message["role"] == "assistant":
            prefix = _render(tokenizer, messages[:i], add_generation_prompt=True)
            if upto[: len(prefix)] != prefix or ids != prefix[: len(ids)]:
                raise ValueError("the chat template does not render conversations prefix by prefix")
            mask += [0] * (len(prefix) - len(ids)) + [1] * (len(upto) - len(prefix))
        else:
            if upto[: len(ids)] != ids:
                raise ValueError("the chat template does not render conversations prefix by prefix")
            mask += [0] * (len(upto) - len(ids))
        ids = upto
    return ids, mask


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """Token ids of a conversation rendered by the tokenizer's chat template."""
    if not messages and not add_generation_prompt:
        return []
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class SftExamples:
    tokens: np.ndarray
    """int32 [N, seq_len + 1], right-padded with the pad id."""
    mask: np.ndarray
    """int32 [N, seq_len + 1], 1 where the token carries loss."""
    counts: dict = field(default_factory=dict)
    """records, examples, bad_records, truncated, no_target, formats, bad_by_file."""
    lengths: Optional[np.ndarray] = None
    """int32 [N]: each example's tokens before padding."""
    pad_id: int = 0

    def blocks(self) -> np.ndarray:
        """[N, 2, seq_len + 1]: what the train loop consumes (row 0 tokens, row 1 loss mask)."""
        return np.stack([self.tokens, self.mask], axis=1)

    def packed_blocks(self) -> np.ndarray:
        """[M, 3, seq_len + 1], M <= N: the examples packed several to a row (`pack_examples`),
        rows of tokens, loss mask and segment id (what the train loop consumes under data.packing=reset)."""
        lengths = self.lengths if self.lengths is not None else (self.tokens != self.pad_id).sum(1)
        return pack_examples(self.tokens, self.mask, lengths, self.pad_id)


def pack_examples(tokens: np.ndarray, mask: np.ndarray, lengths: np.ndarray, pad_id: int) -> np.ndarray:
    """Pack padded examples (rows of `tokens`/`mask`, the first `lengths[i]` tokens real) into as
    few rows of the same width as first-fit decreasing finds: the longest first, each into the
    first row with room. Returns [M, 3, width]: tokens (pad after the last example), loss mask,
    segment id (1, 2, … per example in the row, 0 for padding). Deterministic; every example lands
    in exactly one row, whole."""
    width = tokens.shape[1]
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = int(lengths[i])
        for r, free in enumerate(room):
            if free >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(width - n)
    out = np.zeros((len(rows), 3, width), dtype=np.int32)
    out[:, 0] = pad_id
    for r, members in enumerate(rows):
        at = 0
        for seg, i in enumerate(members, 1):
            n = int(lengths[i])
            out[r, 0, at:at + n] = tokens[i, :n]
            out[r, 1, at:at + n] = mask[i, :n]
            out[r, 2, at:at + n] = seg
            at += n
    return out


def build_examples(records: Iterable[tuple[str, int, Any]], tokenizer, seq_len: int, fmt: str = "auto",
                   max_bad_fraction: float = 0.01) -> SftExamples:
    """Encode `(source, line, record)` triples; `record` is a parsed object, or an Exception for a
    line that did not parse. Fails when a file's bad share exceeds `max_bad_fraction`."""
    block = seq_len + 1
    tokens, masks, lengths = [], [], []
    counts: dict[str, Any] = {"records": 0, "examples": 0, "bad_records": 0, "truncated": 0, "no_target": 0,
                              "formats": {}, "bad_by_file": {}}
    per_file: dict[str, list[int]] = {}
    for source, line, record in records:
        counts["records"] += 1
        seen = per_file.setdefault(source, [0, 0])
        seen[0] += 1
        try:
            if isinstance(record, Exception):
                raise ValueError(str(record))
            kind = detect_format(record) if fmt == "auto" else fmt
            if kind is None:
                raise ValueError("fits no format (prompt/completion, instruction/output, messages)")
            ids, mask = encode(tokenizer, to_messages(record, kind), kind)
        except ValueError as e:
            seen[1] += 1
            counts["bad_records"] += 1
            bad = counts["bad_by_file"].setdefault(source, [])
            if len(bad) < 100:
                bad.append({"line": line, "reason": str(e)})
            continue
        counts["formats"][kind] = counts["formats"].get(kind, 0) + 1
        if len(ids) > block:  # keep the end, where the (last) answer is
            counts["truncated"] += 1
            ids, mask = ids[-block:], mask[-block:]
        if sum(mask[1:]) == 0:  # the first token is never a target
            counts["no_target"] += 1
            continue
        pad = block - len(ids)
        lengths.append(len(ids))
        tokens.append(ids + [tokenizer.pad_token_id] * pad)
        masks.append(mask + [0] * pad)
    for source, (n, bad) in per_file.items():
        if n and bad / n > max_bad_fraction:
            first = counts["bad_by_file"][source][0]
            raise DataError(f"{source}: {bad} of {n} records are bad (more than data.max_bad_fraction="
                            f"{max_bad_fraction}); first at line {first['line']}: {first['reason']}")
    counts["examples"] = len(tokens)
    if not tokens:
        raise DataError(f"no usable fine-tuning examples in {sorted(per_file) or 'the input'} ({counts})")
    return SftExamples(np.array(tokens, dtype=np.int32), np.array(masks, dtype=np.int32), counts,
                       np.array(lengths, dtype=np.int32), int(tokenizer.pad_token_id or 0))


def read_sft_records(paths: list[str], storage_options: Optional[dict] = None) -> Iterator[tuple[str, int, Any]]:
    """`(file, line, record)` for every record of `paths` (files, directories, globs; any fsspec URI;
    JSONL, JSON, parquet or CSV, compressed or not), read by the corpus readers with data.storage_options.
    `record` is the parsed object, or a ValueError saying why the line did not parse. `file` is the
    path as given for a single file, else each matched file's path: with the line, the key of the
    held-out split (documents.is_held_out), so it does not change between runs."""
    from llmos_ray.data.records import read_objects
    from llmos_ray.data.sources import Corpus, expand_sources, filesystem

    for path in paths:
        try:
            sources = expand_sources([path], "auto", storage_options)
        except DataError as e:
            raise DataError(f"finetune.paths: {e}") from None
        fs, root = filesystem(path, storage_options)
        one_file = not any(c in path for c in "*?[") and not fs.isdir(root)
        for source in sources:
            if source.format not in ("jsonl", "json", "parquet", "csv"):
                raise DataError(f"finetune.paths: {source.uri} is {source.format}; fine-tuning records are JSONL, "
                                "JSON, parquet or CSV files")
            name = path if one_file else source.uri.removeprefix("file://")
            corpus = Corpus([source], storage_options=dict(storage_options or {}))
            for line, record, reason in read_objects(corpus, source):
                yield name, line, record if reason is None else ValueError(reason)


@dataclass
class RecordSplits:
    """The records of a fine-tuning run on labelled or paired examples, split."""

    train: list
    """(file, line, record) triples of the training split."""
    val: list
    """(file, line, record) triples of the held-out split."""
    source: dict = field(default_factory=dict)
    """Where they came from: {"paths", "val_fraction"} or an embedded set's ledger."""


def split_records(cfg, key: Callable[[str, int, Any], str] = lambda file, line, record: f"{file}:{line}"
                  ) -> RecordSplits:
    """finetune.paths read (`read_sft_records`) and split by a hash of each record's `key`
    (documents.is_held_out, data.val_fraction): by default its file and line."""
    from llmos_ray.data.documents import is_held_out

    train, val = [], []
    for file, line, record in read_sft_records(cfg.finetune.paths, cfg.data.storage_options):
        (val if is_held_out(key(file, line, record), cfg.data.val_fraction) else train).append((file, line, record))
    return RecordSplits(train, val, {"paths": list(cfg.finetune.paths), "val_fraction": cfg.data.val_fraction})


def embedded_splits(tag: str, train: list, val: list, source: dict) -> RecordSplits:
    """An embedded set's own split as (file, line, record) triples: `<tag>:train` / `<tag>:val`, line numbers from 1."""
    return RecordSplits([(f"{tag}:train", i, r) for i, r in enumerate(train, 1)],
                        [(f"{tag}:val", i, r) for i, r in enumerate(val, 1)], source)
