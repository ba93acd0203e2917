"""`llmos serve` in the foreground: answers over HTTP, then SIGTERM removes the app cleanly."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import threading
import time

import httpx
import pytest

from tests.serve.conftest import free_port

pytestmark = pytest.mark.slow


def test_serve_command_runs_until_sigterm(ray_session, tiny_model_dir, tmp_path, capsys):
    from ray import serve

    from llmos_ray.cli import main

    port = free_port()
    seen: dict = {}
    before = signal.getsignal(signal.SIGTERM)  # Ray's driver handler

    def client():
        deadline = time.time() + 120
        while time.time() < deadline and signal.getsignal(signal.SIGTERM) is before:
            time.sleep(0.2)  # the command installs its handler once the app is up
        try:
            seen["models"] = httpx.get(f"http://127.0.0.1:{port}/v1/models",
                                       headers={"Authorization": "Bearer k"}).json()
            seen["completion"] = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                                            headers={"Authorization": "Bearer k"},
                                            json={"model": "tiny", "prompt": "hi", "max_tokens": 3}).status_code
            seen["app"] = httpx.post(f"http://127.0.0.1:{port}/v1/apps/summarize", timeout=30,  # no "model":
                                     headers={"Authorization": "Bearer k"},  # the one served model
                                     json={"text": "A long text.", "max_tokens": 3}).json()
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        code = main(["serve", "--model", f"tiny={tiny_model_dir}", "--port", str(port), "--api-key", "k",
                     "serve.max_batch_size=4", f"serve.usage_db=sqlite:///{tmp_path}/usage.db"])
    finally:
        thread.join()
        serve.shutdown()  # the next module starts Serve on its own port
    assert code == 0
    assert [m["id"] for m in seen["models"]["data"]] == ["tiny"] and seen["completion"] == 200
    assert seen["app"]["model"] == "tiny" and seen["app"]["app"] == "summarize"
    out = capsys.readouterr().out
    assert f"http://127.0.0.1:{port}/v1" in out and "stopped" in out.splitlines()
    assert f"usage ledger: sqlite:///{tmp_path}/usage.db" in out
    with sqlite3.connect(tmp_path / "usage.db") as db:  # written out when the command stopped
        rows = db.execute("SELECT key, model, app, status FROM llmos_usage ORDER BY time").fetchall()
    assert rows == [(f"key-{hashlib.sha256(b'k').hexdigest()[:8]}", "tiny", app, 200) for app in ("-", "summarize")]
    assert signal.getsignal(signal.SIGTERM) is before  # restored


def test_emit_config(tiny_model_dir, tmp_path, capsys):
    from llmos_ray.cli import main

    path = tmp_path / "serve.yaml"
    assert main(["serve", "--model", tiny_model_dir, "--port", "9001", "--emit-config", str(path)]) == 0
    assert "serve run" in capsys.readouterr().out
    text = path.read_text()
    assert "llmos_ray.serve.build:build_app" in text and "port: 9001" in text and tiny_model_dir in text
