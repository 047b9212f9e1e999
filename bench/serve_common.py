"""Shared by the serving benchmarks: a tiny artifact, a bounded HTTP load generator, and the
plain uvicorn + FastAPI baseline started as a subprocess on the same cores."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from common import ROOT, median, pct

PROMPT = "def main(argv):\n    "
BODY = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0}


def publish_tiny(storage: str, name: str = "tiny", seed: int = 0) -> Any:
    """A randomly initialised tiny GPT in the registry under ``storage`` (no training needed:
    serving cost does not depend on the weights' values)."""
    import torch

    from modelfleet import registry
    from modelfleet.families import build_model
    from modelfleet.presets import load_config
    from modelfleet.train.export import write_artifact_dir

    cfg = load_config(preset="tiny", overrides=[f"storage.path={storage}"])
    torch.manual_seed(seed)
    model = build_model(cfg.model).eval()
    return model, registry.publish(storage, name, write_artifact_dir(model, cfg, {}), consume=True)


@dataclass
class Load:
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    replica_pids: list[tuple[float, str]] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)
    """``usage.completion_tokens`` of each 200 answer (only when ``load(..., tokens=True)``)."""
    sent: list[tuple[int, float]] = field(default_factory=list)
    """(index into ``bodies``, latency) of each answered request (only with ``bodies``)."""
    wall_s: float = 0.0

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    def summary(self) -> dict[str, float]:
        lat = self.latencies or [float("nan")]
        extra = (
            {
                "completion_tokens": sum(self.completion_tokens),
                "tokens_per_s": sum(self.completion_tokens) / self.wall_s if self.wall_s else 0.0,
            }
            if self.completion_tokens
            else {}
        )
        return {
            "requests": len(self.latencies),
            "ok": self.ok,
            "wall_s": self.wall_s,
            **extra,
            "requests_per_s": len(self.latencies) / self.wall_s if self.wall_s else 0.0,
            "p50_ms": 1e3 * median(lat),
            "p99_ms": 1e3 * pct(lat, 99),
            "mean_batch_size": (sum(self.batch_sizes) / len(self.batch_sizes)) if self.batch_sizes else 0.0,
        }


async def _load(
    url: str, n: int, conc: int, body: dict, timeout_s: float, warmup: int, bodies: list[dict] | None, tokens: bool
) -> Load:
    import httpx

    out = Load()
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=conc + 1)) as c:
        for _ in range(warmup):
            (await c.post(url, json=body)).raise_for_status()
        left = [n]
        deadline = time.perf_counter() + timeout_s  # every load is bounded in count and time

        async def worker() -> None:
            while left[0] > 0 and time.perf_counter() < deadline:
                i = n - left[0]  # closed loop: the next request goes out when one of this worker's returns
                left[0] -= 1
                t = time.perf_counter()
                try:
                    r = await c.post(url, json=bodies[i % len(bodies)] if bodies else body)
                    code = r.status_code
                except httpx.HTTPError:
                    code = 0
                    r = None
                out.latencies.append(time.perf_counter() - t)
                out.statuses[code] = out.statuses.get(code, 0) + 1
                if bodies:
                    out.sent.append((i % len(bodies), out.latencies[-1]))
                if r is not None and code == 200:
                    if tokens:
                        out.completion_tokens.append(r.json()["usage"]["completion_tokens"])
                    if "x-modelfleet-replica-pid" in r.headers:
                        out.replica_pids.append((time.perf_counter(), r.headers["x-modelfleet-replica-pid"]))
                    if "x-modelfleet-batch-size" in r.headers:
                        out.batch_sizes.append(int(r.headers["x-modelfleet-batch-size"]))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        out.wall_s = time.perf_counter() - t0
    return out


def load(
    url: str,
    n: int,
    conc: int,
    body: dict | None = None,
    *,
    timeout_s: float = 120,
    warmup: int = 3,
    bodies: list[dict] | None = None,
    tokens: bool = False,
) -> Load:
    """``n`` POSTs of ``body`` (or of ``bodies[i % len(bodies)]``, the i-th request sent) from
    ``conc`` closed-loop workers, stopped after ``timeout_s``; ``tokens`` reads each answer's
    ``usage.completion_tokens``. Warm-up requests send ``body``."""
    return asyncio.run(_load(url, n, conc, body or BODY, timeout_s, warmup, bodies, tokens))


class Uvicorn:
    """bench/uvicorn_baseline.py in a subprocess: the same artifact and continuous-batching engine
    behind plain FastAPI, one process, no Ray."""

    def __init__(self, artifact_dir: str, port: int, *, core: bool = False) -> None:
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "bench" / "uvicorn_baseline.py"),
                artifact_dir,
                "--port",
                str(port),
                *(["--core"] if core else []),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def __enter__(self) -> Uvicorn:
        import httpx

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"uvicorn baseline exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("uvicorn baseline did not answer /healthz within 60 s")

    def __exit__(self, *exc: Any) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def ray_start(env: dict[str, str] | None = None, num_cpus: int = 4) -> None:
    """A fresh local Ray whose processes inherit ``env`` (Serve reads its flags at start-up)."""
    import ray

    os.environ.update(env or {})
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")


def ray_stop(env: dict[str, str] | None = None) -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
        for k in env or {}:
            os.environ.pop(k, None)


def serve_app(storage: str, port: int, models: list[dict[str, Any]], app: str = "bench") -> str:
    from modelfleet.serve.operations import deploy

    deploy(
        {
            "port": port,
            "storage_path": storage,
            "app_name": app,
            "route_prefix": "/",
            "logging": {"enable_access_log": False, "log_level": "WARNING"},
            "models": models,
        }
    )
    return f"http://127.0.0.1:{port}"


def model_spec(name: str, artifact: str, **kw: Any) -> dict[str, Any]:
    return {
        "name": name,
        "artifact": artifact,
        "ray_actor_options": {"num_cpus": 1},
        "max_ongoing_requests": 64,
        "max_queued_requests": -1,
        **kw,
    }
