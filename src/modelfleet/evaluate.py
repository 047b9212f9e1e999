"""Evaluation: batch inference with Ray Data over an actor pool, metrics, JSON and PNG reports.

``evaluate_artifact`` reads a dataset's raw held-out rows, runs the artifact's own family code in
``map_batches`` actors (each loads the artifact once, exactly as a Serve replica does, transform
included) and computes the family's metrics: accuracy, precision, recall, F1 (macro and per
class) and the confusion matrix for classifiers; MSE, MAE and R^2 for regression; perplexity for
language models; recall@k and NDCG@k for recommenders.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

LOWER_IS_BETTER = {"mse", "mae", "loss", "perplexity", "val_loss"}
"""Metrics where a smaller number wins (the quality gate compares the other way round)."""


def metrics_for(task: str, results: dict[str, np.ndarray], transform: Any) -> dict[str, Any]:
    """The task's metrics from collected prediction columns."""
    if task == "classification":
        from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

        y, p = np.asarray(results["y_true"]), np.asarray(results["y_pred"])
        classes = transform.class_names
        labels = list(range(len(classes)))
        prec, rec, f1, support = precision_recall_fscore_support(y, p, labels=labels, zero_division=0)
        mp, mr, mf, _ = precision_recall_fscore_support(y, p, labels=labels, average="macro", zero_division=0)
        return {"accuracy": float(accuracy_score(y, p)), "precision_macro": float(mp),
                "recall_macro": float(mr), "f1_macro": float(mf),
                "per_class": {c: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]),
                                  "support": int(support[i])} for i, c in enumerate(classes)},
                "confusion_matrix": confusion_matrix(y, p, labels=labels).tolist(), "classes": classes,
                "n": int(len(y))}
    if task == "regression":
        from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

        y, p = np.asarray(results["y_true"], np.float64), np.asarray(results["y_pred"], np.float64)
        return {"mse": float(mean_squared_error(y, p)), "mae": float(mean_absolute_error(y, p)),
                "r2": float(r2_score(y, p)), "n": int(len(y))}
    if task == "recommendation":
        from modelfleet.models.mf import EVAL_K

        n_items = transform.state["num_items"]
        return {f"recall@{EVAL_K}": float(np.mean(results["recall"])), f"ndcg@{EVAL_K}": float(np.mean(results["ndcg"])),
                f"chance_recall@{EVAL_K}": EVAL_K / n_items, "n": int(len(results["recall"]))}
    if task == "lm":
        nll, count = float(np.sum(results["nll"])), float(np.sum(results["tokens"]))
        return {"loss": nll / count, "perplexity": float(np.exp(min(nll / count, 50.0))), "tokens": int(count)}
    raise ValueError(f"unknown task {task!r}")


class _BatchPredictor:
    """The map_batches UDF: one artifact load per actor, then one batched forward per batch."""

    def __init__(self, uri: str) -> None:
        import torch

        from modelfleet import registry
        from modelfleet.models import get_family

        torch.set_num_threads(1)
        self.model, self.pre, manifest = registry.load_artifact(uri)
        self.family = get_family(manifest["family"])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.family.predict_batch(self.model, self.pre, batch)


def batch_predict(uri: str, rows: Any, *, concurrency: int = 2, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Prediction columns for ``rows`` (pandas) from an actor pool of ``concurrency`` actors."""
    import ray

    from modelfleet.cluster import connect

    connect()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
    n = max(1, min(concurrency * 2, len(rows)))
    ds = ray.data.from_pandas([rows.iloc[i::n].reset_index(drop=True) for i in range(n)])
    out = ds.map_batches(_BatchPredictor, fn_constructor_kwargs={"uri": uri}, batch_size=batch_size,
                         batch_format="numpy", compute=ray.data.ActorPoolStrategy(min_size=1, max_size=concurrency), num_cpus=0.5)
    cols: dict[str, list[np.ndarray]] = {}
    for b in out.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in b.items():
            cols.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in cols.items()}


def evaluate_artifact(uri: str, data_path: str, *, split: str = "test", concurrency: int = 2) -> dict[str, Any]:
    """Metrics of the artifact at ``uri`` on ``<data_path>/raw/<split>``."""
    from modelfleet import registry
    from modelfleet.data.families import read_rows
    from modelfleet.data.ingest import DataError
    from modelfleet.models import get_family

    manifest = registry.read_json(uri, "manifest.json")
    family = get_family(manifest["family"])
    where = Path(data_path, "raw", split)
    if family.task == "lm":  # language-model datasets hold token rows: train/ and val/
        where = Path(data_path, "val" if split == "test" else split)
    if not where.is_dir():
        raise DataError(f"--data: {data_path} has no {where.relative_to(data_path)} split; point at a "
                        "directory written by `modelfleet prepare` for this family")
    rows = family.eval_rows(read_rows(str(where)))
    results = batch_predict(uri, rows, concurrency=concurrency)
    _, pre, _ = registry.load_artifact(uri)
    return {"artifact": uri, "family": family.name, "task": family.task_of(pre), "data": data_path,
            "split": split, "metrics": family.metrics(results, pre)}


# ---------------------------------------------------------------- reports

def loss_curve(run_dir: str) -> dict[str, list[float]]:
    """Training and validation loss by step from a run's metrics.jsonl (empty when absent)."""
    path = Path(run_dir, "metrics.jsonl")
    out: dict[str, list[float]] = {"step": [], "loss": [], "eval_step": [], "val_loss": []}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "step":
            out["step"].append(r["step"])
            out["loss"].append(r["loss"])
        elif r["kind"] == "eval":
            out["eval_step"].append(r["step"])
            out["val_loss"].append(r["val_loss"])
    return out


def write_report(result: dict[str, Any], out_dir: str, *, run_dir: str | None = None) -> list[str]:
    """``evaluation.json`` plus PNG plots (confusion matrix, loss curves); returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    files = [os.path.join(out_dir, "evaluation.json")]
    m = result["metrics"]
    if "confusion_matrix" in m:
        cm = np.array(m["confusion_matrix"])
        fig, ax = plt.subplots(figsize=(1.2 + 0.5 * len(cm), 1 + 0.5 * len(cm)))
        ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(len(cm)), m["classes"], rotation=45)
        ax.set_yticks(range(len(cm)), m["classes"])
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"accuracy {m['accuracy']:.3f}")
        files.append(_save(fig, out_dir, "confusion_matrix.png"))
    curve = loss_curve(run_dir) if run_dir else {"step": []}
    if curve["step"]:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(curve["step"], curve["loss"], label="train")
        ax.plot(curve["eval_step"], curve["val_loss"], "o-", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        files.append(_save(fig, out_dir, "loss_curves.png"))
        result = {**result, "loss_curve": curve}
    Path(files[0]).write_text(json.dumps({**result, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                                         indent=1))
    return files


def _save(fig: Any, out_dir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_dir_of(uri: str, storage_path: str) -> str | None:
    """The training run an artifact came from, if its directory is still in storage."""
    from modelfleet import registry

    run = registry.read_json(uri, "manifest.json").get("run_id")
    path = os.path.join(storage_path, "runs", run) if run and "://" not in storage_path else None
    return path if path and os.path.isdir(path) else None


def evaluate_main(args: Any) -> int:
    """``modelfleet evaluate``: metrics (or K-fold scores) printed, saved as JSON and PNG plots."""
    from modelfleet import registry
    from modelfleet.config import Config

    storage = os.path.abspath(args.storage) if "://" not in args.storage else args.storage
    ref = registry.resolve(storage, args.artifact)
    data = os.path.abspath(args.data)
    out = args.out or os.path.join(storage, "evaluations", f"{ref.name or 'artifact'}-{ref.version or 'path'}"
                                   + (f"-kfold{args.kfold}" if args.kfold else ""))
    if args.kfold:
        from modelfleet.train.kfold import kfold

        cfg = Config.from_dict(registry.read_json(ref.uri, "manifest.json")["config"])
        cfg.storage.path = storage
        res = kfold(cfg, args.kfold, data)
        os.makedirs(out, exist_ok=True)
        Path(out, "kfold.json").write_text(json.dumps(res, indent=1))
        for m, s in res["summary"].items():
            print(f"{m}: {s['mean']:.4f} +- {s['std']:.4f}  (folds: {', '.join(f'{v:.4f}' for v in s['scores'])})")
        print(f"report: {out}/kfold.json")
        return 0
    result = evaluate_artifact(ref.uri, data, split=args.split, concurrency=args.concurrency)
    files = write_report(result, out, run_dir=run_dir_of(ref.uri, storage))
    for k, v in result["metrics"].items():
        if isinstance(v, float):
            print(f"{k}: {v:.4f}")
    print(f"report: {', '.join(files)}")
    return 0
