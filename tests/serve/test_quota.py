"""Keys, limits and the ledger without Ray: key records and files, the rate windows and budgets on
a clock the test moves, the ledger in a real SQLite file, `llmos usage` and `llmos keys`."""

from __future__ import annotations

import calendar
import json
import sqlite3

import pytest

from llmos_ray.errors import ConfigError
from llmos_ray.serve import keys as keys_module
from llmos_ray.serve.keys import Keyring, hash_key, parse_record, resolve_keys
from llmos_ray.serve.ledger import Ledger, day_of, parse_since
from llmos_ray.serve.quota import WINDOW_S, Limiter, period_bounds


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def row(rid: str, t: float, key: str = "alice", prompt: int = 3, completion: int = 7, **kw) -> dict:
    return {"request_id": rid, "time": t, "day": day_of(t), "key": key, "tenant": kw.get("tenant", "acme"),
            "model": kw.get("model", "tiny"), "app": kw.get("app", "-"), "route": "completions",
            "status": kw.get("status", 200), "prompt_tokens": prompt, "completion_tokens": completion,
            "latency_s": 0.01}


# -- keys -----------------------------------------------------------------------------------------


def test_plain_keys_yaml_and_json_records_resolve_to_hashes_only(tmp_path, monkeypatch):
    plain = tmp_path / "keys.txt"
    plain.write_text("# comment\nsk-one\n\nsk-two\n")
    assert [r.sha256 for r in resolve_keys([], str(plain))] == [hash_key("sk-one"), hash_key("sk-two")]
    yaml_file = tmp_path / "keys.yaml"
    yaml_file.write_text(f"keys:\n  - name: alice\n    sha256: {hash_key('sk-alice')}\n    tenant: acme\n"
                         "    models: [tiny]\n    rpm: 5\n    budget_tokens: 100\n    budget_period: day\n")
    json_file = tmp_path / "keys.json"
    json_file.write_text(json.dumps([{"name": "bob", "key": "sk-bob", "admin": True}]))
    monkeypatch.setenv("LLMOS_API_KEYS", "sk-env, sk-one")
    records = resolve_keys(["sk-one", {"name": "carol", "key": "sk-carol", "apps": ["haiku"]}], str(yaml_file))
    records += resolve_keys([], str(json_file))
    by_name = {r.name: r for r in records}
    assert set(by_name) == {f"key-{hash_key('sk-one')[:8]}", "carol", f"key-{hash_key('sk-env')[:8]}", "alice",
                            "bob"}  # sk-one given twice (config and env) counts once
    alice = by_name["alice"]
    assert (alice.tenant, alice.models, alice.rpm, alice.budget_tokens, alice.budget_period, alice.limited) == \
        ("acme", ("tiny",), 5, 100, "day", True)
    assert alice.allows_model("tiny") and not alice.allows_model("lora") and alice.allows_app("anything")
    assert by_name["carol"].tenant == "carol" and not by_name["carol"].allows_app("other")
    assert by_name["bob"].admin and not by_name["bob"].limited
    assert not any("sk-" in json.dumps(r.to_dict()) for r in records)  # no secret survives reading


def test_bad_key_records_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="'rmp'.*did you mean 'rpm'"):
        parse_record({"name": "a", "key": "k", "rmp": 5}, "serve.api_keys[0]")
    with pytest.raises(ConfigError, match="exactly one of 'key'"):
        parse_record({"name": "a", "key": "k", "sha256": hash_key("k")}, "x")
    with pytest.raises(ConfigError, match="64 hex"):
        parse_record({"name": "a", "sha256": "abc"}, "x")
    with pytest.raises(ConfigError, match=r"x\.rpm: must be a positive integer"):
        parse_record({"name": "a", "key": "k", "rpm": 0}, "x")
    with pytest.raises(ConfigError, match="budget_period"):
        parse_record({"name": "a", "key": "k", "budget_period": "year"}, "x")
    with pytest.raises(ConfigError, match="two different keys are named 'a'"):
        resolve_keys([{"name": "a", "key": "k1"}, {"name": "a", "key": "k2"}], None)
    with pytest.raises(ConfigError, match="cannot be read"):
        resolve_keys([], str(tmp_path / "missing.txt"))


def test_keyring_compares_every_hash_with_compare_digest(monkeypatch):
    records = resolve_keys(["sk-a", "sk-b", {"name": "c", "key": "sk-c"}], None)
    calls = []

    def counting(a, b):
        calls.append((a, b))
        return original(a, b)

    original = keys_module.hmac.compare_digest
    monkeypatch.setattr(keys_module.hmac, "compare_digest", counting)
    ring = Keyring(records)
    assert ring.find("sk-c").name == "c" and ring.find("sk-a") is records[0] and ring.find("sk-x") is None
    assert len(calls) == 3 * len(records)  # every stored hash, whether or not one matched before
    assert all(a == hash_key(t).encode() for (a, _), t in zip(calls, ["sk-c"] * 3 + ["sk-a"] * 3 + ["sk-x"] * 3))


# -- limits ---------------------------------------------------------------------------------------


def test_rpm_window_refuses_until_retry_after_then_admits():
    clock = Clock()
    limiter = Limiter(lambda name, since: 0, clock)
    limits = {"rpm": 5}
    t0 = clock.t
    for i in range(5):
        clock.t = t0 + i
        assert limiter.admit("a", limits) is None
    clock.t = t0 + 10.25
    refusal = limiter.admit("a", limits)
    assert refusal.code == "rate_limit_exceeded" and refusal.retry_after_s == 50  # ceil(t0 + 60 - now)
    assert limiter.admit("b", limits) is None  # another key has its own window
    clock.t = t0 + WINDOW_S - 0.01  # just before the first request leaves the window
    assert limiter.admit("a", limits).retry_after_s == 1
    clock.t = t0 + WINDOW_S  # honouring Retry-After: admitted
    assert limiter.admit("a", limits) is None
    assert limiter.admit("a", limits).retry_after_s == 1  # the window is full again (t0+1 leaves in 1 s)


def test_tpm_window_counts_charged_tokens():
    clock = Clock()
    limiter = Limiter(lambda name, since: 0, clock)
    limits = {"tpm": 100}
    t0 = clock.t
    assert limiter.admit("a", limits) is None
    limiter.charge("a", 60)
    clock.t = t0 + 20
    assert limiter.admit("a", limits) is None  # 60 < 100
    limiter.charge("a", 50)
    clock.t = t0 + 30
    refusal = limiter.admit("a", limits)
    assert refusal.code == "rate_limit_exceeded" and refusal.retry_after_s == 30  # when the first 60 leave
    clock.t = t0 + WINDOW_S
    assert limiter.admit("a", limits) is None


def test_budget_reads_the_ledger_when_a_period_starts(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path}/usage.db")
    now = float(calendar.timegm((2026, 12, 2, 10, 0, 0)))
    ledger.write([row("old", now - 86400, prompt=50, completion=50),  # yesterday: not in today's budget
                  row("r1", now - 3600, prompt=10, completion=20), row("other", now - 60, key="bob", completion=99)])
    clock = Clock(now)
    limiter = Limiter(ledger.used_since, clock)  # a restarted meter starts from the ledger
    limits = {"budget_tokens": 40, "budget_period": "day"}
    assert limiter.admit("alice", limits) is None and limiter.budget_used("alice", "day") == 30
    limiter.charge("alice", 10)
    refusal = limiter.admit("alice", limits)
    midnight = calendar.timegm((2026, 12, 3, 0, 0, 0))
    assert refusal.code == "insufficient_quota" and refusal.retry_after_s == midnight - now
    clock.t = midnight + 1  # a new day: the budget is read again (nothing yet today)
    assert limiter.admit("alice", limits) is None and limiter.budget_used("alice", "day") == 0
    assert Limiter(ledger.used_since, clock).admit("alice", {"budget_tokens": 200, "budget_period": "total"}) is None
    assert Limiter(ledger.used_since, clock).admit("alice", {"budget_tokens": 130, "budget_period": "total"}).code \
        == "insufficient_quota"  # 100 + 30 ever (the charge above was never written)


def test_period_bounds_are_utc_calendar_periods():
    t = float(calendar.timegm((2026, 12, 2, 10, 30, 0)))  # a Wednesday
    assert period_bounds("day", t) == (calendar.timegm((2026, 12, 2, 0, 0, 0)), calendar.timegm((2026, 12, 3, 0, 0, 0)))
    assert period_bounds("week", t) == (calendar.timegm((2026, 11, 30, 0, 0, 0)),
                                        calendar.timegm((2026, 12, 7, 0, 0, 0)))
    assert period_bounds("month", t) == (calendar.timegm((2026, 12, 1, 0, 0, 0)),
                                         calendar.timegm((2027, 1, 1, 0, 0, 0)))
    assert period_bounds("total", t) == (None, None)


# -- the ledger and `llmos usage` ------------------------------------------------------------------


def test_ledger_never_counts_a_request_id_twice_and_survives_reopening(tmp_path):
    url = f"sqlite:///{tmp_path}/state/usage.db"
    t = 1_700_000_000.0
    assert Ledger(url).write([row("a", t), row("b", t + 1), row("a", t + 2, completion=1000)]) == 2
    reopened = Ledger(url)  # another process, after a restart
    assert reopened.write([row("b", t + 3), row("c", t + 4)]) == 1
    rows = reopened.rows()
    assert [r["request_id"] for r in rows] == ["a", "b", "c"] and rows[0]["completion_tokens"] == 7
    assert reopened.used_since("alice", None) == 30 and reopened.used_since("alice", t + 0.5) == 20


def test_llmos_usage_output_equals_the_ledger_per_grouping(tmp_path, capsys):
    from llmos_ray.cli import main

    url = f"sqlite:///{tmp_path}/usage.db"
    t = float(calendar.timegm((2026, 12, 1, 12, 0, 0)))
    Ledger(url).write([row("1", t, "alice", 3, 5, model="tiny"), row("2", t + 86400, "alice", 2, 8, model="lora"),
                       row("3", t + 100, "bob", 4, 4, tenant="beta", app="haiku", model="tiny"),
                       row("4", t + 200, "bob", 0, 0, tenant="beta", status=429, model="-")])
    db = sqlite3.connect(f"{tmp_path}/usage.db")
    for by in ("key", "tenant", "model", "app", "day", "status"):
        assert main(["usage", "--db", url, "--by", by, "--format", "json"]) == 0
        got = {str(r[by]): (r["requests"], r["prompt_tokens"], r["completion_tokens"], r["total_tokens"])
               for r in json.loads(capsys.readouterr().out)}
        want = {str(g): (n, p, c, p + c) for g, n, p, c in db.execute(
            f"SELECT {by}, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens) FROM llmos_usage GROUP BY {by}")}
        assert got == want, by
    assert main(["usage", "--db", url, "--by", "model", "--key", "alice", "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "model,requests,prompt_tokens,completion_tokens,total_tokens", "lora,1,2,8,10", "tiny,1,3,5,8"]
    since = day_of(t + 86400)
    assert main(["usage", "--db", url, "--since", since]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["alice", "1", "2", "8", "10"] and lines[-1].split() == ["total", "1", "2", "8", "10"]
    assert main(["usage", "--db", url, "--by", "colour"]) == 2
    assert "by: one of key, tenant" in capsys.readouterr().err


def test_parse_since():
    assert parse_since("7d", now=1000.0) == 1000.0 - 7 * 86400 and parse_since("30m", now=100.0) == 100.0 - 1800
    assert parse_since("2026-12-01") == calendar.timegm((2026, 12, 1, 0, 0, 0)) and parse_since(None) is None
    with pytest.raises(ConfigError, match="neither a duration"):
        parse_since("last week")


def test_llmos_keys_new_prints_a_record_the_server_accepts(tmp_path, capsys):
    import yaml

    from llmos_ray.cli import main

    assert main(["keys", "new", "alice", "--tenant", "acme", "--models", "tiny,lora", "--rpm", "5"]) == 0
    out = capsys.readouterr()
    secret = out.err.strip().rsplit(" ", 1)[-1]
    (tmp_path / "keys.yaml").write_text(out.out)
    assert secret not in out.out
    [record] = resolve_keys([], str(tmp_path / "keys.yaml"))
    assert Keyring([record]).find(secret) == record and record.models == ("tiny", "lora") and record.rpm == 5
    assert main(["keys", "hash", secret]) == 0 and capsys.readouterr().out.strip() == record.sha256
    assert yaml.safe_load(out.out)[0]["sha256"] == record.sha256


def test_headroom_of_several_replicas_never_lets_a_key_past_its_rpm():
    """Ingress replicas admitting in the headroom the limiter reserved for them, giving back what
    they did not use when their headroom expires or when they ask again: together never more than
    rpm in a window, and once all is given back the limit is reached exactly."""
    import random

    clock = Clock()
    limiter = Limiter(lambda name, since: 0, clock)
    limits, replicas, rng = {"rpm": 200}, 3, random.Random(0)
    room, when, admitted, granted = [0] * replicas, [0.0] * replicas, 0, 0
    for step in range(3000):
        clock.t += 0.001  # all within one window
        i = rng.randrange(replicas)
        if room[i] > 0 and rng.random() < 0.9:
            room[i] -= 1
            admitted += 1
        else:  # asks: gives back its unused headroom (or it expired)
            limiter.release("k", room[i], when[i])
            room[i] = 0
            if limiter.admit("k", limits) is None:
                admitted += 1
                room[i], when[i] = limiter.headroom("k", limits, replicas)
                granted += room[i] > 0
        assert admitted <= limits["rpm"], step
    for i in range(replicas):
        limiter.release("k", room[i], when[i])
    while limiter.admit("k", limits) is None:
        admitted += 1
    assert admitted == limits["rpm"] and granted > 10  # headroom was used
    assert limiter.headroom("far", {"rpm": 1000}, 2) == (64, clock.t)  # at most MAX_HEADROOM
    assert limiter.headroom("fresh", {"budget_tokens": 10_000}, 1)[0] == 1  # 10000 // (2 x 4096 unknown)
    limiter.charge("fresh", 100)
    assert limiter.headroom("fresh", {"budget_tokens": 10_000}, 1)[0] == (10_000 - 100) // 200  # its largest: 100
