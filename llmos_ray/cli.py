"""`llmos <command>`: parses arguments and calls the public API. Nothing else lives here."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from llmos_ray.library_cli import add_library_parsers
from llmos_ray.runtime import command
from llmos_ray.usage_cli import add_usage_parsers


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config file (see jobs/configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides parsed as YAML, e.g. train.lr=3e-4 'data.paths=[a.txt]'")


def _load(args):
    """The config of a command's --config and key=value arguments (each command resolves it for its job)."""
    from llmos_ray.config import load_config

    return load_config(args.config, args.overrides)


def cmd_config_show(args) -> None:
    from llmos_ray.config import field_docs

    cfg = _load(args).resolved()
    if args.docs:
        values = cfg.flat()
        for key, doc in field_docs().items():
            if key in values:
                print(f"{key} = {values[key]!r}\n    {doc}")
    else:
        print(cfg.to_yaml(), end="")


def cmd_data_prepare(args) -> None:
    from llmos_ray.data.prepare import prepare, summary

    print(summary(prepare(_load(args)), command()))


def cmd_pretrain(args) -> None:
    from llmos_ray.train import pretrain

    _train(args, pretrain, "pretrain")


def cmd_finetune(args) -> None:
    from llmos_ray.train.finetune import finetune

    _train(args, finetune, "finetune")


def cmd_distill(args) -> None:
    from llmos_ray.train.finetune import distill

    _train(args, distill, "distill")


def _train(args, run, job: str) -> None:
    cfg = _load(args)
    try:
        result = run(cfg)
    except KeyboardInterrupt:
        print(f"\nllmos: interrupted. {_resume_hint(cfg, job)}", file=sys.stderr)
        raise SystemExit(130) from None
    print("\n" + result.summary(command()))


def _resume_hint(cfg, job: str) -> str:
    """Which checkpoint survived a Ctrl-C, and the command that continues from it."""
    from llmos_ray.train.runs import last_complete, read_run

    resolved = cfg.resolved(job)
    ckpt = last_complete(read_run(resolved))
    again = " ".join([command(), *sys.argv[1:]]) if sys.argv[1:2] == [job] else f"{command()} {job} ..."
    if ckpt is None:
        return f"No checkpoint of run {resolved.run.name!r} was complete yet; `{again}` starts it again."
    return (f"The last complete checkpoint of run {resolved.run.name!r} is step {ckpt.step} ({ckpt.uri}); "
            f"`{again}` resumes from it (run.resume=auto).")


def cmd_runs(args) -> None:
    from llmos_ray.train import runs

    if args.action == "list":
        found = runs.list_runs(args.root)
        if not found:
            print(f"no runs under {args.root}/ yet; start one: {command()} pretrain")
            return
        print(f"{'run':24} {'job':9} {'step':>11} {'loss':>8} {'val_loss':>8}  export")
        for info in found:
            loss, val = info.metric("loss"), info.metric("val_loss")
            print(f"{info.name:24} {info.job or '-':9} {f'{info.step}/{info.max_steps}':>11} "
                  f"{f'{loss[-1][1]:.4f}' if loss else '-':>8} {f'{val[-1][1]:.4f}' if val else '-':>8}  "
                  f"{info.export_dir or '-'}")
        return
    info = runs.find_run(args.run, args.root)
    print(runs.describe_run(info))
    if info.history:
        path = args.plot or os.path.join(info.output_dir, "loss.png")
        print(f"  plot        {runs.plot_run(info, path)}")


def cmd_export(args) -> None:
    from llmos_ray.train.checkpoint import export

    out = export(args.checkpoint, args.out_dir, merge_lora=False if args.adapter_only else None)
    print(f"exported {args.checkpoint} -> {out}")


def cmd_plan(args) -> None:
    from llmos_ray.train.plan import plan

    print(plan(_load(args), num_devices=args.devices))


def cmd_serve(args) -> None:
    import json

    from llmos_ray.config import load_config

    overrides = list(args.overrides)
    if args.model:
        overrides.append("serve.models=" + json.dumps(args.model))
    if args.api_key:
        overrides.append("serve.api_keys=" + json.dumps(args.api_key))
    overrides += [f"serve.{k}={v}" for k, v in (("host", args.host), ("port", args.port)) if v is not None]
    if args.registry:
        overrides.append(f"registry.uri={args.registry}")
    cfg = load_config(args.config, overrides)
    if args.emit_config:
        from llmos_ray.serve.build import emit_config

        emit_config(cfg, args.emit_config)
        print(f"wrote {args.emit_config}\nrun it: serve run {args.emit_config}   (on a cluster: serve deploy "
              f"{args.emit_config}; KubeRay: its applications go under RayService spec.serveConfigV2)")
        return
    from llmos_ray.serve.spec import resolve_models

    resolve_models(cfg.resolved())  # a bad model, name or setting: an error now, before Ray and Serve load
    from llmos_ray.serve import run_until_stopped, serve

    serve(cfg)
    s = cfg.serve
    url = f"http://{s.host}:{s.port}{s.route_prefix.rstrip('/')}"
    auth = " -H 'Authorization: Bearer $KEY'" if s.api_keys or s.api_keys_file or os.environ.get("LLMOS_API_KEYS") \
        else ""
    print(f"serving {', '.join(s.models)} at {url}/v1 (OpenAI) and {url}/v2 (KServe v2); Ctrl-C stops\n"
          f"try: curl {url}/v1/models{auth}")
    if s.metering:
        from llmos_ray.serve.build import usage_url
        from llmos_ray.serve.ledger import redacted

        where = "".join(f" {flag} {value}" for flag, value in (("-c", args.config), ("--registry", args.registry))
                        if value)
        print(f"usage ledger: {redacted(usage_url(cfg.resolved()))}; see it: {command()} usage --since 1d{where}")
    run_until_stopped(cfg)
    print("stopped")


def cmd_evaluate(args) -> None:
    import json

    from llmos_ray.config import load_config
    from llmos_ray.eval import evaluate, format_table

    overrides = list(args.overrides)
    if args.model:
        overrides.append("eval.model=" + json.dumps(args.model))
    report = evaluate(load_config(args.config, overrides))
    print(format_table(report))
    print(f"report: {report['report_path']}")


def cmd_cluster(args) -> None:
    from llmos_ray import cluster

    if args.action == "up":
        print(cluster.describe(cluster.up(num_cpus=args.num_cpus, temp_dir=args.temp_dir,
                                          dashboard_port=args.dashboard_port, port=args.port,
                                          metrics_port=args.metrics_port)))
    elif args.action == "down":
        print(f"stopped {cluster.down(temp_dir=args.temp_dir)} Ray processes")
    else:
        running = cluster.status(args.temp_dir)
        print(cluster.describe(running) if running else "no local llmos cluster is running")


CONFIG_COMMANDS = (
    ("pretrain", "pretrain with Ray Train + DeepSpeed ZeRO", cmd_pretrain),
    ("finetune", "supervised fine-tuning (full or LoRA) on instruction data", cmd_finetune),
    ("distill", "train a smaller student against a teacher's logits", cmd_distill),
)
"""Commands whose only arguments are --config and key=value overrides."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmos", description="llmos-ray: corpus -> pretrain -> fine-tune -> serve")
    from llmos_ray import __version__

    parser.add_argument("--version", action="version", version=f"llmos-ray {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("LLMOS_LOG_LEVEL", "INFO"),
                        help="what --verbose shows (default INFO)")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="show Ray's, DeepSpeed's and every INFO message live, not only in the run's llmos.log")
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="inspect configs").add_subparsers(dest="action", required=True)
    show = config.add_parser("show", help="print the resolved config")
    _config_args(show)
    show.add_argument("--docs", action="store_true", help="print every key with its value and meaning")
    show.set_defaults(func=cmd_config_show)

    data = sub.add_parser("data", help="corpus pipeline").add_subparsers(dest="action", required=True)
    prep = data.add_parser("prepare", help="read, clean, tokenize and pack a corpus; write stats.json")
    _config_args(prep)
    prep.set_defaults(func=cmd_data_prepare)

    for name, text, func in CONFIG_COMMANDS:
        p = sub.add_parser(name, help=text)
        _config_args(p)
        p.set_defaults(func=func)

    p = sub.add_parser("export", help="turn a checkpoint into a Hugging Face model directory")
    p.add_argument("checkpoint", help="checkpoint directory or URI (checkpoint_* under the run's storage)")
    p.add_argument("out_dir", help="directory to write (config.json, model.safetensors, tokenizer)")
    p.add_argument("--adapter-only", action="store_true", help="for a LoRA run: write the adapter, not merged weights")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("plan", help="per-device memory under each ZeRO stage and FLOPs per step")
    _config_args(p)
    p.add_argument("--devices", type=int, default=None, help="GPUs to plan for (default train.num_workers)")
    p.set_defaults(func=cmd_plan)

    runs = sub.add_parser("runs", help="look at training runs: progress, losses, checkpoints, export") \
        .add_subparsers(dest="action", required=True)
    for action, text in (("list", "the runs under runs/, newest first"),
                         ("show", "one run: config summary, losses, throughput, checkpoints, export, a loss plot")):
        r = runs.add_parser(action, help=text)
        r.add_argument("--root", default="runs", help="where the runs are (default runs/)")
        if action == "show":
            r.add_argument("run", help="run name (under --root) or run directory")
            r.add_argument("--plot", help="PNG to write (default <run>/loss.png)")
        r.set_defaults(func=cmd_runs)

    _serving_parsers(sub)
    _cluster_parser(sub)
    add_library_parsers(sub)
    add_usage_parsers(sub)
    return parser


def _serving_parsers(sub) -> None:
    p = sub.add_parser("serve", help="serve models over HTTP (OpenAI API + KServe v2) with Ray Serve")
    _config_args(p)
    p.add_argument("--model", "-m", action="append", default=[], metavar="DIR_OR_NAME",
                   help="export directory, fsspec URI or registry name; NAME=SOURCE sets the served name (repeatable)")
    p.add_argument("--host", help="HTTP host (default serve.host)")
    p.add_argument("--port", type=int, help="HTTP port (default serve.port, 8000)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="accepted API key (repeatable; also LLMOS_API_KEYS, serve.api_keys_file)")
    p.add_argument("--registry",
                   help="model registry file (default registry.uri, $LLMOS_REGISTRY, ~/.llmos/models.json)")
    p.add_argument("--emit-config", metavar="FILE", help="write a Serve config file for serve run/deploy and exit")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("evaluate", help="perplexity, BLEU and ROUGE of models side by side (Ray Data inference)")
    _config_args(p)
    p.add_argument("--model", "-m", action="append", default=[], metavar="DIR_OR_NAME",
                   help="model directory, fsspec URI or registry name (repeatable; default eval.model)")
    p.set_defaults(func=cmd_evaluate)


def _cluster_parser(sub) -> None:
    clus = sub.add_parser("cluster", help="a local Ray head for `ray job submit` and the dashboard") \
        .add_subparsers(dest="action", required=True)
    for action, text in (("up", "ray start --head on 127.0.0.1 (dashboard, metrics, token auth)"),
                         ("down", "stop the local cluster's processes (no other Ray)"),
                         ("status", "print the running local cluster's addresses")):
        c = clus.add_parser(action, help=text)
        c.add_argument("--temp-dir", help="the cluster's Ray temp dir, which identifies it (default /tmp/llmos-ray)")
        if action == "up":
            c.add_argument("--num-cpus", type=int, help="logical CPUs (default: this machine's + 2, so Ray Data "
                                                         "keeps CPUs beside training workers)")
            c.add_argument("--dashboard-port", type=int, default=8265, help="dashboard / job API port (default 8265)")
            c.add_argument("--port", type=int, default=6379, help="GCS port (default 6379)")
            c.add_argument("--metrics-port", type=int, default=8080, help="Prometheus metrics port (default 8080)")
        c.set_defaults(func=cmd_cluster)


def main(argv: list[str] | None = None) -> int:
    from llmos_ray.errors import find_ours

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `llmos prune MODEL OUT -c F k=v`: overrides after an option still count as overrides
        if getattr(args, "overrides", None) is None or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    _setup_logging(args.log_level.upper(), args.verbose)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("llmos: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a user mistake (ours, even wrapped by Ray) is one line; a bug keeps its traceback
        ours = find_ours(e)
        if ours is None:
            raise
        print(f"llmos: error: {_one_line(ours)}", file=sys.stderr)
        return 2
    return 0


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a line is logged (a notebook or a test may replace it)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging(level: str, verbose: bool = False) -> None:
    """Progress lines (`llmos_ray.progress`) bare on stdout; other log lines on stderr with a time and
    a source: warnings and errors only, unless --verbose (a run's llmos.log has them all anyway)."""
    from llmos_ray import runtime

    runtime.set_verbose(verbose)
    if not verbose:  # progress bars of transformers, DeepSpeed and the hub: the run log says when a step ended
        for var in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
            os.environ.setdefault(var, "1")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:
        handler.setLevel(level if verbose else max(logging.getLevelName(level), logging.WARNING))
        if not verbose:
            handler.addFilter(lambda record: record.name != "py.warnings")
    logging.captureWarnings(True)  # deprecation warnings become log records: in llmos.log, not on the console
    progress = logging.getLogger("llmos_ray.progress")
    if progress.handlers:  # main() called again in one process (tests, notebooks)
        return
    handler = _StdoutHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    progress.addHandler(handler)
    progress.propagate = False
    progress.setLevel(logging.INFO)


if __name__ == "__main__":
    sys.exit(main())
