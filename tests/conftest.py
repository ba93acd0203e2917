"""Shared fixtures: one Ray instance for the session, a tiny tokenizer and a tiny exported model.

Ray gets 4 logical CPUs on this 2-core machine: Train workers and Ray Data tasks then both find
CPUs (with 2, workers holding a CPU each would leave Ray Data's tasks none). A test that proves the
2-CPU defaults never hang starts its own Ray in a subprocess.
"""

from __future__ import annotations

import contextlib
import glob
import os
import sysconfig

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RAY_NUM_CPUS = 4
FAST = os.environ.get("LLMOS_TEST_FAST") == "1"
"""`make test-fast`: unit tests only; a test that starts Ray there is a mistake (mark it slow)."""
CLUSTER_FIXTURES = {"ray_session", "only_ray_on_this_machine", "s3_server"}


OWN_RAY_MODULES = ("tests/cluster/test_local_cluster.py",)
"""Modules whose fixtures stop the session's Ray to run a cluster of their own (`session_ray_paused`)."""


def _own_ray(item) -> bool:
    return "only_ray_on_this_machine" in getattr(item, "fixturenames", ()) or item.nodeid.startswith(OWN_RAY_MODULES)


def pytest_collection_modifyitems(config, items):
    """A test that needs Ray or the S3 server is slow, whether or not its module says so. Tests that
    stop the session's Ray for a Ray of their own run last (in their order), so it is restarted only
    when a later test needs it: a restart costs seconds each time."""
    for item in items:
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    items.sort(key=_own_ray)  # stable: the order within both groups is kept
    needs_ray = False
    for item in reversed(items):
        item.stash[LATER_NEEDS_RAY] = needs_ray
        needs_ray = needs_ray or "ray_session" in getattr(item, "fixturenames", ())


LATER_NEEDS_RAY = pytest.StashKey[bool]()
_current: list = [None]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    _current[0] = item


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on loopback for the whole session. The standard AWS
    variables point every client at it — s3fs, pyarrow (Ray Train storage) and boto3 alike — which
    is also how a user reaches MinIO or another S3-compatible store. Yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    yield endpoint
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket named after the test; returns 's3://<bucket>'."""
    import re

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") + "-b"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


def start_session_ray():
    import ray

    if FAST:
        raise RuntimeError("a test run by `make test-fast` started Ray: mark it @pytest.mark.slow")

    if not ray.is_initialized():
        env = {k: os.environ[k] for k in ("DS_ACCELERATOR", "WANDB_MODE", "TOKENIZERS_PARALLELISM", "AWS_ENDPOINT_URL",
                                          "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
        ray.init(num_cpus=RAY_NUM_CPUS, include_dashboard=False, log_to_driver=True, runtime_env={"env_vars": env})
    return ray


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """Ray for the session; started after the S3 server so workers inherit its endpoint."""
    yield start_session_ray()
    import ray

    ray.shutdown()


@contextlib.contextmanager
def session_ray_paused():
    """Stop the session's Ray while a test runs its own cluster (as a user's `llmos` command or
    `llmos cluster up` does), then restart it. With two local Ray clusters on one machine, Ray
    Train's placement-group cleaner cannot tell which one to query and may tear down a healthy
    run's workers."""
    import ray

    was_running = ray.is_initialized()
    ray.shutdown()
    try:
        yield
    finally:
        item = _current[0]
        if was_running and (item is None or item.stash.get(LATER_NEEDS_RAY, True)):
            start_session_ray()


@pytest.fixture
def only_ray_on_this_machine(s3_server):
    """For a test that starts its own Ray: the session's Ray is stopped meanwhile."""
    with session_ray_paused():
        yield


def stdlib_texts(n: int = 40) -> list[str]:
    """Real text present on every machine: the first `n` modules of the standard library."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:n]
    return [open(f, encoding="utf-8", errors="replace").read() for f in files]


def stdlib_blocks(tokenizer_dir: str, seq_len: int, n_texts: int = 12):
    """(tokenizer, int32 blocks [N, seq_len + 1]): the first `n_texts` standard-library modules
    tokenized, each followed by EOS, packed into whole blocks."""
    import numpy as np

    from llmos_ray.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    ids = []
    for text in stdlib_texts(n_texts):
        ids += tok(text)["input_ids"] + [tok.eos_token_id]
    n = len(ids) // (seq_len + 1)
    return tok, np.array(ids[: n * (seq_len + 1)], dtype=np.int32).reshape(n, seq_len + 1)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> str:
    from llmos_ray.data.tokenizer import train_tokenizer

    out = str(tmp_path_factory.mktemp("tok") / "tokenizer")
    train_tokenizer(stdlib_texts(), vocab_size=512, out_dir=out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_tokenizer_dir, tmp_path_factory) -> str:
    """An untrained gpt2-tiny saved as a Hugging Face directory with our tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from llmos_ray.data.tokenizer import load_tokenizer
    from llmos_ray.models import preset_config

    tok = load_tokenizer(tiny_tokenizer_dir)
    torch.manual_seed(0)
    cfg = preset_config("gpt2", "tiny", len(tok), 128, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id,
                        pad_id=tok.pad_token_id)
    model = AutoModelForCausalLM.from_config(cfg)
    out = str(tmp_path_factory.mktemp("model") / "tiny")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(out)
    return out


CLASSIFIER_STEPS = 80


def classifier_overrides(out_dir, name: str, *more: str) -> list[str]:
    """A bert-tiny language-ID classifier trained from scratch on the embedded set's shipped sample
    (360 training, 40 held-out records of 8 languages: `finetune.locale_root` has no catalogs)."""
    import pathlib

    empty = pathlib.Path(out_dir) / "no-catalogs"
    empty.mkdir(parents=True, exist_ok=True)
    return [f"run.name={name}", f"run.output_dir={pathlib.Path(out_dir) / name}", "run.wandb=disabled",
            "finetune.task=classification", f"finetune.locale_root={empty}", "model.size=tiny",
            "data.vocab_size=1000", "data.seq_len=64", "train.num_workers=2", "train.micro_batch_size=16",
            "train.global_batch_size=32", f"train.max_steps={CLASSIFIER_STEPS}", "train.lr=5e-3",
            "train.warmup_steps=4", "train.log_every=2", f"train.eval_every={CLASSIFIER_STEPS // 2}",
            "train.eval_batches=2", f"train.checkpoint_every={CLASSIFIER_STEPS // 2}", "train.num_to_keep=null", *more]


@pytest.fixture(scope="session")
def classifier_run(ray_session, tmp_path_factory):
    """The session's one fine-tuned classifier (ZeRO-2, 2 workers; checkpoints at steps 40 and 80):
    its TrainResult. Shared by the training, evaluation and serving tests."""
    from llmos_ray.config import load_config
    from llmos_ray.train.finetune import finetune

    return finetune(load_config(None, classifier_overrides(tmp_path_factory.mktemp("classifier"), "lang-id")))


SEQ2SEQ_STEPS = 120  # 40 leave greedy outputs of one token for every source: weak serving checks
SEQ2SEQ_LOG_EVERY = 4  # each report costs ~1-2 s on this machine: 10 log lines, not 40
SEQ2SEQ_PREFIX = "translate English to French: "


def seq2seq_overrides(out_dir, name: str, *more: str) -> list[str]:
    """A t5-tiny en->fr translator trained from scratch on the embedded pairs' shipped sample (360
    training, 40 held-out pairs: `finetune.locale_root` has no catalogs), ZeRO-3 on 2 workers."""
    import pathlib

    empty = pathlib.Path(out_dir) / "no-catalogs"
    empty.mkdir(parents=True, exist_ok=True)
    return [f"run.name={name}", f"run.output_dir={pathlib.Path(out_dir) / name}", "run.wandb=disabled",
            "finetune.task=seq2seq", f"finetune.locale_root={empty}", f"finetune.task_prefix='{SEQ2SEQ_PREFIX}'",
            "finetune.max_source_len=48", "finetune.max_target_len=40", "model.size=tiny", "data.vocab_size=1000",
            "data.seq_len=64", "deepspeed.zero_stage=3", "train.num_workers=2", "train.micro_batch_size=8",
            # half a CPU per worker: the fixture is first built by `pytest tests/serve` while the shared
            # Serve app holds 2.5 of the session's 4 CPUs, where two 1-CPU workers would never be placed
            "train.cpus_per_worker=0.5",
            "train.global_batch_size=16", f"train.max_steps={SEQ2SEQ_STEPS}", "train.lr=5e-3",
            "train.warmup_steps=4", f"train.log_every={SEQ2SEQ_LOG_EVERY}", f"train.eval_every={SEQ2SEQ_STEPS // 3}",
            "train.eval_batches=2", f"train.checkpoint_every={SEQ2SEQ_STEPS // 3}", "train.num_to_keep=null", *more]


@pytest.fixture(scope="session")
def seq2seq_run(ray_session, tmp_path_factory):
    """The session's one fine-tuned translator (t5-tiny, ZeRO-3, 2 workers; checkpoints at steps 40, 80
    and 120): its TrainResult. Shared by the training, evaluation and serving tests."""
    from llmos_ray.config import load_config
    from llmos_ray.train.finetune import finetune

    return finetune(load_config(None, seq2seq_overrides(tmp_path_factory.mktemp("seq2seq"), "en-fr")))
