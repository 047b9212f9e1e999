"""Serve's HTTP ingress mode, a property of the Ray cluster: HAProxy in front of replicas that
serve HTTP themselves (Ray 2.60's HAProxy ingress + direct ingress), on by default.

Serve's controller, proxies and replicas read these variables once, when their processes start,
so they are set where clusters are made: ``modelfleet cluster up`` (every ``ray start``), the local
instance ``connect()`` starts, ``cluster/*.yaml`` and the Helm chart's pod env. Turn it off with
``MODELFLEET_HAPROXY=0`` before the cluster starts: Serve's Python proxy then carries HTTP (one
more Python process per request, ~5 ms here).

What the variables fix, and why:

- ``RAY_SERVE_HAPROXY_NBTHREAD``: Ray's default is 4 threads; a small node does not have them.
- ``RAY_SERVE_HAPROXY_RETRY_ON``: ``conn-failure`` only (Ray's default): a request no replica
  received is re-sent to another (``option redispatch``); one that reached a replica which then
  died is not replayed, so a request that kills replicas cannot walk through all of them. The
  client sees Ray's normalised 500 and retries (the kill drill's clients do).
- Paths (config, admin socket, server state) live in an owner-only directory of this cluster:
  Ray writes the admin socket ``mode 666``; the directory makes that unreachable for other users,
  and two clusters on one machine no longer share ``/tmp/haproxy-serve``.
- Ports (stats, Prometheus exporter, the fallback proxy) are free ports picked per cluster, so two
  clusters on one machine do not collide, and picked *below the kernel's ephemeral range*: HAProxy
  re-binds them on every start and reload, and a port from the ephemeral range, once its HAProxy
  died (a proxy actor killed for a slow health check), is soon the local end of one of Ray's
  long-lived outgoing connections, so every new HAProxy failed with "cannot bind socket (Address
  already in use)" for minutes (seen in CI). Ray 2.60 binds the stats and exporter ports on every
  interface; the edge wrapper (below) rebinds them to 127.0.0.1.
- ``RAY_SERVE_HAPROXY_BINARY_PATH``: Ray's one hook into how HAProxy runs, pointed at
  ``haproxy_edge.py``, which hardens each config Ray renders (start and every reload) and execs
  the real HAProxy: ``timeout http-request`` (``MODELFLEET_HAPROXY_HTTP_REQUEST_TIMEOUT_S``,
  10 s: a request head trickled or never ended gets 408 and a close), stats and exporter on
  loopback, client ``x-request-id`` bounded. Ray 2.60 has no variable for any of these.
- Time bounds: the body is read by the replica's front within ``serve.body_timeout_s`` (408), and
  response headers are due within ``serve.request_timeout_s`` (504) whatever
  ``x-request-timeout-seconds`` says.
- The ingress request router (``serve.router``, ``serve/route_front.py``): the body is forwarded
  to it (``RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY``), HAProxy waits for it at most 1 s
  (``..._ROUTER_TIMEOUT_S``), and its buffer and ``maxconn`` are sized together (below).
- ``RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S``: how long a stopping replica keeps serving
  while HAProxy drops it (Ray's default 30 s, for external load balancers; HAProxy reloads in
  well under a second).
"""

from __future__ import annotations

import os
import random
import socket
import stat
import tempfile
from pathlib import Path

from modelfleet.cluster import haproxy_edge

ROUTER_BUFSIZE = (1 << 20) + (64 << 10)
"""HAProxy's buffer with the ingress request router on: a 1 MiB body and 64 KiB of headers."""
MAXCONN = 512
"""Connections per HAProxy process: 2 x ROUTER_BUFSIZE x MAXCONN (~1.1 GiB) bounds its buffers."""

ENABLE = "MODELFLEET_HAPROXY"
"""Set to 0 before a cluster starts to keep Serve's Python proxy."""


def haproxy_enabled() -> bool:
    return os.environ.get(ENABLE, "1") != "0"


PORT_WINDOW_LOW = 28000
"""Listening ports are picked from here up to the ephemeral range: above the simulated cluster's
worker ports (20000 + 1000 per node) and Ray's default ones (10002-19999)."""


def _ephemeral_low() -> int:
    """The first port the kernel hands to outgoing connections (Linux's default 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port(taken: set[int] | None = None) -> int:
    """A port free now, outside the ephemeral range where the kernel has room for that (else any
    free port: a machine whose ephemeral range starts low leaves no such window)."""
    taken = taken if taken is not None else set()
    window = range(PORT_WINDOW_LOW, _ephemeral_low())
    if len(window) >= 256:
        rng = random.SystemRandom()
        for _ in range(64):
            port = rng.choice(window)
            if port not in taken and _bindable(port):
                taken.add(port)
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    taken.add(port)
    return port


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
    _owner_only_dir(base)
    ports: set[int] = set()  # four distinct ones: each is checked free, none yet bound
    env = {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_NBTHREAD": str(threads),
        # Replay only what never reached a replica (Ray's default): a request that killed one
        # replica is not re-sent to the next; clients retry a lost request themselves.
        "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure",
        haproxy_edge.HTTP_REQUEST_TIMEOUT: f"{haproxy_edge.DEFAULT_HTTP_REQUEST_TIMEOUT_S:g}",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(base / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(base / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(base),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(base / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(base / "metrics.sock"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port(ports)),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port(ports)),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(_free_port(ports)),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(_free_port(ports)),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": f"{draining_s:g}",
        # Idle bounds (Ray's defaults: client 3600 s, server none): past ServeConfig's default
        # request_timeout_s (300 s), which the replica enforces itself, so these only cut
        # connections nobody is using (a stalled stream, a client that stopped reading).
        "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": "310",
        "RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S": "310",
        # The cache-aware router (serve.router) reads the prompt: HAProxy forwards the body to it,
        # waiting for it at most the router timeout (1 s: a pick takes ~1 ms; Ray's 5 s default
        # would hold every trickled POST that long).
        "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "1",
        "RAY_SERVE_HAPROXY_INGRESS_REQUEST_ROUTER_TIMEOUT_S": "1",
        # One buffer holds the largest body the front accepts (ServeConfig.max_body_bytes, 1 MiB)
        # plus headers, so every allowed body routes whole (a bigger one arrives truncated, is
        # routed by load and answered 413 by the replica). Ray's 8 MiB default x its maxconn 4096
        # could ask for 64 GiB; HAProxy's bound is ~2 x bufsize x maxconn = 1.1 GiB here.
        "RAY_SERVE_HAPROXY_INGRESS_REQUEST_ROUTER_BUFSIZE": str(ROUTER_BUFSIZE),
        "RAY_SERVE_HAPROXY_MAXCONN": str(MAXCONN),
        # Router replicas beside each node's HAProxy (Ray's default 1): HAProxy tries the next on
        # a connection failure, so one router's death leaves requests served.
        "RAY_SERVE_INGRESS_ROUTER_REPLICAS_PER_NODE": "2",
    }
    env = {k: os.environ.get(k, v) for k, v in env.items()}
    return {**env, **_edge_binary()}


def _edge_binary() -> dict[str, str]:
    """Ray runs ``RAY_SERVE_HAPROXY_BINARY_PATH``; make that the edge wrapper, which runs the real
    HAProxy (an operator's own ``RAY_SERVE_HAPROXY_BINARY_PATH`` becomes that real one)."""
    wrapper = haproxy_edge.__file__
    if not os.access(wrapper, os.X_OK):
        raise RuntimeError(f"the HAProxy edge wrapper {wrapper} is not executable; reinstall modelfleet or chmod +x it")
    real = os.environ.get(haproxy_edge.REAL_BINARY, "")
    operator = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH", "")
    if not real and operator and os.path.realpath(operator) != os.path.realpath(wrapper):
        real = operator
    if not real:
        real = haproxy_edge.bundled_haproxy()  # what Ray would pick with the variable unset
    return {"RAY_SERVE_HAPROXY_BINARY_PATH": wrapper, haproxy_edge.REAL_BINARY: real}


def _refuse_foreign(path: Path) -> None:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"cluster directory {str(path)!r} is a symlink or not a directory; remove it or use another")
    if st.st_uid != os.geteuid():
        raise ValueError(
            f"cluster directory {str(path)!r} belongs to uid {st.st_uid}, not to this user ({os.geteuid()}); "
            "another user may have planted it: remove it or use another port"
        )


def _owner_only_dir(base: Path) -> None:
    """Create ``base`` 0700 (its parent too when missing), or accept it only when it is ours and
    a real directory: a directory another local user made first (``/tmp/modelfleet-<port>`` is
    predictable) could hold a planted HAProxy config."""
    for d in (base.parent, base):
        if str(d) in ("/", "/tmp"):
            continue
        try:
            os.mkdir(d, 0o700)  # created owner-only from the start, no wider moment
        except FileExistsError:
            _refuse_foreign(d)
        except FileNotFoundError:
            os.makedirs(d, 0o700)
    _refuse_foreign(base)
    base.chmod(0o700)


def apply_haproxy_env(root: str | Path | None = None) -> dict[str, str]:
    """Put this cluster's ingress variables into ``os.environ`` (before Ray starts processes that
    inherit it); returns them."""
    env = haproxy_env(root)
    os.environ.update(env)
    return env
