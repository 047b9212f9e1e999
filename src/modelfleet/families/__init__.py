"""Model families behind one registry: ``get_family(name)`` answers everything about a family,
``build_model(cfg.model)`` is how everything gets a model.

Adding a family is one module with a ``Family`` subclass (see ``families/base.py``) plus one
entry in ``FAMILIES``. Entries are import paths so that optional extras (``transformers`` for
``hf-causal-lm``) are imported only when that family is used.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any

from modelfleet.config import Config, ModelConfig
from modelfleet.errors import ConfigError
from modelfleet.families.base import Family, Transform

FAMILIES: dict[str, str] = {
    "gpt": "modelfleet.families.gpt:GPTFamily",
    "hf-causal-lm": "modelfleet.families.hf:HFCausalLMFamily",
    "cnn": "modelfleet.families.cnn:CNNFamily",
    "lstm": "modelfleet.families.lstm:LSTMFamily",
    "linear": "modelfleet.families.linear:LinearFamily",
    "mf": "modelfleet.families.mf:MFFamily",
}
"""Family name (``model.family``) -> ``module:Class`` of its ``Family``."""


@cache
def get_family(name: str) -> Family:
    """The family registered as ``name``; ConfigError naming model.family otherwise."""
    try:
        module, _, cls = FAMILIES[name].partition(":")
    except (KeyError, TypeError):
        raise ConfigError(
            f"model.family: unknown family {name!r}; valid families: {', '.join(sorted(FAMILIES))}"
        ) from None
    return getattr(importlib.import_module(module), cls)()


def check_config(cfg: Config) -> Config:
    """The family's own checks of ``model.params`` (the schema cannot know them); returns cfg."""
    get_family(cfg.model.family).parse_params(cfg.model.params)
    return cfg


def build_model(cfg: ModelConfig) -> Any:
    """A freshly initialised model of ``cfg.family`` (seed with ``torch.manual_seed`` first)."""
    return get_family(cfg.family).build(cfg)


__all__ = ["FAMILIES", "Family", "Transform", "build_model", "check_config", "get_family"]
