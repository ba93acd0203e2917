"""`llmos models | apps | chat | prune`: the model library, the app store, a terminal chat and pruning.
Parses, calls the public API, prints (as `cli.py`, which adds these commands to its parser).

    llmos models register NAME URI [--task T --base-model REF --source-run RUN]   # version N+1
    llmos models promote NAME@3 prod          llmos models list [--all]     llmos models show NAME:prod
    llmos apps create haiku.yaml              llmos apps list | show NAME[@N] | remove NAME[@N] | export NAME
    llmos chat MODEL [--url URL --api-key KEY] [--system S]                   # /reset, /history, /quit
    llmos prune MODEL OUT --sparsity 0.5 [--structured] [--recover-steps N] [--register NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from llmos_ray.runtime import command


def _library(args) -> Optional[str]:
    """The library file of a command: --registry, else the --config's registry.uri, else the default."""
    if getattr(args, "registry", None):
        return args.registry
    if getattr(args, "config", None):
        from llmos_ray.config import load_config

        return load_config(args.config).registry.uri
    return None


def _json_arg(text: Optional[str], flag: str):
    from llmos_ray.errors import ConfigError

    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag} takes a JSON object: {e}") from None


# -- models ------------------------------------------------------------------------------------


def cmd_models(args) -> None:
    from llmos_ray import registry

    uri = _library(args)
    if args.action == "list":
        entries = registry.list_models(uri, all_versions=args.all)
        if not entries:
            print(f"no models in {registry.registry_uri(uri)}; add one: {command()} models register NAME DIR")
            return
        print(f"{'name':24} {'ver':>4} {'aliases':12} {'family':10} {'task':14} {'size':6} {'params':>7}  "
              f"{'registered':25} uri")
        for e in entries:
            evals = ", ".join(f"{k}={v}" for k, v in e.eval.items())
            params = registry.human_count(registry.parameter_count(e.uri))
            print(f"{e.name:24} {e.version:>4} {','.join(e.aliases) or '-':12} {e.family or '-':10} "
                  f"{e.task or 'causal_lm':14} {e.size or '-':6} {params:>7}  {e.created:25} {e.uri}"
                  + (f"  [{evals}]" if evals else ""))
    elif args.action == "register":
        meta = _json_arg(args.meta, "--meta") or {}
        e = registry.register(args.name, args.uri, family=args.family, size=args.size, task=args.task,
                              source_run=args.source_run, base_model=args.base_model,
                              eval=_json_arg(args.eval, "--eval"), overwrite=args.overwrite, registry=uri, **meta)
        print(f"registered {e.ref} -> {e.uri} in {registry.registry_uri(uri)}\n"
              f"serve it: {command()} serve --model {e.name}   (this version: --model {e.ref}; "
              f"promote it: {command()} models promote {e.ref} prod)")
    elif args.action == "promote":
        e = registry.promote(args.name, args.alias, uri)
        print(f"{e.name}:{args.alias} -> {e.ref} ({e.uri})")
    elif args.action == "remove":
        e = registry.remove(args.name, uri)
        what = e.name if registry.parse_ref(args.name) == (e.name, None, None) else e.ref
        print(f"removed {what} (latest: {e.uri}); the model files were not touched")
    else:
        print(json.dumps(registry.get(args.name, uri).to_dict(), indent=2))


def _models_parser(sub) -> None:
    models = sub.add_parser("models", help="the model library: named models, versions, aliases") \
        .add_subparsers(dest="action", required=True)
    for action, text in (("list", "list registered models (latest versions; --all: every version)"),
                         ("register", "add a model as version N+1 of NAME"),
                         ("promote", "point an alias (prod, staging, ...) at a version: promote NAME@3 prod"),
                         ("remove", "delete NAME (every version) or NAME@N (not the files)"),
                         ("show", "print one version as JSON (NAME, NAME@N, NAME:ALIAS)")):
        m = models.add_parser(action, help=text)
        m.add_argument("--registry", help="library file or URI (default $LLMOS_REGISTRY, ~/.llmos/models.json)")
        m.add_argument("--config", "-c", help="YAML config whose registry.uri to use")
        if action == "list":
            m.add_argument("--all", action="store_true", help="every version, not only the latest")
        else:
            m.add_argument("name", help="model name, or a reference NAME@N / NAME:ALIAS")
        if action == "promote":
            m.add_argument("alias", help="alias to set, e.g. prod or staging")
        if action == "register":
            m.add_argument("uri", help="export or adapter directory, or an fsspec URI (s3://...)")
            m.add_argument("--family")
            m.add_argument("--size")
            m.add_argument("--task", help="causal_lm, classification, seq2seq, ... (default: from config.json)")
            m.add_argument("--source-run", help="lineage: the run that produced it (default: from the export)")
            m.add_argument("--base-model", help="lineage: the model it was trained from (default: from the export)")
            m.add_argument("--eval", help="evaluation results as JSON, e.g. '{\"perplexity\": 41.2}'")
            m.add_argument("--meta", help="extra metadata as a JSON object")
            m.add_argument("--overwrite", action="store_true", help="update the latest version if it has this URI")
        m.set_defaults(func=cmd_models)


# -- apps ----------------------------------------------------------------------------------------


def cmd_apps(args) -> None:
    from llmos_ray.serve import app_store

    uri = _library(args)
    if args.action == "list":
        print(f"{'app':20} {'ver':>4} {'source':8} {'model':16} description")
        for s in app_store.list_apps(uri):
            print(f"{s.name:20} {s.version:>4} {s.source:8} {s.model or '-':16} {s.description}")
    elif args.action == "create":
        spec = app_store.create(_read_spec(args.file), uri)
        print(f"created app {spec.ref} in {_where(uri)}; POST /v1/apps/{spec.name} serves it (a running server picks "
              f"it up within serve.apps_refresh_s)\ntry: {command()} apps show {spec.ref}")
    elif args.action == "remove":
        gone = app_store.remove(args.name, uri)
        print(f"removed app {args.name} (versions {', '.join(map(str, gone))})")
    elif args.action == "export":
        text = app_store.export(args.name, uri)
        if args.out:
            from llmos_ray.storage import write_text

            write_text(args.out, text)
            print(f"wrote {args.out}")
        else:
            print(text, end="")
    else:
        spec = app_store.get(args.name, uri)
        print(json.dumps({**spec.describe(), "created": spec.created, "spec": spec.to_dict()}, indent=2))


def _where(uri: Optional[str]) -> str:
    from llmos_ray.registry import registry_uri

    return registry_uri(uri)


def _read_spec(path: str):
    """A spec file: YAML or JSON (any fsspec URI)."""
    import fsspec
    import yaml

    from llmos_ray.errors import ConfigError

    try:
        with fsspec.open(path, "r") as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"app spec file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"app spec file {path} is not valid YAML or JSON: {e}") from None


def _apps_parser(sub) -> None:
    apps = sub.add_parser("apps", help="the app store: named, versioned prompt apps served at /v1/apps") \
        .add_subparsers(dest="action", required=True)
    for action, text in (("list", "every app (latest versions), built-ins included"),
                         ("show", "one app: NAME or NAME@N, as JSON"),
                         ("create", "check a spec file (YAML/JSON) and store it as version N+1 of its name"),
                         ("remove", "delete NAME (every stored version) or NAME@N"),
                         ("export", "print an app's spec as YAML (or --out FILE)")):
        a = apps.add_parser(action, help=text)
        a.add_argument("--registry", help="library file or URI (default $LLMOS_REGISTRY, ~/.llmos/models.json)")
        a.add_argument("--config", "-c", help="YAML config whose registry.uri to use")
        if action == "create":
            a.add_argument("file", help="app spec (YAML or JSON)")
        elif action != "list":
            a.add_argument("name", help="app name, or NAME@VERSION")
        if action == "export":
            a.add_argument("--out", help="file to write instead of printing")
        a.set_defaults(func=cmd_apps)


# -- chat ----------------------------------------------------------------------------------------

CHAT_HELP = "commands: /reset forgets the conversation, /history shows it, /quit (or Ctrl-D) leaves"


def cmd_chat(args) -> None:
    from llmos_ray.sdk import LLM, Chatbot

    if args.url:
        llm = LLM.connect(args.url, api_key=args.api_key, model=None if args.model == "-" else args.model)
    else:
        llm = LLM.from_pretrained(args.model, registry=args.registry)
    sampling = {k: v for k, v in (("temperature", args.temperature), ("seed", args.seed)) if v is not None}
    bot = Chatbot(llm, system=args.system, max_history_tokens=args.max_history_tokens, max_tokens=args.max_tokens,
                  **sampling)
    print(f"chatting with {llm.name} ({'over HTTP at ' + args.url if args.url else 'in this process'}); {CHAT_HELP}",
          flush=True)
    try:
        _chat_loop(bot)
    finally:
        llm.close()


def _chat_loop(bot) -> None:
    while True:
        try:
            text = input("you> ")
        except EOFError:
            print()
            return
        text = text.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            bot.reset()
            print("(conversation forgotten)", flush=True)
            continue
        if text == "/history":
            for m in bot.history:
                print(f"  {m['role']}: {m['content']!r}")
            print(f"  ({len(bot.history) // 2} turns kept, {bot.dropped_turns} dropped to fit the context)", flush=True)
            continue
        sys.stdout.write("bot> ")
        for piece in bot.stream_response(text):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()


def _chat_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal (in-process, or --url a server)")
    p.add_argument("model", help="library reference, export directory or URI; with --url, the served name ('-': "
                                 "the one model served)")
    p.add_argument("--url", help="a running `llmos serve` (http://HOST:PORT) instead of loading the model here")
    p.add_argument("--api-key", default=os.environ.get("LLMOS_API_KEY"), help="API key for --url ($LLMOS_API_KEY)")
    p.add_argument("--registry", help="library file (default $LLMOS_REGISTRY, ~/.llmos/models.json)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-tokens", type=int, help="longest answer in tokens (default: the rest of the context)")
    p.add_argument("--max-history-tokens", type=int, help="prompt tokens kept (oldest turns are dropped first)")
    p.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy; default 1)")
    p.add_argument("--seed", type=int, help="seed for sampling")
    p.set_defaults(func=cmd_chat)


# -- prune ---------------------------------------------------------------------------------------


def cmd_prune(args) -> None:
    from llmos_ray.config import load_config
    from llmos_ray.pruning import prune, summary

    config = load_config(args.config, args.overrides) if args.config or args.overrides else None
    if args.registry:
        config = config or load_config()
        config.registry.uri = args.registry
    report = prune(args.model, args.out_dir, sparsity=args.sparsity, structured=args.structured, config=config,
                   recover_steps=args.recover_steps, register=args.register)
    print(summary(report, command()))


def _prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="prune a model (magnitude, or MLP neurons), measure perplexity, export")
    p.add_argument("model", help="library reference, export directory or URI")
    p.add_argument("out_dir", help="where the pruned export goes")
    p.add_argument("--sparsity", type=float, default=0.5, help="share of weights (or MLP neurons) removed (0.5)")
    p.add_argument("--structured", action="store_true", help="remove MLP neurons (a smaller model) instead of "
                                                             "zeroing single weights")
    p.add_argument("--recover-steps", type=int, default=0, help="train the pruned model this many steps after")
    p.add_argument("--register", metavar="NAME", help="add the export to the model library as NAME")
    p.add_argument("--registry", help="library file (default registry.uri, $LLMOS_REGISTRY, ~/.llmos/models.json)")
    p.add_argument("--config", "-c", help="YAML config: its data section gives the validation text (default: the "
                                          "model's own config) and the recovery run's settings")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. "
                                                                      "'eval.perplexity_paths=[val.txt]'")
    p.set_defaults(func=cmd_prune)


def add_library_parsers(sub: argparse._SubParsersAction) -> None:
    """Add `models`, `apps`, `chat` and `prune` to the `llmos` parser."""
    _models_parser(sub)
    _apps_parser(sub)
    _chat_parser(sub)
    _prune_parser(sub)
