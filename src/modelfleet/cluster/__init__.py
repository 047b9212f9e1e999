"""How modelfleet reaches a Ray cluster: an existing one, a simulated local one, or a new local
instance. Nothing here imports Ray at import time: Ray reads its auth mode from the environment
once, so ``cluster.local`` must be able to set it first."""

from typing import Any


def connect(**kwargs: Any) -> str:
    from modelfleet.cluster.connection import connect as _connect

    return _connect(**kwargs)


__all__ = ["connect"]
