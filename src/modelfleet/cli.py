"""The ``modelfleet`` console script: every subcommand in one table, each importing its
implementation only when chosen (so ``modelfleet --help`` stays fast)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

# Quiet Ray/DeepSpeed chatter that says nothing to a user; real errors still surface.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (sections: model, data, train, deepspeed, storage)")
    p.add_argument("--config", dest="config_opt", metavar="CONFIG", help="the same, as an option (jobs/)")
    p.add_argument("--preset", help="start from this preset (tiny, small, gpt2-124m, gpt-1b, digits-cnn, "
                   "diabetes-linear, breast-cancer-linear, topics-lstm, interactions-mf)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set deepspeed.zero_stage=2 (repeatable)")


def _load(args: argparse.Namespace):
    from modelfleet.config import load_config

    return load_config(args.config or args.config_opt, preset=args.preset, overrides=args.overrides)


def cmd_prepare(args: argparse.Namespace) -> int:
    from modelfleet.data.prepare import prepare_dataset
    from modelfleet.data.tokenizer import ByteTokenizer

    cfg = _load(args)
    if cfg.model.family != "gpt":
        from modelfleet.models import get_family

        meta = get_family(cfg.model.family).prepare(cfg, overwrite=args.overwrite)
        print(f"prepared {meta['train_rows']} train / {meta['val_rows']} validation / {meta['test_rows']} "
              f"test rows of {cfg.data.sources[0]} for family {cfg.model.family} -> {cfg.data.path}")
        return 0
    meta = prepare_dataset(cfg.data, cfg.model.block_size, ByteTokenizer(), overwrite=args.overwrite)
    print(f"prepared {meta['train_rows']} train / {meta['val_rows']} validation sequences of "
          f"{meta['seq_len']} tokens from {meta['num_documents']} documents -> {cfg.data.path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from modelfleet.train.trainer import train

    cfg = _load(args)
    res = train(cfg, resume=args.resume, export=not args.no_export)
    print(f"run {res.run_name}: step {res.checkpoint_step}, metrics {json.dumps(res.metrics)}")
    print(f"timings: {json.dumps({k: round(v, 2) for k, v in res.timings.items()})}")
    if res.artifact:
        print(f"artifact {res.artifact.name}@{res.artifact.version}: {res.artifact.uri}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from modelfleet.train.export import export_run

    cfg = _load(args)
    ref = export_run(cfg.storage.path, args.run, name=args.name)
    print(f"artifact {ref.name}@{ref.version}: {ref.uri}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from modelfleet.demo import run_demo

    return run_demo(_load(args))


def _add_train(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its last complete checkpoint")
    p.add_argument("--no-export", action="store_true", help="do not export an artifact at the end")


def _add_prepare(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset")


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run id under <storage>/runs/")
    _config_args(p)
    p.add_argument("--name", help="registry name (default: storage.model_name or the preset)")


def cmd_serve(args: argparse.Namespace) -> int:
    from modelfleet.serve.ops import serve_main

    return serve_main(_load(args), detach=args.detach)


def cmd_generate(args: argparse.Namespace) -> int:
    from modelfleet.serve.ops import generate_main

    return generate_main(args)


def cmd_status(args: argparse.Namespace) -> int:
    from modelfleet.serve.ops import status_main

    return status_main(as_json=args.json)


def cmd_deploy(args: argparse.Namespace) -> int:
    from modelfleet.serve.ops import deploy_main

    if args.if_better:
        from modelfleet.serve.gate import check
        from modelfleet.serve.ops import _attach

        _attach(start_local=False)
        decision = check(args.app, args.name, args.artifact, args.if_better, data=args.data)
        print(f"quality gate: {decision.explain()}")
        if not decision.promote:
            return 1
    return deploy_main(args.app, args.name, args.artifact)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from modelfleet.evaluate import evaluate_main

    return evaluate_main(args)


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="name, name@vN, or an artifact path/URI")
    p.add_argument("--data", required=True, help="a dataset written by `modelfleet prepare` (its raw/<split>)")
    p.add_argument("--split", default="test", help="split to score (default: test)")
    p.add_argument("--kfold", type=int, metavar="K", help="instead: K-fold cross-validation as K training runs "
                   "of the artifact's config on the dataset's train+val rows")
    p.add_argument("--storage", default="storage", help="storage root of the registry and runs")
    p.add_argument("--out", help="report directory (default: <storage>/evaluations/<name>-<version>)")
    p.add_argument("--concurrency", type=int, default=2, help="batch-inference actors")


def _add_serve(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--detach", action="store_true",
                   help="return once deployed (needs a running cluster) instead of serving until Ctrl-C")


def _add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="text to continue")
    p.add_argument("--stream", action="store_true", help="print tokens as they arrive (Server-Sent Events)")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the app's base URL")
    p.add_argument("--model", help="served model name (default: the app's first model)")
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.add_argument("--api-key-env", default="MODELFLEET_API_KEY", help="env var holding the API key")


def _add_status(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_deploy(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="served model name (serve.models[].name)")
    p.add_argument("--artifact", required=True, help="vN, latest, name@vN, or an artifact path/URI")
    p.add_argument("--app", default="modelfleet", help="Serve application name (serve.app_name)")
    p.add_argument("--if-better", metavar="METRIC", help="promote only if the artifact beats the served one "
                   "on METRIC (accuracy, f1_macro, r2, mse, recall@10, perplexity, ...)")
    p.add_argument("--data", help="dataset for --if-better (default: the candidate's training dataset)")


def cmd_plan(args: argparse.Namespace) -> int:
    from modelfleet.train.memory import format_plan, plan, refusal

    cfg = _load(args)
    gib = args.gpu_memory_gib
    if gib is None:
        import torch

        gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 80.0
    p = plan(cfg, gpu_memory_gib=gib)
    print(format_plan(p, cfg))
    if not p.fits:
        print(f"modelfleet plan: error: {refusal(p)}", file=sys.stderr)
        return 2
    print(f"fits: {p.total / 2**30:.1f} of {gib:g} GiB per GPU")
    return 0


def _add_plan(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--gpu-memory-gib", type=float, metavar="GIB",
                   help="memory of one GPU (default: this machine's GPU, else 80)")


def cmd_pipeline(args: argparse.Namespace) -> int:
    from modelfleet.serve.ops import pipeline_main

    return pipeline_main(_load(args))


def _cluster(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from modelfleet.cluster import commands

        return getattr(commands, f"cmd_{name}")(args)
    return run


def _cluster_args(name: str) -> Callable[[argparse.ArgumentParser], None]:
    def add(p: argparse.ArgumentParser) -> None:
        from modelfleet.cluster import commands

        getattr(commands, f"add_{name}")(p)
    return add


# name -> (help, add arguments, run). The README's command table is tested against this.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "prepare": ("tokenize text/JSONL/Parquet into Parquet shards", _add_prepare, cmd_prepare),
    "train": ("train with Ray Train + DeepSpeed ZeRO, then export", _add_train, cmd_train),
    "export": ("consolidate a run's last complete checkpoint into an artifact", _add_export, cmd_export),
    "demo": ("the whole mission on one machine (make demo)", _config_args, cmd_demo),
    "serve": ("deploy the serve section as a Ray Serve app (starts a local cluster if none)", _add_serve, cmd_serve),
    "generate": ("send a prompt to a running app (OpenAI API), optionally streaming", _add_generate, cmd_generate),
    "status": ("Serve applications, deployments and replicas with their state", _add_status, cmd_status),
    "deploy": ("move a served model to another artifact with zero downtime", _add_deploy, cmd_deploy),
    "evaluate": ("score an artifact on held-out data with Ray Data, or K-fold; JSON + PNG report",
                 _add_evaluate, cmd_evaluate),
    "plan": ("predict per-GPU memory of a training config; refuse one that cannot fit", _add_plan, cmd_plan),
    "pipeline": ("train, export and deploy the serve section in one go (jobs/pipeline.py)", _config_args, cmd_pipeline),
    "cluster": ("simulated multi-node cluster on this machine: up, status, down, kill-node",
                _cluster_args("cluster"), _cluster("cluster")),
    "submit": ("submit jobs/<JOB>.py to the cluster as a Ray job", _cluster_args("submit"), _cluster("submit")),
    "jobs": ("Ray jobs: list, status ID, logs ID [--follow], stop ID", _cluster_args("jobs"), _cluster("jobs")),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelfleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from modelfleet.errors import USER_ERRORS

    args = build_parser().parse_args(argv)
    if args.command != "cluster":
        from modelfleet.cluster.local import use_local_cluster_env

        # Before Ray is imported: Ray reads its auth mode once, from the environment.
        use_local_cluster_env()
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"modelfleet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
