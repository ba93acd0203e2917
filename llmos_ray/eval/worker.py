"""Running one model over the inputs: a Ray Data actor pool (`run_model`) of `ModelWorker`s, each
loading the model once — as `llmos serve` loads it, so what is evaluated is what is served — on a
GPU when the cluster has them, and turning each batch of INPUT_SCHEMA rows into a row per document
(NLL sum, tokens scored) and per prompt (greedy answer).

The perplexity window is eval.max_length, else the data.seq_len the model was trained with (read
from the llmos_config.yaml of our exports: positions beyond it were never trained), else the
model's context.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Optional

import numpy as np

from llmos_ray.config import Config
from llmos_ray.errors import ModelError, reraise_ours

log = logging.getLogger(__name__)


def worker_resources(cfg: Config) -> tuple[dict, int]:
    """Ray resources of one inference actor, and its torch threads. Without eval.cpus_per_worker,
    an actor asks for 1 CPU, or an equal share when the cluster has fewer CPUs than actors (a
    request the cluster can never grant would wait forever)."""
    import ray

    ev = cfg.eval
    cluster = ray.cluster_resources()
    gpus = cluster.get("GPU", 0)
    use_gpu = ev.device == "cuda" or (ev.device == "auto" and gpus > 0)
    if ev.device == "cuda" and gpus < ev.num_workers:
        log.warning("eval.device=cuda with %d actor(s) but the cluster has %g GPU(s) now: the actors wait for "
                    "GPUs (an autoscaling cluster adds them)", ev.num_workers, gpus)
    cpus = ev.cpus_per_worker
    if cpus is None:
        cpus = round(min(1.0, cluster.get("CPU", 1.0) / ev.num_workers), 3)
    return {"num_cpus": cpus, "num_gpus": 1 if use_gpu else 0}, max(1, int(cpus))


def run_model(inputs, model: dict, cfg: Config, resources: dict, threads: int) -> list[dict]:
    """Every input row through an actor pool of `model`; the output rows (any order)."""
    import ray

    ev = cfg.eval
    settings = {"max_length": ev.max_length, "stride": ev.stride, "batch_size": ev.batch_size,
                "max_new_tokens": ev.max_new_tokens, "stop": list(ev.stop), "threads": threads,
                "device": "cuda" if resources["num_gpus"] else "cpu",
                "trust_remote_code": cfg.model.trust_remote_code}
    out = inputs.map_batches(ModelWorker, fn_constructor_kwargs={"model": model, "settings": settings},
                             batch_size=ev.batch_size, batch_format="numpy",
                             compute=ray.data.ActorPoolStrategy(size=ev.num_workers),
                             udf_modifying_row_count=False, **resources)
    out.context.raise_original_map_exception = True  # a ModelError reaches reraise_ours() as itself
    with reraise_ours():
        return out.take_all()


class ModelWorker:
    """Ray Data actor: loads one model once; scores documents (per-document NLL sum and tokens) and
    answers prompts (greedy) of each batch of INPUT_SCHEMA rows. Output: one row per input row."""

    def __init__(self, model: dict, settings: dict):
        import torch

        from llmos_ray.models import context_length
        from llmos_ray.runtime import worker_logging
        from llmos_ray.serve.loading import load_model
        from llmos_ray.serve.spec import ModelSpec

        worker_logging()
        torch.set_num_threads(settings["threads"])
        spec = ModelSpec(name=model["label"], uri=model["uri"], base_uri=model["base_uri"], device=settings["device"],
                         trust_remote_code=settings["trust_remote_code"])
        # A failure is raised from the first batch, not from here: Ray reports an actor that fails
        # to start as ActorDiedError with the cause only in its text, a failed batch as the error itself.
        self.error: Optional[ModelError] = None
        try:
            self.model, self.tokenizer, self.device = load_model(spec)
        except ModelError as e:
            self.error = e
            return
        except Exception as e:  # noqa: BLE001 - transformers raises many types; all mean "cannot load"
            self.error = ModelError(f"cannot load model {model['label']!r} from {model['uri']}: "
                                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return
        self.settings = settings
        context = context_length(self.model.config)
        trained = trained_length(model["uri"])
        if settings["max_length"]:
            self.max_length, self.window_source = min(settings["max_length"], context), "eval.max_length"
        elif trained and trained < context:
            self.max_length, self.window_source = trained, "data.seq_len the model was trained with"
        else:
            self.max_length, self.window_source = context, "model context"
        self.stride = min(settings["stride"] or max(1, self.max_length // 2), self.max_length)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from llmos_ray.eval.generation import greedy_generate
        from llmos_ray.eval.metrics import document_nll

        if self.error is not None:
            raise self.error
        s = self.settings
        kinds = np.asarray(batch["kind"]).astype(str)
        n = len(kinds)
        max_length, stride = self.max_length, self.stride
        out = {"kind": kinds, "id": np.asarray(batch["id"], dtype=np.int64),
               "nll": np.zeros(n), "tokens": np.zeros(n, np.int64), "bytes": np.zeros(n, np.int64),
               "words": np.zeros(n, np.int64), "output": np.array([""] * n, dtype=object),
               "prompt_tokens": np.zeros(n, np.int64), "new_tokens": np.zeros(n, np.int64),
               "truncated": np.zeros(n, bool), "seconds": np.zeros(n), "device": np.array([self.device] * n, object),
               "max_length": np.full(n, max_length, np.int64), "stride": np.full(n, stride, np.int64),
               "window_source": np.array([self.window_source] * n, object)}
        docs = np.flatnonzero(kinds == "ppl")
        if len(docs):
            t0 = time.perf_counter()
            scored = document_nll(self.model, self.tokenizer, [str(batch["text"][i]) for i in docs],
                                  max_length, stride, s["batch_size"])
            for i, row in zip(docs, scored):
                for key in ("nll", "tokens", "bytes", "words"):
                    out[key][i] = row[key]
            out["seconds"][docs] = (time.perf_counter() - t0) / len(docs)
        prompts = np.flatnonzero(kinds == "gen")
        if len(prompts):
            t0 = time.perf_counter()
            answers = greedy_generate(self.model, self.tokenizer, [str(batch["text"][i]) for i in prompts],
                                      s["max_new_tokens"], s["batch_size"], s["stop"])
            for i, row in zip(prompts, answers):
                for key in ("output", "prompt_tokens", "new_tokens", "truncated"):
                    out[key][i] = row[key]
            out["seconds"][prompts] = (time.perf_counter() - t0) / len(prompts)
        return out


def trained_length(uri: str) -> Optional[int]:
    """data.seq_len of the training run that exported a model (its llmos_config.yaml), else None.
    A model trained on shorter sequences than its position table has untrained positions beyond
    them, so its perplexity window defaults to what it was trained on."""
    import yaml

    from llmos_ray.storage import localize

    path = os.path.join(localize(uri), "llmos_config.yaml") if "://" in uri or os.path.isdir(uri) else None
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            value = (yaml.safe_load(f) or {}).get("data", {}).get("seq_len")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 1 else None
