"""The ``mf`` family: a matrix-factorization recommender over implicit user-item interactions.

Scores are ``user_vec . item_vec + item_bias``; training is a softmax over all items for each
observed (user, item) pair. Serving answers the top-k items for a user, leaving out the items
the user already had in the training split (kept with the artifact's transform)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(kw_only=True)
class MFParams:
    dim: int = 32
    """Latent factors per user and per item."""
    num_users: int = 0
    """User ids are 0..num_users-1; 0 takes it from the dataset."""
    num_items: int = 0
    """Item ids are 0..num_items-1; 0 takes it from the dataset."""


class MatrixFactorization(nn.Module):
    def __init__(self, p: MFParams) -> None:
        super().__init__()
        import torch

        self.user = nn.Embedding(max(1, p.num_users), p.dim)
        # Item factors are used whole (scores for every item), so they are parameters of this
        # module: ZeRO-3 gathers a module's own parameters around its forward.
        self.item = nn.Parameter(torch.randn(max(1, p.num_items), p.dim) * 0.1)
        self.item_bias = nn.Parameter(torch.zeros(max(1, p.num_items)))
        nn.init.normal_(self.user.weight, std=0.1)

    def forward(self, user: Any) -> Any:
        """Scores of every item for each user: [B, num_items]."""
        return self.user(user) @ self.item.T + self.item_bias
