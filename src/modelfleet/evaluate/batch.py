"""Batch evaluation: inference with Ray Data over an actor pool, then the task's metrics.

``evaluate_artifact`` reads a dataset's raw held-out rows, runs the artifact's own family code in
``map_batches`` actors (each loads the artifact once, exactly as a Serve replica does, transform
included) and computes the family's metrics: accuracy, precision, recall, F1 (macro and per
class) and the confusion matrix for classifiers; MSE, MAE and R^2 for regression; perplexity for
language models; recall@k and NDCG@k for recommenders.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from modelfleet import registry, storage
from modelfleet.cluster import connect
from modelfleet.cluster.local import gpus_are_simulated
from modelfleet.data.families import read_rows
from modelfleet.data.raydata import configure_context
from modelfleet.errors import DataError
from modelfleet.families import get_family
from modelfleet.families.artifact import load_artifact
from modelfleet.models.placement import OnDevice, place, placement


class _BatchPredictor:
    """The map_batches UDF: one artifact load per actor, then one batched forward per batch."""

    def __init__(self, uri: str, num_gpus: float = 0.0) -> None:
        import torch

        torch.set_num_threads(1)
        self.model, self.pre, manifest = load_artifact(uri)
        # Metrics in float32 wherever the forward runs; a GPU actor computes on its GPU.
        where = placement(
            num_gpus,
            "float32",
            cuda_available=torch.cuda.is_available(),
            simulated=num_gpus > 0 and gpus_are_simulated(),
            who="an evaluation actor",
        )
        if where.problem:
            raise RuntimeError(where.problem)
        if where.device.type != "cpu":
            self.model = OnDevice(place(self.model, where), where)
        self.family = get_family(manifest["family"])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.family.predict_batch(self.model, self.pre, batch)


def batch_predict(
    uri: str, rows: Any, *, concurrency: int = 2, batch_size: int = 256, num_gpus: float = 0.0
) -> dict[str, np.ndarray]:
    """Prediction columns for ``rows`` (pandas) from an actor pool of ``concurrency`` actors, each
    holding ``num_gpus`` GPUs (and computing there when CUDA works)."""
    import ray

    connect()
    configure_context()
    n = max(1, min(concurrency * 2, len(rows)))
    ds = ray.data.from_pandas([rows.iloc[i::n].reset_index(drop=True) for i in range(n)])
    out = ds.map_batches(
        _BatchPredictor,
        fn_constructor_kwargs={"uri": uri, "num_gpus": num_gpus},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=concurrency),
        num_cpus=0.5,
        num_gpus=num_gpus or None,
    )
    cols: dict[str, list[np.ndarray]] = {}
    for b in out.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in b.items():
            cols.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in cols.items()}


def evaluate_artifact(
    uri: str, data_path: str, *, split: str = "test", concurrency: int = 2, num_gpus: float = 0.0
) -> dict[str, Any]:
    """Metrics of the artifact at ``uri`` on ``<data_path>/raw/<split>``."""

    manifest = registry.read_json(uri, "manifest.json")
    family = get_family(manifest["family"])
    rel = ("val" if split == "test" else split) if family.task == "lm" else f"raw/{split}"
    where = storage.join(data_path, rel)  # language-model datasets hold token rows: train/ and val/
    if not storage.has_files(where):
        raise DataError(
            f"--data: {data_path} has no {rel} split; point at a "
            "directory written by `modelfleet prepare` for this family"
        )
    rows = family.eval_rows(read_rows(where))
    results = batch_predict(uri, rows, concurrency=concurrency, num_gpus=num_gpus)
    _, pre, _ = load_artifact(uri)
    return {
        "artifact": uri,
        "family": family.name,
        "task": family.task_of(pre),
        "data": data_path,
        "split": split,
        "metrics": family.metrics(results, pre),
    }


# ---------------------------------------------------------------- reports
