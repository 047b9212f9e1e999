"""The bodies of the serving commands: ``serve``, ``generate``, ``status``, ``deploy``."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any

from modelfleet.cli.commands import load_args
from modelfleet.cluster.connect import connect
from modelfleet.config import Config
from modelfleet.errors import ConfigError
from modelfleet.evaluate import gate
from modelfleet.serve import client
from modelfleet.serve.operations import deploy, running_config, status, update_model, update_pool, verify_auth


def _attach(*, start_local: bool, log_to_driver: bool | None = False) -> bool:
    """Join the running cluster; start a local one only if allowed. Returns True if started here.
    Quick commands never stream Ray's logs; ``serve`` leaves it to ``--verbose``."""
    return connect(log_to_driver=log_to_driver, start_local=start_local).started_here


def serve_main(cfg: Config, *, detach: bool = False, insecure_no_auth: bool = False) -> int:
    """Deploy the config's serve section; keep serving until Ctrl-C if this process owns the cluster."""

    if cfg.serve is None:
        raise ConfigError(
            "serve: this config has no serve section; add serve.models (see deploy/modelfleet-serve.yaml)"
        )
    serve_cfg = cfg.serve if cfg.serve.storage_path else cfg.serve.model_copy(update={"storage_path": cfg.storage.path})
    if insecure_no_auth:
        serve_cfg = serve_cfg.model_copy(update={"insecure_no_auth": True})
    started = _attach(start_local=True, log_to_driver=None)
    sc = deploy(serve_cfg)
    base = f"http://{sc.host}:{sc.port}{sc.route_prefix.rstrip('/')}"
    print(f"app {sc.app_name} RUNNING at {base}: models {', '.join(f'{m.name} ({m.artifact})' for m in sc.models)}")
    if verify_auth(sc).auth:
        print("auth: on (requests need 'Authorization: Bearer <key>')")
    else:
        print(
            f"WARNING: auth is OFF: anyone who can reach {sc.host}:{sc.port} can use these models "
            f"(set {sc.api_key_env} where the cluster runs, or serve.api_key_file)",
            file=sys.stderr,
        )
    print(f"try: modelfleet generate 'def main(' --url {base}")
    if detach and not started:
        return 0
    if detach:
        print("note: no cluster was running, so this process owns a local one; serving until Ctrl-C")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    from ray import serve

    serve.delete(sc.app_name)
    print(f"app {sc.app_name} deleted")
    return 0


def generate_main(args: argparse.Namespace) -> int:
    key = client.api_key_from_env(args.api_key_env)
    params: dict[str, Any] = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.seed is not None:
        params["seed"] = args.seed
    try:
        if args.stream:
            sys.stdout.write(args.prompt)
            for piece in client.stream_completion(args.url, args.prompt, model=args.model, api_key=key, **params):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            out = client.complete(args.url, args.prompt, model=args.model, api_key=key, **params)
            print(args.prompt + out["choices"][0]["text"])
            u = out["usage"]
            print(
                f"[{out['model']}: {u['prompt_tokens']} prompt + {u['completion_tokens']} completion tokens, "
                f"finish_reason={out['choices'][0]['finish_reason']}]",
                file=sys.stderr,
            )
    except (client.ServeRequestError, client.httpx.HTTPError) as e:
        print(f"modelfleet generate: error: {e}", file=sys.stderr)
        return 1
    return 0


def status_main(*, as_json: bool = False) -> int:
    _attach(start_local=False)
    rows = status()
    if as_json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no Serve applications are running")
        return 0
    print(f"{'APP':<14} {'DEPLOYMENT':<24} {'STATUS':<12} {'RUNNING':>7}  REPLICAS")
    for r in rows:
        states = ", ".join(f"{k}={v}" for k, v in sorted(r["replicas"].items())) or "-"
        print(f"{r['app']:<14} {r['deployment']:<24} {r['status']:<12} {r['running']:>7}  {states}")
        if r["message"]:
            print(f"{'':<14} {'':<24} {r['message']}")
    return 0


def deploy_main(app_name: str, model: str, artifact: str) -> int:
    _attach(start_local=False)
    label = update_model(app_name, model, artifact)
    print(f"app {app_name}: model {model} now serves {label}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    return serve_main(load_args(args), detach=args.detach, insecure_no_auth=args.insecure_no_auth)


def cmd_generate(args: argparse.Namespace) -> int:
    return generate_main(args)


def cmd_status(args: argparse.Namespace) -> int:
    return status_main(as_json=args.json)


def cmd_deploy(args: argparse.Namespace) -> int:
    if args.add or args.remove:
        if args.add and args.remove:
            raise ConfigError("--add and --remove: give one change at a time")
        if args.add and not args.artifact:
            raise ConfigError("--add: name the adapter with --artifact (name@vN or a path/URI)")
        _attach(start_local=False)
        print(
            f"app {args.app}: pool {args.name}: "
            f"{update_pool(args.app, args.name, add=(args.add, args.artifact) if args.add else None, remove=args.remove)}"
        )
        return 0
    if not args.artifact:
        raise ConfigError("--artifact: required (vN, latest, name@vN, or an artifact path/URI)")
    if args.if_better:
        _attach(start_local=False)
        decision = gate.check(running_config(args.app), args.name, args.artifact, args.if_better, data=args.data)
        print(f"quality gate: {decision.explain()}")
        if not decision.promote:
            return 1
    return deploy_main(args.app, args.name, args.artifact)
