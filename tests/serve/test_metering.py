"""Usage metering over real HTTP on the package's one Serve app (`server` in conftest.py: two
ingress replicas sharing one usage meter, the ledger a real SQLite file, keys in LIMITED_KEYS).

Ledger rows are read with sqlite3 straight from the server's database file, not through our code.
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
import os
import sqlite3
import time
import uuid

import httpx
import pytest

from tests.serve.conftest import KEY, SECRETS, error_of

pytestmark = pytest.mark.slow


def auth(name: str) -> dict:
    return {"Authorization": f"Bearer {SECRETS[name]}"}


def flush(server) -> None:
    """Have the meter write what it holds (any usage read does)."""
    r = httpx.get(server["url"] + "/v1/admin/usage", headers=auth("ops"), timeout=30)
    assert r.status_code == 200, r.text


def ledger_rows(server, key: str) -> dict[str, dict]:
    flush(server)
    path = server["usage_db"].removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        db.row_factory = sqlite3.Row
        return {r["request_id"]: dict(r) for r in db.execute("SELECT * FROM llmos_usage WHERE key = ?", (key,))}


def serve_log_dir() -> str:
    import ray

    return os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")


def ingress_replicas(server) -> list[str]:
    """The Ray actor names of the app's ingress replicas (SERVE_REPLICA::APP#ingress#ID)."""
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{server['app_name']}#ingress#")]


def completion(server, key: str, rid: str, **body) -> httpx.Response:
    return httpx.post(server["url"] + "/v1/completions", headers={**auth(key), "X-Request-Id": rid}, timeout=60,
                      json={"model": "tiny", "prompt": "hello there", "max_tokens": 2, **body})


def test_the_sixth_request_of_a_5_rpm_key_is_429_across_two_ingress_replicas(server):
    from ray import serve

    app = serve.status().applications["llmos"]
    assert app.deployments["ingress"].replica_states.get("RUNNING") == 2
    ids = [f"rpm-{uuid.uuid4().hex[:8]}-{i}" for i in range(10)]
    responses, times = [], []
    for rid in ids:
        t0 = time.time()
        responses.append(completion(server, "rpm5", rid))
        times.append((t0, time.time()))
    assert [r.status_code for r in responses] == [200] * 5 + [429] * 5
    for r, (start, end) in zip(responses[5:], times[5:]):
        err = error_of(r)
        assert err["code"] == "rate_limit_exceeded" and err["type"] == "rate_limit_error"
        retry = int(r.headers["retry-after"])  # when the first request leaves the 60 s window
        assert 60 - (end - times[0][0]) - 1 <= retry <= 60 - (start - times[0][1]) + 1, (retry, start, end)
    # both replicas answered some of them (each writes the request ids it served to its own log):
    # per-replica counters would have let through up to 10
    deadline = time.time() + 10
    replicas = ingress_replicas(server)
    while time.time() < deadline:  # a replica's log is written a moment after its response
        served = {}
        for name in replicas:
            replica_id = name.rsplit("#", 1)[1]
            path = os.path.join(serve_log_dir(), "serve", f"replica_{server['app_name']}_ingress_{replica_id}.log")
            text = open(path, errors="replace").read() if os.path.exists(path) else ""
            served[path] = {rid for rid in ids if rid in text}
        if set().union(*served.values()) == set(ids):
            break
        time.sleep(0.2)
    assert len(served) == 2 and all(served.values()) and set().union(*served.values()) == set(ids), served
    assert completion(server, "counted", "rpm-other-key").status_code == 200  # other keys are not held back
    rows = ledger_rows(server, "rpm5")
    assert sorted(r["status"] for rid, r in rows.items() if rid in ids) == [200] * 5 + [429] * 5


def _stream(server, key: str, rid: str, max_tokens: int, stop_after: int = 0) -> tuple[list[dict], dict]:
    """Stream a completion; `stop_after` > 0 = close the connection after that many chunks."""
    body = {"model": "tiny", "prompt": "once upon a time", "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    events, status = [], None
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", server["url"] + "/v1/completions", json=body,
                           headers={**auth(key), "X-Request-Id": rid}) as r:
            status = r.status_code
            if status != 200:
                r.read()
                return [], {"status": status, "error": r.json()["error"], "headers": r.headers}
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
                    if stop_after and len(events) >= stop_after:
                        break  # leaving the block closes the connection mid-stream
    return events, {"status": status}


def budget_used(server) -> int:
    return httpx.get(server["url"] + "/v1/usage", headers=auth("budget"), timeout=30).json()["budget_used"]


def test_token_budget_charges_streams_and_disconnected_streams_their_real_tokens(server):
    budget = 40
    events, _ = _stream(server, "budget", "budget-whole", max_tokens=12)
    use = events[-1]["usage"]
    assert use["completion_tokens"] == 12
    events, _ = _stream(server, "budget", "budget-cut", max_tokens=390, stop_after=2)
    assert len(events) == 2
    deadline = time.time() + 20
    while "budget-cut" not in (rows := ledger_rows(server, "budget")) and time.time() < deadline:
        time.sleep(0.2)
    whole, cut = rows["budget-whole"], rows["budget-cut"]
    assert (whole["prompt_tokens"], whole["completion_tokens"], whole["status"]) == \
        (use["prompt_tokens"], use["completion_tokens"], 200)
    assert cut["prompt_tokens"] == use["prompt_tokens"] and 1 <= cut["completion_tokens"] < 390  # what it got
    used = sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows.values())
    own = httpx.get(server["url"] + "/v1/usage", headers=auth("budget"), timeout=30).json()
    assert own["budget_used"] == used and own["total"]["total_tokens"] == used and own["key"] == "budget"
    n = 0
    while used < budget:  # admitted while under the budget, charged when done
        r = completion(server, "budget", f"budget-more-{n}", max_tokens=8, ignore_eos=True)
        assert r.status_code == 200, r.text
        used += r.json()["usage"]["total_tokens"]
        n += 1
        deadline = time.time() + 5  # the charge reaches the meter a moment after the response
        while budget_used(server) != used and time.time() < deadline:
            time.sleep(0.05)
    refused = completion(server, "budget", "budget-over")
    assert refused.status_code == 429 and error_of(refused)["code"] == "insufficient_quota"
    midnight = (int(time.time()) // 86400 + 1) * 86400
    assert abs(int(refused.headers["retry-after"]) - (midnight - time.time())) <= 2
    events, info = _stream(server, "budget", "budget-over-stream", max_tokens=4)
    assert info["status"] == 429 and info["error"]["code"] == "insufficient_quota"
    assert budget_used(server) == used

    # the meter dies and Ray restarts it: rows stay, the budget is read back from the ledger
    import ray

    from llmos_ray.serve.meter import NAMESPACE, meter_name

    before = ledger_rows(server, "budget")
    actor = ray.get_actor(meter_name(server["app_name"], server["usage_db"]), namespace=NAMESPACE)
    ray.kill(actor, no_restart=False)
    deadline = time.time() + 60
    while time.time() < deadline:
        r = completion(server, "budget", f"after-restart-{time.time()}")
        if r.status_code == 429 and error_of(r)["code"] == "insufficient_quota":
            break
        time.sleep(0.5)  # while restarting, requests pass unchecked (logged)
    assert r.status_code == 429, r.text
    after = ledger_rows(server, "budget")
    assert {k: after[k] for k in before} == before


def test_concurrent_requests_are_exactly_one_row_each_with_their_usage(server):
    c = server["client"]
    n_plain, n_stream = 10, 2
    batch = f"conc-{uuid.uuid4().hex[:8]}"
    ids = [f"{batch}-{i}" for i in range(n_plain + n_stream)]

    def send(i: int) -> dict:
        if i >= n_plain:
            events, _ = _stream(server, "counted", ids[i], max_tokens=3 + i % 3)
            return events[-1]["usage"]
        path, body = (("/v1/chat/completions", {"messages": [{"role": "user", "content": f"hi {i}"}]}) if i % 2 else
                      ("/v1/completions", {"prompt": "word " * (i + 1)}))
        r = httpx.post(server["url"] + path, json={"model": "tiny", "max_tokens": 1 + i % 4, **body},
                       headers={**auth("counted"), "X-Request-Id": ids[i]}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["usage"]

    with concurrent.futures.ThreadPoolExecutor(len(ids)) as pool:
        usages = list(pool.map(send, range(len(ids))))
    rows = ledger_rows(server, "counted")
    mine = {rid: r for rid, r in rows.items() if rid.startswith(batch)}
    assert set(mine) == set(ids)
    for rid, use in zip(ids, usages):
        assert (mine[rid]["prompt_tokens"], mine[rid]["completion_tokens"]) == \
            (use["prompt_tokens"], use["completion_tokens"]), rid
        assert mine[rid]["tenant"] == "beta" and mine[rid]["model"] == "tiny" and mine[rid]["status"] == 200
    # a client retrying with the same request id is not counted twice
    assert completion(server, "counted", ids[0]).status_code == 200
    assert len(ledger_rows(server, "counted")) == len(rows)
    assert c.get("/v1/usage").json()["key"] == f"key-{__import__('hashlib').sha256(KEY.encode()).hexdigest()[:8]}"


def test_a_key_limited_to_one_model_sees_404_for_the_others(server):
    url, h = server["url"], auth("onlytiny")
    other = httpx.post(url + "/v1/completions", json={"model": "lora", "prompt": "a"}, headers=h)
    missing = httpx.post(url + "/v1/completions", json={"model": "nope", "prompt": "a"}, headers=h)
    assert other.status_code == missing.status_code == 404
    assert error_of(other)["message"].replace("'lora'", "X") == error_of(missing)["message"].replace("'nope'", "X")
    assert error_of(other)["code"] == "model_not_found" and "guarded" not in other.text
    assert [m["id"] for m in httpx.get(url + "/v1/models", headers=h).json()["data"]] == ["tiny"]
    assert httpx.get(url + "/v1/models/lora", headers=h).status_code == 404
    assert httpx.get(url + "/v2/models/lora", headers=h).status_code == 404
    assert httpx.post(url + "/v2/models/guarded/generate", json={"text_input": "a"}, headers=h).status_code == 404
    assert httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 1},
                      headers=h).status_code == 200
    assert httpx.get(url + "/v1/apps", headers=h).json()["data"] == []  # apps: [] = none
    apps = [a["name"] for a in server["client"].get("/v1/apps").json()["data"]]
    app = httpx.post(url + f"/v1/apps/{apps[0]}", json={}, headers=h)
    no_app = httpx.post(url + "/v1/apps/no-such-app", json={}, headers=h)
    assert app.status_code == no_app.status_code == 404
    assert error_of(app)["message"].replace(repr(apps[0]), "X") == error_of(no_app)["message"].replace(
        "'no-such-app'", "X")
    assert server["client"].post("/v1/completions", json={"model": "lora", "prompt": "a", "max_tokens": 1}) \
        .status_code == 200  # an unrestricted key still can


def test_usage_routes_own_usage_and_admin_only_for_everyone(server):
    url = server["url"]
    assert completion(server, "onlytiny", f"usage-{uuid.uuid4().hex}").status_code == 200
    own = httpx.get(url + "/v1/usage", params={"by": "day", "since": "1d"}, headers=auth("onlytiny")).json()
    assert own["key"] == "onlytiny" and own["by"] == "day" and [r["day"] for r in own["data"]] == \
        [time.strftime("%Y-%m-%d", time.gmtime())]
    denied = httpx.get(url + "/v1/admin/usage", headers=auth("onlytiny"))
    assert denied.status_code == 403 and error_of(denied)["code"] == "permission_denied"
    r = httpx.get(url + "/v1/usage", params={"key": "ops"}, headers=auth("onlytiny"))  # not someone else's
    assert r.status_code == 400 and error_of(r)["param"] == "key"
    assert error_of(httpx.get(url + "/v1/usage", params={"by": "colour"}, headers=auth("onlytiny")))["param"] == "by"
    everyone = httpx.get(url + "/v1/admin/usage", params={"by": "key"}, headers=auth("ops")).json()
    by_key = {r["key"]: r for r in everyone["data"]}
    rows = ledger_rows(server, "onlytiny")
    assert by_key["onlytiny"]["requests"] == len(rows) == own["total"]["requests"]
    tenant = httpx.get(url + "/v1/admin/usage", params={"by": "key", "tenant": "beta"}, headers=auth("ops")).json()
    assert {r["key"] for r in tenant["data"]} <= {"onlytiny", "counted"}


def test_llmos_usage_on_the_server_ledger_equals_it_per_grouping(server, capsys):
    from llmos_ray.cli import main

    flush(server)
    db = sqlite3.connect(server["usage_db"].removeprefix("sqlite:///"))
    for by in ("key", "tenant", "model", "app", "day"):
        assert main(["usage", "--registry", server["registry"], "--by", by, "--format", "json"]) == 0
        got = [(r[by], r["requests"], r["prompt_tokens"], r["completion_tokens"])
               for r in json.loads(capsys.readouterr().out)]
        want = db.execute(f"SELECT {by}, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens) FROM llmos_usage "
                          f"GROUP BY {by}").fetchall()
        assert sorted(got) == sorted(want) and len(want) >= 1, by


def test_no_secret_in_logs_ledger_or_metrics(server):
    import ray

    texts = {}
    for path in glob.glob(os.path.join(serve_log_dir(), "**", "*"), recursive=True):
        if os.path.isfile(path):
            texts[path] = open(path, "rb").read()
    texts["ledger"] = open(server["usage_db"].removeprefix("sqlite:///"), "rb").read()
    port = ray._private.worker._global_node.metrics_export_port
    deadline = time.time() + 30
    while time.time() < deadline:  # Ray exports metrics every few seconds
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if 'key="counted"' in metrics:
            break
        time.sleep(1)
    tokens = [line for line in metrics.splitlines() if line.startswith("ray_llmos_serve_tokens_total{")]
    assert any('key="counted"' in line and 'kind="completion"' in line for line in tokens), tokens[:3]
    texts["metrics"] = metrics.encode()
    for name, secret in [*SECRETS.items(), ("default", KEY)]:
        found = [p for p, t in texts.items() if secret.encode() in t]
        assert not found, (name, found)


# -- Last: replicas dying mid-request ------------------------------------------------------------


def _first_chunk_then(server, rid: str, action) -> list[str]:
    """Open a long stream, read its first chunk, run `action` (the request is in flight), then read
    what is left (the lines after the first), whatever becomes of the connection."""
    body = {"model": "tiny", "prompt": "once upon a time", "max_tokens": 390, "stream": True, "ignore_eos": True}
    lines = []
    try:
        with httpx.stream("POST", server["url"] + "/v1/completions", json=body, timeout=60,
                          headers={**auth("counted"), "X-Request-Id": rid}) as r:
            it = r.iter_lines()
            assert next(it).startswith("data: {")
            action()
            lines = list(it)
    except (httpx.RemoteProtocolError, httpx.ReadError):
        pass
    return lines


def test_replicas_killed_mid_request_leave_one_row_or_none(server):
    import signal

    import ray

    batch = f"kill-{uuid.uuid4().hex[:8]}"
    pid = server["client"].get("/v1/stats").json()["models"]["tiny"]["pid"]
    rest = _first_chunk_then(server, f"{batch}-model", lambda: os.kill(pid, signal.SIGKILL))
    assert any('"error"' in line for line in rest), rest[-3:]  # the stream ends with an error event
    # both ingress replicas die while a stream is in flight through one of them
    names = ingress_replicas(server)
    assert len(names) == 2, names
    handles = [ray.get_actor(n, namespace="serve") for n in names]
    _first_chunk_then(server, f"{batch}-ingress", lambda: [ray.kill(h, no_restart=True) for h in handles])
    seen, deadline = {}, time.time() + 90
    while time.time() < deadline and 200 not in seen.values():  # Serve replaces them (and the model replica)
        rid = f"{batch}-after-{len(seen)}"
        try:
            seen[rid] = completion(server, "counted", rid).status_code
        except httpx.HTTPError:
            time.sleep(0.5)
    assert 200 in seen.values()
    rows = {rid: r for rid, r in ledger_rows(server, "counted").items() if rid.startswith(batch)}
    model_row = rows.pop(f"{batch}-model")  # exactly one row: the tokens it was sent before the replica died
    assert model_row["status"] == 200 and 1 <= model_row["completion_tokens"] < 390
    assert f"{batch}-ingress" not in rows  # its ingress died with it: no phantom row
    # the requests while Serve recovered: a row for each one an ingress answered, with the status it sent
    assert {rid: r["status"] for rid, r in rows.items()} == {rid: s for rid, s in seen.items() if rid in rows}
    assert all(rid in rows for rid, s in seen.items() if s == 200)
