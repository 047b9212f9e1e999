"""The bodies of ``prepare``, ``train``, ``export``, ``evaluate`` and ``plan`` (the argument
tables are in ``cli/__init__``)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from modelfleet import registry
from modelfleet import storage as storage_io
from modelfleet.cluster import connect
from modelfleet.config import Config
from modelfleet.errors import StorageError
from modelfleet.evaluate import evaluate_artifact, run_dir_of, write_report
from modelfleet.evaluate.kfold import kfold
from modelfleet.families import get_family
from modelfleet.presets import load_config
from modelfleet.storage import StorageLayout, is_remote
from modelfleet.train.export import export_run
from modelfleet.train.memory import cheapest_fix, format_plan, plan, refusal
from modelfleet.train.trainer import train


def load_args(args: argparse.Namespace) -> Config:
    """The config a command's ``CONFIG`` / ``--config`` / ``--preset`` / ``--set`` describe."""
    return load_config(args.config or args.config_opt, preset=args.preset, overrides=args.overrides)


def cmd_prepare(args: argparse.Namespace) -> int:
    cfg = load_args(args)
    family = get_family(cfg.model.family)
    if family.needs_ray_to_prepare:
        connect(log_to_driver=False)  # the transform is applied with Ray Data
    meta = family.prepare(cfg, overwrite=args.overwrite)
    splits = " / ".join(f"{meta[f'{s}_rows']} {s}" for s in ("train", "val", "test") if f"{s}_rows" in meta)
    unit = f"sequences of {meta['seq_len']} tokens" if "seq_len" in meta else "rows"
    print(f"prepared {splits} {unit} of {', '.join(cfg.data.sources)} for family {cfg.model.family} -> {cfg.data.path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_args(args)
    res = train(cfg, resume=args.resume, export=not args.no_export, check_plan=not args.no_plan)
    print(f"run {res.run_name}: step {res.checkpoint_step}, metrics {json.dumps(res.metrics)}")
    print(f"timings: {json.dumps({k: round(v, 2) for k, v in res.timings.items()})}")
    if res.artifact:
        print(f"artifact {res.artifact.name}@{res.artifact.version}: {res.artifact.uri}")
    return 0


def _writable(uri: str, key: str) -> None:
    """Object stores: fail at once, naming the URI and the cause, before any work."""
    try:
        storage_io.check_writable(uri)
    except StorageError as e:
        raise StorageError(f"{key}: {e}") from None


def cmd_export(args: argparse.Namespace) -> int:
    cfg = load_args(args)
    _writable(cfg.storage.path, "storage.path")
    ref = export_run(cfg.storage.path, args.run, name=args.name, merge=args.merge)
    print(f"artifact {ref.name}@{ref.version}: {ref.uri}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Metrics (or K-fold scores) printed, saved as JSON and PNG plots under the storage layout."""
    storage = args.storage if is_remote(args.storage) else os.path.abspath(args.storage)
    _writable(storage, "--storage")
    ref = registry.resolve(storage, args.artifact)
    data = args.data if is_remote(args.data) else os.path.abspath(args.data)
    label = f"{ref.name or 'artifact'}-{ref.version or 'path'}" + (f"-kfold{args.kfold}" if args.kfold else "")
    out = args.out or StorageLayout(storage).evaluation(label)
    if args.kfold:
        cfg = Config.from_dict(registry.read_json(ref.uri, "manifest.json")["config"])
        cfg.storage.path = storage
        res = kfold(cfg, args.kfold, data)
        storage_io.makedirs(out)
        storage_io.write_text(storage_io.join(out, "kfold.json"), json.dumps(res, indent=1))
        for m, s in res["summary"].items():
            print(f"{m}: {s['mean']:.4f} +- {s['std']:.4f}  (folds: {', '.join(f'{v:.4f}' for v in s['scores'])})")
        print(f"report: {out}/kfold.json")
        return 0
    result = evaluate_artifact(ref.uri, data, split=args.split, concurrency=args.concurrency, num_gpus=args.num_gpus)
    files = write_report(result, out, run_dir=run_dir_of(ref.uri, storage))
    for k, v in result["metrics"].items():
        if isinstance(v, float):
            print(f"{k}: {v:.4f}")
    print(f"report: {', '.join(files)}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import torch

    cfg = load_args(args)
    gib = args.gpu_memory_gib
    if gib is None:
        gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 80.0
    p = plan(cfg, gpu_memory_gib=gib)
    print(format_plan(p, cfg))
    if not p.fits:
        print(f"modelfleet plan: error: {refusal(p, cheapest_fix(cfg, gib))}", file=sys.stderr)
        return 2
    print(f"fits: {p.total / 2**30:.1f} of {gib:g} GiB per GPU")
    return 0
