"""Serving trained artifacts with Ray Serve: an OpenAI-compatible, autoscaling application.

Public API: ``build_app`` (the Serve application builder, also importable as
``modelfleet.serve.app:build_app``), ``deploy``, ``update_model`` and ``status`` (operations on a
running cluster). The config schema is ``modelfleet.config.ServeConfig``.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["build_app", "deploy", "update_model", "status"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        # Lazy: ``modelfleet.serve.client`` (the HTTP client of ``modelfleet generate``) must not
        # pay for importing Ray Serve and torch.
        module = "modelfleet.serve.app" if name == "build_app" else "modelfleet.serve.operations"
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'modelfleet.serve' has no attribute {name!r}")
