"""The preprocessing interface every family's transform implements (fitted on the training split,
saved as JSON with the artifact, applied identically in training, evaluation and serving)."""

from __future__ import annotations

from typing import Any

import numpy as np


class Transform:
    """Preprocessing fitted on the training split; its ``state`` is JSON saved with the artifact."""

    state: dict[str, Any]

    def apply(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Raw columns -> model-ready columns (``x``/``tokens``/... and ``y`` when labels exist)."""
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        """Sizes the model takes from the data (``Family.from_data`` keys) for meta.json."""
        return {}

    @property
    def class_names(self) -> list[str]:
        return list(self.state.get("classes", []))
