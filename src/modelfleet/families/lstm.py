"""The ``lstm`` family hooks (data, training, serving) around ``models/lstm.py``."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from modelfleet.config import ModelConfig
from modelfleet.data.families import TOPICS
from modelfleet.families.base import Family, Transform, classify
from modelfleet.models.lstm import PAD, UNK, LSTMClassifier, LSTMParams

_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class TextTransform(Transform):
    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.index = {w: i + 2 for i, w in enumerate(state["vocab"])}

    def apply(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, max_len = len(raw["text"]), self.state["max_len"]
        tokens = np.full((n, max_len), PAD, np.int64)
        length = np.ones(n, np.int64)
        for i, text in enumerate(raw["text"]):
            ids = [self.index.get(w, UNK) for w in words(str(text))][:max_len] or [UNK]
            tokens[i, : len(ids)] = ids
            length[i] = len(ids)
        out = {"tokens": tokens, "length": length}
        if "label" in raw:
            out["y"] = np.asarray(raw["label"], np.int64)
        return out

    def meta(self) -> dict[str, Any]:
        return {"vocab_size": len(self.state["vocab"]) + 2, "num_classes": len(self.state["classes"])}


class TextRequest(BaseModel):
    """One text to classify."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=10_000, description="The text; words beyond max_len are ignored.")


class LSTMFamily(Family):
    name = "lstm"
    task = "classification"
    Params = LSTMParams
    primary_metric = "accuracy"
    from_data = ("vocab_size", "num_classes")

    def build(self, cfg: ModelConfig) -> nn.Module:
        return LSTMClassifier(self.parse_params(cfg.params))

    def fit_transform(self, train_raw: Any, cfg: ModelConfig) -> Transform:
        p = self.parse_params(cfg.params)
        counts = Counter(w for t in train_raw["text"] for w in words(str(t)))
        vocab = sorted(w for w, c in counts.items() if c >= p.min_count)
        labels = sorted(np.unique(train_raw["label"]).tolist())

        # Class names for the built-in topic generator; plain ids for anything else.
        names = list(TOPICS) if labels == list(range(len(TOPICS))) else [str(c) for c in labels]
        return TextTransform({"kind": "text", "vocab": vocab, "max_len": p.max_len, "classes": names})

    def load_transform(self, state: dict[str, Any]) -> Transform:
        return TextTransform(state)

    def loss(self, model: Any, batch: dict[str, Any]) -> Any:
        import torch.nn.functional as F

        return F.cross_entropy(model(batch["tokens"], batch["length"]), batch["y"])

    def forward(self, model: Any, batch: dict[str, Any]) -> Any:
        return model(batch["tokens"], batch["length"])

    def request_model(self, transform: Transform) -> type[BaseModel]:
        return TextRequest

    def _logits(self, model: Any, ready: dict[str, np.ndarray]) -> Any:
        import torch

        with torch.no_grad():
            return model(torch.from_numpy(ready["tokens"]), torch.from_numpy(ready["length"]))

    def predict(self, model: Any, transform: Transform, instances: list[BaseModel]) -> list[dict[str, Any]]:
        ready = transform.apply({"text": np.array([i.text for i in instances], dtype=object)})
        return classify(self._logits(model, ready), transform.class_names)

    def predict_batch(self, model: Any, transform: Transform, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ready = transform.apply(raw)
        return {"y_true": ready["y"], "y_pred": self._logits(model, ready).argmax(-1).numpy()}
