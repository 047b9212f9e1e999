"""Serve's HTTP ingress mode, a property of the Ray cluster: HAProxy in front of replicas that
serve HTTP themselves (Ray 2.60's HAProxy ingress + direct ingress), on by default.

Serve's controller, proxies and replicas read these variables once, when their processes start,
so they are set where clusters are made: ``modelfleet cluster up`` (every ``ray start``), the local
instance ``connect()`` starts, ``cluster/*.yaml`` and the Helm chart's pod env. Turn it off with
``MODELFLEET_HAPROXY=0`` before the cluster starts: Serve's Python proxy then carries HTTP (one
more Python process per request, ~5 ms here).

What the variables fix, and why:

- ``RAY_SERVE_HAPROXY_NBTHREAD``: Ray's default is 4 threads; a small node does not have them.
- ``RAY_SERVE_HAPROXY_RETRY_ON``: a replica dying mid-request closes its connection without an
  answer; HAProxy re-sends the request to another replica (``option redispatch`` is Ray's default),
  so the client sees the answer instead of Ray's normalised 500. Generation has no side effects,
  so replaying an unanswered request is safe. A stream already under way cannot be replayed.
- Paths (config, admin socket, server state) live in an owner-only directory of this cluster:
  Ray writes the admin socket ``mode 666``; the directory makes that unreachable for other users,
  and two clusters on one machine no longer share ``/tmp/haproxy-serve``.
- Ports (stats, Prometheus exporter, the fallback proxy) are free ports picked per cluster, so two
  clusters on one machine do not collide. Ray 2.60 binds the stats and exporter ports on every
  interface (its template has no host for them): on a shared host, firewall them; the Helm chart's
  NetworkPolicy admits only the serving port.
- Time bounds: HAProxy reads a request's headers before it picks a replica, so headers that never
  end hold only an HAProxy connection (``maxconn``), bounded by its client idle timeout; Ray 2.60
  has no variable for HAProxy's ``timeout http-request``, so that bound is the 310 s idle one. The
  body is read by the replica's front within ``serve.body_timeout_s`` (408), and response headers
  are due within ``serve.request_timeout_s`` (504) whatever ``x-request-timeout-seconds`` says.
- ``RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S``: how long a stopping replica keeps serving
  while HAProxy drops it (Ray's default 30 s, for external load balancers; HAProxy reloads in
  well under a second).
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

ENABLE = "MODELFLEET_HAPROXY"
"""Set to 0 before a cluster starts to keep Serve's Python proxy."""


def haproxy_enabled() -> bool:
    return os.environ.get(ENABLE, "1") != "0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def haproxy_env(root: str | Path | None = None, *, threads: int = 1, draining_s: float = 2.0) -> dict[str, str]:
    """The ``RAY_SERVE_*`` variables of one cluster whose private HAProxy files live in ``root``
    (created owner-only; default a new directory in /tmp); empty when ``MODELFLEET_HAPROXY=0``.
    Values already in the environment win, so an operator can still set any of them."""
    if not haproxy_enabled():
        return {}
    base = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="mfh-", dir="/tmp"))
    # HAProxy refuses unix socket paths over 97 bytes, and Ray adds a 56-character directory.
    if len(str(base)) + 1 + 56 + len("/metrics.sock") > 97:
        raise ValueError(
            f"HAProxy state directory {str(base)!r} is too long for its unix sockets (at most {97 - 70} characters)"
        )
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o700)
    env = {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_NBTHREAD": str(threads),
        "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response response-timeout",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(base / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(base / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(base),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(base / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(base / "metrics.sock"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(_free_port()),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(_free_port()),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": f"{draining_s:g}",
        # Idle bounds (Ray's defaults: client 3600 s, server none): past ServeConfig's default
        # request_timeout_s (300 s), which the replica enforces itself, so these only cut
        # connections nobody is using (a stalled stream, a client that stopped reading).
        "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": "310",
        "RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S": "310",
    }
    return {k: os.environ.get(k, v) for k, v in env.items()}


def apply_haproxy_env(root: str | Path | None = None) -> dict[str, str]:
    """Put this cluster's ingress variables into ``os.environ`` (before Ray starts processes that
    inherit it); returns them."""
    env = haproxy_env(root)
    os.environ.update(env)
    return env
