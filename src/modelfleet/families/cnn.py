"""The ``cnn`` family hooks (data, training, serving) around ``models/cnn.py``."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from modelfleet.config import ModelConfig
from modelfleet.families.base import Family, Transform, classify
from modelfleet.models.cnn import CNN, SIDE, CNNParams


class ImageTransform(Transform):
    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def apply(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        img = np.asarray(np.stack(raw["image"]) if raw["image"].dtype == object else raw["image"], np.float32)
        out = {"x": ((img.reshape(len(img), -1) - self.state["mean"]) / self.state["std"]).astype(np.float32)}
        if "label" in raw:
            out["y"] = np.asarray(raw["label"], np.int64)
        return out

    def meta(self) -> dict[str, Any]:
        return {"num_classes": len(self.state["classes"])}


class ImageRequest(BaseModel):
    """One grayscale image: 28 rows of 28 pixel values on a 0..255 scale."""

    model_config = ConfigDict(extra="forbid")
    image: list[list[float]] = Field(description="28x28 pixel values, 0 (background) to 255 (ink).")

    @field_validator("image")
    @classmethod
    def _shape(cls, v: list[list[float]]) -> list[list[float]]:
        if len(v) != SIDE or any(len(r) != SIDE for r in v):
            raise ValueError(
                f"must be {SIDE} rows of {SIDE} numbers, got {len(v)} rows of {sorted({len(r) for r in v})} numbers"
            )
        if any(not 0 <= x <= 255 for r in v for x in r):
            raise ValueError("pixel values must be in [0, 255]")
        return v


class CNNFamily(Family):
    name = "cnn"
    task = "classification"
    Params = CNNParams
    primary_metric = "accuracy"
    from_data = ("num_classes",)

    def build(self, cfg: ModelConfig) -> nn.Module:
        return CNN(self.parse_params(cfg.params))

    def fit_transform(self, train_raw: Any, cfg: ModelConfig) -> Transform:
        img = np.stack(train_raw["image"].to_numpy()).astype(np.float64)
        classes = [str(c) for c in sorted(np.unique(train_raw["label"]).tolist())]
        return ImageTransform(
            {
                "kind": "image",
                "mean": float(img.mean()),
                "std": float(img.std() or 1.0),
                "shape": [SIDE, SIDE],
                "classes": classes,
            }
        )

    def load_transform(self, state: dict[str, Any]) -> Transform:
        return ImageTransform(state)

    def loss(self, model: Any, batch: dict[str, Any]) -> Any:
        import torch.nn.functional as F

        return F.cross_entropy(model(batch["x"]), batch["y"])

    def forward(self, model: Any, batch: dict[str, Any]) -> Any:
        return model(batch["x"])

    def request_model(self, transform: Transform) -> type[BaseModel]:
        return ImageRequest

    def _logits(self, model: Any, x: np.ndarray) -> Any:
        import torch

        with torch.no_grad():
            return model(torch.from_numpy(x))

    def predict(self, model: Any, transform: Transform, instances: list[BaseModel]) -> list[dict[str, Any]]:
        img = np.array([np.asarray(i.image, np.float32).reshape(-1) for i in instances])
        return classify(self._logits(model, transform.apply({"image": img})["x"]), transform.class_names)

    def predict_batch(self, model: Any, transform: Transform, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ready = transform.apply(raw)
        return {"y_true": ready["y"], "y_pred": self._logits(model, ready["x"]).argmax(-1).numpy()}
