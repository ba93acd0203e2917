"""Serving throughput on a mixed-length workload: 16 concurrent streaming HTTP clients against our
server vs the strongest thing a user could write in a notebook, one static batched `model.generate`
of the same 16 prompts (left padding), and vs sequential `generate` per request.

Same model (the gpt2 `small` preset, untrained, with a byte-level BPE trained on standard-library
source), same prompts, greedy, each request asks for its own number of new tokens (MIN_NEW..MAX_NEW,
fixed seed) and gets exactly that many (`ignore_eos` on the server, `min_new_tokens` in the
baselines). Useful tokens are what the requests asked for: the static batch runs every row until the
longest is done, so its rows generate more than that, and only the asked-for tokens count.

Also measured on our side: time to first token (first streamed chunk) and inter-token latency (gaps
between a stream's chunks, per generated token), p50/p99; and the single-request overhead: median
latency of one non-streamed HTTP completion minus the median of a direct `generate` of the same
request. Baseline and server rounds alternate (best of --rounds each; the server is idle during the
baseline rounds). Torch threads are the same on both sides (--threads; the replica gets
serve.num_cpus = threads). The last line is `ratio=<ours / static batched generate>` (useful
tokens/s); the sequential ratio is printed above it. Where the time goes: the CPU cores each serving
process kept busy during our best round (model replica, ingress, proxy, Ray's daemons, the clients).

    .venv/bin/python bench/serve_throughput.py [--threads 1] [--rounds 2] [--clients 16]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import statistics
import sys
import tempfile
import time

# bench/ is on sys.path: it is the script's directory.
from _common import untrained_gpt2

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MIN_NEW, MAX_NEW = 16, 128
SINGLE_TOKENS, SINGLE_REPEATS = 16, 10


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=16, help="concurrent requests (default 16)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on each side (default 1)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; each side's best is kept (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the requests' lengths (default 0)")
    p.add_argument("--stream-interval", type=float, default=None,
                   help="serve.stream_interval_s of the served model (default: the server's default)")
    p.add_argument("--port", type=int, default=8765)
    return p.parse_args()


def build_model(out_dir: str) -> str:
    return untrained_gpt2(out_dir, "small", 4096, generation_config=True)


def workload(clients: int, seed: int) -> list[tuple[str, int]]:
    """(prompt, new tokens asked for) per request: prompts of 4-17 words, lengths uniform in MIN_NEW..MAX_NEW."""
    words = "the server batches concurrent requests so that every decoding step serves many users".split()
    rng = random.Random(seed)
    return [(" ".join(words[: 3 + i % len(words)]) + f" #{i}", rng.randint(MIN_NEW, MAX_NEW)) for i in range(clients)]


class Direct:
    """Plain transformers in this process: what a user writes without a server."""

    def __init__(self, model_dir: str):
        from transformers import AutoModelForCausalLM

        from llmos_ray.data.tokenizer import load_tokenizer

        self.tok = load_tokenizer(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.params = sum(p.numel() for p in self.model.parameters())

    def one(self, prompt: str, new: int) -> int:
        import torch

        ids = torch.tensor([self.tok.encode(prompt)])
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                      min_new_tokens=new, do_sample=False, pad_token_id=self.tok.pad_token_id)
        return out.shape[1] - ids.shape[1]

    def static_batch(self, requests: list[tuple[str, int]]) -> int:
        """One left-padded batch of every prompt, run until the longest request is done; returns the
        useful tokens (each row's asked-for count), having checked every row generated at least that."""
        import torch

        self.tok.padding_side = "left"
        enc = self.tok([p for p, _ in requests], return_tensors="pt", padding=True)
        longest = max(n for _, n in requests)
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                                      pad_token_id=self.tok.pad_token_id)
        assert out.shape[1] - enc["input_ids"].shape[1] == longest
        return sum(n for _, n in requests)


class Client:
    """One streaming client per request over its own connection: tokens, TTFT and chunk gaps."""

    def __init__(self, url: str):
        import httpx

        self.url, self.http = url, httpx.Client(timeout=600)

    def stream(self, prompt: str, new: int) -> tuple[int, float, list[float]]:
        body = {"model": "bench", "prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        first, last, gaps, tokens = None, None, [], 0
        with self.http.stream("POST", self.url, json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                now = time.perf_counter()
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                if not any(c.get("text") for c in event.get("choices", [])):
                    continue
                if first is None:
                    first = now - t0
                else:
                    gaps.append(now - last)
                last = now
        return tokens, first if first is not None else float("nan"), gaps

    def once(self, prompt: str, new: int) -> int:
        r = self.http.post(self.url, json={"model": "bench", "prompt": prompt, "max_tokens": new, "temperature": 0,
                                           "ignore_eos": True})
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]


def cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by each process on this machine that serves a request, by role: the model's
    replica, the ingress replica, Serve's HTTP proxy, Ray's own daemons, and this process (the clients)."""
    import psutil

    used: dict[str, float] = {}
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or []) or proc.info["name"] or ""
            if proc.info["pid"] == os.getpid():
                role = "clients (this process)"
            elif "ServeReplica" in cmd:
                role = "ingress" if ":ingress" in cmd else "model replica"
            elif "ProxyActor" in cmd:
                role = "proxy"
            elif "raylet" in cmd or "gcs_server" in cmd:
                role = "ray daemons"
            else:
                continue
            t = proc.cpu_times()
            used[role] = used.get(role, 0.0) + t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return used


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main() -> int:
    import httpx
    import ray
    import torch
    from ray import serve

    import llmos_ray.serve
    from llmos_ray.config import load_config

    args = parse_args()
    torch.set_num_threads(args.threads)
    requests = workload(args.clients, args.seed)
    useful = sum(n for _, n in requests)
    tmp = tempfile.TemporaryDirectory()
    model_dir = build_model(os.path.join(tmp.name, "model"))
    direct = Direct(model_dir)
    direct.one(*requests[0])  # warm up
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    settings = {"serve.models": [f"bench={model_dir}"], "serve.port": args.port, "serve.max_batch_size": args.clients,
                "serve.num_cpus": args.threads}
    if args.stream_interval is not None:
        settings["serve.stream_interval_s"] = args.stream_interval
    cfg = load_config(None, settings)
    llmos_ray.serve.serve(cfg)
    url = f"http://127.0.0.1:{args.port}/v1/completions"
    clients = [Client(url) for _ in requests]
    best = {"static": float("inf"), "sequential": float("inf"), "ours": float("inf")}
    ttft, itl = [], []
    cpu_rounds: list[tuple[float, dict[str, float]]] = []  # (wall s, CPU cores busy per role) of each round

    def timed(name: str, fn) -> None:
        t0 = time.perf_counter()
        tokens = fn()
        assert tokens == useful, (name, tokens, useful)
        best[name] = min(best[name], time.perf_counter() - t0)

    def ours() -> int:
        before, t0 = cpu_seconds(), time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
            results = list(pool.map(lambda c, r: c.stream(*r), clients, requests))
        wall, after = time.perf_counter() - t0, cpu_seconds()
        cpu_rounds.append((wall, {k: (after[k] - before.get(k, 0.0)) / wall for k in after}))
        ttft.extend(first for _, first, _ in results)
        itl.extend(g for _, _, gaps in results for g in gaps)
        return sum(tokens for tokens, _, _ in results)

    try:
        with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:  # warm every connection and a full batch
            list(pool.map(lambda c, r: c.once(*r), clients, requests))
        for _ in range(args.rounds):
            timed("static", lambda: direct.static_batch(requests))
            timed("sequential", lambda: sum(direct.one(p, n) for p, n in requests))
            ttft.clear(), itl.clear()
            timed("ours", ours)
        server, local = [], []
        for _ in range(SINGLE_REPEATS):
            t = time.perf_counter()
            clients[0].once(requests[0][0], SINGLE_TOKENS)
            server.append(time.perf_counter() - t)
            t = time.perf_counter()
            direct.one(requests[0][0], SINGLE_TOKENS)
            local.append(time.perf_counter() - t)
        stats = httpx.get(f"http://127.0.0.1:{args.port}/v1/stats").json()["models"]["bench"]
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()
    rate = {k: useful / v for k, v in best.items()}
    lengths = [n for _, n in requests]
    print(f"model: gpt2 small preset, {direct.params / 1e6:.1f}M parameters, CPU, {args.threads} torch thread(s) "
          f"each side; {len(requests)} requests asking {min(lengths)}-{max(lengths)} new tokens ({useful} in all, "
          f"seed {args.seed}), greedy; best of {args.rounds} alternating rounds; stream_interval_s "
          f"{cfg.serve.stream_interval_s}")
    print(f"baseline, one static batched model.generate: {rate['static']:8.1f} useful tokens/s "
          f"({best['static']:.2f} s)")
    print(f"baseline, sequential model.generate:         {rate['sequential']:8.1f} useful tokens/s "
          f"({best['sequential']:.2f} s)")
    print(f"ours, {len(requests)} concurrent streaming HTTP clients: {rate['ours']:8.1f} useful tokens/s "
          f"({best['ours']:.2f} s, largest batch {stats.get('max_batch_size_seen')})")
    print(f"ours, last round: time to first token p50 {pct(ttft, 0.5) * 1e3:.0f} ms, "
          f"p99 {pct(ttft, 0.99) * 1e3:.0f} ms; inter-chunk latency p50 {pct(itl, 0.5) * 1e3:.1f} ms, "
          f"p99 {pct(itl, 0.99) * 1e3:.1f} ms")
    wall, cpu = min(cpu_rounds, key=lambda r: r[0])
    print(f"ours, best round ({wall:.2f} s): CPU cores busy per process: "
          + ", ".join(f"{k} {v:.2f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])))
    our_single, base_single = statistics.median(server), statistics.median(local)
    print(f"single request, {SINGLE_TOKENS} tokens (median of {SINGLE_REPEATS}): server {our_single * 1e3:.1f} ms, "
          f"direct generate {base_single * 1e3:.1f} ms, overhead {(our_single - base_single) * 1e3:+.1f} ms")
    print(f"ratio_sequential={rate['ours'] / rate['sequential']:.2f}")
    print(f"ratio={rate['ours'] / rate['static']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
