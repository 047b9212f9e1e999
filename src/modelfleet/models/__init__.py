"""Model families behind one registry: ``build_model(cfg.model)`` is how everything gets a model."""

from __future__ import annotations

from typing import Callable

from torch import nn

from modelfleet.config import ModelConfig
from modelfleet.models.gpt import GPT, KVCache, flops_per_token, generate, num_params

MODEL_FAMILIES: dict[str, Callable[[ModelConfig], nn.Module]] = {"gpt": GPT}
"""Family name (``model.family``) -> constructor taking the ``ModelConfig``."""


def build_model(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised model of ``cfg.family`` (seed with ``torch.manual_seed`` first)."""
    try:
        ctor = MODEL_FAMILIES[cfg.family]
    except KeyError:
        raise ValueError(f"model.family: unknown family {cfg.family!r}; valid families: "
                         f"{', '.join(sorted(MODEL_FAMILIES))}") from None
    return ctor(cfg)


__all__ = ["GPT", "KVCache", "MODEL_FAMILIES", "build_model", "flops_per_token", "generate",
           "num_params"]
