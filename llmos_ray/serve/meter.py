"""The usage meter: one Ray actor per application that every ingress replica asks and tells.

    meter = Meter(app_name, url)                   # in each ingress replica: finds or starts the actor
    await meter.admit(key)                         # 429 (rate_limit_exceeded / insufficient_quota) or go
    meter.record(ctx, status)                      # when the request ended: one ledger row, tokens charged

`UsageMeter` is the actor: the rate windows and budgets (`quota.Limiter`) of every key, shared by
all ingress replicas (not per-process counters that multiply with replicas), and the writer of
the ledger (`ledger.Ledger`): rows are queued and written in batches by a thread, every FLUSH_S
seconds or BATCH rows, never on a request's path. It is detached and named after the application
and the database, restarted by Ray if it dies (budgets are re-read from the ledger then); a row
whose request id it has already taken is ignored, and the ledger ignores it too. It ends itself
once its application is deleted (`stop_meter` ends it at once). Only keys with
limits make the request wait for the actor (`admit`), and only near a limit: far from all of
them the meter gives a replica some headroom (`quota.Limiter.headroom`) to admit a few requests on
its own for LEASE_S, counted by the meter moments later. `record` never waits (the rows of
requests that end within SEND_S go to the actor in one call).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Optional

from llmos_ray.errors import ConfigError
from llmos_ray.runtime import ACTOR_NAMESPACE, detached_actor
from llmos_ray.serve.keys import KeyRecord
from llmos_ray.serve.ledger import GROUPS, Ledger, day_of, parse_since
from llmos_ray.serve.metrics import get_metrics
from llmos_ray.serve.quota import Limiter
from llmos_ray.serve.types import APIError, bad_request
from llmos_ray.serve.validation import shown

log = logging.getLogger(__name__)

NAMESPACE = ACTOR_NAMESPACE
FLUSH_S = 0.5
BATCH = 256
SEEN = 100_000
"""Request ids remembered to drop a replayed row before it reaches the database."""
ADMIT_TIMEOUT_S = 5.0
APP_CHECK_S = 10.0
SEND_S = 0.01
LEASE_S = 1.0
"""How long an ingress replica may use the headroom the meter gave it."""
"""An ingress replica sends the rows of the requests that ended within this many seconds in one call."""
"""How often the meter checks that its application still exists (it ends itself two checks after)."""


def meter_name(app_name: str, url: str) -> str:
    """The actor's name: one meter per application and database."""
    return f"llmos-meter-{app_name}-{hashlib.sha256(url.encode()).hexdigest()[:10]}"


class UsageMeter:
    """The actor (threaded: admit, record and reports run concurrently under one lock)."""

    def __init__(self, url: str, app_name: Optional[str] = None):
        self.app_name = app_name
        self.ledger = Ledger(url)
        self.limiter = Limiter(self._used_since)
        self.lock = threading.RLock()
        self.pending: list[dict[str, Any]] = []
        self.seen: OrderedDict[str, None] = OrderedDict()
        self.written = 0
        threading.Thread(target=self._flush_loop, daemon=True, name="ledger-writer").start()

    def _used_since(self, name: str, since: Optional[float]) -> int:
        self.flush()
        return self.ledger.used_since(name, since)

    def admit(self, name: str, limits: dict, replicas: int = 1,
              release: Optional[tuple[int, float]] = None) -> tuple[Optional[tuple], int, float]:
        """(None = go, else (code, message, retry_after_s); the caller's headroom and when it was
        given), after taking back what the caller did not use of its last headroom (`release`)."""
        with self.lock:
            if release:
                self.limiter.release(name, *release)
            refusal = self.limiter.admit(name, limits)
            if refusal is not None:
                return (refusal.code, refusal.message, refusal.retry_after_s), 0, 0.0
            return (None, *self.limiter.headroom(name, limits, replicas))

    def record(self, rows: list[tuple[dict[str, Any], bool]], releases: Optional[list] = None) -> None:
        """Queue ledger rows (row, whether to charge its tokens to the key's windows and budget);
        take back unused headroom ([(name, n, when)])."""
        with self.lock:
            for name, n, when in releases or ():
                self.limiter.release(name, n, when)
            for row, charge in rows:
                if row["request_id"] in self.seen:
                    continue
                self.seen[row["request_id"]] = None
                if len(self.seen) > SEEN:
                    self.seen.popitem(last=False)
                self.pending.append(row)
                if charge:
                    self.limiter.charge(row["key"], row["prompt_tokens"] + row["completion_tokens"])
            full = len(self.pending) >= BATCH
        if full:
            self.flush()

    def flush(self) -> int:
        """Write the queued rows now; returns how many were new to the ledger."""
        with self.lock:
            rows, self.pending = self.pending, []
            try:
                n = self.ledger.write(rows)
            except Exception:
                self.pending = rows + self.pending  # kept for the next attempt
                raise
            self.written += n
            return n

    def _flush_loop(self) -> None:
        missing, last_check = 0, time.monotonic()
        while True:
            time.sleep(FLUSH_S)
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - a database hiccup: the rows stay queued, retried next time
                log.exception("usage ledger: writing %d rows failed; retrying", len(self.pending))
            if self.app_name and time.monotonic() - last_check > APP_CHECK_S:
                last_check = time.monotonic()
                missing = missing + 1 if _app_gone(self.app_name) else 0
                if missing >= 2 and not self.pending:  # the application was deleted: so is its meter
                    import ray

                    log.info("application %s is gone; its usage meter ends", self.app_name)
                    ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def summary(self, **query) -> list[dict[str, Any]]:
        self.flush()
        return self.ledger.summary(**query)

    def rows(self, **query) -> list[dict[str, Any]]:
        self.flush()
        return self.ledger.rows(**query)

    def budget_used(self, name: str, period: str) -> int:
        with self.lock:
            return self.limiter.budget_used(name, period)


def _app_gone(app_name: str) -> bool:
    """Whether Serve is running without application `app_name` (False when it cannot tell)."""
    import ray
    from ray import serve
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return True  # Serve was shut down
    try:
        return app_name not in serve.status().applications
    except Exception:  # noqa: BLE001 - a controller too busy to answer: ask again next time
        return False


def meter_actor(app_name: str, url: str):
    """The application's meter actor, started if there is none (any replica may be first)."""
    return detached_actor(UsageMeter, meter_name(app_name, url), url, app_name, max_concurrency=16, max_restarts=-1,
                          max_task_retries=3)


def stop_meter(app_name: str, url: str) -> bool:
    """Flush and end the application's meter actor (after its application is deleted)."""
    import ray

    try:
        actor = ray.get_actor(meter_name(app_name, url), namespace=NAMESPACE)
    except ValueError:
        return False
    try:
        ray.get(actor.flush.remote(), timeout=30)
    finally:
        ray.kill(actor, no_restart=True)
    return True


class Meter:
    """An ingress replica's side of the meter."""

    def __init__(self, app_name: str, url: str, replicas: int = 1):
        self.url, self.replicas = url, replicas
        self.actor = meter_actor(app_name, url)
        self.metrics = get_metrics()
        self._outbox: list[tuple[dict[str, Any], bool]] = []
        self._room: dict[str, list] = {}
        """key name -> [requests it may still admit without asking, until when (monotonic), the
        meter's time of the grant]."""
        self._releases: list[tuple[str, int, float]] = []

    def _schedule(self) -> None:
        if not self._outbox and not self._releases:  # what ends together goes in one call, SEND_S later
            asyncio.get_running_loop().call_later(SEND_S, self._send)

    def _send(self) -> None:
        rows, self._outbox = self._outbox, []
        releases, self._releases = self._releases, []
        if rows or releases:
            self.actor.record.remote(rows, releases)

    def _expire(self, name: str, when: float) -> None:
        """A headroom's time is up: give back what is left of it."""
        entry = self._room.get(name)
        if entry is not None and entry[2] == when and entry[0] > 0:
            self._schedule()
            self._releases.append((name, entry[0], when))
            entry[0] = 0

    async def admit(self, key: Optional[KeyRecord]) -> None:
        """Raise the 429 a key over its limits gets; keys without limits pass without asking, and
        so do a few requests of a key far from its limits (the headroom the meter last gave)."""
        if key is None or not key.limited:
            return
        entry = self._room.get(key.name)
        if entry is not None and entry[0] > 0 and time.monotonic() < entry[1]:
            entry[0] -= 1
            return
        release = (entry[0], entry[2]) if entry is not None and entry[0] > 0 else None
        self._room.pop(key.name, None)
        try:
            refusal, room, when = await asyncio.wait_for(
                self.actor.admit.remote(key.name, key.limits(), self.replicas, release), ADMIT_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - the meter restarting must not take the API down with it
            log.warning("usage meter unavailable (%s); a request of key %s went unchecked", type(e).__name__, key.name)
            return
        if room > 0:
            old = self._room.get(key.name)  # a request beside this one asked too: its grant goes back
            if old is not None and old[0] > 0:
                self._schedule()
                self._releases.append((key.name, old[0], old[2]))
            self._room[key.name] = [room, time.monotonic() + LEASE_S, when]
            asyncio.get_running_loop().call_later(LEASE_S, self._expire, key.name, when)
        if refusal is not None:
            code, message, retry = refusal
            raise APIError(429, message, code=code, headers={"Retry-After": str(retry)} if retry else None)

    def record(self, ctx, status: int) -> None:
        """Queue the ledger row of a request that ended and count its tokens (never waits)."""
        key: Optional[KeyRecord] = ctx.key
        name, tenant = (key.name, key.tenant) if key is not None else ("-", "-")
        now = time.time()
        row = {"request_id": ctx.request_id, "time": now, "day": day_of(now), "key": name, "tenant": tenant,
               "model": ctx.model, "app": ctx.app, "route": ctx.route or "-", "status": status,
               "prompt_tokens": ctx.prompt_tokens, "completion_tokens": ctx.completion_tokens,
               "latency_s": time.perf_counter() - ctx.t0}
        self._schedule()
        self._outbox.append((row, key is not None and key.limited))
        for kind, n in (("prompt", ctx.prompt_tokens), ("completion", ctx.completion_tokens)):
            if n:
                self.metrics.tokens.inc(n, tags={"key": name, "tenant": tenant, "model": ctx.model, "kind": kind})


# -- GET /v1/usage (the caller's own) and /v1/admin/usage (everyone's) ---------------------------

QUERY = ("by", "since", "key", "tenant")


async def usage_report(guard, ctx, query: dict[str, str], admin: bool) -> dict[str, Any]:
    """The ledger summarised for the caller's key (`admin`=False) or, for an admin key (or on an
    open server), for any key/tenant; ?by=model|app|day|key|tenant|route|status&since=7d."""
    meter: Optional[Meter] = guard.meter
    if meter is None:
        raise APIError(404, "usage metering is off on this server (serve.metering)", code="metering_disabled")
    key: Optional[KeyRecord] = ctx.key
    for name in query:
        if name not in (QUERY if admin else ("by", "since")):
            raise bad_request(f"{name}: unknown query parameter; use {', '.join(QUERY if admin else QUERY[:2])}",
                              name, "unknown_parameter")
    if admin and not (guard.keyring.open or (key is not None and key.admin)):
        raise APIError(403, "this route needs an admin key", code="permission_denied")
    by = query.get("by", "model")
    if by not in GROUPS:
        raise bad_request(f"by: one of {', '.join(GROUPS)}, got {shown(by)}", "by")
    try:
        since = parse_since(query.get("since"))
    except ConfigError as e:
        raise bad_request(str(e), "since") from None
    who = ({"key": query.get("key"), "tenant": query.get("tenant")} if admin
           else {"key": key.name if key is not None else "-", "tenant": None})
    data = await meter.actor.summary.remote(by=by, since=since, **who)
    total = {f: sum(r[f] for r in data) for f in ("requests", "prompt_tokens", "completion_tokens", "total_tokens")}
    out = {"object": "usage", "by": by, "since": since, **who, "data": data, "total": total}
    if not admin and key is not None and key.limited:
        out["limits"] = key.limits()
        if key.budget_tokens:
            out["budget_used"] = await meter.actor.budget_used.remote(key.name, key.budget_period)
    return out
