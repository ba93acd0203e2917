"""LoRA adapters loaded and unloaded at run time, in vLLM's shapes (behind an admin API key).

    POST /v1/load_lora_adapter    {"lora_name", "lora_path", "load_inplace"?: false}
                               -> 200 "Success: LoRA adapter 'NAME' added successfully."
    POST /v1/unload_lora_adapter  {"lora_name"} -> 200 "Success: LoRA adapter 'NAME' removed successfully."

`lora_path` is a model library reference (NAME, NAME@N, NAME:ALIAS), a local directory or any fsspec
URI of a peft LoRA adapter. It goes to the deployment that holds its base (adapter_config.json's
base_model_name_or_path, resolved as `llmos serve` resolves models, must be a base a served model's
deployment holds shared: the first such deployment in serve.models order); that deployment's
replica reads it and checks it fits the base, then it enters the application's adapter table, which
every ingress and model replica follows (`adapter_table`). From then on `/v1/models` lists it and
requests with `model: NAME` decode with it, batched with the base's rows and other adapters'; after
an unload the name is a 404 `model_not_found` like any other unknown model (requests already decoding
with it finish). `load_inplace: true` replaces an adapter loaded at run time under the same name.
Configured models (serve.models) can be neither replaced nor unloaded.

Errors, in OpenAI's shape: a name that is taken or invalid, a path that is not a LoRA adapter, an
adapter of a base not served here or that does not fit it -> 400 naming the field; unloading a name
that was not loaded -> 404; no key -> 401 and, when keys are configured, a key without `admin: true`
-> 403 (on an open server anyone may load adapters, as anyone may use the models).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Optional

from fastapi.responses import PlainTextResponse, Response

from llmos_ray.errors import LlmosError
from llmos_ray.registry import adapter_base, resolve_source
from llmos_ray.serve.adapter_host import fetch
from llmos_ray.serve.adapters import is_adapter_dir
from llmos_ray.serve.dispatch import ServedModels, normalised
from llmos_ray.serve.middleware import RequestContext
from llmos_ray.serve.spec import SERVED_NAME_RE
from llmos_ray.serve.types import AdapterRef, APIError, bad_request
from llmos_ray.serve.validation import StrictRequest, parse_body, shown

log = logging.getLogger(__name__)


class LoadLoraAdapterRequest(StrictRequest):
    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoraAdapterRequest(StrictRequest):
    lora_name: str
    lora_int_id: Optional[int] = None
    """vLLM's internal id: not supported here (400 when given)."""


def require_admin(guard, ctx: RequestContext) -> None:
    """403 for a key that is not an admin key (an open server has no keys: anyone may)."""
    if not guard.keyring.open and not (ctx.key is not None and ctx.key.admin):
        raise APIError(403, "loading and unloading LoRA adapters needs an admin key", code="permission_denied")


def resolve_adapter(path: str, registry: Optional[str], load_id: str) -> tuple[str, str]:
    """(adapter URI, its base's URI) of a library reference, directory or fsspec URI (a remote one is
    fetched for load `load_id`); 400 naming lora_path when it is not a LoRA adapter or names no base."""
    try:
        uri, base, _ = resolve_source(path, registry)
        local = fetch(uri, load_id)
        if not is_adapter_dir(local):
            raise bad_request(f"lora_path: {shown(path)} is not a LoRA adapter (no adapter_config.json, or a whole "
                              "model)", "lora_path", "invalid_adapter")
        if base is None:  # a remote adapter: its base is read from the downloaded copy
            base, _, _ = resolve_source(adapter_base(local), registry)
    except APIError:
        raise
    except LlmosError as e:
        raise bad_request(f"lora_path: {e}", "lora_path", "invalid_adapter") from None
    except Exception as e:  # noqa: BLE001 - e.g. a remote directory that cannot be listed
        raise bad_request(f"lora_path: {shown(path)} cannot be read: {type(e).__name__}: {e}", "lora_path",
                          "invalid_adapter") from None
    return uri, base


class LoraRoutes:
    """What the load/unload routes do; the ingress delegates here."""

    def __init__(self, models: ServedModels, guard, registry: Optional[str]):
        self.models, self.guard, self.registry = models, guard, registry

    def _name(self, name: str, loading: bool) -> None:
        if not SERVED_NAME_RE.match(name):
            raise bad_request(f"lora_name: {shown(name)} is not a valid model name (letters, digits, '.', '_', ':', "
                              "'@', '-')", "lora_name")
        if name in self.models.configured:
            what = "replaced" if loading else "unloaded"
            raise bad_request(f"lora_name: {name!r} is a model configured in serve.models; it cannot be {what} at "
                              "run time", "lora_name", "model_exists" if loading else "invalid_value")

    async def load(self, body: bytes, ctx: RequestContext) -> Response:
        require_admin(self.guard, ctx)
        req = parse_body(body, LoadLoraAdapterRequest)
        self._name(req.lora_name, loading=True)
        if self.models.table_name is None:
            raise bad_request("this server takes no LoRA adapters at run time", "lora_name", "unsupported_parameter")
        if req.lora_name in self.models.runtime and not req.load_inplace:
            raise bad_request(f"lora_name: a LoRA adapter named {req.lora_name!r} is already loaded (load_inplace: "
                              "true replaces it)", "lora_name", "model_exists")
        load_id = uuid.uuid4().hex
        uri, base = await asyncio.to_thread(resolve_adapter, req.lora_path, self.registry, load_id)
        host = self.models.bases.get(normalised(base))
        if host is None:
            bases = sorted({s.base_uri if s.adapter_id else s.uri for s in self.models.bases.values()})
            raise bad_request(f"lora_path: the adapter was trained on {base}, which no model here serves as a shared "
                              f"base (bases: {', '.join(bases) or 'none'})", "lora_path", "invalid_adapter")
        ref = AdapterRef(req.lora_name, uri, load_id)
        replica = self.models.hosts[host.host]
        error = await replica.load_adapter.remote(ref)
        if error is not None:
            raise error
        record = {"name": ref.name, "uri": uri, "base": base, "host": host.host, "id": ref.id}
        old = self.models.runtime.get(ref.name)
        why = await self.models.table().add.remote(record, replace=req.load_inplace)
        if why is not None:  # another load of that name won meanwhile
            await replica.unload_adapter.remote(ref.id)
            raise bad_request(f"lora_name: {why}", "lora_name", "model_exists")
        self.models.drop_runtime(ref.name)
        self.models.add_runtime(record)
        await self._settled()
        if old is not None:
            await self._unload_from(old)
        log.info("LoRA adapter %s loaded from %s on %s", ref.name, uri, host.host)
        return PlainTextResponse(f"Success: LoRA adapter '{ref.name}' added successfully.")

    async def unload(self, body: bytes, ctx: RequestContext) -> Response:
        require_admin(self.guard, ctx)
        req = parse_body(body, UnloadLoraAdapterRequest)
        if req.lora_int_id is not None:
            raise bad_request("lora_int_id: not supported by this server (unload by lora_name)", "lora_int_id",
                              "unsupported_parameter")
        self._name(req.lora_name, loading=False)
        record = await self.models.table().remove.remote(req.lora_name) if self.models.table_name else None
        if record is None:
            raise APIError(404, f"lora_name: no LoRA adapter named {shown(req.lora_name)} was loaded at run time",
                           param="lora_name", code="model_not_found")
        self.models.drop_runtime(req.lora_name)
        await self._settled()
        await self._unload_from(record)
        log.info("LoRA adapter %s unloaded", req.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    async def _settled(self) -> None:
        """Wait until every ingress replica serves the table's new version (`adapter_table.settled`)."""
        behind = await self.models.table().settled.remote()
        if behind:
            log.warning("LoRA adapters: ingress replicas %s did not catch up with the adapter table in time", behind)

    async def _unload_from(self, record: dict) -> None:
        """Drop an adapter from one replica of its host now (the others follow the table)."""
        try:
            await self.models.hosts[record["host"]].unload_adapter.remote(record["id"])
        except Exception as e:  # noqa: BLE001 - the table no longer has it: every replica drops it anyway
            log.warning("LoRA adapter %s: a replica did not confirm the unload (%s)", record["name"], e)
