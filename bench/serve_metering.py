"""What usage metering costs: the same server with metering and a limited key (rpm, tpm and a token
budget: every request asks the usage meter before it runs and leaves a ledger row after) vs
metering off with a plain key, in one run.

Three Serve applications side by side on one Ray (same model, built as in serve_throughput.py,
same settings, each with its own model replica): /off (serve.metering=false), /ledger (metering
on, a key without limits: ledger rows only) and /on (metering on, a key with limits: every request
also waits for the meter's admission), ledgers in SQLite. Rounds alternate between them (the
others idle), best of ROUNDS each; REQUESTS short completions (NEW_TOKENS tokens, greedy,
ignore_eos) from CLIENTS concurrent HTTP clients per round: short requests are where a
per-request cost shows most. Afterwards the /on ledger is checked to hold one row per request.
The last line is `ratio=<on/off>` (requests per second); goal >= 0.97.

    .venv/bin/python bench/serve_metering.py
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
import tempfile
import time

# bench/ is on sys.path: it is the script's directory.
from _common import machine
from serve_throughput import build_model, prompts

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CLIENTS = 16
REQUESTS = 96
NEW_TOKENS = 8
ROUNDS = 4
PORT = 8766
KEY = "sk-bench-metering"


def start(model_dir: str, tmp: str) -> None:
    import llmos_ray.serve
    from llmos_ray.config import load_config

    common = {"serve.models": [f"bench={model_dir}"], "serve.port": PORT, "serve.max_batch_size": CLIENTS,
              "serve.num_cpus": 1, "registry.uri": os.path.join(tmp, "models.json")}
    llmos_ray.serve.serve(load_config(None, {**common, "serve.app_name": "off", "serve.route_prefix": "/off",
                                             "serve.metering": False, "serve.api_keys": [KEY]}))
    llmos_ray.serve.serve(load_config(None, {**common, "serve.app_name": "ledger", "serve.route_prefix": "/ledger",
                                             "serve.usage_db": f"sqlite:///{tmp}/ledger.db",
                                             "serve.api_keys": [{"name": "bench", "key": KEY}]}))
    limited = {"name": "bench", "key": KEY, "tenant": "bench", "rpm": 10**6, "tpm": 10**9, "budget_tokens": 10**12}
    llmos_ray.serve.serve(load_config(None, {**common, "serve.app_name": "on", "serve.route_prefix": "/on",
                                             "serve.usage_db": f"sqlite:///{tmp}/usage.db",
                                             "serve.api_keys": [limited]}))


def main() -> int:
    import httpx
    import ray
    from ray import serve

    tmp = tempfile.TemporaryDirectory()
    model_dir = build_model(os.path.join(tmp.name, "model"))
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    start(model_dir, tmp.name)
    base = f"http://127.0.0.1:{PORT}"
    body = {"model": "bench", "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    clients = [httpx.Client(timeout=300, headers={"Authorization": f"Bearer {KEY}"}) for _ in range(CLIENTS)]
    texts = prompts()

    def ask(prefix: str, i: int) -> int:
        r = clients[i % CLIENTS].post(f"{base}/{prefix}/v1/completions", json={**body, "prompt": texts[i % len(texts)]})
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    def round_s(pool, prefix: str) -> float:
        t0 = time.perf_counter()
        tokens = sum(pool.map(lambda i: ask(prefix, i), range(REQUESTS)))
        assert tokens == REQUESTS * NEW_TOKENS, tokens
        return time.perf_counter() - t0

    best = {"off": float("inf"), "ledger": float("inf"), "on": float("inf")}
    try:
        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            for prefix in best:  # warm up both: connections, a full batch, the meter actor
                round_s(pool, prefix)
            for _ in range(ROUNDS):
                for prefix in best:
                    best[prefix] = min(best[prefix], round_s(pool, prefix))
        usage = clients[0].get(f"{base}/on/v1/usage").json()["total"]
    finally:
        for c in clients:
            c.close()
        serve.shutdown()
        from llmos_ray.serve.meter import stop_meter

        stop_meter("on", f"sqlite:///{tmp.name}/usage.db")
        stop_meter("ledger", f"sqlite:///{tmp.name}/ledger.db")
        ray.shutdown()
        tmp.cleanup()
    sent = REQUESTS * (ROUNDS + 1)
    assert usage["requests"] == sent and usage["completion_tokens"] == sent * NEW_TOKENS, usage
    off, ledger, on = (REQUESTS / best[k] for k in ("off", "ledger", "on"))
    print(machine())
    print(f"{REQUESTS} completions x {NEW_TOKENS} tokens from {CLIENTS} concurrent clients, best of {ROUNDS} "
          f"alternating rounds; ledger rows of /on: {usage['requests']} (= requests sent)")
    print(f"metering off, plain key:                 {off:7.1f} requests/s ({best['off']:.2f} s)")
    print(f"metering on, key without limits:         {ledger:7.1f} requests/s ({best['ledger']:.2f} s; ledger rows "
          f"only, ratio_ledger={ledger / off:.3f})")
    print(f"metering on, key with rpm/tpm/budget:    {on:7.1f} requests/s ({best['on']:.2f} s)")
    print(f"ratio={on / off:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
