"""Reading a config: a base (a preset's plain data), then the YAML file, then ``--set`` overrides,
merged key by key (unknown keys are errors) and built into a ``Config``."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from modelfleet.config.schema import Config
from modelfleet.errors import ConfigError
from modelfleet.storage import StorageLayout, is_remote


def load_config(
    path: str | os.PathLike | None,
    *,
    presets: Mapping[str, Callable[[], Config]],
    preset: str | None = None,
    overrides: Sequence[str] = (),
) -> Config:
    """Build a Config: a preset from ``presets`` (named by ``--preset``, the YAML's ``preset:``
    key, or ``tiny``), then the YAML file's sections, then ``key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping, got {type(loaded).__name__}")
        raw = loaded
    name = preset or raw.get("preset") or "tiny"
    if name not in presets:
        raise ConfigError(f"preset: unknown preset {name!r}; valid presets: {', '.join(presets)}")
    merged = _deep_merge(presets[name]().to_dict(), {**raw, "preset": name}, "")
    model = raw.get("model")
    set_by_user = {f"model.{k}" for k in model} if isinstance(model, Mapping) else set()
    for ov in overrides:
        key, sep, value = ov.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {ov!r} must look like section.key=value")
        _set_path(merged, key.strip(), yaml.safe_load(value) if value else "")
        set_by_user.add(key.strip())
    cfg = Config.from_dict(merged)
    _refuse_ignored_model_keys(cfg, set_by_user)
    return resolve_paths(cfg)


GPT_ONLY_MODEL_KEYS = ("vocab_size", "n_layer", "n_head", "n_embd", "block_size", "dropout", "bias")
"""``model.*`` keys only the ``gpt`` family reads; every other family takes its settings from
``model.params`` (``hf-causal-lm``'s context is ``model.params.block_size``)."""


def _refuse_ignored_model_keys(cfg: Config, set_by_user: set[str]) -> None:
    """A key the user set (YAML or ``--set``, not the preset) that the model's family would ignore."""
    if cfg.model.family == "gpt":
        return
    for k in GPT_ONLY_MODEL_KEYS:
        if f"model.{k}" in set_by_user:
            raise ConfigError(
                f"model.{k}: not used by family {cfg.model.family!r}, which reads its settings from "
                f"model.params (only the gpt family reads model.{k})"
            )


def resolve_paths(cfg: Config) -> Config:
    """Make local storage and data paths absolute (Ray needs an absolute storage_path).

    Relative paths resolve against the current directory, not the YAML's folder, so that
    ``storage/...`` means the same thing from the CLI and from a job. An empty ``data.path``
    is the storage layout's ``data/<preset>``, so ``--set storage.path=...`` alone moves both.
    """
    if not is_remote(cfg.storage.path):
        cfg.storage.path = str(Path(cfg.storage.path).expanduser().resolve())
    if not cfg.data.path:
        cfg.data.path = StorageLayout(cfg.storage.path).data(cfg.preset)
    elif not is_remote(cfg.data.path):
        cfg.data.path = str(Path(cfg.data.path).expanduser().resolve())
    return cfg


FAMILY_PARAMS = "model.params."
"""Keys below this prefix are the model family's to check (``Family.parse_params``), not the schema's."""


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        key = f"{prefix}{k}"
        if k not in base and prefix.startswith(FAMILY_PARAMS):
            out[k] = v  # the family's own dataclass checks these keys (unknown ones fail there, named)
            continue
        if k not in base:
            raise ConfigError(f"{key}: unknown key; valid keys here: {', '.join(sorted(base))}")
        if isinstance(base[k], dict) and base[k] and isinstance(v, Mapping):
            out[k] = _deep_merge(base[k], v, f"{key}.")
        else:
            out[k] = v
    return out


def _set_path(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    # Below model.params the family's own dataclass checks the keys (unknown ones fail there,
    # named), so an override may start an optional section such as model.params.lora.
    free_from = 2 if dotted.startswith(FAMILY_PARAMS) else len(parts)
    cur = d
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        if isinstance(cur, dict) and part not in cur and i >= free_from:
            cur[part] = None
        if not isinstance(cur, dict) or part not in cur:
            valid = ", ".join(sorted(cur)) if isinstance(cur, dict) else "(none)"
            raise ConfigError(f"{here}: unknown key; valid keys here: {valid}")
        if i == len(parts) - 1:
            cur[part] = value
        else:
            if cur[part] is None and i + 1 >= free_from:
                cur[part] = {}
            cur = cur[part]
