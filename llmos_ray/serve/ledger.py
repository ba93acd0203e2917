"""The usage ledger: one row per request, in a real database (SQLAlchemy).

    ledger = Ledger("sqlite:////var/lib/llmos/usage.db")      # or postgresql://..., any SQLAlchemy URL
    ledger.write(rows)                                          # rows already there (same request id) are skipped
    ledger.summary(by="model", key="alice", since=time.time() - 7 * 86400)

A row: request_id (the primary key: a retried or replayed write never counts twice), time (unix
seconds, when the request ended), day (UTC 'YYYY-MM-DD', so grouping by day is the same SQL on every database), key (the
key's NAME, never the secret), tenant, model, app, route, status, prompt_tokens,
completion_tokens, latency_s. Only `meter.UsageMeter` writes (batched, off the request path);
`llmos usage` and the usage routes read.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, Optional

import sqlalchemy as sa

from llmos_ray.errors import ConfigError

COLUMNS = ("request_id", "time", "day", "key", "tenant", "model", "app", "route", "status", "prompt_tokens",
           "completion_tokens", "latency_s")
GROUPS = ("key", "tenant", "model", "app", "day", "route", "status")
"""What a summary can be grouped by."""
DB_FILE = "usage.db"

_meta = sa.MetaData()
usage_table = sa.Table(
    "llmos_usage", _meta,
    sa.Column("request_id", sa.String(128), primary_key=True),
    sa.Column("time", sa.Float, nullable=False, index=True),
    sa.Column("day", sa.String(10), nullable=False),
    sa.Column("key", sa.String(128), nullable=False, index=True),
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("app", sa.String(256), nullable=False),
    sa.Column("route", sa.String(256), nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("latency_s", sa.Float, nullable=False),
)


def default_url(registry: Optional[str] = None) -> str:
    """SQLite beside the model library when that is a local file (the server's state directory),
    else under ~/.llmos."""
    base = os.path.expanduser("~/.llmos")
    if registry and "://" not in registry:
        base = os.path.dirname(os.path.abspath(os.path.expanduser(registry)))
    return f"sqlite:///{os.path.join(base, DB_FILE)}"


def day_of(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(t))


def parse_since(text: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """'7d', '12h', '30m', '90s', '2w' -> the unix time that long ago; a date 'YYYY-MM-DD' (UTC) -> its start."""
    if not text:
        return None
    now = time.time() if now is None else now
    m = re.fullmatch(r"(\d+)\s*([smhdw])", text.strip())
    if m:
        return now - int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}[m.group(2)]
    try:
        import calendar

        return float(calendar.timegm(time.strptime(text.strip(), "%Y-%m-%d")))
    except ValueError:
        raise ConfigError(f"since: {text!r} is neither a duration (7d, 12h, 30m, 2w) nor a date (YYYY-MM-DD)") from None


class Ledger:
    """The usage table in one database."""

    def __init__(self, url: str):
        if url.startswith("sqlite:///"):
            path = url[len("sqlite:///"):]
            if path and path != ":memory:":
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            self.engine = sa.create_engine(url, pool_pre_ping=True)
            _meta.create_all(self.engine)
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, sa.exc.OperationalError) as e:
            raise ConfigError(f"serve.usage_db {redacted(url)!r} cannot be opened: {e}") from None
        self.url = url

    def write(self, rows: list[dict[str, Any]]) -> int:
        """Insert the rows whose request id is not in the ledger yet (one transaction); returns how many."""
        if not rows:
            return 0
        fresh: dict[str, dict] = {}
        for row in rows:
            fresh.setdefault(row["request_id"], row)
        with self.engine.begin() as conn:
            ids = list(fresh)
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                have = conn.execute(sa.select(usage_table.c.request_id).where(usage_table.c.request_id.in_(chunk)))
                for (rid,) in have:
                    fresh.pop(rid, None)
            if fresh:
                conn.execute(usage_table.insert(), [{c: r[c] for c in COLUMNS} for r in fresh.values()])
        return len(fresh)

    def _where(self, query, key=None, tenant=None, since=None, until=None):
        c = usage_table.c
        if key is not None:
            query = query.where(c.key == key)
        if tenant is not None:
            query = query.where(c.tenant == tenant)
        if since is not None:
            query = query.where(c.time >= since)
        if until is not None:
            query = query.where(c.time < until)
        return query

    def rows(self, key: Optional[str] = None, tenant: Optional[str] = None, since: Optional[float] = None,
             until: Optional[float] = None) -> list[dict[str, Any]]:
        """The rows (oldest first) of `key`/`tenant` from `since`."""
        query = self._where(sa.select(usage_table), key, tenant, since, until).order_by(usage_table.c.time)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def summary(self, by: str = "key", key: Optional[str] = None, tenant: Optional[str] = None,
                since: Optional[float] = None, until: Optional[float] = None) -> list[dict[str, Any]]:
        """Requests and tokens per value of `by` (one of GROUPS), largest total first."""
        if by not in GROUPS:
            raise ConfigError(f"by: one of {', '.join(GROUPS)}, got {by!r}")
        c = usage_table.c
        group = c[by]
        prompt, completion = sa.func.sum(c.prompt_tokens), sa.func.sum(c.completion_tokens)
        query = self._where(sa.select(group, sa.func.count(), prompt, completion), key, tenant, since, until)
        query = query.group_by(group)
        with self.engine.connect() as conn:
            out = [{by: g, "requests": n, "prompt_tokens": int(p or 0), "completion_tokens": int(q or 0),
                    "total_tokens": int(p or 0) + int(q or 0)} for g, n, p, q in conn.execute(query)]
        return sorted(out, key=lambda r: (-r["total_tokens"], str(r[by])))

    def used_since(self, key: str, since: Optional[float]) -> int:
        """Tokens (prompt + completion) of `key` from `since` (None = ever)."""
        c = usage_table.c
        query = self._where(sa.select(sa.func.sum(c.prompt_tokens + c.completion_tokens)), key, None, since)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar() or 0)


def redacted(url: str) -> str:
    """A database URL without its password."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL too broken to parse is shown as it is
        return url
