"""lm-evaluation-harness against our server: its `local-completions` model (what users point at
an OpenAI-compatible server) vs its own `hf` model on the same export, for the same two tasks.

Tasks are local files (no hub): `stdlib_mc`, a multiple-choice task (loglikelihood requests: token
ids, echo, logprobs 1, max_tokens 1), and `stdlib_next_line`, a generate_until task (greedy until a
newline), both built from the Python standard library's source lines. The model is the gpt2
`tiny` preset, untrained, with a byte-level BPE trained on standard-library source: its scores are
near chance; what matters is that the server's equal the in-process model's. Prints both sides'
metrics, the largest difference of a loglikelihood between them, and last `ratio=<our time /
hf time>` (wall time of the whole evaluation; the server side includes HTTP and batching).

    .venv/bin/python bench/lm_eval_local_completions.py      # needs `pip install "lm-eval[api]"` (the bench extra)
"""

from __future__ import annotations

import glob
import json
import os
import random
import sys
import sysconfig
import tempfile
import time

# bench/ is on sys.path: it is the script's directory.
from _common import untrained_gpt2

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

DOCS = 40
MC_TASK = """task: stdlib_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
"""
GEN_TASK = """task: stdlib_next_line
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{choices[gold]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
"""


def build_model(out_dir: str) -> str:
    return untrained_gpt2(out_dir, "tiny", 2048)


def write_tasks(out_dir: str) -> str:
    """Docs: a few lines of a stdlib module as context, its next line and three other lines as choices."""
    rng = random.Random(0)
    lines = [ln.rstrip() for f in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[60:90]
             for ln in open(f, encoding="utf-8", errors="replace") if 8 < len(ln.strip()) < 60]
    docs = []
    for _ in range(DOCS):
        i = rng.randrange(3, len(lines) - 1)
        others = rng.sample(lines, 3)
        choices = [" " + lines[i].strip()] + [" " + o.strip() for o in others]
        docs.append({"context": "\n".join(lines[i - 3:i]) + "\n#", "choices": choices, "gold": 0})
    path = os.path.join(out_dir, "docs.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    for name, text in (("stdlib_mc.yaml", MC_TASK), ("stdlib_next_line.yaml", GEN_TASK)):
        with open(os.path.join(out_dir, name), "w") as f:
            f.write(text.format(docs=path))
    return out_dir


def evaluate(model: str, model_args: str, tasks_dir: str):
    import lm_eval
    from lm_eval.tasks import TaskManager

    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["stdlib_mc", "stdlib_next_line"],
                                  task_manager=TaskManager(include_path=tasks_dir), log_samples=True,
                                  batch_size=8)
    return out, time.perf_counter() - t0


def loglikelihoods(out) -> list[float]:
    return [resp[0][0] for s in out["samples"]["stdlib_mc"] for resp in s["resps"]]


def generations(out) -> list[str]:
    return [s["resps"][0][0] for s in sorted(out["samples"]["stdlib_next_line"], key=lambda s: s["doc_id"])]


def main() -> int:
    import ray
    from ray import serve

    import llmos_ray.serve
    from llmos_ray.config import load_config

    tmp = tempfile.TemporaryDirectory()
    model_dir = build_model(os.path.join(tmp.name, "model"))
    tasks_dir = write_tasks(tmp.name)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = 8766
    try:
        llmos_ray.serve.serve(load_config(None, {"serve.models": [f"bench={model_dir}"], "serve.port": port,
                                                 "serve.max_tokens_limit": 64}))
        ours, ours_s = evaluate("local-completions", f"model=bench,base_url=http://127.0.0.1:{port}/v1/completions,"
                                f"tokenizer={model_dir},num_concurrent=4,max_retries=1,max_length=256", tasks_dir)
    finally:
        serve.shutdown()
        ray.shutdown()
    base, base_s = evaluate("hf", f"pretrained={model_dir},max_length=256,device=cpu", tasks_dir)
    tmp.cleanup()
    diff = max(abs(a - b) for a, b in zip(loglikelihoods(ours), loglikelihoods(base)))
    for name, out, secs in (("ours (local-completions over HTTP)", ours, ours_s), ("lm-eval hf in-process", base,
                                                                                 base_s)):
        r = out["results"]
        print(f"{name:36s} stdlib_mc acc {r['stdlib_mc']['acc,none']:.3f}   stdlib_next_line exact_match "
              f"{r['stdlib_next_line']['exact_match,none']:.3f}   {secs:.1f} s")
    same = sum(a == b for a, b in zip(generations(ours), generations(base)))
    print(f"{len(loglikelihoods(ours))} loglikelihoods, largest difference {diff:.2e}; greedy generations equal: "
          f"{same}/{len(generations(base))}")
    print(f"ratio={ours_s / base_s:.2f}")
    return 0 if diff < 1e-3 and same == len(generations(base)) else 1


if __name__ == "__main__":
    sys.exit(main())
