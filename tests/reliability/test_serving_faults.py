"""Serving faults under bounded load, over real HTTP on 127.0.0.1:8300: a replica killed, a replica
hung (its health check fails), a scale-down, and overload. Clients are the project's own
``modelfleet.serve.client.Client`` (retries with backoff) unless a drill must show that nothing
was dropped even without retries. Figures are printed (``pytest -s``) for docs/reliability.md.

The model update drain (rolling update under load, zero failed requests) is
tests/integration/test_serving.py::test_deploy_swaps_weights_with_zero_failed_requests.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import httpx

from helpers import deploy_app, engine_core_pids, pid_alive, run_load, running_replicas, serve_replica_pids, wait_until
from modelfleet.serve.client import Client, iter_sse

PORT = 8300
PROBE = "def main("
ME = os.getpid()  # Ray's workers descend from this process: drills only ever touch those


def _model(**kw) -> dict:
    return {"name": "tiny", "artifact": "tiny@v1", "ray_actor_options": {"num_cpus": 0.5}, **kw}


def _replicas(app: str) -> list[int]:
    return serve_replica_pids(app, "model-tiny", ME)


def _replaced(app: str, old: set[int], want: int) -> bool:
    """Serve reports ``want`` RUNNING replicas and at least one of their processes is new."""
    pids = set(_replicas(app))
    return running_replicas(app).get("RUNNING", 0) == want and len(pids) >= want and bool(pids - old)


def test_kill_one_of_two_replicas_under_load_loses_no_request(serve_8300, tiny_registry):
    """500 greedy requests at concurrency 8; one of the 2 replicas is frozen (SIGSTOP) after 100
    and SIGKILLed once a request is stuck on it (unanswered while 8 later ones were answered by the
    other replica: in flight on it, by condition). HAProxy replays only what no replica received
    (retry-on conn-failure): the requests the dead replica held reach the client as the proxy's 500
    (Ray normalises HAProxy's 502/503/504) and the project client retries them, so "0 lost" is the
    client's retries (retried >= 1): zero failures, every answer right, and Serve has a new replica
    RUNNING within 30 s."""
    storage, answers = tiny_registry
    url = deploy_app(storage, PORT, "kill", [_model(num_replicas=2)])
    n, drill = 500, {}
    try:
        before = set(wait_until(lambda: len(_replicas("kill")) == 2 and _replicas("kill"), 30, "2 replica processes"))

        with Client(url, max_retries=6, backoff_s=0.2, max_backoff_s=2.0, timeout_s=60) as client:
            stop_killer = threading.Event()

            def killer() -> None:
                wait_until(lambda: stop_killer.is_set() or progress["sent"] >= n // 5, 120, "100 requests sent")
                if stop_killer.is_set():
                    return
                victim = sorted(before)[0]
                drill["cores"] = engine_core_pids(victim)  # its engine core must not outlive it
                # Freeze the victim first so the router keeps handing it requests it never answers,
                # then kill it once one is stuck there: a request sent before the freeze is still
                # unanswered while 8 more have been answered (by the other replica). Bounded: after
                # 30 s it is killed anyway, and `retried >= 1` below says whether it hit a request.
                os.kill(victim, signal.SIGSTOP)
                try:
                    wait_until(stuck, 30, "a request stuck on the frozen replica", 0.05)
                    drill["stuck"] = True
                except TimeoutError:
                    pass
                with progress["lock"]:
                    drill["in_flight"] = len(progress["pending"])
                os.kill(victim, signal.SIGKILL)
                t_kill = time.monotonic()
                drill.update(victim=victim, at_request=progress["sent"])
                wait_until(lambda: not any(pid_alive(p) for p in drill["cores"]), 5, "the engine core to exit", 0.05)
                drill["core_gone_s"] = time.monotonic() - t_kill
                wait_until(lambda: _replaced("kill", before, 2), 60, "a replacement replica RUNNING", 0.1)
                drill["replaced_s"] = time.monotonic() - t_kill

            progress: dict = {
                "sent": 0,
                "done": 0,
                "pending": {},
                "answered": [],  # read by the killer thread
                "lock": threading.Lock(),
            }

            def stuck() -> bool:
                """A request is still unanswered while 8 requests sent after it have been answered
                (by the other replica): it is held by the frozen one."""
                with progress["lock"]:
                    oldest = min(progress["pending"], default=None)
                    return oldest is not None and sum(1 for k in progress["answered"] if k > oldest) >= 8

            th = threading.Thread(target=killer, daemon=True)
            th.start()
            t0 = time.monotonic()
            res = _load_with_progress(client, n, 8, progress, prompt=PROBE, max_tokens=8, temperature=0)
            stop_killer.set()
            th.join(timeout=90)
            retried = client.retried
    finally:
        serve_8300.delete("kill")
    print(
        f"\n[kill-replica] sent={res.sent} ok={res.ok} failed={len(res.failed)} retried={retried} "
        f"killed pid {drill.get('victim')} after {drill.get('at_request')} requests with "
        f"{drill.get('in_flight')} in flight; its engine core {drill.get('cores')} gone after "
        f"{drill.get('core_gone_s', float('nan')):.2f} s; replacement RUNNING "
        f"after {drill.get('replaced_s', float('nan')):.1f} s; load took {time.monotonic() - t0:.1f} s"
    )
    assert drill.get("victim"), "no replica was killed: the drill did not run"
    assert len(drill["cores"]) == 1 and drill.get("core_gone_s") is not None, drill  # no orphaned core
    assert res.sent == n and not res.failed, res.failed[:5]
    assert res.texts == {answers["v1"]: n}, res.texts  # retried answers are the right ones too
    assert drill.get("stuck"), "no request was held by the frozen replica: the kill hit nothing in flight"
    assert retried >= 1, "no client retry: the held request was replayed by HAProxy (retry-on beyond conn-failure?)"
    assert drill["replaced_s"] <= 30, drill


def _load_with_progress(client: Client, n: int, concurrency: int, progress: dict, **body):
    """run_load, counting sent and answered requests in ``progress`` for the killer thread, with
    the send time of each request still in flight (``pending``)."""
    real, lock = client.complete, progress["lock"]

    def counted(**kw):
        with lock:
            progress["sent"] += 1
            key = progress["sent"]
            progress["pending"][key] = time.monotonic()
        try:
            return real(**kw)
        finally:
            with lock:
                del progress["pending"][key]
                progress["answered"].append(key)
                progress["done"] += 1

    client.complete = counted  # type: ignore[method-assign]
    try:
        return run_load(client, n, concurrency, deadline_s=150, **body)
    finally:
        client.complete = real  # type: ignore[method-assign]


def test_hung_replica_fails_its_health_check_and_is_replaced(serve_8300, tiny_registry):
    """SIGSTOP one of 2 replicas: its check_health cannot answer within health_check_timeout_s,
    Serve marks it unhealthy, kills it and starts a new one; a light load meanwhile (project
    client, retries) loses nothing."""
    storage, answers = tiny_registry
    url = deploy_app(
        storage,
        PORT,
        "hc",
        [_model(num_replicas=2, health_check_period_s=1, health_check_timeout_s=2, graceful_shutdown_timeout_s=2)],
    )
    victim = None
    try:
        before = set(wait_until(lambda: len(_replicas("hc")) == 2 and _replicas("hc"), 30, "2 replica processes"))
        victim = sorted(before)[0]
        stop = threading.Event()
        with Client(url, max_retries=8, backoff_s=0.2, max_backoff_s=2.0, timeout_s=60) as client:
            box = {}
            th = threading.Thread(
                target=lambda: box.update(
                    res=run_load(client, 400, 2, deadline_s=90, stop=stop, prompt=PROBE, max_tokens=8, temperature=0)
                ),
                daemon=True,
            )
            th.start()
            os.kill(victim, signal.SIGSTOP)
            t_stop = time.monotonic()
            try:
                wait_until(
                    lambda: _replaced("hc", before, 2) and not pid_alive(victim),
                    60,
                    "the hung replica killed and a new one RUNNING",
                    0.1,
                )
                replaced_s = time.monotonic() - t_stop
            finally:
                stop.set()
                th.join(timeout=90)
            res, retried = box["res"], client.retried
    finally:
        if victim and pid_alive(victim):
            os.kill(victim, signal.SIGCONT)  # let Serve finish it off normally
        serve_8300.delete("hc")
    print(
        f"\n[hung-replica] sent={res.sent} ok={res.ok} failed={len(res.failed)} retried={retried}; "
        f"replaced (hung pid gone, new replica RUNNING) {replaced_s:.1f} s after SIGSTOP"
    )
    assert res.sent > 0 and not res.failed, res.failed[:5]
    assert set(res.texts) == {answers["v1"]}
    assert replaced_s <= 30


def test_scale_down_drains_in_flight_requests(serve_8300, tiny_registry):
    """Autoscaling 2 -> 1 under steady low load from plain httpx clients (no retries, so a dropped
    request would show): every request succeeds, including those in flight on the replica being
    stopped when Serve marked it STOPPING."""
    storage, _ = tiny_registry
    url = deploy_app(
        storage,
        PORT,
        "drain",
        [
            _model(
                # 2 requests per replica at most, 6 clients: both replicas are always busy, so the one Serve
                # stops has requests in flight; 6 ongoing < target 8 makes the autoscaler want 1 replica.
                max_ongoing_requests=2,
                batching={"max_batch_size": 2},
                graceful_shutdown_timeout_s=30,
                autoscaling={
                    "min_replicas": 1,
                    "initial_replicas": 2,
                    "max_replicas": 2,
                    "target_ongoing_requests": 8,
                    "upscale_delay_s": 60,
                    "downscale_delay_s": 6,
                    "metrics_interval_s": 0.5,
                    "look_back_period_s": 1,
                },
            )
        ],
    )
    results: list[tuple[int, str, float, float, str]] = []  # (status, replica pid, start, end, detail)
    stop = threading.Event()

    def client(i: int) -> None:
        with httpx.Client(timeout=60) as c:
            for k in range(400):  # bounded even if stop never came
                if stop.is_set():
                    return
                t0 = time.monotonic()
                try:
                    with c.stream(
                        "POST",
                        f"{url}/v1/completions",
                        json={"prompt": f"{i}{k} {PROBE}", "max_tokens": 64, "stream": True, "seed": k},
                    ) as r:
                        if r.status_code != 200:
                            r.read()
                        events = list(iter_sse(r.iter_lines())) if r.status_code == 200 else []
                        done = (
                            bool(events)
                            and events[-1]["choices"][0]["finish_reason"] in ("length", "stop")
                            and not any("error" in e for e in events)
                        )
                        results.append(
                            (
                                r.status_code if done else -r.status_code,
                                r.headers.get("x-modelfleet-replica-pid", "?"),
                                t0,
                                time.monotonic(),
                                "" if done else r.text[-300:],
                            )
                        )
                except httpx.HTTPError as e:
                    results.append((0, "?", t0, time.monotonic(), repr(e)))

    pids0 = set(wait_until(lambda: len(_replicas("drain")) == 2 and _replicas("drain"), 30, "2 replica processes"))
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(6)]
    try:
        for t in threads:
            t.start()
        t_stopping = wait_until(
            lambda: running_replicas("drain").get("STOPPING", 0) and time.monotonic(),
            90,
            "Serve to stop one replica",
            0.05,
        )
        wait_until(
            lambda: running_replicas("drain") == {"RUNNING": 1} and len(_replicas("drain")) == 1,
            60,
            "the stopped replica gone",
            0.1,
        )
        t_gone, stopped = time.monotonic(), pids0 - set(_replicas("drain"))
        n_after = len(results)
        wait_until(lambda: len(results) >= n_after + 5, 30, "requests after the scale-down")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        serve_8300.delete("drain")
    assert len(stopped) == 1, (pids0, stopped)
    in_flight = [r for r in results if r[1] == str(next(iter(stopped))) and r[2] < t_stopping < r[3]]
    failed = [r for r in results if r[0] != 200]
    print(
        f"\n[scale-down] sent={len(results)} failed={len(failed)} retried=0 (plain httpx); "
        f"{len(in_flight)} in flight on the stopped replica when it went STOPPING, all completed; "
        f"drained and gone {t_gone - t_stopping:.1f} s after STOPPING"
    )
    assert not failed, failed[:3]
    assert in_flight, "no request was in flight on the stopped replica: the drill proved nothing"
    assert all(r[0] == 200 for r in in_flight)


async def _burst(url: str, n: int, max_tokens: int) -> list[tuple[int, float, httpx.Response]]:
    async def one(c: httpx.AsyncClient, i: int) -> tuple[int, float, httpx.Response]:
        t0 = time.perf_counter()
        r = await c.post(f"{url}/v1/completions", json={"prompt": f"{i} {PROBE}", "max_tokens": max_tokens, "seed": i})
        return r.status_code, time.perf_counter() - t0, r

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=n)) as c:
        return await asyncio.gather(*(one(c, i) for i in range(n)))


def test_backpressure_answers_429_fast_and_recovers(serve_8300, tiny_registry):
    """One replica taking 2 requests and queueing 2: a burst of 24 gets fast 429s with Retry-After
    (each in under a second), service recovers as soon as the burst is over, and the project client
    turns the same overload into 24 answers by retrying."""
    storage, _ = tiny_registry
    url = deploy_app(
        storage,
        PORT,
        "bp",
        [
            _model(
                max_ongoing_requests=2,
                max_queued_requests=2,
                overload_status=429,
                retry_after_s=1,
                batching={"max_batch_size": 2},
            )
        ],
    )
    try:
        burst = asyncio.run(_burst(url, 24, 100))
        t_end = time.monotonic()
        with httpx.Client(timeout=60) as c:
            wait_until(
                lambda: c.post(f"{url}/v1/completions", json={"prompt": PROBE, "max_tokens": 4}).status_code == 200,
                30,
                "a 200 after the burst",
                0.05,
            )
        recovered_s = time.monotonic() - t_end
        with Client(url, max_retries=10, backoff_s=0.2, max_backoff_s=2.0) as client:
            res = run_load(client, 24, 24, deadline_s=120, prompt=PROBE, max_tokens=100)
            retried = client.retried
    finally:
        serve_8300.delete("bp")
    shed = [(lat, r) for code, lat, r in burst if code == 429]
    codes = sorted({code for code, _, _ in burst})
    print(
        f"\n[backpressure] burst of {len(burst)}: {len(shed)} shed with 429, slowest 429 in "
        f"{max(lat for lat, _ in shed):.3f} s; a 200 again {recovered_s:.2f} s after the burst; "
        f"with the project client: sent={res.sent} ok={res.ok} failed={len(res.failed)} retried={retried}"
    )
    assert set(codes) == {200, 429}, codes
    assert all(lat < 1.0 for lat, _ in shed), sorted(lat for lat, _ in shed)[-3:]
    assert all(r.headers["retry-after"] == "1" and "overloaded" in r.json()["error"]["message"] for _, r in shed)
    assert recovered_s < 5
    assert res.ok == 24 and not res.failed and retried >= 1, (res, retried)
