"""The ``linear`` family hooks (data, training, serving) around ``models/linear.py``."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, create_model
from torch import nn

from modelfleet.config import ModelConfig
from modelfleet.data.tabular import TabularTransform
from modelfleet.families.base import Family, Transform, classify, instances_frame
from modelfleet.models.linear import LinearModel, LinearParams

MAX_ABS = 1e15
"""Largest magnitude a numeric request field may have."""


class LinearFamily(Family):
    name = "linear"
    task = "regression"
    Params = LinearParams
    primary_metric = "r2"
    from_data = ("in_features", "num_outputs")

    def build(self, cfg: ModelConfig) -> nn.Module:
        return LinearModel(self.parse_params(cfg.params))

    def fit_transform(self, train_raw: Any, cfg: ModelConfig) -> Transform:
        p = self.parse_params(cfg.params)
        task = "regression" if train_raw[p.target].dtype.kind == "f" else "classification"
        return TabularTransform.fit(
            train_raw, target=p.target, task=task, minmax_columns=p.minmax_columns, ordinal_columns=p.ordinal_columns
        )

    def load_transform(self, state: dict[str, Any]) -> Transform:
        return TabularTransform(state)

    def task_of(self, transform: Transform) -> str:
        return transform.state["task"]

    def loss(self, model: Any, batch: dict[str, Any]) -> Any:
        import torch.nn.functional as F

        out = model(batch["x"])
        if batch["y"].dtype.is_floating_point:
            return F.mse_loss(out.squeeze(-1), batch["y"])
        return F.cross_entropy(out, batch["y"])

    def forward(self, model: Any, batch: dict[str, Any]) -> Any:
        return model(batch["x"])

    def request_model(self, transform: Transform) -> type[BaseModel]:
        """One table row: every feature optional (missing values are imputed), unknown keys refused."""
        # Finite and of a magnitude a standardised feature can take (1e400 parses as inf, and
        # 1e300 would overflow the model's float32 arithmetic): a 422 naming the field, not a 500.
        number = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_ABS, le=MAX_ABS)]
        fields: dict[str, Any] = {c: (number | None, None) for c in transform.state["numeric"]}
        fields.update({c: (str | None, None) for c in transform.state["categorical"]})
        return create_model("TabularRecord", __config__=ConfigDict(extra="forbid"), **fields)

    def _outputs(self, model: Any, transform: Transform, x: np.ndarray) -> Any:
        import torch

        with torch.no_grad():
            return model(torch.from_numpy(x))

    def predict(self, model: Any, transform: Transform, instances: list[BaseModel]) -> list[dict[str, Any]]:
        import pandas as pd

        out = self._outputs(model, transform, transform.features(pd.DataFrame(instances_frame(instances))))
        if transform.state["task"] == "classification":
            return classify(out, transform.class_names)
        return [{"value": float(v)} for v in transform.unscale(out.squeeze(-1).numpy())]

    def predict_batch(self, model: Any, transform: Transform, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ready = transform.apply(raw)
        out = self._outputs(model, transform, ready["x"])
        if transform.state["task"] == "classification":
            return {"y_true": ready["y"], "y_pred": out.argmax(-1).numpy()}
        return {"y_true": transform.unscale(ready["y"]), "y_pred": transform.unscale(out.squeeze(-1).numpy())}
