"""Serving against a real Ray Serve instance over real HTTP on 127.0.0.1 (port 8123).

Artifacts come from randomly initialised tiny GPTs published to a temporary registry (no
training run). Every load loop is bounded in count and time; waits poll with deadlines.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from helpers import engine_core_pids, publish_tiny_models, serve_on, serve_replica_pids, wait_until
from modelfleet.serve.client import iter_sse

PORT = 8123  # not 8000: another engineer may run Serve there
BASE = f"http://127.0.0.1:{PORT}"
PROBE = "def main("
KEY = "sk-test-7f3a9c1e5b"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory):
    """A registry with tiny@v1 and tiny@v2 (different random weights) and their greedy answers."""
    storage = tmp_path_factory.mktemp("serve-storage")
    answers = publish_tiny_models(storage, (1, 2), PROBE)
    assert answers["v1"] != answers["v2"], "the two random models must answer differently"
    return storage, answers


@pytest.fixture(scope="module")
def serve_up(ray_session):
    """Serve on PORT for this module: started once the port is free, gone (by condition) after."""
    with serve_on(PORT) as serve:
        yield serve


def _model(name: str, artifact: str, **kw) -> dict:
    return {"name": name, "artifact": artifact, "ray_actor_options": {"num_cpus": 0.5}, **kw}


def _deploy(storage: Path, app: str, models: list[dict], **kw):
    from modelfleet.serve.operations import deploy

    return deploy(
        {
            "app_name": app,
            "route_prefix": f"/{app}",
            "port": PORT,
            "storage_path": str(storage),
            "ingress": {"num_cpus": 0.05},
            "models": models,
            **kw,
        }
    )


@pytest.fixture(scope="module")
def main_app(serve_up, registry_dir, tmp_path_factory):
    """Auth from a key file, a small body limit, JSON logs in a known dir, two models."""
    storage, answers = registry_dir
    tmp = tmp_path_factory.mktemp("main-app")
    (tmp / "key").write_text(KEY + "\n")
    logs = tmp / "logs"
    batched = {
        "batching": {"max_batch_size": 8},  # an LM: continuous batching, no wait timeout
        "max_ongoing_requests": 8,
        "max_queued_requests": 8,
        "overload_status": 503,
        "retry_after_s": 2,
    }
    _deploy(
        storage,
        "main",
        [
            _model("tiny", "tiny@v1", **batched),
            _model("tiny-path", str(storage / "models" / "tiny" / "v2"), max_model_len=96),
        ],
        api_key_file=str(tmp / "key"),
        max_body_bytes=4096,
        logging={"encoding": "JSON", "logs_dir": str(logs)},
    )
    yield {"url": f"{BASE}/main", "answers": answers, "logs": logs}
    serve_up.delete("main")


def _auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _complete(client: httpx.Client, url: str, **body) -> httpx.Response:
    return client.post(
        f"{url}/v1/completions", json={"prompt": PROBE, "max_tokens": 8, "temperature": 0, **body}, headers=_auth()
    )


# ---------------------------------------------------------------- OpenAI formats


def test_completions_chat_models_and_health_in_openai_format(main_app):
    url = main_app["url"]
    with httpx.Client(timeout=60) as c:
        r = _complete(c, url, model="tiny")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["model"] == "tiny" and body["id"].startswith("cmpl-")
        assert body["choices"][0]["text"] == main_app["answers"]["v1"]  # served greedy == reference sampler
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"] == {
            "prompt_tokens": len(PROBE),
            "completion_tokens": 8,
            "total_tokens": len(PROBE) + 8,
            "prompt_tokens_details": {"cached_tokens": 0},
        }
        # A repeated prompt: its full 16-token KV blocks come from the prefix cache, the answer is
        # the same (greedy), and OpenAI's field says how many prompt tokens were cached.
        long = "# prefix cache probe\n" + PROBE * 4  # 57 tokens: 3 full blocks before the last token
        cold, warm = (_complete(c, url, model="tiny", prompt=long).json() for _ in range(2))
        assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] == 48
        assert warm["choices"][0]["text"] == cold["choices"][0]["text"]
        # cache_salt: a salt has its own cache space. The same prompt under a new salt is cold,
        # then warm under that salt, and cold again under another; the answer never changes.
        salted = [
            _complete(c, url, model="tiny", prompt=long, cache_salt=s).json()
            for s in ("tenant-a", "tenant-a", "tenant-b")
        ]
        assert [b["usage"]["prompt_tokens_details"]["cached_tokens"] for b in salted] == [0, 48, 0], salted
        assert {b["choices"][0]["text"] for b in salted} == {cold["choices"][0]["text"]}
        r = _complete(c, url, model="tiny", cache_salt="")
        assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt", r.text

        r = _complete(c, url, model="tiny-path")  # the same app serves a second artifact, by path
        assert r.json()["choices"][0]["text"] == main_app["answers"]["v2"]

        r = c.post(
            f"{url}/v1/chat/completions",
            headers=_auth(),
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "seed": 3},
        )
        assert r.status_code == 200, r.text
        chat = r.json()
        assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
        assert isinstance(chat["choices"][0]["message"]["content"], str)
        assert chat["usage"]["total_tokens"] == chat["usage"]["prompt_tokens"] + chat["usage"]["completion_tokens"]

        models = c.get(f"{url}/v1/models", headers=_auth()).json()
        assert models["object"] == "list"
        assert {(m["id"], m["artifact"]) for m in models["data"]} == {("tiny", "tiny@v1"), ("tiny-path", "tiny@v2")}
        assert all(m["object"] == "model" for m in models["data"])
        # tiny-path is served with max_model_len 96 (the model's context is 128): reported and enforced.
        assert {m["id"]: m["context_length"] for m in models["data"]} == {"tiny": 128, "tiny-path": 96}
        r = _complete(c, url, model="tiny-path", max_tokens=96 - len(PROBE) + 1)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
        assert "max_model_len of 96 tokens" in r.json()["error"]["message"]
        assert _complete(c, url, model="tiny-path", max_tokens=96 - len(PROBE)).status_code == 200

        health = c.get(f"{url}/healthz")  # no key needed: probes carry no credentials
        assert health.status_code == 200 and health.json()["status"] == "ok"

        r = c.post(
            f"{url}/v1/completions",
            headers={**_auth(), "x-request-id": "rid-test-42"},
            json={"prompt": "x", "max_tokens": 2},
        )
        assert r.headers["x-request-id"] == "rid-test-42"


def test_prefix_cache_counters_reach_prometheus(main_app):
    """The replica's prefix-cache counters as Prometheus scrapes them: Ray's metrics endpoint of the
    node (public ``ray.nodes()``) serves ``ray_modelfleet_prefix_cache_{queried,hit}_tokens`` for
    model tiny, and the hit count covers the repeat just sent (metrics flush every few seconds)."""
    import re

    import ray

    prompt = "# prometheus prefix probe\n" + PROBE * 4  # 61 tokens: 3 full blocks on the repeat
    with httpx.Client(timeout=60) as c:
        for _ in range(2):
            assert _complete(c, url=main_app["url"], model="tiny", prompt=prompt).status_code == 200
        ends = [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics" for n in ray.nodes() if n["Alive"]]

        def scraped() -> dict[str, float] | None:
            got: dict[str, float] = {}
            for url in ends:
                for name, tags, value in re.findall(
                    r"^ray_modelfleet_prefix_cache_(queried|hit)_tokens(?:_total)?\{([^}]*)\} (\S+)$",
                    c.get(url).text,
                    re.M,
                ):
                    if 'model="tiny"' in tags:
                        got[name] = got.get(name, 0.0) + float(value)
            return got if got.get("hit", 0) >= 48 else None

        got = wait_until(scraped, 60, "the prefix-cache counters of model tiny on the metrics endpoint", 1.0)
    assert got["queried"] >= 2 * 61 and got["hit"] <= got["queried"]


def test_streaming_yields_chunks_then_done(main_app):
    url = main_app["url"]
    with httpx.Client(timeout=60) as c:
        r = c.post(
            f"{url}/v1/completions",
            headers=_auth(),
            json={
                "prompt": PROBE,
                "max_tokens": 8,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.text.splitlines() if ln]
        assert lines[-1] == "data: [DONE]"
        events = list(iter_sse(iter(lines)))
        text_events = [e for e in events if e["choices"]]
        assert len(text_events) >= 3
        assert all(e["object"] == "text_completion" and e["id"] == events[0]["id"] for e in events)
        assert "".join(e["choices"][0]["text"] for e in text_events) == main_app["answers"]["v1"]
        assert text_events[-1]["choices"][0]["finish_reason"] == "length"
        assert events[-1]["usage"]["completion_tokens"] == 8

        r = c.post(
            f"{url}/v1/chat/completions",
            headers=_auth(),
            # Greedy: an unseeded sample could be the end-of-text token at once (2 events).
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True, "temperature": 0},
        )
        events = list(iter_sse(iter(r.text.splitlines())))
        assert r.text.rstrip().endswith("data: [DONE]") and len(events) >= 3
        assert (
            events[0]["object"] == "chat.completion.chunk" and events[0]["choices"][0]["delta"]["role"] == "assistant"
        )
        assert events[-1]["choices"][0]["finish_reason"] in ("length", "stop")


async def _burst(url: str, n: int, max_tokens: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120) as c:
        return await asyncio.gather(
            *(
                c.post(
                    f"{url}/v1/completions",
                    headers=_auth(),
                    json={"prompt": f"{i} {PROBE}", "max_tokens": max_tokens, "seed": i},
                )
                for i in range(n)
            )
        )


def test_concurrent_requests_are_batched(main_app):
    responses = asyncio.run(_burst(main_app["url"], 8, 24))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    sizes = [int(r.headers["x-modelfleet-batch-size"]) for r in responses]
    assert max(sizes) > 1, sizes


def test_bad_inputs_get_their_status_and_the_same_replica_then_answers(main_app):
    url = main_app["url"]
    with httpx.Client(timeout=60) as c:
        ok = _complete(c, url)
        assert ok.status_code == 200
        replica, ingress = ok.headers["x-modelfleet-replica-pid"], ok.headers["x-modelfleet-ingress-pid"]
        good = {"prompt": PROBE, "max_tokens": 4}
        cases = [
            ("no key", lambda: c.post(f"{url}/v1/completions", json=good), 401, "API key"),
            (
                "wrong key",
                lambda: c.post(f"{url}/v1/completions", json=good, headers=_auth("sk-wrong")),
                401,
                "API key",
            ),
            ("bad max_tokens", lambda: _complete(c, url, max_tokens=-3), 400, "max_tokens"),
            ("bad temperature", lambda: _complete(c, url, temperature="hot"), 400, "temperature"),
            ("unknown field", lambda: _complete(c, url, max_tokenz=3), 400, "max_tokenz"),
            ("missing prompt", lambda: c.post(f"{url}/v1/completions", json={}, headers=_auth()), 400, "prompt"),
            (
                "bad json",
                lambda: c.post(
                    f"{url}/v1/completions", content=b"{nope", headers={**_auth(), "content-type": "application/json"}
                ),
                400,
                "JSON",
            ),
            ("body too large", lambda: _complete(c, url, prompt="x" * 5000), 413, "4096"),
            ("prompt too long", lambda: _complete(c, url, prompt="x" * 200), 400, "at most 128 tokens per request"),
            (
                "prompt + max_tokens too long",
                lambda: _complete(c, url, prompt="x" * 100, max_tokens=64),
                400,
                "at most 28",
            ),
            ("unknown model", lambda: _complete(c, url, model="nope"), 404, "tiny-path"),
        ]
        for what, send, status, needle in cases:
            r = send()
            assert r.status_code == status, (what, r.status_code, r.text)
            assert needle in r.json()["error"]["message"], (what, r.text)
            after = _complete(c, url)
            assert after.status_code == 200, (what, after.text)
            assert after.headers["x-modelfleet-ingress-pid"] == ingress, what
            assert after.headers["x-modelfleet-replica-pid"] == replica, what
            assert after.json()["choices"][0]["text"] == main_app["answers"]["v1"], what

    # Overload: 8 in flight + 8 queued per caller; the rest of a bounded burst is shed with 503.
    responses = asyncio.run(_burst(url, 40, 100))
    codes = [r.status_code for r in responses]
    assert 503 in codes and 200 in codes, codes
    shed = next(r for r in responses if r.status_code == 503)
    assert shed.headers["retry-after"] == "2" and "overloaded" in shed.json()["error"]["message"]
    with httpx.Client(timeout=60) as c:
        after = _complete(c, url)
        assert after.status_code == 200 and after.headers["x-modelfleet-replica-pid"] == replica


def test_logs_carry_request_ids_and_never_the_key(main_app):
    with httpx.Client(timeout=60) as c:
        assert (
            c.post(
                f"{main_app['url']}/v1/completions",
                headers={**_auth(), "x-request-id": "rid-log-7"},
                json={"prompt": "x", "max_tokens": 2},
            ).status_code
            == 200
        )

    def logged() -> bool:
        text = "".join(p.read_text(errors="replace") for p in main_app["logs"].rglob("*.log"))
        return any(json.loads(ln).get("request_id") == "rid-log-7" for ln in text.splitlines() if ln.startswith("{"))

    wait_until(logged, 120, "the request id in the replica logs", 0.5)
    for p in main_app["logs"].rglob("*"):
        if p.is_file():
            assert KEY not in p.read_text(errors="replace"), p


def test_status_command_lists_deployments(main_app, capsys):
    from modelfleet.cli import main

    assert main(["status", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    mine = {r["deployment"]: r for r in rows if r["app"] == "main"}
    assert set(mine) == {"ingress", "model-tiny", "model-tiny-path"}
    assert all(r["status"] == "HEALTHY" and r["running"] == 1 for r in mine.values())


def test_generate_command_completes_and_streams_greedily(main_app, capsys, monkeypatch):
    from modelfleet.cli import main

    monkeypatch.setenv("MF_TEST_GENERATE_KEY", KEY)
    args = [
        PROBE,
        "--url",
        main_app["url"],
        "--model",
        "tiny",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--api-key-env",
        "MF_TEST_GENERATE_KEY",
    ]
    assert main(["generate", *args]) == 0
    out = capsys.readouterr()
    assert out.out == PROBE + main_app["answers"]["v1"] + "\n"
    assert "8 completion tokens, finish_reason=length" in out.err
    assert main(["generate", *args, "--stream"]) == 0
    assert capsys.readouterr().out == PROBE + main_app["answers"]["v1"] + "\n"  # the same text, in pieces
    monkeypatch.setenv("MF_TEST_GENERATE_KEY", "sk-wrong")
    assert main(["generate", *args]) == 1
    assert "401" in capsys.readouterr().err


# ---------------------------------------------------------------- autoscaling


def test_autoscaling_up_under_burst_and_back_down(serve_up, registry_dir):
    from modelfleet.serve.operations import status

    storage, _ = registry_dir
    _deploy(
        storage,
        "scale",
        [
            _model(
                "tiny",
                "tiny",
                batching={"max_batch_size": 2},
                max_ongoing_requests=2,
                autoscaling={
                    "min_replicas": 1,
                    "initial_replicas": 1,
                    "max_replicas": 2,
                    "target_ongoing_requests": 1,
                    "upscale_delay_s": 0.5,
                    "downscale_delay_s": 2,
                    "metrics_interval_s": 0.5,
                    "look_back_period_s": 2,
                },
            )
        ],
    )
    url = f"{BASE}/scale"

    def running() -> int:
        return next(r["running"] for r in status() if r["app"] == "scale" and r["deployment"] == "model-tiny")

    try:
        assert running() == 1
        stop, failures, sent = threading.Event(), [], [0]

        def client() -> None:
            with httpx.Client(timeout=60) as c:
                for _ in range(300):  # bounded even if the stop signal never came
                    if stop.is_set():
                        return
                    r = c.post(f"{url}/v1/completions", json={"prompt": PROBE, "max_tokens": 48})
                    sent[0] += 1
                    if r.status_code != 200:
                        failures.append((r.status_code, r.text[:300]))

        threads = [threading.Thread(target=client, daemon=True) for _ in range(6)]
        for t in threads:
            t.start()
        try:
            peak = wait_until(lambda: running() >= 2 and running(), 90, "a second replica under load")
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        assert peak >= 2 and not failures, (peak, failures)
        wait_until(lambda: running() == 1, 90, "scale-down to one replica after the load stopped")
    finally:
        serve_up.delete("scale")


# ---------------------------------------------------------------- zero-downtime update


def test_a_model_scaled_to_zero_sleeps_through_readiness_probes_then_cold_starts_and_sleeps_again(
    serve_up, registry_dir
):
    """A two-model app (the Python front) whose second model scales to zero and starts with none:
    readiness answers ok at once without waking it (asking a sleeping model would queue the
    call and start a replica: the probe would hang for a cold start, and a probe every few
    seconds would keep the model awake for ever); its first request cold-starts it and gets its
    greedy answer; with the load gone it goes back to zero replicas."""
    from modelfleet.serve.operations import status

    storage, answers = registry_dir
    zero = {
        "min_replicas": 0,
        "initial_replicas": 0,
        "max_replicas": 1,
        "target_ongoing_requests": 1,
        "upscale_delay_s": 0,
        "downscale_delay_s": 1,
        "downscale_to_zero_delay_s": 2,
        "metrics_interval_s": 0.5,
        "look_back_period_s": 1,
    }
    _deploy(storage, "sleepy", [_model("awake", "tiny@v1"), _model("sleeper", "tiny@v2", autoscaling=zero)])
    url = f"{BASE}/sleepy"

    def replicas() -> int:
        return sum(
            sum(r["replicas"].values()) for r in status() if r["app"] == "sleepy" and r["deployment"] == "model-sleeper"
        )

    try:
        assert replicas() == 0
        with httpx.Client(timeout=60) as c:
            # The front's first probe asks its models (later ones reuse the answer for 2 s).
            t0 = time.monotonic()
            r = c.get(f"{url}/healthz")
            took = time.monotonic() - t0
            assert r.status_code == 200 and r.json() == {"status": "ok"}, r.text
            assert took < 2, f"the readiness probe took {took:.1f} s: it waited on the sleeping model"
            assert replicas() == 0, "readiness probes woke the model that scales to zero"
            t0 = time.monotonic()
            r = c.post(
                f"{url}/v1/completions", json={"model": "sleeper", "prompt": PROBE, "max_tokens": 8, "temperature": 0}
            )
            cold = time.monotonic() - t0
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == answers["v2"]
        assert replicas() == 1
        t0 = time.monotonic()
        wait_until(lambda: replicas() == 0, 90, "the idle model back at zero replicas", 0.5)
        print(
            f"\n[scale-to-zero] cold start answered in {cold:.1f} s; back to zero {time.monotonic() - t0:.1f} s after"
        )
        assert httpx.get(f"{url}/healthz", timeout=30).json() == {"status": "ok"}
    finally:
        serve_up.delete("sleepy")


def test_deploy_swaps_weights_with_zero_failed_requests(serve_up, registry_dir):
    from modelfleet.cli import main

    storage, answers = registry_dir
    _deploy(storage, "upd", [_model("tiny", "tiny@v1")])
    url = f"{BASE}/upd"
    stop, results = threading.Event(), []

    def client(stream: bool) -> None:
        with httpx.Client(timeout=60) as c:
            for _ in range(3000):  # bounded
                if stop.is_set():
                    return
                try:
                    r = c.post(
                        f"{url}/v1/completions",
                        json={"prompt": PROBE, "max_tokens": 8, "temperature": 0, "stream": stream},
                    )
                    text = (
                        "".join(e["choices"][0]["text"] for e in iter_sse(iter(r.text.splitlines())) if e["choices"])
                        if stream and r.status_code == 200
                        else r.json()["choices"][0]["text"]
                        if r.status_code == 200
                        else r.text
                    )
                    results.append((r.status_code, text, time.monotonic()))
                except httpx.HTTPError as e:
                    results.append((0, repr(e), time.monotonic()))

    threads = [threading.Thread(target=client, args=(s,), daemon=True) for s in (False, False, True)]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: len(results) >= 5, 60, "5 answers from the old weights", 0.05)
        t0 = time.monotonic()
        assert main(["deploy", "tiny", "--artifact", "v2", "--app", "upd"]) == 0
        switched = time.monotonic()
        print(f"deploy took {switched - t0:.1f} s; {len(results)} requests so far")
        wait_until(lambda: sum(1 for _, _, t in results if t > switched) >= 10, 60, "10 answers after the switch", 0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        serve_up.delete("upd")
    failed = [r for r in results if r[0] != 200]
    assert not failed, failed[:5]
    texts = [t for _, t, _ in results]
    assert set(texts) <= {answers["v1"], answers["v2"]}, set(texts)
    assert texts[0] == answers["v1"] and answers["v2"] in texts
    assert all(t == answers["v2"] for _, t, ts in results if ts > switched + 1), "old weights after the switch"


# ---------------------------------------------------------------- one hop


def test_a_single_model_app_is_one_non_python_hop_from_the_replica_that_decodes(serve_up, registry_dir):
    """Client -> HAProxy -> the decoding replica: the process listening on the Serve port is the
    HAProxy binary (not Python), the only processes connected to the answering replica's HTTP port
    while it streams are HAProxy's, and that replica is also the app's HTTP front (ingress pid ==
    replica pid)."""
    import psutil

    storage, answers = registry_dir
    _deploy(storage, "hop", [_model("tiny", "tiny@v1")])
    url = f"{BASE}/hop"
    try:
        with httpx.Client(timeout=60) as c:
            r = c.post(f"{url}/v1/completions", json={"prompt": PROBE, "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == answers["v1"]
            replica = int(r.headers["x-modelfleet-replica-pid"])
            assert int(r.headers["x-modelfleet-ingress-pid"]) == replica  # no ingress deployment between
            listeners = {
                k.pid for k in psutil.net_connections("tcp") if k.status == psutil.CONN_LISTEN and k.laddr.port == PORT
            }
            assert len(listeners) == 1, listeners
            front = psutil.Process(listeners.pop())
            exe = Path(front.exe()).name  # the binary itself, not an interpreter running a script
            assert front.name() == exe == "haproxy", (front.name(), front.exe(), front.cmdline()[:2])
            front_is = f"{front.name()} (pid {front.pid}, {front.exe()})"  # HAProxy may reload later
            # The replica's HTTP listener: Serve binds it on http_options.host (127.0.0.1); its
            # other listeners (Ray's worker RPC, on every interface) are what Ray's own processes use.
            replica_listens = {
                (k.laddr.ip, k.laddr.port)
                for k in psutil.Process(replica).net_connections("tcp")
                if k.status == psutil.CONN_LISTEN and k.laddr.ip == "127.0.0.1"
            }

            def to_replica(conn) -> bool:
                return (conn.raddr.ip, conn.raddr.port) in replica_listens

            def peer_names() -> set[str]:
                names = set()
                for k in psutil.net_connections("tcp"):
                    if k.raddr and k.status == psutil.CONN_ESTABLISHED and k.pid is not None and to_replica(k):
                        try:
                            names.add(psutil.Process(k.pid).name())
                        except psutil.NoSuchProcess:
                            pass  # a process that just ended (an HAProxy reloaded out)
                return names

            def peers_during_a_stream() -> set[str]:
                # While a stream is open, HAProxy holds a connection to a port the replica listens on.
                with c.stream(
                    "POST", f"{url}/v1/completions", json={"prompt": PROBE, "max_tokens": 100, "stream": True}
                ) as s:
                    assert s.status_code == 200 and int(s.headers["x-modelfleet-replica-pid"]) == replica
                    lines = s.iter_lines()
                    next(lines)
                    seen = peer_names()
                    assert "data: [DONE]" in list(lines)
                return seen

            # Who is connected to the replica's HTTP port: only HAProxy. Polled, bounded: for the first
            # seconds after deploy, until HAProxy's reload lists the new replica and it passes a health
            # check, HAProxy sends to its backup server, Serve's proxy, which reaches the replica over
            # Ray's RPC port (no connection to the HTTP port at all; seen in CI). Once direct, only
            # HAProxy is there.
            peers = wait_until(
                peers_during_a_stream, 30, f"a process connected to the replica at {sorted(replica_listens)}"
            )
            assert peers == {"haproxy"}, peers
            # The decoding runs in the replica's engine core child: its CPU time grows with the
            # tokens generated, the replica's (HTTP, tokenizing, one wake-up per step) far less.
            cores = engine_core_pids(replica)
            assert len(cores) == 1, cores
            procs = (psutil.Process(replica), psutil.Process(cores[0]))
            before = [sum(p.cpu_times()[:2]) for p in procs]
            for _ in range(6):
                r = c.post(f"{url}/v1/completions", json={"prompt": PROBE, "max_tokens": 100, "temperature": 0})
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 100, r.text
            d_replica, d_core = (sum(p.cpu_times()[:2]) - b for p, b in zip(procs, before, strict=True))
            assert d_core > 2 * d_replica, (d_core, d_replica)
        print(
            f"\n[one-hop] client -> {front_is} -> replica pid {replica} "
            f"on {sorted(replica_listens)}, connected to by {sorted(peers)} only; 600 tokens cost its engine "
            f"core (pid {cores[0]}) {d_core:.2f} s of CPU and the replica {d_replica:.2f} s"
        )
    finally:
        serve_up.delete("hop")


def _loopback_ports(pid: int) -> list[int]:
    """The HTTP ports a Serve replica listens on (Serve binds them on 127.0.0.1)."""
    import psutil

    conns = psutil.Process(pid).net_connections("tcp")
    return [k.laddr.port for k in conns if k.status == psutil.CONN_LISTEN and k.laddr.ip == "127.0.0.1"]


def test_the_router_keeps_each_prefix_on_its_warm_replica_and_survives_a_router_down(serve_up, registry_dir):
    """Cache-aware routing through HAProxy's ingress request router (serve/route_front.py): two
    replicas, four customers with their own 80-token prefix. The first turns, sent at once, spread
    over both replicas (ties spread); every follow-up lands on its customer's replica with the
    whole prefix cached (HAProxy's leastconn would send about half elsewhere, cold). Then one of
    the two router replicas is killed: every request is still answered (HAProxy tries the next)."""
    import os
    import signal

    storage, _ = registry_dir
    _deploy(
        storage,
        "route",
        [_model("tiny", "tiny@v1", num_replicas=2, ray_actor_options={"num_cpus": 0.4})],
        router={"enabled": True},
    )
    url = f"{BASE}/route/v1/completions"
    prefixes = [f"customer {c}: ".ljust(80, "abcdefghij"[c]) for c in range(4)]

    def turn(c: httpx.Client, who: int, n: int) -> tuple[int, int, str]:
        r = c.post(url, json={"prompt": f"{prefixes[who]}q{n}", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        return int(r.headers["x-modelfleet-replica-pid"]), cached, r.headers.get("x-modelfleet-route", "")

    try:
        with httpx.Client(timeout=60) as c:
            # Until HAProxy's reloads after the deploy list both routers and both replicas, it
            # balances by leastconn (Ray's Lua skips an app whose routers it does not know yet) or
            # recovers a pick of a replica it does not know through Serve's fallback proxy.
            seen: set[tuple[str, str]] = set()

            def both_routers_and_replicas() -> bool:
                r = c.post(url, json={"prompt": f"warm-up {len(seen)}", "max_tokens": 1})
                route = r.headers.get("x-modelfleet-route", "")
                if route:
                    seen.add((route.rsplit("router=", 1)[-1], r.headers["x-modelfleet-replica-pid"]))
                return len({a for a, _ in seen}) == 2 and len({b for _, b in seen}) == 2

            wait_until(both_routers_and_replicas, 60, "HAProxy asking both routers, and both replicas picked")
            home: dict[int, int] = {}

            def first(who: int) -> None:
                home[who] = turn(c, who, 0)[0]

            threads = [threading.Thread(target=first, args=(w,)) for w in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert len(home) == 4 and len(set(home.values())) == 2, home
            # Each router replica learns the other's placements from the replicas' publications
            # (every 0.5 s): wait until both routers, asked directly, send every customer's next
            # turn to its warm replica.
            routers = serve_replica_pids("route", "router-tiny", os.getpid())
            assert len(routers) == 2, routers
            ports = [p for pid in routers for p in _loopback_ports(pid)]

            def routes(port: int) -> set[str]:
                out = set()
                for who in range(4):
                    body = {"prompt": f"{prefixes[who]}q9", "max_tokens": 4}
                    r = c.post(f"http://127.0.0.1:{port}/internal/route", json=body)
                    route = r.json()["request_headers"]["x-serve-router-route"] if r.status_code == 200 else r.text
                    out.add(route.split("; router=")[0])
                return out

            wait_until(lambda: all(routes(p) == {"prefix; cached=80"} for p in ports), 30, "both routers warm")
            for n in (1, 2):
                for who in range(4):
                    pid, cached, route = turn(c, who, n)
                    assert (pid, cached, route.split("; router=")[0]) == (home[who], 80, "prefix; cached=80"), (
                        who,
                        n,
                        pid,
                        route,
                        home,
                    )
            os.kill(routers[0], signal.SIGKILL)
            for n in range(3, 13):
                turn(c, n % 4, n)
    finally:
        serve_up.delete("route")


@pytest.fixture(scope="module")
def long_app(serve_up, tmp_path_factory):
    """App "long": a random tiny GPT with a 1,024-token context and 8 layers, so a request lasts
    seconds and one decode step takes tens of ms (the tiny test model finishes its whole context in
    a tenth of a second, too fast for a client's clock to see steps)."""
    import torch

    from modelfleet import registry
    from modelfleet.families import build_model
    from modelfleet.presets import load_config
    from modelfleet.train.export import write_artifact_dir

    storage = tmp_path_factory.mktemp("long")
    cfg = load_config(
        preset="tiny",
        overrides=[f"storage.path={storage}", "model.block_size=1024", "model.n_layer=8", "model.n_embd=256"],
    )
    torch.manual_seed(0)
    registry.publish(str(storage), "long", write_artifact_dir(build_model(cfg.model).eval(), cfg, {}), consume=True)
    _deploy(storage, "long", [_model("long", "long@v1")])
    yield f"{BASE}/long"
    serve_up.delete("long")


def test_a_short_request_joins_a_running_stream_and_finishes_first_by_the_clients_clock(long_app):
    """Continuous batching seen from outside, by the client's clock only (no self-reported
    header): a 4-token request sent while a 600-token stream decodes completes long before the
    stream ends, and the stream keeps its pace while the short one runs: the median of its
    inter-token gaps in that window stays below 2x the stream's median (the short request joined
    the running batch). A static batcher fails both: the short request waits for the stream, or
    the stream stops for it (one gap as long as the short request). Single gaps are not bounded:
    on 2 cores they jitter by tens of ms around a ~7 ms median (45 ms seen on an idle machine,
    the client's own threads sharing one GIL)."""
    arrivals: list[float] = []
    done: dict[str, float] = {}

    def stream() -> None:
        body = {"prompt": PROBE, "max_tokens": 600, "temperature": 0, "stream": True}
        with httpx.Client(timeout=120) as c, c.stream("POST", f"{long_app}/v1/completions", json=body) as s:
            assert s.status_code == 200
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.monotonic())
        done["stream"] = time.monotonic()

    th = threading.Thread(target=stream)
    th.start()
    try:
        wait_until(lambda: len(arrivals) >= 60 or not th.is_alive(), 60, "the long stream decoding", 0.01)
        t_short = time.monotonic()
        with httpx.Client(timeout=120) as c:
            r = c.post(f"{long_app}/v1/completions", json={"prompt": "x = ", "max_tokens": 4, "temperature": 0})
        done["short"] = time.monotonic()
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
    finally:
        th.join(timeout=120)
    assert "stream" in done and len(arrivals) >= 300, (len(arrivals), done)
    assert done["short"] < done["stream"], "the short request waited for the stream to end"
    # The stream's own pace just before the short request (its last 40 gaps): under the other
    # lane's load the machine's speed drifts over seconds, so the whole stream's median is not
    # the pace the short request's window should be compared with.
    gaps = [(b - a, b) for a, b in zip(arrivals, arrivals[1:])]
    before = [g for g, b in gaps if b < t_short][-40:]
    median = sorted(before)[len(before) // 2]
    during = [g for g, b in gaps if b >= t_short and b - g <= done["short"]]
    assert during, "no stream token arrived while the short request ran"
    print(
        f"\n[continuous batching] short request {1000 * (done['short'] - t_short):.0f} ms, during it "
        f"{len(during)} stream gaps, median {1000 * sorted(during)[len(during) // 2]:.1f} max {1000 * max(during):.1f} ms; "
        f"median gap before it {1000 * median:.1f} ms, "
        f"{len(arrivals)} events, ended {done['stream'] - done['short']:.1f} s after the short one"
    )
    typical = sorted(during)[len(during) // 2]
    assert typical < 2 * median, (typical, median, during)


def test_clients_that_go_away_free_their_sequences_in_the_engine_core(long_app):
    """A streaming client that closes after its first event and a non-streaming one that closes its
    connection while the replica decodes it (one-hop: HAProxy -> the replica): each request is cancelled in the engine core
    (the replica counts it) and the core's batch is empty within 2 s, long before the 900 tokens
    each asked for would have been decoded, though both send ``x-request-disconnect-disabled: ?1``
    (which Ray's direct ingress honours; the HAProxy edge drops it)."""
    url = long_app
    body = {"prompt": PROBE, "max_tokens": 900, "temperature": 0}
    # Ray's direct ingress would not cancel a request whose client sends this; the edge drops it.
    keep_going = {"x-request-disconnect-disabled": "?1"}

    def card() -> dict:
        return httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]

    assert card()["cancelled_requests"] == 0
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, headers=keep_going) as s:
            assert s.status_code == 200
            assert next(s.iter_lines()).startswith("data: ")  # decoding has started; then we leave
    wait_until(
        lambda: (k := card())["cancelled_requests"] == 1 and k["running_sequences"] == 0,
        2,
        "the closed stream cancelled in the engine core",
        0.05,
    )
    # Non-streaming, on a raw connection: closed once the replica reports it decoding.
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", PORT), timeout=30)
    try:
        sock.sendall(
            b"POST /long/v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + b"x-request-disconnect-disabled: ?1\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        wait_until(lambda: card()["running_sequences"] == 1, 30, "the non-streaming request decoding", 0.05)
    finally:
        sock.close()
    t0 = time.monotonic()
    last: list[dict] = []

    def cancelled_and_idle() -> dict | None:
        last[:] = [card()]
        return last[0] if last[0]["cancelled_requests"] == 2 and last[0]["running_sequences"] == 0 else None

    try:
        seen = wait_until(cancelled_and_idle, 2, "both requests cancelled and the engine core's batch empty", 0.05)
    except TimeoutError as e:
        raise AssertionError(f"{e}; the replica last said {last}") from None
    print(
        f"\n[disconnect] a closed stream, then a closed non-streaming connection: cancelled {seen['cancelled_requests']}, "
        f"running {seen['running_sequences']}, {time.monotonic() - t0:.2f} s after the second client left"
    )


# ---------------------------------------------------------------- fail-closed auth


def test_a_key_only_in_this_shell_is_caught_and_an_exposed_app_without_one_refused(serve_up, registry_dir, monkeypatch):
    """The front reads its key where the cluster runs: a key exported here after the cluster
    started is not in the front, and deploy says so instead of reporting RUNNING. Without any key,
    a non-loopback serve.host is refused unless insecure_no_auth says it is meant."""
    from modelfleet.errors import ConfigError
    from modelfleet.serve.operations import verify_auth
    from modelfleet.serve.protocol import AuthState

    storage, _ = registry_dir
    monkeypatch.setenv("MF_SHELL_ONLY_KEY", "sk-only-in-this-shell")
    try:
        with pytest.raises(ConfigError, match="holds no API key than 'MF_SHELL_ONLY_KEY' in this shell") as e:
            _deploy(storage, "shellkey", [_model("tiny", "tiny@v1")], api_key_env="MF_SHELL_ONLY_KEY")
        assert "sk-only-in-this-shell" not in str(e.value)
    finally:
        serve_up.delete("shellkey")
    monkeypatch.delenv("MF_SHELL_ONLY_KEY")
    with pytest.raises(ConfigError, match="no API key is configured.*--insecure-no-auth"):
        _deploy(storage, "exposed", [_model("tiny", "tiny@v1")], api_key_env="MF_SHELL_ONLY_KEY", host="0.0.0.0")
    serve_up.delete("exposed")
    try:
        cfg = _deploy(
            storage,
            "meant",
            [_model("tiny", "tiny@v1")],
            api_key_env="MF_SHELL_ONLY_KEY",
            host="0.0.0.0",
            insecure_no_auth=True,
        )
        assert verify_auth(cfg) == AuthState(auth=False, fingerprint=None)
    finally:
        serve_up.delete("meant")
