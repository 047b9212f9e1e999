"""Task metrics from collected prediction columns: accuracy, precision, recall, F1 (macro and per
class) and the confusion matrix for classifiers; MSE, MAE and R^2 for regression; perplexity for
language models; recall@k and NDCG@k for recommenders. A leaf: imports nothing of ours."""

from __future__ import annotations

from typing import Any

import numpy as np

EVAL_K = 10
"""k of recall@k and NDCG@k in evaluation."""

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
        return {
            "accuracy": float(accuracy_score(y, p)),
            "precision_macro": float(mp),
            "recall_macro": float(mr),
            "f1_macro": float(mf),
            "per_class": {
                c: {
                    "precision": float(prec[i]),
                    "recall": float(rec[i]),
                    "f1": float(f1[i]),
                    "support": int(support[i]),
                }
                for i, c in enumerate(classes)
            },
            "confusion_matrix": confusion_matrix(y, p, labels=labels).tolist(),
            "classes": classes,
            "n": int(len(y)),
        }
    if task == "regression":
        from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

        y, p = np.asarray(results["y_true"], np.float64), np.asarray(results["y_pred"], np.float64)
        return {
            "mse": float(mean_squared_error(y, p)),
            "mae": float(mean_absolute_error(y, p)),
            "r2": float(r2_score(y, p)),
            "n": int(len(y)),
        }
    if task == "recommendation":
        n_items = transform.state["num_items"]
        return {
            f"recall@{EVAL_K}": float(np.mean(results["recall"])),
            f"ndcg@{EVAL_K}": float(np.mean(results["ndcg"])),
            f"chance_recall@{EVAL_K}": EVAL_K / n_items,
            "n": int(len(results["recall"])),
        }
    if task == "lm":
        nll, count = float(np.sum(results["nll"])), float(np.sum(results["tokens"]))
        return {"loss": nll / count, "perplexity": float(np.exp(min(nll / count, 50.0))), "tokens": int(count)}
    raise ValueError(f"unknown task {task!r}")
