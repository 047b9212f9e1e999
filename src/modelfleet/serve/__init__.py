"""Serving trained artifacts with Ray Serve: an OpenAI-compatible, autoscaling application.

Public API: ``ServeConfig`` / ``ModelSpec`` / ``parse_serve_config`` (the config schema),
``build_app`` (the Serve application builder, also importable as
``modelfleet.serve.app:build_app``), ``deploy``, ``update_model`` and ``status`` (operations on a
running cluster). Ray Serve is imported only when one of the last four is used, so loading a
config that has a ``serve:`` section stays cheap for training workers.
"""

from __future__ import annotations

from typing import Any

from modelfleet.serve.config import ModelSpec, ServeConfig, parse_serve_config

__all__ = ["ServeConfig", "ModelSpec", "parse_serve_config", "build_app", "deploy", "update_model", "status"]

_LAZY = {"build_app", "deploy", "update_model", "status"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from modelfleet.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'modelfleet.serve' has no attribute {name!r}")
