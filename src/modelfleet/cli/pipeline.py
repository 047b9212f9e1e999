"""``modelfleet pipeline`` (and ``jobs/pipeline.py``): train, export, then deploy the serve section."""

from __future__ import annotations

import argparse

from modelfleet.cli.commands import load_args
from modelfleet.cli.serving import serve_main
from modelfleet.config import Config
from modelfleet.errors import ConfigError
from modelfleet.train.trainer import train


def cmd_pipeline(args: argparse.Namespace) -> int:
    return pipeline_main(load_args(args))


def pipeline_main(cfg: Config) -> int:
    """Train -> export -> deploy: the serve section's models that serve this run's registry name
    (or the only model) are pointed at the new version and (re)deployed."""
    if cfg.serve is None:
        raise ConfigError("serve: the pipeline deploys the serve section, but this config has none")
    res = train(cfg)
    if res.artifact is None:
        raise ConfigError("the training run left no complete checkpoint to export; nothing to deploy")
    label = f"{res.artifact.name}@{res.artifact.version}"
    served = cfg.serve.models
    models = [
        m.model_copy(update={"artifact": label})
        if len(served) == 1 or m.artifact.partition("@")[0] == res.artifact.name
        else m
        for m in served
    ]
    cfg.serve = cfg.serve.model_copy(update={"models": models})
    print(f"trained {res.run_name}; deploying {label}")
    return serve_main(cfg, detach=True)
