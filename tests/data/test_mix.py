"""data.mix: weighted mixtures of corpora, interleaved deterministically (no Ray here; the Ray
pipeline's mixture is checked in test_pipeline.py and, resumed mid-stream, in
tests/train/test_pretrain.py::test_streamed_corpus_resumes_with_the_same_batches)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from llmos_ray.config import load_config
from llmos_ray.data.mix import Interleaver, MixSchedule
from llmos_ray.errors import ConfigError


def test_schedule_realizes_the_weights_over_any_prefix():
    weights = [0.5, 0.3, 0.2]
    s = MixSchedule(weights)
    picks = np.array([s.take() for _ in range(10_000)])
    for n in (10, 100, 1_000, 10_000):
        counts = np.bincount(picks[:n], minlength=3)
        assert np.all(np.abs(counts - n * np.array(weights)) < 3)  # less than one pick per component off
    shares = np.bincount(picks, minlength=3) / len(picks)
    np.testing.assert_allclose(shares, weights, atol=0.02)
    resumed = MixSchedule(weights, position=MixSchedule(weights, s.position).position)
    assert [resumed.take() for _ in range(50)] == [s.take() for _ in range(50)]  # its position is all its state


def docs(name: str, n: int) -> list[str]:
    return [f"{name}{i}" for i in range(n)]


def test_interleaving_depends_on_the_documents_not_on_how_blocks_arrive():
    """Blocks of three components arrive in different orders and sizes (read tasks finishing
    differently): the mixed stream is the same document for document; 10k documents mixed at
    5:3:2 are within 2% of those shares, and the pass ends when the first component runs out."""
    sources = {"a": docs("a", 6000), "b": docs("b", 3500), "c": docs("c", 2200)}
    names, weights = list(sources), [5.0, 3.0, 2.0]
    streams = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        pieces = []
        for c, name in enumerate(names):
            cuts = np.sort(rng.choice(np.arange(1, len(sources[name])), size=rng.integers(3, 40), replace=False))
            for part in np.split(np.array(sources[name]), cuts):
                pieces.append((c, part.tolist()))
        order = sorted(range(len(pieces)), key=lambda i: (rng.random(), i))
        # Each component's pieces still arrive in its own order (the ledger sees a component in order).
        per = {c: [p for p in pieces if p[0] == c] for c in range(3)}
        arrival, cursor = [], {c: 0 for c in range(3)}
        for i in order:
            c = pieces[i][0]
            arrival.append(per[c][cursor[c]])
            cursor[c] += 1
        mixer, out = Interleaver(names, weights), []
        for c, part in arrival:
            out += mixer.push(c, pa.array(part)).to_pylist()
        for c in range(3):
            out += mixer.close(c).to_pylist()
        streams.append((out, mixer.counts()))
    assert streams[0][0] == streams[1][0] == streams[2][0]
    out, counts = streams[0]
    assert len(out) >= 10_000
    for name, w in zip(names, weights):
        assert abs(sum(d.startswith(name) for d in out) / len(out) - w / 10) < 0.02
        assert counts[name]["share"] == pytest.approx(w / 10, abs=0.02) and counts[name]["share_asked"] == w / 10
    assert counts["c"]["exhausted"] and counts["c"]["documents"] == 2200  # c ran out first: the pass ended
    assert counts["a"]["documents"] < 6000 and not counts["a"]["exhausted"]
    # Each component's documents keep their order.
    assert [d for d in out if d.startswith("b")] == sources["b"][:counts["b"]["documents"]]


def test_interleaver_waits_for_the_component_the_schedule_needs():
    mixer = Interleaver(["a", "b"], [1.0, 1.0])
    assert mixer.push(1, pa.array(["b0", "b1", "b2"])).to_pylist() == []  # the first pick is a: nothing is decided
    assert mixer.push(0, pa.array(["a0"])).to_pylist() == ["a0", "b0"]
    assert mixer.close(0).to_pylist() == []  # a has run out where the schedule needs it: the pass ends
    assert mixer.ended and mixer.push(1, pa.array(["b3"])).to_pylist() == []


@pytest.mark.parametrize("mix,match", [
    ([{"name": "a", "paths": ["x"]}], "at least two components"),
    ([{"name": "a", "paths": ["x"]}, {"name": "a", "paths": ["y"]}], "two components are named 'a'"),
    ([{"paths": ["x"], "weight": 0}, {"paths": ["y"]}], r"data.mix\[0\].weight must be a number > 0"),
    ([{"paths": []}, {"paths": ["y"]}], r"data.mix\[0\].paths must be a non-empty list"),
    ([{"path": ["x"]}, {"paths": ["y"]}], "unknown key 'path'"),
])
def test_mix_config_errors_name_the_entry(mix, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, {"data.mix": mix})


def test_mix_and_paths_exclude_each_other():
    with pytest.raises(ConfigError, match="data.paths and data.mix are both set"):
        load_config(None, {"data.mix": [{"paths": ["x"]}, {"paths": ["y"]}], "data.paths": ["z"]})
