"""The ``mf`` family hooks (data, training, serving) around ``models/mf.py``."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, create_model
from torch import nn

from modelfleet.config import ModelConfig
from modelfleet.data.families import split_rows
from modelfleet.families.base import Family, Transform
from modelfleet.metrics import EVAL_K
from modelfleet.models.mf import MatrixFactorization, MFParams


class InteractionTransform(Transform):
    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def apply(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {"user": np.asarray(raw["user"], np.int64)}
        if "item" in raw:
            out["y"] = np.asarray(raw["item"], np.int64)
        return out

    def meta(self) -> dict[str, Any]:
        return {"num_users": self.state["num_users"], "num_items": self.state["num_items"]}


class MFFamily(Family):
    name = "mf"
    task = "recommendation"
    Params = MFParams
    primary_metric = f"recall@{EVAL_K}"
    from_data = ("num_users", "num_items")
    fold_group = "user"

    def build(self, cfg: ModelConfig) -> nn.Module:
        return MatrixFactorization(self.parse_params(cfg.params))

    def split(self, raw: Any, data: Any) -> dict[str, Any]:
        return split_rows(raw, data, group="user")  # every user keeps history and held-out items

    def fit_transform(self, train_raw: Any, cfg: ModelConfig) -> Transform:
        n_users, n_items = int(train_raw["user"].max()) + 1, int(train_raw["item"].max()) + 1
        seen = [[] for _ in range(n_users)]
        for u, i in zip(train_raw["user"], train_raw["item"]):
            seen[int(u)].append(int(i))
        return InteractionTransform(
            {"kind": "interactions", "num_users": n_users, "num_items": n_items, "seen": [sorted(s) for s in seen]}
        )

    def load_transform(self, state: dict[str, Any]) -> Transform:
        return InteractionTransform(state)

    def loss(self, model: Any, batch: dict[str, Any]) -> Any:
        import torch.nn.functional as F

        return F.cross_entropy(model(batch["user"]), batch["y"])

    def forward(self, model: Any, batch: dict[str, Any]) -> Any:
        return model(batch["user"])

    def probe(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"user": batch["user"][:2].contiguous()}

    def request_model(self, transform: Transform) -> type[BaseModel]:
        n = transform.state["num_users"]
        return create_model(
            "RecommendRequest",
            __config__=ConfigDict(extra="forbid"),
            user=(int, Field(ge=0, lt=n, description=f"User id, 0..{n - 1}.")),
            k=(int, Field(10, ge=1, le=transform.state["num_items"], description="How many items to return.")),
            exclude_seen=(bool, Field(True, description="Leave out items the user had in training.")),
        )

    def top_k(self, model: Any, transform: Transform, users: np.ndarray, k: int, exclude_seen: Any) -> tuple[Any, Any]:
        import torch

        with torch.no_grad():
            scores = model(torch.from_numpy(np.asarray(users, np.int64))).clone()
        for row, (u, ex) in enumerate(zip(users, exclude_seen)):
            if ex and transform.state["seen"][int(u)]:
                scores[row, transform.state["seen"][int(u)]] = float("-inf")
        return scores.topk(k, dim=-1)

    def predict(self, model: Any, transform: Transform, instances: list[BaseModel]) -> list[dict[str, Any]]:
        users = np.array([i.user for i in instances])
        vals, idx = self.top_k(
            model, transform, users, max(i.k for i in instances), [i.exclude_seen for i in instances]
        )
        # k may reach the catalogue size: items excluded as seen score -inf and are left out, so
        # a user may get fewer than k items (never a non-finite score).
        return [
            {
                "user": int(i.user),
                "items": [int(x) for x, v in zip(idx[r, : i.k], vals[r, : i.k]) if np.isfinite(float(v))],
                "scores": [round(float(v), 6) for v in vals[r, : i.k] if np.isfinite(float(v))],
            }
            for r, i in enumerate(instances)
        ]

    def eval_rows(self, raw: Any) -> Any:
        grouped = raw.groupby("user")["item"].apply(lambda s: np.array(sorted(s), np.int64))
        return grouped.reset_index().rename(columns={"item": "items"})

    def predict_batch(self, model: Any, transform: Transform, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        users = np.asarray(raw["user"], np.int64)
        _, idx = self.top_k(model, transform, users, EVAL_K, [True] * len(users))
        recall, ndcg = np.zeros(len(users)), np.zeros(len(users))
        for r, truth in enumerate(raw["items"]):
            truth = set(np.asarray(truth).tolist())
            hits = [1.0 if int(x) in truth else 0.0 for x in idx[r]]
            recall[r] = sum(hits) / min(len(truth), EVAL_K)
            ideal = sum(1 / math.log2(j + 2) for j in range(min(len(truth), EVAL_K)))
            ndcg[r] = sum(h / math.log2(j + 2) for j, h in enumerate(hits)) / ideal
        return {"recall": recall, "ndcg": ndcg}
