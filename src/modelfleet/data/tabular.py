"""Tabular preprocessing with Ray Data's preprocessors, fitted on the training split only.

Missing values are imputed (mean for numbers, most frequent for categories), numbers are
standard-scaled (or min-max scaled for ``minmax_columns``), categories are one-hot encoded (or
ordinal encoded for ``ordinal_columns``). The fitted state is kept as JSON in Ray's own
serialization layout (type id, version, fields, stats) without the pickle, so an artifact
carries it and serving rebuilds exactly the same preprocessors.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from modelfleet.data.transform import Transform
from modelfleet.errors import ConfigError
from modelfleet.raycompat import preprocessor_from_state, preprocessor_state


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _dump(p: Any) -> dict[str, Any]:
    return _jsonable(preprocessor_state(p))


def _load(spec: dict[str, Any]) -> Any:
    return preprocessor_from_state(spec)


class TabularTransform(Transform):
    """Feature table -> ``x`` (float32 vector); the target -> ``y`` (scaled number or class id)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.steps = [_load(s) for s in state["steps"]]

    @classmethod
    def fit(
        cls,
        train: pd.DataFrame,
        *,
        target: str,
        task: str,
        minmax_columns: list[str] = (),
        ordinal_columns: list[str] = (),
    ) -> TabularTransform:
        import ray
        from ray.data.preprocessors import MinMaxScaler, OneHotEncoder, OrdinalEncoder, SimpleImputer, StandardScaler

        features = [c for c in train.columns if c != target]
        categorical = [c for c in features if not pd.api.types.is_numeric_dtype(train[c])]
        numeric = [c for c in features if c not in categorical]
        for key, cols, pool in (
            ("minmax_columns", minmax_columns, numeric),
            ("ordinal_columns", ordinal_columns, categorical),
        ):
            bad = [c for c in cols if c not in pool]
            if bad:
                raise ConfigError(
                    f"model.params.{key}: {bad} are not {'numeric' if pool is numeric else 'categorical'} "
                    f"columns of the table; valid: {pool}"
                )
        standard = [c for c in numeric if c not in minmax_columns]
        onehot = [c for c in categorical if c not in ordinal_columns]
        steps = [SimpleImputer(numeric, strategy="mean")] if numeric else []
        if categorical:
            steps.append(SimpleImputer(categorical, strategy="most_frequent"))
        steps += [StandardScaler(standard)] if standard else []
        steps += [MinMaxScaler(list(minmax_columns))] if minmax_columns else []
        steps += [OneHotEncoder(onehot)] if onehot else []
        steps += [OrdinalEncoder(list(ordinal_columns))] if ordinal_columns else []
        ds = ray.data.from_pandas(train[features])
        for p in steps:  # each step is fitted on the training rows as the previous steps left them
            ds = p.fit_transform(ds)
        state: dict[str, Any] = {
            "kind": "tabular",
            "task": task,
            "target": target,
            "features": features,
            "numeric": numeric,
            "categorical": categorical,
            "onehot": onehot,
            "steps": [_dump(p) for p in steps],
        }
        y = train[target].to_numpy()
        if task == "regression":
            state.update(target_mean=float(y.mean()), target_std=float(y.std() or 1.0))
        else:
            state["classes"] = [str(c) for c in sorted(np.unique(y).tolist())]
        t = cls(state)
        t.state["in_features"] = int(t.features(train.head(2)).shape[1])
        return t

    def features(self, df: pd.DataFrame) -> np.ndarray:
        """The model's input matrix for a feature table (missing columns count as missing values)."""
        df = df.reindex(columns=self.state["features"]).copy()
        for c in self.state["numeric"]:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype(np.float64)
        for c in self.state["categorical"]:
            df[c] = df[c].astype(object)
        for p in self.steps:
            df = p.transform_batch(df)
        parts = [df[self.state["numeric"]].to_numpy(np.float32)] if self.state["numeric"] else []
        for c in self.state["categorical"]:
            col = df[c]
            parts.append(
                np.stack([np.asarray(v, np.float32) for v in col])
                if c in self.state["onehot"]
                else col.to_numpy(np.float32)[:, None]
            )
        return np.concatenate(parts, axis=1)

    def apply(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        df = pd.DataFrame({k: v for k, v in raw.items()})
        out = {"x": self.features(df)}
        target = self.state["target"]
        if target in df:
            y = df[target].to_numpy()
            if self.state["task"] == "regression":
                out["y"] = ((y - self.state["target_mean"]) / self.state["target_std"]).astype(np.float32)
            else:
                index = {c: i for i, c in enumerate(self.state["classes"])}
                out["y"] = np.array([index[str(v)] for v in y], np.int64)
        return out

    def unscale(self, y: np.ndarray) -> np.ndarray:
        """Model output -> the target's own units (regression)."""
        return y * self.state["target_std"] + self.state["target_mean"]

    def meta(self) -> dict[str, Any]:
        return {
            "in_features": self.state["in_features"],
            "num_outputs": 1 if self.state["task"] == "regression" else len(self.state["classes"]),
        }
