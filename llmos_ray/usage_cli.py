"""`llmos usage` and `llmos keys`: who used which model and how many tokens; writing key records.
Parses, calls the library, prints (as `cli.py`, which adds these commands to its parser).

    llmos usage [--key NAME] [--tenant T] [--since 7d] [--by key|tenant|model|app|day|route|status]
                [--format table|csv|json] [--db URL | -c CONFIG | --registry FILE]
    llmos keys hash [KEY]        # the sha256 to put in a keys file instead of the key (stdin if not given)
    llmos keys new NAME [--tenant T] [--rpm N] ...   # a fresh key: the secret once, and its record (hash only)
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import secrets
import sys
from typing import Any

COLUMNS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens")


def usage_db(args) -> str:
    """The ledger of a command: --db, else the --config's serve.usage_db (or the SQLite file beside
    its model library), else beside --registry / the default library."""
    from llmos_ray.registry import registry_uri
    from llmos_ray.serve.ledger import default_url

    if args.db:
        return args.db
    if args.config:
        from llmos_ray.config import load_config

        cfg = load_config(args.config)
        return cfg.serve.usage_db or default_url(registry_uri(args.registry or cfg.registry.uri))
    return default_url(registry_uri(args.registry))


def format_summary(rows: list[dict[str, Any]], by: str, fmt: str) -> str:
    """The summary as a table (with a total line), CSV or JSON."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=[by, *COLUMNS], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue().rstrip("\n")
    width = max([len(by), 5, *(len(str(r[by])) for r in rows)])
    lines = [f"{by:{width}} " + " ".join(f"{c:>17}" for c in COLUMNS)]
    lines += [f"{str(r[by]):{width}} " + " ".join(f"{r[c]:>17}" for c in COLUMNS) for r in rows]
    lines.append(f"{'total':{width}} " + " ".join(f"{sum(r[c] for r in rows):>17}" for c in COLUMNS))
    return "\n".join(lines)


def cmd_usage(args) -> None:
    from llmos_ray.serve.ledger import Ledger, parse_since

    ledger = Ledger(usage_db(args))
    rows = ledger.summary(by=args.by, key=args.key, tenant=args.tenant, since=parse_since(args.since))
    if not rows and args.format == "table":
        print(f"no usage recorded{' for these filters' if args.key or args.tenant or args.since else ''} "
              f"in {args.db or 'the ledger'}")
        return
    print(format_summary(rows, args.by, args.format))


def cmd_keys(args) -> None:
    import yaml

    from llmos_ray.serve.keys import hash_key, parse_record

    if args.action == "hash":
        secret = args.key if args.key is not None else sys.stdin.readline()
        print(hash_key(secret))
        return
    secret = "sk-" + secrets.token_urlsafe(24)
    raw: dict[str, Any] = {"name": args.name, "sha256": hash_key(secret)}
    for field in ("tenant", "rpm", "tpm", "budget_tokens", "budget_period"):
        if getattr(args, field) is not None:
            raw[field] = getattr(args, field)
    for field in ("models", "apps"):
        if getattr(args, field):
            raw[field] = getattr(args, field).split(",")
    if args.admin:
        raw["admin"] = True
    parse_record(raw, "the new key")  # the same checks as the server's
    print(f"key (shown once, give it to {args.name}): {secret}", file=sys.stderr)
    print(yaml.safe_dump([raw], sort_keys=False).rstrip())


def add_usage_parsers(sub: argparse._SubParsersAction) -> None:
    """Add `usage` and `keys` to the `llmos` parser."""
    from llmos_ray.serve.keys import PERIODS

    p = sub.add_parser("usage", help="requests and tokens per key, tenant, model, app or day (the usage ledger)")
    p.add_argument("--key", help="only this key (its name)")
    p.add_argument("--tenant", help="only this tenant")
    p.add_argument("--since", help="a duration (7d, 12h, 30m, 2w) or a date YYYY-MM-DD (UTC)")
    p.add_argument("--by", default="key", help="key, tenant, model, app, day, route or status (default key)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--db", help="the ledger's SQLAlchemy URL (default: the server's, see serve.usage_db)")
    p.add_argument("--config", "-c", help="YAML config whose serve.usage_db / registry.uri to use")
    p.add_argument("--registry", help="model library file: the default ledger is usage.db beside it")
    p.set_defaults(func=cmd_usage)

    keys = sub.add_parser("keys", help="API key records for serve.api_keys_file").add_subparsers(dest="action",
                                                                                                 required=True)
    h = keys.add_parser("hash", help="print the sha256 of a key (read from stdin when not given)")
    h.add_argument("key", nargs="?")
    h.set_defaults(func=cmd_keys)
    n = keys.add_parser("new", help="make a key: the secret on stderr, its record (hash only) on stdout")
    n.add_argument("name")
    n.add_argument("--tenant")
    n.add_argument("--models", help="comma-separated served models it may use (default all)")
    n.add_argument("--apps", help="comma-separated prompt apps it may run (default all)")
    for field in ("rpm", "tpm", "budget-tokens"):
        n.add_argument(f"--{field}", type=int)
    n.add_argument("--budget-period", choices=PERIODS)
    n.add_argument("--admin", action="store_true", help="may read everyone's usage")
    n.set_defaults(func=cmd_keys)
