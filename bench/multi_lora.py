"""Several LoRA adapters on one shared base vs each adapter merged into its own copy of the base.

One workload: --requests greedy requests (prompts of 4-17 words, --new-tokens each, `ignore_eos`),
split evenly between --adapters adapters (rank --rank on GPT-2's attention and projections, random
B so each changes the outputs). Three ways to serve it, each through our continuous-batching engine
in this process (no HTTP: the engine is what differs), the same torch threads (--threads):

  shared   one engine on the base with every adapter beside it (`serve.lora=shared`): all requests in
           one batch, each row's adapter applied as its own low-rank delta (`serve/adapters.py`)
  peft     one engine on a peft PeftModel holding every adapter, rows mixed by peft's
           `adapter_names=` forward argument (peft's mixed-adapter batches)
  merged   one engine per adapter on its merged copy (`serve.lora=merge`), each serving its share of
           the requests, one after the other (the same cores, one model at a time)

Rounds alternate (best of --rounds each); greedy outputs are checked equal across the three. Printed:
useful tokens/s of each, the parameters held (one base + adapters vs a copy per adapter), then
`ratio_peft=` (peft / merged) and last `ratio=` (shared / merged).

    .venv/bin/python bench/multi_lora.py [--requests 16] [--adapters 2] [--new-tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import queue
import random
import sys
import tempfile
import time

# bench/ is on sys.path: it is the script's directory.
from _common import untrained_gpt2

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--adapters", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    return p.parse_args()


def make_adapters(base_dir: str, out: str, n: int, rank: int) -> list[str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dirs = []
    for i in range(n):
        torch.manual_seed(100 + i)
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                            init_lora_weights=False)
        dirs.append(os.path.join(out, f"adapter{i}"))
        get_peft_model(model, config).save_pretrained(dirs[-1])
    return dirs


def workload(n: int, adapters: int) -> list[tuple[str, int]]:
    """(prompt, adapter index) per request: prompts of 4-17 stdlib-ish words, adapters round-robin."""
    rng = random.Random(0)
    words = "def return import class self value list dict for while with open file data result error".split()
    return [(" ".join(rng.choice(words) for _ in range(rng.randint(4, 17))), i % adapters) for i in range(n)]


def run(engine, requests: list[tuple[str, "str | None"]], new_tokens: int) -> tuple[float, list[str]]:
    """Seconds to finish every request submitted at once, and their texts."""
    from llmos_ray.serve.engine import collect_sync
    from llmos_ray.serve.types import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    queues, items = [queue.Queue() for _ in requests], []
    for (prompt, adapter), q in zip(requests, queues):
        ids, sp, stop = engine.prepare(GenerationRequest(params=params, prompt=prompt))
        items.append((ids, sp, q.put, stop, adapter))
    t0 = time.perf_counter()
    engine.submit_many(items)
    texts = [collect_sync(q, t0).text for q in queues]
    return time.perf_counter() - t0, texts


def peft_engine(base_dir: str, adapter_dirs: list[str], tokenizer, max_batch: int):
    """Our engine over a PeftModel, each row's adapter given to peft as `adapter_names`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmos_ray.serve.engine import Engine

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dirs[0],
                                      adapter_name="a0")
    for i, d in enumerate(adapter_dirs[1:], 1):
        model.load_adapter(d, adapter_name=f"a{i}")
    model.eval()

    class PeftEngine(Engine):
        def _forward(self, rows=(), all_logits=False, **kwargs):
            if not all_logits:
                kwargs["logits_to_keep"] = 1  # PeftModel passes it on to the model
            names = [self.peft_names.get(r.slot, "__base__") for r in rows] if rows else None
            return self.model(use_cache=True, adapter_names=names, **kwargs) if names else \
                self.model(use_cache=True, **kwargs)

    engine = PeftEngine(model, tokenizer, name="peft", max_batch_size=max_batch, max_tokens_limit=512)

    class Names:  # what submit_many looks adapters up in: a name -> a slot peft knows by name
        names = {f"a{i}": i for i in range(len(adapter_dirs))}

    engine.adapters, engine.peft_names = Names(), {i: f"a{i}" for i in range(len(adapter_dirs))}
    return engine


def main() -> None:
    args = parse_args()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmos_ray.data.tokenizer import load_tokenizer
    from llmos_ray.serve.adapters import read_adapter
    from llmos_ray.serve.engine import Engine

    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="multi-lora-")
    base_dir = untrained_gpt2(os.path.join(tmp, "base"), "small", 4096, generation_config=True)
    adapter_dirs = make_adapters(base_dir, tmp, args.adapters, args.rank)
    tok = load_tokenizer(base_dir)
    jobs = workload(args.requests, args.adapters)

    shared = Engine(AutoModelForCausalLM.from_pretrained(base_dir).eval(), tok, name="shared",
                    max_batch_size=args.requests, max_tokens_limit=512)
    for i, d in enumerate(adapter_dirs):
        shared.add_adapter(f"a{i}", read_adapter(d))
    peft = peft_engine(base_dir, adapter_dirs, tok, args.requests)
    merged = [Engine(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), d)
                     .merge_and_unload().eval(), tok, name=f"merged{i}", max_batch_size=args.requests,
                     max_tokens_limit=512) for i, d in enumerate(adapter_dirs)]

    def run_shared(engine):
        return run(engine, [(p, f"a{a}") for p, a in jobs], args.new_tokens)

    def run_merged():
        total, texts = 0.0, [""] * len(jobs)
        for i, engine in enumerate(merged):
            mine = [k for k, (_, a) in enumerate(jobs) if a == i]
            seconds, out = run(engine, [(jobs[k][0], None) for k in mine], args.new_tokens)
            total += seconds
            for k, text in zip(mine, out):
                texts[k] = text
        return total, texts

    best = {"shared": float("inf"), "peft": float("inf"), "merged": float("inf")}
    outputs = {}
    run_shared(shared), run_shared(peft), run_merged()  # warm-up
    for _ in range(args.rounds):
        for name, fn in (("merged", run_merged), ("shared", lambda: run_shared(shared)),
                         ("peft", lambda: run_shared(peft))):
            seconds, outputs[name] = fn()
            best[name] = min(best[name], seconds)
    for engine in [shared, peft, *merged]:
        engine.shutdown()

    useful = args.requests * args.new_tokens
    rate = {k: useful / v for k, v in best.items()}
    base_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base_dir).parameters())
    adapter_params = sum(a.numel() + b.numel() for d in adapter_dirs for a, b in read_adapter(d).deltas.values())
    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} cores, load {load:.1f}, torch threads {args.threads}; {args.requests} requests "
          f"x {args.new_tokens} new tokens over {args.adapters} adapters (rank {args.rank})", file=sys.stderr)
    print(f"outputs equal across the three: {outputs['shared'] == outputs['peft'] == outputs['merged']}")
    print(f"parameters held: shared {base_params + adapter_params:,} (base + adapters), merged "
          f"{args.adapters * base_params:,} ({args.adapters} copies)")
    for name in ("shared", "peft", "merged"):
        print(f"{name}: {rate[name]:,.0f} useful tok/s ({best[name]:.2f} s)")
    print(f"ratio_peft={rate['peft'] / rate['merged']:.2f}")
    print(f"ratio={rate['shared'] / rate['merged']:.2f}")


if __name__ == "__main__":
    main()
