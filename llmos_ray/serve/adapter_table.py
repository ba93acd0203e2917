"""The LoRA adapters an application loaded at run time (POST /v1/load_lora_adapter): one small actor
that every ingress replica and every model replica of the application follows.

    table = adapter_table(name)                              # finds or starts it (any replica may be first)
    version, records = await table.changes.remote(seen, me)  # a long poll: returns once the table is not
                                                             # at version `seen` any more (or after WAIT_S)
    why = await table.add.remote(record, replace=False)      # None, or why not (the name is taken)
    record = await table.remove.remote(name)                 # the record removed, or None
    await table.settled.remote()                             # [] once every ingress replica has the latest
    await table.current.remote(adapter_id)                   # whether that load is still in the table

A record is {name, uri, base, host, id}: the served name, where the adapter is read from, its base,
the deployment that holds it and an id unique to the load (a name loaded again under another path is
another adapter). Ingress replicas keep a copy of the records (`dispatch.ServedModels`) and model
replicas the adapters of their own deployment (`adapter_host.HostedAdapters`): each reads the whole
table when it starts (a restart, autoscaling) and then follows it by a long poll of `changes`, so a
load or an unload reaches every replica in about one round trip. The load and unload routes answer
once every ingress replica that follows the table (`me` names it) polled again at the new version
(`settled`, at most SETTLE_S), so the next request sees the change whichever replica it reaches.

Why an actor: a Serve handle reaches one replica of a deployment, never each of them, and a
deployment's user_config changes only by redeploying the application. It is detached and named
after the application and the build of it (`build_app`'s instance id), so a redeployed
application starts with an empty table; it ends itself once nobody asked it anything for IDLE_S
(its application is gone). The table lives in memory: if Ray restarts the actor, the adapters loaded
at run time are gone and must be loaded again (those in serve.models are never in it).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Optional

from llmos_ray.runtime import ACTOR_NAMESPACE, detached_actor

log = logging.getLogger(__name__)

NAMESPACE = ACTOR_NAMESPACE
WAIT_S = 30.0
"""How long one long poll of `changes` waits for a change."""
IDLE_S = 300.0
"""The table ends itself after this long without a call (every follower polls at least every WAIT_S)."""
SETTLE_S = 2.0
"""How long `settled` waits at most for the followers to catch up (one that died is given up on)."""


def table_name(app_name: str, instance: str) -> str:
    return f"llmos-adapters-{app_name}-{instance}"


class AdapterTable:
    """The actor (async: long polls wait on the actor's event loop)."""

    def __init__(self):
        self.records: dict[str, dict[str, Any]] = {}
        self.version = (uuid.uuid4().hex[:8], 0)  # (epoch, n): a restarted table is never taken for an old one
        self._changed: Optional[asyncio.Condition] = None
        self._last = time.monotonic()
        self._waiting = 0
        self._reaper: Optional[asyncio.Task] = None
        self.followers: dict[str, tuple[tuple, float]] = {}
        """Follower -> (the version it last asked from, when)."""

    def _touch(self) -> asyncio.Condition:
        self._last = time.monotonic()
        if self._changed is None:
            self._changed = asyncio.Condition()
            self._reaper = asyncio.get_running_loop().create_task(self._reap())
        return self._changed

    async def _bump(self) -> None:
        self.version = (self.version[0], self.version[1] + 1)
        async with self._touch():
            self._changed.notify_all()

    async def changes(self, seen: Optional[tuple] = None, follower: Optional[str] = None,
                      wait_s: float = WAIT_S) -> tuple[tuple, dict]:
        """(version, records), once the table is not at version `seen` (at once if it is not), or after
        wait_s; `follower` names an ingress replica that holds version `seen` (for `settled`)."""
        changed = self._touch()
        if follower is not None:
            self.followers[follower] = (tuple(seen or ()), time.monotonic())
            async with changed:
                changed.notify_all()
        if tuple(seen or ()) == self.version:
            self._waiting += 1
            try:
                async with changed:
                    await asyncio.wait_for(changed.wait_for(lambda: self.version != tuple(seen)), wait_s)
            except asyncio.TimeoutError:
                pass
            finally:
                self._waiting -= 1
                self._touch()
        return self.version, dict(self.records)

    async def add(self, record: dict[str, Any], replace: bool = False) -> Optional[str]:
        """Put `record` in the table; why not (its name is taken and not `replace`), else None."""
        self._touch()
        if record["name"] in self.records and not replace:
            return f"a LoRA adapter named {record['name']!r} is already loaded"
        self.records[record["name"]] = dict(record)
        await self._bump()
        return None

    async def remove(self, name: str) -> Optional[dict[str, Any]]:
        self._touch()
        record = self.records.pop(name, None)
        if record is not None:
            await self._bump()
        return record

    async def settled(self, timeout_s: float = SETTLE_S) -> list[str]:
        """Wait until every live follower asked from the current version; those that did not in time."""
        changed = self._touch()

        def behind() -> list[str]:
            live = time.monotonic() - WAIT_S - 5.0
            return [f for f, (v, when) in self.followers.items() if when > live and v != self.version]

        try:
            async with changed:
                await asyncio.wait_for(changed.wait_for(lambda: not behind()), timeout_s)
        except asyncio.TimeoutError:
            pass
        return behind()

    async def current(self, adapter_id: str) -> bool:
        self._touch()
        return any(r["id"] == adapter_id for r in self.records.values())

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(IDLE_S / 10)
            if self._waiting == 0 and time.monotonic() - self._last > IDLE_S:
                import ray

                log.info("adapter table: no call for %.0f s, its application is gone; it ends", IDLE_S)
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


class TableFollower:
    """A replica's long poll of the adapter table `name` (None: the application has none), run on the
    replica's event loop: `start(changed, first)` reads the whole table at once when `first` is given
    and hands it to `first(records)` before it returns (a replica starting), then calls
    `await changed(records)` after every change. Started once, and only inside an event loop (a
    replica's __init__ may run outside one: it starts on the first call that has one)."""

    def __init__(self, name: Optional[str], who: str, follower_id: Optional[str] = None):
        self.name, self.who, self.follower_id = name, who, follower_id
        """`who` names the replica in log lines; `follower_id` is given by the ingress replicas whose
        version `settled` waits for."""
        self._table = None
        self._task: Optional[asyncio.Task] = None

    def table(self):
        """The table's actor handle."""
        if self._table is None:
            self._table = adapter_table(self.name)
        return self._table

    def start(self, changed, first=None) -> None:
        if self._task is not None or self.name is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        seen = None
        if first is not None:
            import ray

            try:
                seen, records = ray.get(self.table().changes.remote(None, None, 0), timeout=30)
            except Exception as e:  # noqa: BLE001 - the long poll below keeps asking
                log.warning("%s: the adapter table did not answer (%s); following it", self.who, e)
            else:
                first(records)
        self._task = loop.create_task(self._follow(seen, changed))

    async def _follow(self, seen: Optional[tuple], changed) -> None:
        while True:
            try:
                seen, records = await self.table().changes.remote(seen, self.follower_id)
            except Exception as e:  # noqa: BLE001 - the table restarting: ask again
                log.warning("%s: the adapter table did not answer (%s); retrying", self.who, e)
                await asyncio.sleep(1.0)
                continue
            await changed(records)


def adapter_table(name: str):
    """The actor named `name`, started if there is none."""
    return detached_actor(AdapterTable, name, max_restarts=-1, max_task_retries=-1)
