"""`llmos <command>`: parses arguments and calls the public API. Nothing else lives here."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from llmos_ray.errors import LlmosError


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config file (see jobs/configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides parsed as YAML, e.g. train.lr=3e-4 'data.paths=[a.txt]'")


def _load(args):
    from llmos_ray.config import load_config

    return load_config(args.config, args.overrides)


def cmd_config_show(args) -> None:
    from llmos_ray.config import field_docs

    cfg = _load(args)
    if args.docs:
        values = _flatten(cfg.to_dict())
        for key, doc in field_docs().items():
            if key in values:
                print(f"{key} = {values[key]!r}\n    {doc}")
    else:
        print(cfg.to_yaml(), end="")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("overrides", "extra"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def cmd_data_prepare(args) -> None:
    from llmos_ray.data import prepare

    prepare(_load(args))


def cmd_pretrain(args) -> None:
    from llmos_ray.train import pretrain

    pretrain(_load(args))


def cmd_export(args) -> None:
    from llmos_ray.train.checkpoint import export

    out = export(args.checkpoint, args.out_dir)
    print(f"exported {args.checkpoint} -> {out}")


def cmd_plan(args) -> None:
    from llmos_ray.train.plan import plan

    print(plan(_load(args), num_devices=args.devices))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmos", description="llmos-ray: corpus -> pretrain -> fine-tune -> serve")
    parser.add_argument("--log-level", default=os.environ.get("LLMOS_LOG_LEVEL", "INFO"))
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

    p = sub.add_parser("pretrain", help="pretrain with Ray Train + DeepSpeed ZeRO")
    _config_args(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("export", help="turn a checkpoint into a Hugging Face model directory")
    p.add_argument("checkpoint", help="checkpoint directory or URI (checkpoint_* under the run's storage)")
    p.add_argument("out_dir", help="directory to write (config.json, model.safetensors, tokenizer)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("plan", help="per-device memory under each ZeRO stage and FLOPs per step")
    _config_args(p)
    p.add_argument("--devices", type=int, default=None, help="GPUs to plan for (default train.num_workers)")
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    try:
        args.func(args)
    except LlmosError as e:
        print(f"llmos: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmos: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
