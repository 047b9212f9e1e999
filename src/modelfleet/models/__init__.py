"""Model families behind one registry: ``get_family(name)`` answers everything about a family,
``build_model(cfg.model)`` is how everything gets a model.

Adding a family is one module with a ``Family`` subclass (see ``models/family.py``) plus one
entry in ``FAMILIES``. Entries are import paths so that optional extras (``transformers`` for
``hf-causal-lm``) are imported only when that family is used.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Any, Callable

from torch import nn

from modelfleet.config import ConfigError, ModelConfig
from modelfleet.models.family import Family, Transform
from modelfleet.models.gpt import GPT, KVCache, flops_per_token, generate, num_params

FAMILIES: dict[str, str] = {
    "gpt": "modelfleet.models.gpt_family:GPTFamily",
    "hf-causal-lm": "modelfleet.models.hf:HFCausalLMFamily",
    "cnn": "modelfleet.models.cnn:CNNFamily",
    "lstm": "modelfleet.models.lstm:LSTMFamily",
    "linear": "modelfleet.models.linear:LinearFamily",
    "mf": "modelfleet.models.mf:MFFamily",
}
"""Family name (``model.family``) -> ``module:Class`` of its ``Family``."""


@lru_cache(maxsize=None)
def get_family(name: str) -> Family:
    """The family registered as ``name``; ConfigError naming model.family otherwise."""
    try:
        module, _, cls = FAMILIES[name].partition(":")
    except (KeyError, TypeError):
        raise ConfigError(f"model.family: unknown family {name!r}; valid families: "
                          f"{', '.join(sorted(FAMILIES))}") from None
    return getattr(importlib.import_module(module), cls)()


def build_model(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised model of ``cfg.family`` (seed with ``torch.manual_seed`` first)."""
    return get_family(cfg.family).build(cfg)


# Kept for callers of the first registry: family name -> constructor taking the ModelConfig.
MODEL_FAMILIES: dict[str, Callable[[ModelConfig], Any]] = {n: (lambda c, n=n: get_family(n).build(c))
                                                           for n in FAMILIES}

__all__ = ["FAMILIES", "GPT", "Family", "KVCache", "MODEL_FAMILIES", "Transform", "build_model",
           "flops_per_token", "generate", "get_family", "num_params"]
