"""Helpers for the corpus pipeline tests: small corpora on disk, configs, expected token streams."""

from __future__ import annotations

import bz2
import gzip
import json
import uuid

import numpy as np
import pytest

from llmos_ray.data.default_corpus import sample_path


def sample_docs(n: int) -> list[str]:
    """`n` distinct documents of real sentences (the shipped sample, numbered)."""
    with open(sample_path()) as f:
        base = [json.loads(line)["text"] for line in f]
    return [f"{i}. {base[i % len(base)]}" for i in range(n)]


def compress(data: bytes, suffix: str) -> bytes:
    if suffix == ".gz":
        return gzip.compress(data)
    if suffix == ".bz2":
        return bz2.compress(data)
    if suffix == ".zst":
        import zstandard

        return zstandard.ZstdCompressor().compress(data)
    return data


def write(path, data: bytes) -> str:
    """Write bytes to `path`, compressed according to its last suffix (.gz, .bz2, .zst)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(compress(data, path.suffix))
    return str(path)


def jsonl(docs: list[str], field: str = "text") -> bytes:
    return "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()


def rows(ds) -> list[np.ndarray]:
    """Every packed row of a dataset, in order."""
    return [r for b in ds.iter_batches(batch_format="numpy", batch_size=None) for r in b["input_ids"]]


def token_stream(tokenizer, docs: list[str]) -> np.ndarray:
    """The documents tokenized without special tokens, each followed by EOS."""
    out: list[int] = []
    for d in docs:
        out += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return np.array(out, dtype=np.int32)


@pytest.fixture
def make_cfg(tmp_path, tiny_tokenizer_dir):
    """make_cfg(**data_overrides) -> a resolved Config with a unique run name, the tiny tokenizer,
    short blocks, small batches and no validation split unless asked."""
    from llmos_ray.config import load_config

    def make(**data):
        overrides = {"run.name": f"test-{uuid.uuid4().hex[:8]}", "run.output_dir": str(tmp_path / "run"),
                     "data.tokenizer": tiny_tokenizer_dir, "data.seq_len": 31, "data.batch_docs": 8,
                     "data.val_fraction": 0.0}
        overrides.update({f"data.{k}": v for k, v in data.items()})
        return load_config(None, overrides)

    return make


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from llmos_ray.data import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir)
