"""Rate limits and token budgets per key: the arithmetic, no Ray, no HTTP (`meter.UsageMeter` holds one).

    limiter = Limiter(used_since=ledger.used_since)
    refusal = limiter.admit("alice", {"rpm": 5, "tpm": None, "budget_tokens": 1000, "budget_period": "day"})
    # None = go (the request is counted), else a Refusal(code, message, retry_after_s)
    limiter.charge("alice", 42)               # when the request ended: its prompt + completion tokens

rpm and tpm are sliding windows of WINDOW_S seconds; Retry-After is when enough of the window has
passed for the same request to be admitted. A budget counts the tokens of the current UTC
calendar period (day, ISO week, month) or ever ('total'): read from the ledger when a period
starts (so it holds across restarts), then kept up to date by `charge`. Requests are admitted
before they run and charged when they end, so the last admitted request may go over a budget
by its own tokens (OpenAI's usage tiers behave the same). Far from every limit, an ingress
replica may admit a few requests on its own (`headroom`, reserved here; `release` gives back what
it did not use).
"""

from __future__ import annotations

import calendar
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

WINDOW_S = 60.0
MAX_HEADROOM = 64
UNKNOWN_REQUEST_TOKENS = 4096
"""Tokens a request of a key is assumed to take before one of its requests has been charged."""


@dataclass(frozen=True)
class Refusal:
    code: str
    """rate_limit_exceeded or insufficient_quota (OpenAI's codes)."""
    message: str
    retry_after_s: Optional[int]
    """Whole seconds until the same request would be admitted; None = not within this period."""


def period_bounds(period: str, now: float) -> tuple[Optional[float], Optional[float]]:
    """(start, end) of the UTC calendar period holding `now`; (None, None) for 'total'."""
    if period == "total":
        return None, None
    t = time.gmtime(now)
    day_start = float(calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0)))
    if period == "day":
        return day_start, day_start + 86400
    if period == "week":
        start = day_start - t.tm_wday * 86400
        return start, start + 7 * 86400
    start = float(calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0)))
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return start, float(calendar.timegm((year, month, 1, 0, 0, 0)))


def _seconds(delta: float) -> int:
    return max(1, math.ceil(delta - 1e-9))


class Limiter:
    """Request and token windows and budget use, per key name."""

    def __init__(self, used_since: Callable[[str, Optional[float]], int], clock: Callable[[], float] = time.time):
        self.used_since = used_since
        self.clock = clock
        self.requests: dict[str, deque] = {}
        self.tokens: dict[str, deque] = {}
        self.budgets: dict[str, list] = {}
        """name -> [period start, tokens used in it]."""
        self.largest: dict[str, int] = {}
        """name -> the most tokens one of its requests took."""

    def admit(self, name: str, limits: dict) -> Optional[Refusal]:
        """Count a request of key `name` if its limits allow it now; the reason why not otherwise."""
        now = self.clock()
        refusal = self._budget(name, limits, now) or self._rpm(name, limits, now) or self._tpm(name, limits, now)
        if refusal is None and limits.get("rpm"):
            self.requests.setdefault(name, deque()).append(now)
        return refusal

    def charge(self, name: str, tokens: int) -> None:
        """Add the tokens of a request of `name` that ended."""
        if tokens <= 0:
            return
        self.tokens.setdefault(name, deque()).append((self.clock(), tokens))
        self.largest[name] = max(self.largest.get(name, 0), tokens)
        if name in self.budgets:
            self.budgets[name][1] += tokens

    def headroom(self, name: str, limits: dict, replicas: int) -> tuple[int, float]:
        """(n, when): `n` more requests of `name` that one of `replicas` ingress replicas may admit
        without asking, reserved in the rpm window now (`when`) — `release` what it did not use.
        Each replica gets at most 1/(2 x replicas) of what is left under every limit (tokens
        counted at the key's largest request so far, not reserved: charged when they end); 0 near
        a limit (an rpm's last 4 x replicas requests of a window), where every request is asked about."""
        now, share = self.clock(), 2 * max(1, replicas)
        per = self.largest.get(name, UNKNOWN_REQUEST_TOKENS)
        room = [MAX_HEADROOM]
        if limits.get("rpm"):
            window = self.requests.setdefault(name, deque())
            # headroom only while more than 2 x share requests are left: a key of a few rpm is asked about
            # every time, so its first refusal is exactly its rpm+1-th request whichever replica it reaches
            room.append((limits["rpm"] - sum(1 for t in window if t > now - WINDOW_S) - share) // share)
        if limits.get("tpm"):
            used = sum(n for t, n in self.tokens.get(name, ()) if t > now - WINDOW_S)
            room.append((limits["tpm"] - used) // (share * per))
        if limits.get("budget_tokens"):
            used = self.budget_used(name, limits.get("budget_period") or "month")
            room.append((limits["budget_tokens"] - used) // (share * per))
        n = max(0, min(room))
        if n and limits.get("rpm"):
            self.requests[name].extend([now] * n)
        return n, now

    def release(self, name: str, n: int, when: float) -> None:
        """Give back `n` requests of a headroom reserved at `when` that were not used."""
        window = self.requests.get(name)
        if not window or n <= 0:
            return
        kept = deque()
        for t in window:
            if t == when and n > 0:
                n -= 1
            else:
                kept.append(t)
        self.requests[name] = kept

    def budget_used(self, name: str, period: str) -> int:
        start, _ = period_bounds(period, self.clock())
        entry = self.budgets.get(name)
        if entry is None or entry[0] != start:
            self.budgets[name] = entry = [start, self.used_since(name, start)]
        return entry[1]

    def _budget(self, name: str, limits: dict, now: float) -> Optional[Refusal]:
        budget = limits.get("budget_tokens")
        if not budget:
            return None
        period = limits.get("budget_period") or "month"
        used = self.budget_used(name, period)
        if used < budget:
            return None
        _, end = period_bounds(period, now)
        when = f"; it renews in {_seconds(end - now)} s" if end else ""
        return Refusal("insufficient_quota", f"this key has used its budget of {budget} tokens per {period} "
                                             f"({used} used){when}", _seconds(end - now) if end else None)

    def _rpm(self, name: str, limits: dict, now: float) -> Optional[Refusal]:
        rpm = limits.get("rpm")
        if not rpm:
            return None
        window = self.requests.setdefault(name, deque())
        while window and window[0] <= now - WINDOW_S:
            window.popleft()
        if len(window) < rpm:
            return None
        retry = _seconds(window[len(window) - rpm] + WINDOW_S - now)
        return Refusal("rate_limit_exceeded", f"rate limit of {rpm} requests per minute reached for this key; "
                                              f"retry after {retry} s", retry)

    def _tpm(self, name: str, limits: dict, now: float) -> Optional[Refusal]:
        tpm = limits.get("tpm")
        if not tpm:
            return None
        window = self.tokens.setdefault(name, deque())
        while window and window[0][0] <= now - WINDOW_S:
            window.popleft()
        used = sum(n for _, n in window)
        if used < tpm:
            return None
        for t, n in window:  # the moment enough tokens have left the window
            used -= n
            if used < tpm:
                break
        retry = _seconds(t + WINDOW_S - now)
        return Refusal("rate_limit_exceeded", f"rate limit of {tpm} tokens per minute reached for this key; "
                                              f"retry after {retry} s", retry)
