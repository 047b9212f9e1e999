"""The typed root config (``schema``), its serving section (``serve``, pydantic: a trust
boundary) and reading it from YAML plus ``--set`` overrides (``load``). Presets, which need the
model families, live above this package in ``modelfleet.presets``."""

from modelfleet.config.load import resolve_paths
from modelfleet.config.schema import (
    Config,
    DataConfig,
    DeepSpeedConfig,
    ModelConfig,
    StorageConfig,
    TrackingConfig,
    TrainConfig,
)
from modelfleet.config.serve import ModelSpec, ServeConfig, parse_serve_config
from modelfleet.errors import ConfigError

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "ModelConfig",
    "ModelSpec",
    "ServeConfig",
    "StorageConfig",
    "TrackingConfig",
    "TrainConfig",
    "parse_serve_config",
    "resolve_paths",
]
