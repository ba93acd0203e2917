"""Weighted mixtures of corpora (data.mix, finetune.mix): which component each next document comes
from, decided deterministically, so a mixed stream is the same on every run and a resumed run
continues the same interleaving.

    data.mix: [{name: web, paths: [web/*.jsonl], weight: 3}, {name: code, paths: [src/], weight: 1}]

`MixSchedule` is smooth weighted round-robin (the scheduler nginx uses for weighted upstreams):
every pick adds each component's weight to its credit and takes the component with the most
credit (ties: the first), which then pays the total. Over any n picks component c is chosen
n·w_c/W times up to less than one pick per component — no randomness, no drift.

`Interleaver` applies it to streams of documents arriving per component in any interleaving of
blocks (the pipeline reads components side by side): it emits documents in schedule order as far
as the input determines them, so its output depends only on each component's documents, never on
timing. A pass ends when the schedule picks a component that has run out (Hugging Face
`interleave_datasets`' "first_exhausted"): the proportions hold exactly, and the stats say how
much of each component was used.
"""

from __future__ import annotations

from typing import Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from llmos_ray.config import MixComponent, mix_components

__all__ = ["MixComponent", "mix_components", "MixSchedule", "Interleaver", "MixLedger", "interleave_lists"]

class MixSchedule:
    """Smooth weighted round-robin over components (see module doc). `position` is its whole state."""

    def __init__(self, weights: Sequence[float], position: Optional[dict] = None):
        if not weights or min(weights) <= 0:
            raise ValueError(f"weights must be > 0, got {list(weights)}")
        self.weights = [float(w) for w in weights]
        self.total = sum(self.weights)
        state = position or {}
        self.credit = list(state.get("credit", [0.0] * len(self.weights)))
        self.picks = int(state.get("picks", 0))

    def peek(self) -> int:
        """The component of the next pick (without taking it)."""
        best, best_credit = 0, None
        for c, (credit, w) in enumerate(zip(self.credit, self.weights)):
            if best_credit is None or credit + w > best_credit:
                best, best_credit = c, credit + w
        return best

    def take(self) -> int:
        c = self.peek()
        for i, w in enumerate(self.weights):
            self.credit[i] += w
        self.credit[c] -= self.total
        self.picks += 1
        return c

    @property
    def position(self) -> dict:
        return {"credit": list(self.credit), "picks": self.picks}


def interleave_lists(items: Sequence[Sequence], names: Sequence[str], weights: Sequence[float]) -> tuple[list, dict]:
    """In-memory mixing (fine-tuning sets): the items of each list in `MixSchedule` order until the
    schedule picks a list that has run out; returns (mixed items, per-list counts as `Interleaver.counts`)."""
    schedule, used, out = MixSchedule(weights), [0] * len(items), []
    while True:
        c = schedule.peek()
        if used[c] == len(items[c]):
            break
        schedule.take()
        out.append(items[c][used[c]])
        used[c] += 1
    total = max(1, len(out))
    counts = {name: {"weight": w, "share_asked": round(w / schedule.total, 6), "share": round(u / total, 6),
                     "documents": u, "arrived": len(lst), "exhausted": u == len(lst)}
              for name, w, u, lst in zip(names, schedule.weights, used, items)}
    return out, counts


class Interleaver:
    """Documents of several components → one stream in `MixSchedule` order (see module doc)."""

    def __init__(self, names: Sequence[str], weights: Sequence[float], limit: Optional[int] = None):
        self.names = list(names)
        self.schedule = MixSchedule(weights)
        self.pending: list[list[pa.Array]] = [[] for _ in names]
        self.available = [0] * len(names)
        self.closed = [False] * len(names)
        self.emitted = [0] * len(names)
        self.arrived = [0] * len(names)
        self.limit = limit
        self.ended = False

    def push(self, component: int, texts: pa.Array) -> pa.Array:
        """Documents of `component`, in its order; returns the documents now determined."""
        if len(texts):
            self.pending[component].append(texts.cast(pa.large_string()))
            self.available[component] += len(texts)
            self.arrived[component] += len(texts)
        return self._emit()

    def close(self, component: int) -> pa.Array:
        """`component` has no more documents; returns the documents now determined."""
        self.closed[component] = True
        return self._emit()

    def _emit(self) -> pa.Array:
        take = [0] * len(self.names)
        order: list[int] = []
        while not self.ended:
            if self.limit is not None and self.schedule.picks >= self.limit:
                self.ended = True
                break
            c = self.schedule.peek()
            if take[c] == self.available[c]:
                if self.closed[c]:
                    self.ended = True  # first exhausted: the pass ends here
                break
            self.schedule.take()
            order.append(c)
            take[c] += 1
        if not order:
            return pa.array([], pa.large_string())
        heads = []
        for c, n in enumerate(take):
            values = pa.concat_arrays(self.pending[c]) if self.pending[c] else pa.array([], pa.large_string())
            heads.append(values.slice(0, n))
            self.pending[c] = [values.slice(n)] if n < len(values) else []
            self.available[c] -= n
            self.emitted[c] += n
        # Documents in pick order: the k-th pick of component c is heads[c][k].
        flat = pa.concat_arrays(heads)
        starts, at = [], 0
        for h in heads:
            starts.append(at)
            at += len(h)
        seen = [0] * len(self.names)
        index = []
        for c in order:
            index.append(starts[c] + seen[c])
            seen[c] += 1
        return flat.take(pa.array(index, pa.int64()))

    def counts(self) -> dict:
        """Per component: weight, asked and realized share, documents emitted and arrived, exhausted."""
        total = sum(self.emitted) or 1
        weights = self.schedule.weights
        return {name: {"weight": w, "share_asked": round(w / self.schedule.total, 6),
                       "share": round(e / total, 6), "documents": e, "arrived": a,
                       "exhausted": closed and a == e}
                for name, w, e, a, closed in zip(self.names, weights, self.emitted, self.arrived, self.closed)}


class MixLedger:
    """The ledger of a mixture: one `documents.Ledger` per component (each sees its component's
    records in order: counts, dedup and the held-out split stay per component), then the
    `Interleaver`. Same interface as a Ledger: add(block) / close(component) → {text}, counts()."""

    def __init__(self, ledgers: list, component_of: Sequence[int], names: Sequence[str], weights: Sequence[float],
                 limit: Optional[int] = None):
        self.ledgers, self.component_of = ledgers, list(component_of)
        self.interleaver = Interleaver(names, weights, limit)

    @classmethod
    def for_config(cls, data, corpus, split: str) -> "MixLedger":
        from llmos_ray.data.documents import Ledger

        ledgers = [Ledger.for_config(data, corpus, split) for _ in corpus.mix]
        return cls(ledgers, corpus.component_of, [c.name for c in corpus.mix], [c.weight for c in corpus.mix],
                   limit=data.max_documents)

    @property
    def records(self) -> int:
        return sum(ledger.records for ledger in self.ledgers)

    @property
    def bad_records(self) -> int:
        return sum(ledger.bad_records for ledger in self.ledgers)

    @property
    def done(self) -> bool:
        return self.interleaver.ended or all(self.interleaver.closed)

    def add(self, block: pa.Table) -> pa.Table:
        """Records of one read unit (one component) → the mixed documents now determined."""
        if not block.num_rows:
            return pa.table({"text": pa.array([], pa.large_string())})
        first, last = (self.component_of[block.column("file")[i].as_py()] for i in (0, -1))
        if first != last:  # read units never span components; blocks keep to one unit
            raise RuntimeError("a block of the mixture's read stage holds records of two components")
        kept = self.ledgers[first].add(block).column("text")
        texts = pc.cast(kept, pa.large_string()).combine_chunks() if isinstance(kept, pa.ChunkedArray) else kept
        return pa.table({"text": self.interleaver.push(first, texts)})

    def close(self, component: int) -> pa.Table:
        return pa.table({"text": self.interleaver.close(component)})

    def counts(self) -> dict:
        """Summed counts of the components (as documents.Ledger.counts), and `mix`: per component its
        weight, asked and realized share, documents mixed in and read, whether it ran out."""
        parts = [ledger.counts() for ledger in self.ledgers]
        out = {k: sum(p[k] for p in parts) for k in parts[0] if isinstance(parts[0][k], int)}
        out["bad_by_file"] = {k: v for p in parts for k, v in p["bad_by_file"].items()}
        out["bad_count_by_file"] = {k: v for p in parts for k, v in p["bad_count_by_file"].items()}
        out["mix"] = self.interleaver.counts()
        out["mixed_documents"] = sum(self.interleaver.emitted)
        return out
