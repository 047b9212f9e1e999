"""The ``cnn`` family: 28x28 single-channel image classification (two conv blocks, an MLP head).

Images travel as 784 pixel values on a 0..255 scale; the transform normalises them with the
mean and standard deviation of the training split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

SIDE = 28


@dataclass(kw_only=True)
class CNNParams:
    channels: int = 16
    """Channels of the first conv layer; the second has twice as many."""
    hidden: int = 64
    """Width of the hidden fully-connected layer."""
    num_classes: int = 0
    """Output classes; 0 takes it from the dataset."""
    dropout: float = 0.0
    """Dropout before the classifier (0 keeps export checks exact)."""


class CNN(nn.Module):
    def __init__(self, p: CNNParams) -> None:
        super().__init__()
        c = p.channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * c * 7 * 7, p.hidden),
            nn.ReLU(),
            nn.Dropout(p.dropout),
            nn.Linear(p.hidden, max(1, p.num_classes)),
        )

    def forward(self, x: Any) -> Any:
        return self.head(self.features(x.view(-1, 1, SIDE, SIDE)))
