"""The notebooks run top to bottom in a Jupyter kernel (nbclient, this virtualenv's interpreter) and
reach real results, which the tests read back from the files the notebooks wrote; the committed
copies carry no outputs.

Each notebook writes under $LLMOS_NOTEBOOK_DIR (here the test's tmp_path) and ends by saving a
summary.json of what it did. The kernel is another process that starts its own Ray (quickstart) or
its own local cluster (cluster), so the session's Ray is stopped meanwhile.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT_S = 600


def execute(name: str, out_dir: Path, monkeypatch) -> tuple[nbformat.NotebookNode, Path, dict]:
    """Run notebooks/<name> as Jupyter would (working directory notebooks/), outputs under `out_dir`.
    The executed copy is kept in `out_dir` to read when a cell fails. Returns the executed notebook,
    the notebook's run directory and the summary.json it wrote there."""
    from nbclient import NotebookClient

    monkeypatch.setenv("LLMOS_NOTEBOOK_DIR", str(out_dir))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    t0 = time.perf_counter()
    try:
        client.execute()
    finally:
        nbformat.write(nb, out_dir / f"executed-{name}")
        print(f"{name}: {time.perf_counter() - t0:.0f} s")
    run = out_dir / Path(name).stem
    return nb, run, json.loads((run / "summary.json").read_text())


def outputs_of(nb: nbformat.NotebookNode, first_line: str) -> list:
    cells = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(first_line)]
    assert len(cells) == 1, first_line
    return cells[0].outputs


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_committed_notebooks_have_no_outputs():
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert names == ["cluster.ipynb", "quickstart.ipynb"]
    for name in names:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata.kernelspec.name == "python3"
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(c.outputs == [] and c.execution_count is None for c in code), name
        assert not any("execution" in c.metadata for c in code), f"{name}: execution timings committed"
        assert sum(c.cell_type == "markdown" for c in nb.cells) >= len(code) // 2, f"{name}: explain the steps"


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_quickstart_notebook_trains_finetunes_evaluates_and_serves(only_ray_on_this_machine, tmp_path, monkeypatch):
    nb, run, summary = execute("quickstart.ipynb", tmp_path, monkeypatch)

    # Pretraining: the loss in metrics.jsonl falls, and the notebook plotted it.
    losses = [h["loss"] for h in read_jsonl(run / "pretrain" / "metrics.jsonl") if "loss" in h]
    assert len(losses) >= 10 and losses[-1] < losses[0] - 0.5
    assert (summary["pretrain_first_loss"], summary["pretrain_last_loss"]) == (losses[0], losses[-1])
    assert any("image/png" in o.get("data", {}) for o in outputs_of(nb, "%matplotlib inline"))
    assert (run / "pretrain" / "stats.json").exists() and (run / "pretrain" / "tokenizer").is_dir()

    # Fine-tuning started from the pretrain export and lowered its loss.
    pretrain_export, finetune_export = run / "pretrain" / "export", run / "finetune" / "export"
    assert summary["pretrain_export"] == str(pretrain_export) and summary["finetune_export"] == str(finetune_export)
    ft = [h["loss"] for h in read_jsonl(run / "finetune" / "metrics.jsonl") if "loss" in h]
    assert len(ft) >= 2 and ft[-1] < ft[0]
    assert (finetune_export / "config.json").exists()

    # Evaluation: both models side by side, with perplexity on the same held-out tokens.
    report = json.loads((run / "evaluate" / "report.json").read_text())
    assert list(report["models"]) == ["pretrain", "finetune"]
    ppl = {label: m["perplexity"] for label, m in report["models"].items()}
    assert all(1 < p["perplexity"] < 1e5 and math.isfinite(p["perplexity"]) for p in ppl.values())
    assert ppl["pretrain"]["tokens"] == ppl["finetune"]["tokens"] > 0
    assert all("python_completion" in m["tasks"] for m in report["models"].values())
    table = "".join(o.get("text", "") for o in outputs_of(nb, "from llmos_ray.eval import format_table"))
    assert "perplexity" in table and "python_completion/bleu" in table

    # Serving: the fine-tuned export answered through the OpenAI API.
    assert summary["served"] == {"quickstart": str(finetune_export)} and summary["served_model"] == "quickstart"
    assert isinstance(summary["answer"], str) and summary["answer"].strip() and summary["completion_tokens"] > 0
    # The SDK: the design documents' three lines on the fine-tuned export, and the same greedy answer over HTTP.
    assert isinstance(summary["sdk_response"], str) and summary["sdk_same_greedy"] is True


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_cluster_notebook_submits_monitors_and_stops_its_cluster(only_ray_on_this_machine, tmp_path, monkeypatch):
    nb, run, summary = execute("cluster.ipynb", tmp_path, monkeypatch)

    # The job ran through job submission to the end, and `list_jobs` saw it.
    assert summary["status"] == "SUCCEEDED" and summary["jobs_listed"] == {summary["job_id"]: "SUCCEEDED"}
    assert summary["entrypoint"].startswith("python jobs/pretrain.py --config jobs/configs/pretrain_tiny.yaml")
    steps = [h["step"] for h in read_jsonl(run / "pretrain" / "metrics.jsonl")]
    assert steps[-1] == 10 and summary["losses"][-1] < summary["losses"][0]
    assert (run / "pretrain" / "export" / "config.json").exists()
    # Its logs were tailed into the notebook: the training progress of that run.
    logs = "".join(o.get("text", "") for o in outputs_of(nb, "async for lines in client.tail_job_logs"))
    assert "step 10/10" in logs and "finished pretrain-tiny" in logs
    # The metrics endpoint carried the training series while it ran.
    seen = summary["metrics_seen"]
    assert {"ray_llmos_train_step", "ray_llmos_train_loss", "ray_llmos_train_tokens_per_s"} <= set(seen)
    assert 1 <= seen["ray_llmos_train_step"] <= 10 and math.isfinite(seen["ray_llmos_train_loss"])
    # `down` stopped the cluster's processes and nothing of it is left.
    from llmos_ray.cluster import cluster_processes

    assert summary["processes_stopped"] > 0 and cluster_processes(summary["temp_dir"]) == []
