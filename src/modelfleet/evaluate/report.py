"""Evaluation reports: metrics as JSON, plus PNG plots (confusion matrix, predicted vs true, the
training run's loss curve when its directory is still in storage)."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import numpy as np

from modelfleet import registry, storage
from modelfleet.storage import StorageLayout


def loss_curve(run_dir: str) -> dict[str, list[float]]:
    """Training and validation loss by step from a run's metrics.jsonl (empty when absent)."""
    path = storage.join(run_dir, "metrics.jsonl")
    out: dict[str, list[float]] = {"step": [], "loss": [], "eval_step": [], "val_loss": []}
    if not storage.exists(path):
        return out
    for line in storage.read_text(path).splitlines():
        r = json.loads(line)
        if r["kind"] == "step":
            out["step"].append(r["step"])
            out["loss"].append(r["loss"])
        elif r["kind"] == "eval":
            out["eval_step"].append(r["step"])
            out["val_loss"].append(r["val_loss"])
    return out


def write_report(result: dict[str, Any], out_dir: str, *, run_dir: str | None = None) -> list[str]:
    """``evaluation.json`` plus PNG plots (confusion matrix, loss curves) in ``out_dir`` (a local
    path or a URI); returns the files. The JSON goes last: it says the report is complete."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    storage.makedirs(out_dir)
    files = [storage.join(out_dir, "evaluation.json")]
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
    storage.write_text(
        files[0], json.dumps({**result, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1)
    )
    return files


def _save(fig: Any, out_dir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    path = storage.join(out_dir, name)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(path, buf.getvalue())
    return path


def run_dir_of(uri: str, storage_path: str) -> str | None:
    """The training run an artifact came from, if its directory is still in storage."""

    run = registry.read_json(uri, "manifest.json").get("run_id")
    path = StorageLayout(storage_path).run(run) if run else None
    return path if path and storage.exists(path) else None
