"""The ``modelfleet`` console script: every subcommand in one table. A command's body lives in
a ``cli`` module imported only when that command runs, so ``modelfleet --help`` never loads
torch or Ray."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable

from modelfleet.cluster import JOBS
from modelfleet.cluster.connect import VERBOSE_ENV
from modelfleet.cluster.connect import verbose as env_verbose
from modelfleet.cluster.local import use_local_cluster_env
from modelfleet.errors import USER_ERRORS

# Quiet Ray/DeepSpeed chatter that says nothing to a user; real errors still surface.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (sections: model, data, train, deepspeed, storage, serve)")
    p.add_argument("--config", dest="config_opt", metavar="CONFIG", help="the same, as an option (jobs/)")
    p.add_argument(
        "--preset",
        help="start from this preset (tiny, small, gpt2-124m, gpt-1b, digits-cnn, "
        "diabetes-linear, breast-cancer-linear, topics-lstm, interactions-mf, bench-lm)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set deepspeed.zero_stage=2 (repeatable)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="stream Ray's process logs (actors, workers, Serve) to this terminal; "
        "otherwise they stay in Ray's session log directory, named on stderr",
    )


def _add_train(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its last complete checkpoint")
    p.add_argument("--no-export", action="store_true", help="do not export an artifact at the end")
    p.add_argument(
        "--no-plan",
        action="store_true",
        help="launch GPU workers without checking the memory plan "
        "against their GPUs (train.gpu_memory_gib or the accelerator type)",
    )


def _add_prepare(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset")


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run id under <storage>/runs/")
    _config_args(p)
    p.add_argument("--name", help="registry name (default: storage.model_name or the preset)")
    p.add_argument(
        "--merge",
        action="store_true",
        help="LoRA runs: publish the base with the adapter merged in (a full model) instead of the adapter artifact",
    )


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="name, name@vN, or an artifact path/URI")
    p.add_argument("--data", required=True, help="a dataset written by `modelfleet prepare` (its raw/<split>)")
    p.add_argument("--split", default="test", help="split to score (default: test)")
    p.add_argument(
        "--kfold",
        type=int,
        metavar="K",
        help="instead: K-fold cross-validation as K training runs "
        "of the artifact's config on the dataset's train+val rows",
    )
    p.add_argument("--storage", default="storage", help="storage root of the registry and runs")
    p.add_argument("--out", help="report directory (default: <storage>/evaluations/<name>-<version>)")
    p.add_argument("--concurrency", type=int, default=2, help="batch-inference actors")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per batch-inference actor (computes there)")


def _add_serve(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument(
        "--detach",
        action="store_true",
        help="return once deployed (needs a running cluster) instead of serving until Ctrl-C",
    )
    p.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="allow serving without an API key on a non-loopback serve.host (refused otherwise)",
    )


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
    p.add_argument("name", help="served model name (serve.models[].name); with --add/--remove, a pool's name")
    p.add_argument("--artifact", help="vN, latest, name@vN, or an artifact path/URI (with --add: the adapter)")
    p.add_argument(
        "--add",
        metavar="VARIANT",
        help="pools: add a variant serving the LoRA adapter --artifact, in place (no replica restarts)",
    )
    p.add_argument("--remove", metavar="VARIANT", help="pools: remove a variant, in place")
    p.add_argument("--app", default="modelfleet", help="Serve application name (serve.app_name)")
    p.add_argument(
        "--if-better",
        metavar="METRIC",
        help="promote only if the artifact beats the served one "
        "on METRIC (accuracy, f1_macro, r2, mse, recall@10, perplexity, ...)",
    )
    p.add_argument("--data", help="dataset for --if-better (default: the candidate's training dataset)")


def _add_plan(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument(
        "--gpu-memory-gib", type=float, metavar="GIB", help="memory of one GPU (default: this machine's GPU, else 80)"
    )


def _add_cluster(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = sub.add_parser("up", help="start a simulated multi-node cluster on this machine")
    up.add_argument("--config", dest="cluster_config", help="cluster YAML (default: cluster/local.yaml)")
    up.add_argument("--nodes", type=int, help="nodes including the head")
    up.add_argument("--cpus-per-node", type=int, help="logical CPUs each node advertises")
    up.add_argument("--gpus-per-node", type=int, help="logical GPUs each node advertises")
    up.add_argument("--head-gpus", type=int, help="logical GPUs of the head (default: --gpus-per-node)")
    up.add_argument(
        "--isolated",
        action="store_true",
        default=None,
        help="each worker node gets its own /tmp (a private mount namespace): share-nothing nodes",
    )
    up.add_argument("--dashboard-port", type=int, help="dashboard and Jobs API port on 127.0.0.1")
    up.add_argument("--serve-port", type=int, help="Serve HTTP port on 127.0.0.1")
    up.add_argument("--gcs-port", type=int, help="head GCS port; other ports derive from it")
    up.add_argument("--no-auth", action="store_true", help="disable Ray token authentication (not advised)")
    sub.add_parser("status", help="nodes with total and free resources").add_argument(
        "--json", action="store_true", help="print JSON instead of a table"
    )
    sub.add_parser("down", help="stop exactly the processes `cluster up` started")
    kill = sub.add_parser("kill-node", help="SIGKILL one simulated worker node (failure drills)")
    kill.add_argument("node", help="node name from `cluster status`, e.g. worker-1")
    drain = sub.add_parser(
        "drain-node", help="a spot reclaim: drain one simulated worker node for preemption, kill it at the deadline"
    )
    drain.add_argument("node", help="node name from `cluster status`, e.g. worker-1")
    drain.add_argument("--deadline-s", type=int, default=30, help="seconds between the notice and the kill")
    drain.add_argument("--no-kill", action="store_true", help="only drain: leave the node running")
    restart = sub.add_parser("restart-node", help="start a killed simulated worker node again (capacity returns)")
    restart.add_argument("node", help="node name from `cluster status`, e.g. worker-1")


def _add_submit(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", choices=JOBS, help="jobs/<JOB>.py to run")
    p.add_argument("config", nargs="?", help="YAML config inside the working directory")
    p.add_argument("--preset", help="start from this preset")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value (repeatable)",
    )
    p.add_argument("--submission-id", help="job id; resubmitting an existing id is refused")
    p.add_argument("--address", help="Jobs API URL (default: the local cluster, else 127.0.0.1:8265)")
    p.add_argument("--wait", action="store_true", help="follow the logs and return the job's result")
    p.add_argument(
        "--arg",
        dest="args",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for the job, e.g. --arg RUN for export (repeatable)",
    )


def _add_jobs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Jobs API URL (default: the local cluster, else 127.0.0.1:8265)")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("list", help="all jobs with their status").add_argument("--json", action="store_true")
    sub.add_parser("status", help="one job's status (and why it failed)").add_argument("id")
    logs = sub.add_parser("logs", help="one job's logs")
    logs.add_argument("id")
    logs.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    sub.add_parser("stop", help="stop a running job").add_argument("id")


Adder = Callable[[argparse.ArgumentParser], None]

# name -> (help, add arguments, "module:function" of the body). README's command table is tested
# against this.
COMMANDS: dict[str, tuple[str, Adder, str]] = {
    "prepare": ("tokenize text/JSONL/Parquet into Parquet shards", _add_prepare, "commands:cmd_prepare"),
    "train": ("train with Ray Train + DeepSpeed ZeRO, then export", _add_train, "commands:cmd_train"),
    "export": ("consolidate a run's last complete checkpoint into an artifact", _add_export, "commands:cmd_export"),
    "demo": ("the whole mission on one machine (make demo)", _config_args, "demo:cmd_demo"),
    "serve": (
        "deploy the serve section as a Ray Serve app (starts a local cluster if none)",
        _add_serve,
        "serving:cmd_serve",
    ),
    "generate": (
        "send a prompt to a running app (OpenAI API), optionally streaming",
        _add_generate,
        "serving:cmd_generate",
    ),
    "status": ("Serve applications, deployments and replicas with their state", _add_status, "serving:cmd_status"),
    "deploy": (
        "move a served model to another artifact with zero downtime, or add/remove a pool's variant",
        _add_deploy,
        "serving:cmd_deploy",
    ),
    "evaluate": (
        "score an artifact on held-out data with Ray Data, or K-fold; JSON + PNG report",
        _add_evaluate,
        "commands:cmd_evaluate",
    ),
    "plan": ("predict per-GPU memory of a training config; refuse one that cannot fit", _add_plan, "commands:cmd_plan"),
    "pipeline": (
        "train, export and deploy the serve section in one go (jobs/pipeline.py)",
        _config_args,
        "pipeline:cmd_pipeline",
    ),
    "cluster": (
        "simulated multi-node cluster on this machine: up, status, down, kill-node, drain-node, restart-node",
        _add_cluster,
        "cluster:cmd_cluster",
    ),
    "submit": ("submit jobs/<JOB>.py to the cluster as a Ray job", _add_submit, "cluster:cmd_submit"),
    "jobs": ("Ray jobs: list, status ID, logs ID [--follow], stop ID", _add_jobs, "cluster:cmd_jobs"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelfleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add, body) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(body=body)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "cluster":
        # Before Ray is imported: Ray reads its auth mode once, from the environment.
        use_local_cluster_env()
    verbose = getattr(args, "verbose", False) or env_verbose()
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # read by cluster.connect, in this process and the jobs it starts
    else:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # its database set-up lines
    module, _, func = args.body.partition(":")
    # The one function-local import of the CLI: each command loads torch/Ray only when chosen.
    run = getattr(importlib.import_module(f"modelfleet.cli.{module}"), func)
    if not verbose:
        # Serve's driver-side INFO lines ("Started Serve", "Application ... is ready", "Deleting
        # app"): our commands print what happened themselves. Serve sets its logger up when
        # ray.serve is imported (by the command's module, just above), so after that.
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    try:
        return run(args)
    except USER_ERRORS as e:
        print(f"modelfleet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
