"""The HTTP edge (HAProxy as Ray runs it, through modelfleet's edge wrapper) against a served model
on the session's Ray (Serve on 127.0.0.1:8300): request heads must arrive within
``MODELFLEET_HAPROXY_HTTP_REQUEST_TIMEOUT_S`` (10 s, the cluster default), an ambiguous
Content-Length + Transfer-Encoding request cannot smuggle a second request, and an oversized
client request id is not echoed. Figures go to docs/reliability.md ("round 3")."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from helpers import deploy_app
from modelfleet.cluster import haproxy_edge

PORT = 8300
DEADLINE_S = 30.0  # the bound; the configured head deadline is 10 s


@pytest.fixture(scope="module")
def edge(serve_8300, tiny_registry):
    storage, _ = tiny_registry
    url = deploy_app(
        storage, PORT, "edge", [{"name": "tiny", "artifact": "tiny@v1", "ray_actor_options": {"num_cpus": 0.5}}]
    )
    yield url
    serve_8300.delete("edge")


def _trickle(head: bytes, step: bytes, every_s: float, for_s: float) -> tuple[float, bytes]:
    """Send ``head`` then ``step`` every ``every_s`` for up to ``for_s``; return (seconds until the
    server answered or closed, what it sent)."""
    with socket.create_connection(("127.0.0.1", PORT), timeout=for_s + 10) as s:
        s.sendall(head)
        t0 = time.monotonic()
        while time.monotonic() - t0 < for_s:
            s.settimeout(every_s)
            try:
                got = s.recv(4096)
                return time.monotonic() - t0, got  # an answer, or b"" for a close
            except TimeoutError:
                pass
            try:
                s.sendall(step)
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - t0, b""
    return time.monotonic() - t0, b"<still open>"


def test_trickled_and_never_ending_headers_are_cut_within_30s(edge):
    assert haproxy_edge.DEFAULT_HTTP_REQUEST_TIMEOUT_S <= 10
    head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    results: dict[str, tuple[float, bytes]] = {}
    # Both drills at once: neither waits for the other's deadline.
    drills = {
        "byte every 5 s": lambda: _trickle(head + b"X-Slow: ", b"a", 5.0, 60.0),
        "never-ending headers": lambda: _trickle(head, b"X-More: " + b"b" * 32 + b"\r\n", 0.2, 60.0),
    }
    threads = [threading.Thread(target=lambda k=k, f=f: results.__setitem__(k, f())) for k, f in drills.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    for name, (took, got) in results.items():
        print(f"\n[edge] {name}: cut after {took:.1f} s, answer {got[:24]!r}")
        assert took <= DEADLINE_S, (name, took)
        assert got == b"" or got.startswith(b"HTTP/1.1 408"), (name, got[:120])
    assert set(results) == set(drills)


def test_content_length_with_transfer_encoding_cannot_smuggle_a_request(edge):
    """HAProxy 2.8 frames such a request by the chunked encoding alone (it drops Content-Length)
    and closes the connection after its answer: the bytes a smuggler hides behind the short
    Content-Length never become a second request."""
    body = b'{"model":"tiny","prompt":"def main(","max_tokens":1}'
    smuggled = b"GET /-/routes HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    req = (
        b"POST /edge/v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked + smuggled
    )
    data = b""
    with socket.create_connection(("127.0.0.1", PORT), timeout=60) as s:
        s.sendall(req)
        while chunk := s.recv(65536):  # returns b"" when the edge closes the connection
            data += chunk
    print(f"\n[edge] CL+TE: {data.count(b'HTTP/1.1 ')} response(s), first {data[:15]!r}, then closed")
    assert data.count(b"HTTP/1.1 ") == 1 and data.startswith(b"HTTP/1.1 200"), data[:400]
    assert b"connection: close" in data.lower()


def test_oversized_client_request_id_is_not_echoed(edge):
    url = f"{edge}/v1/completions"
    body = {"model": "tiny", "prompt": "def main(", "max_tokens": 1}
    long_id = "r" * 8192
    r = httpx.post(url, json=body, headers={"x-request-id": long_id}, timeout=60)
    assert r.status_code == 200, r.text
    assert long_id not in r.headers.get("x-request-id", "") and len(r.headers.get("x-request-id", "")) <= 128
    ok = httpx.post(url, json=body, headers={"x-request-id": "client-id-1"}, timeout=60)
    assert ok.status_code == 200 and ok.headers.get("x-request-id") == "client-id-1", ok.headers
