"""The ``linear`` family: a linear model on a preprocessed table — regression (squared error) or,
when the target is a class, logistic regression (cross-entropy)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass(kw_only=True)
class LinearParams:
    in_features: int = 0
    """Input width after preprocessing (one-hot widens it); 0 takes it from the dataset."""
    num_outputs: int = 0
    """1 for regression, the class count for classification; 0 takes it from the dataset."""
    target: str = "target"
    """Column holding the label; a float column means regression, an integer one classification."""
    minmax_columns: list[str] = field(default_factory=list)
    """Numeric columns min-max scaled to [0, 1]; every other numeric column is standard-scaled."""
    ordinal_columns: list[str] = field(default_factory=list)
    """Categorical columns ordinal-encoded; every other categorical column is one-hot encoded."""


class LinearModel(nn.Module):
    def __init__(self, p: LinearParams) -> None:
        super().__init__()
        self.linear = nn.Linear(max(1, p.in_features), max(1, p.num_outputs))

    def forward(self, x: Any) -> Any:
        return self.linear(x)
