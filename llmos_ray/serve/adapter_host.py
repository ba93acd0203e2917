"""The LoRA adapters one model replica holds beside its base (`HostedAdapters`), and how an adapter's
requests see the engine (`AdapterView`).

    hosted = HostedAdapters(engine, {"sql": "runs/sql/adapter"}, table_name, "model-tiny")
    view = await hosted.view(request.adapter)        # the engine, an AdapterView, or an APIError (404)
    ids, params, stops = prompting.prepare(view, request)
    engine.submit(ids, params, sink, stops, request.adapter.id)
    await hosted.load(ref); hosted.unload(ref.id)    # what the load/unload routes ask of one replica

The adapters configured for the deployment (serve.models) are loaded when the replica starts (a bad
one fails the replica, as a bad model does). Runtime adapters (`adapter_table`) reach a replica three
ways, whichever comes first: the ingress asks one replica to load an adapter before it enters the
table (which checks it fits the base), every replica follows the table (`follow`: loads what was
added for its deployment, drops what was removed), and a request naming an adapter this replica does
not have yet loads it then, after asking the table whether it is still loaded (else 404).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any, Optional, Union

from llmos_ray.errors import ModelError
from llmos_ray.serve.adapter_table import TableFollower
from llmos_ray.serve.adapters import read_adapter
from llmos_ray.serve.engine import TURN_END_TOKENS, Engine
from llmos_ray.serve.types import AdapterRef, APIError
from llmos_ray.storage import localize

log = logging.getLogger(__name__)


def fetch(uri: str, load_id: Optional[str] = None) -> str:
    """A local directory of adapter `uri`: a remote one is downloaded once per runtime load (`load_id`: a
    fresh copy, whatever an earlier load of the same URI left in the cache), a configured one once."""
    return localize(uri, "models" if load_id is None else f"adapters/{load_id}")


class AdapterView:
    """The engine as one adapter's requests see it (`prompting.prepare`, /tokenize, structured output):
    its context, vocabulary and limits under the adapter's served name, with the adapter's tokenizer (its
    chat template) and end-of-sequence tokens when the adapter brings its own."""

    def __init__(self, engine: Engine, name: str, tokenizer, eos_ids: frozenset[int]):
        self.engine, self.name, self.tokenizer, self.eos_ids = engine, name, tokenizer, eos_ids
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        vocab = tokenizer.get_vocab()
        self.turn_end_ids = frozenset(vocab[t] for t in TURN_END_TOKENS if t in vocab) | eos_ids

    def __getattr__(self, attr: str):  # everything else is the engine's
        return getattr(self.engine, attr)


def adapter_view(engine: Engine, name: str, path: str) -> AdapterView:
    """The view of the adapter in local directory `path`: its own tokenizer if it has one (ModelError
    if its vocabulary is not the base's) and the end-of-sequence ids of its generation config."""
    from llmos_ray.data.tokenizer import load_tokenizer

    tokenizer = engine.tokenizer
    if any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = load_tokenizer(path)
        if tokenizer.get_vocab() != engine.tokenizer.get_vocab():
            raise ModelError(f"LoRA adapter {path} brings a tokenizer whose vocabulary is not its base's: serve it "
                             f"merged (serve.model_options.{name}.lora=merge)")
    eos = set(engine.eos_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    generation = os.path.join(path, "generation_config.json")
    if os.path.isfile(generation):
        with open(generation) as f:
            value = json.load(f).get("eos_token_id")
        eos |= {value} if isinstance(value, int) else {v for v in value or () if isinstance(v, int)}
    return AdapterView(engine, name, tokenizer, frozenset(eos))


class HostedAdapters:
    """The LoRA adapters of one replica of deployment `host`: configured ones, and the application's
    runtime ones (followed in `table`, the adapter table's actor name; None = no runtime adapters)."""

    def __init__(self, engine: Engine, configured: dict[str, str], table: Optional[str], host: str):
        self.engine, self.host, self.table_name = engine, host, table
        self.views: dict[str, AdapterView] = {}
        """Adapter id -> its view."""
        self.runtime: set[str] = set()
        """Ids of the runtime adapters loaded here."""
        self._loading: dict[str, asyncio.Future] = {}
        self._follower = TableFollower(table, f"model {engine.name}")
        for name, uri in configured.items():
            self._load_now(AdapterRef(name, uri, name), runtime=False)
        self.follow(now=True)

    def _load_now(self, ref: AdapterRef, runtime: bool = True) -> None:
        """Read, check and add one adapter (blocking: a thread's work)."""
        local = fetch(ref.uri, ref.id if runtime else None)
        files = read_adapter(local)
        view = adapter_view(self.engine, ref.name, local)
        self.engine.add_adapter(ref.id, files)
        self.views[ref.id] = view
        log.info("model %s: LoRA adapter %s (%s) loaded beside the base", self.engine.name, ref.name, ref.uri)

    async def load(self, ref: AdapterRef) -> Optional[APIError]:
        """Load a runtime adapter (at most once, however many ask at once); a 400 naming lora_path if it
        is not an adapter of this base."""
        if ref.id in self.views:
            return None
        task = self._loading.get(ref.id)
        if task is None:
            task = self._loading[ref.id] = asyncio.ensure_future(asyncio.to_thread(self._load_now, ref))
            task.add_done_callback(lambda _: self._loading.pop(ref.id, None))
        try:
            await asyncio.shield(task)
        except ModelError as e:
            return APIError(400, f"lora_path: {e}", param="lora_path", code="invalid_adapter")
        except Exception as e:  # noqa: BLE001 - e.g. a remote directory that cannot be fetched
            return APIError(400, f"lora_path: {ref.uri} cannot be read: {type(e).__name__}: {e}", param="lora_path",
                            code="invalid_adapter")
        self.runtime.add(ref.id)
        return None

    def unload(self, adapter_id: str) -> bool:
        """Drop a runtime adapter; requests already decoding with it finish with it."""
        self.views.pop(adapter_id, None)
        self.runtime.discard(adapter_id)
        return self.engine.remove_adapter(adapter_id)

    async def view(self, ref: Optional[AdapterRef]) -> Union[Engine, AdapterView, APIError]:
        """What requests naming `ref` decode with: the engine (no adapter) or the adapter's view; a 404 for a
        runtime adapter that was unloaded meanwhile."""
        self.follow()
        if ref is None:
            return self.engine
        view = self.views.get(ref.id)
        if view is not None:
            return view
        if self.table_name is None or not await self._follower.table().current.remote(ref.id):
            return APIError(404, f"model {ref.name!r} does not exist (its LoRA adapter was unloaded)", param="model",
                            code="model_not_found")
        error = await self.load(ref)
        if error is not None:
            return APIError(500, f"model {ref.name!r}: its LoRA adapter cannot be loaded here: {error.message}",
                            code="server_error")
        return self.views[ref.id]

    def slot(self, ref: Optional[AdapterRef]) -> Optional[int]:
        """The engine slot of a loaded adapter (None: the base)."""
        return None if ref is None or self.engine.adapters is None else self.engine.adapters.names.get(ref.id)

    # -- following the table -------------------------------------------------------------------

    def follow(self, now: bool = False) -> None:
        """Follow the adapter table from now on (once; on the replica's event loop, not outside one); `now`:
        first load the runtime adapters it already holds for this deployment (when the replica starts)."""
        self._follower.start(self._changed, self._load_all_now if now else None)

    def _load_all_now(self, records: dict[str, dict[str, Any]]) -> None:
        for r in records.values():
            if r["host"] == self.host:
                try:
                    self._load_now(AdapterRef(r["name"], r["uri"], r["id"]))
                    self.runtime.add(r["id"])
                except Exception:  # noqa: BLE001 - loaded when a request names it, or logged then
                    log.exception("model %s: LoRA adapter %s cannot be loaded", self.engine.name, r["name"])

    async def _changed(self, records: dict[str, dict[str, Any]]) -> None:
        mine = {r["id"]: r for r in records.values() if r["host"] == self.host}
        for adapter_id in self.runtime - set(mine):
            self.unload(adapter_id)
        for adapter_id, r in mine.items():
            if adapter_id not in self.views:
                error = await self.load(AdapterRef(r["name"], r["uri"], adapter_id))
                if error is not None:
                    log.error("model %s: LoRA adapter %s cannot be loaded here: %s", self.engine.name,
                              r["name"], error.message)
