"""Waiting by condition: every wait in the suite polls what it waits for, with a generous bound."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.25) -> Any:
    """Poll ``predicate()`` every ``interval_s`` until it returns something truthy, and return that.
    After ``timeout_s`` (checked after a last try) raise ``TimeoutError`` naming ``what``. The
    product's own poll (``serve.operations.wait_for``, used by the demo and deploys) is the one loop."""
    from modelfleet.serve.operations import wait_for

    return wait_for(predicate, timeout_s, what, interval_s)


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Nothing accepts connections on ``host:port`` (what ``cluster up`` and Serve need to bind)."""
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, port)) != 0


def wait_port_free(port: int, timeout_s: float = 120, what: str = "") -> None:
    """Wait until an earlier test's server (Serve proxy, a simulated cluster) has let go of ``port``."""
    wait_until(lambda: port_free(port), timeout_s, f"port {port} to be free{f' ({what})' if what else ''}", 0.5)
