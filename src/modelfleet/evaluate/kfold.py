"""K-fold cross-validation as K Ray Train runs: each fold is held out once, the transform is
fitted on the other folds' training rows only, and the fold's score comes from the same Ray Data
batch evaluation as ``modelfleet evaluate``. The dataset's test split is never used here."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pandas as pd

from modelfleet.config import Config
from modelfleet.data.families import read_raw, write_splits
from modelfleet.errors import ConfigError
from modelfleet.evaluate.batch import evaluate_artifact
from modelfleet.families import get_family
from modelfleet.storage import StorageLayout, join
from modelfleet.train.trainer import train


def fold_ids(rows: pd.DataFrame, k: int, seed: int, group: str | None) -> np.ndarray:
    """A fold number per row, deterministic from ``seed``; with ``group`` each group (e.g. a
    user) is spread over all folds so every fold's users also have training rows."""
    rng = np.random.default_rng(seed)
    ids = np.empty(len(rows), np.int64)
    groups = [np.arange(len(rows))] if group is None else list(rows.groupby(group).indices.values())
    for idx in groups:
        ids[idx[rng.permutation(len(idx))]] = np.arange(len(idx)) % k
    return ids


def kfold(cfg: Config, k: int, data_path: str, *, show_progress: bool = False) -> dict[str, Any]:
    """Train and score ``k`` models; returns every fold's metrics and mean +- std of each metric."""

    if k < 2:
        raise ConfigError(f"--kfold: needs K >= 2, got {k}")
    family = get_family(cfg.model.family)
    pool = pd.concat([read_raw(data_path, "train"), read_raw(data_path, "val")], ignore_index=True)
    group = getattr(family, "fold_group", None)
    folds = fold_ids(pool, k, cfg.data.seed, group)
    base = cfg.storage.run_name or f"{cfg.preset}-kfold"
    name = cfg.storage.model_name or cfg.preset
    results = []
    for i in range(k):
        rest = pool[folds != i].reset_index(drop=True)
        inner = fold_ids(rest, max(2, round(1 / cfg.data.val_fraction)), cfg.data.seed + 1, group)
        splits = {
            "train": rest[inner != 0].reset_index(drop=True),
            "val": rest[inner == 0].reset_index(drop=True),
            "test": pool[folds == i].reset_index(drop=True),
        }
        c = copy.deepcopy(cfg)
        for key in family.from_data:  # sizes come from this fold's data
            c.model.params[key] = 0
        c.data.path = join(StorageLayout(cfg.storage.path).kfold(), base, f"fold-{i}")
        write_splits(family, c.model, splits, c.data.path, {"fold": i, "k": k, "source": data_path}, overwrite=True)
        c.storage.run_name = f"{base}-fold{i}"
        c.storage.model_name = f"{name}-kfold"
        res = train(c, show_progress=show_progress)
        if res.artifact is None:
            raise ConfigError(f"--kfold: fold {i} left no complete checkpoint to evaluate")
        ev = evaluate_artifact(res.artifact.uri, c.data.path)
        results.append(
            {"fold": i, "artifact": res.artifact.uri, "rows_held_out": len(splits["test"]), "metrics": ev["metrics"]}
        )
    numeric = [m for m, v in results[0]["metrics"].items() if isinstance(v, float)]
    summary = {
        m: {
            "mean": float(np.mean([r["metrics"][m] for r in results])),
            "std": float(np.std([r["metrics"][m] for r in results])),
            "scores": [r["metrics"][m] for r in results],
        }
        for m in numeric
    }
    return {
        "k": k,
        "family": family.name,
        "primary_metric": family.primary_metric,
        "scores": summary[family.primary_metric]["scores"],
        "summary": summary,
        "folds": results,
    }
