"""autoscale: from a load step to the first request answered by a new replica, and the cold start
of one replica (schedule, load weights, ready), measured on a scale-to-zero deployment. Target:
reaction <= upscale delay + metrics interval + cold start + 2 s; tiny model cold start <= 5 s.

    python bench/serve_autoscale.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from common import median, save
from serve_common import BODY, load, model_spec, publish_tiny, ray_start, ray_stop, serve_app

UPSCALE_DELAY_S = 1.0
METRICS_INTERVAL_S = 0.5


def _running(app: str, deployment: str) -> int:
    from ray import serve

    dep = serve.status().applications[app].deployments[deployment]
    return dict(dep.replica_states).get("RUNNING", 0) if dep.replica_states else 0


def cold_starts(url: str, app: str, n: int) -> list[float]:
    """Time of one request to a deployment at zero replicas: the replica's whole cold start."""
    from modelfleet.serve.operations import wait_for

    out = []
    for _ in range(n):
        wait_for(lambda: _running(app, "model-zero") == 0, 120, "model-zero to scale to zero", 0.2)
        t = time.perf_counter()
        r = load(url, 1, 1, {**BODY, "model": "zero", "max_tokens": 1}, warmup=0)
        assert r.ok == 1, f"cold request failed: {r.statuses}"
        out.append(time.perf_counter() - t)
    return out


def reaction(url: str, app: str, seconds: float) -> dict[str, float]:
    """Step from idle to concurrency 8; when did a response first come from a new replica?"""
    from modelfleet.serve.operations import wait_for

    wait_for(lambda: _running(app, "model-tiny") == 1, 120, "model-tiny to settle at 1 replica", 0.2)
    first = load(url, 2, 1, warmup=0).replica_pids
    old = {pid for _, pid in first}
    t0 = time.perf_counter()
    got = load(url, 100_000, 8, timeout_s=seconds, warmup=0)
    new = [(t, pid) for t, pid in got.replica_pids if pid not in old]
    return {
        "reaction_s": (new[0][0] - t0) if new else float("nan"),
        "replicas_seen": len({pid for _, pid in got.replica_pids}),
        "requests": len(got.latencies),
        "failed": len(got.latencies) - got.ok,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--port", type=int, default=8420)
    args = ap.parse_args()
    reps = 2 if args.quick else 4

    storage = tempfile.mkdtemp(prefix="mf-bench-scale-")
    publish_tiny(storage)
    auto = {
        "upscale_delay_s": UPSCALE_DELAY_S,
        "downscale_delay_s": 2.0,
        "metrics_interval_s": METRICS_INTERVAL_S,
        "look_back_period_s": 1.0,
        "target_ongoing_requests": 2,
    }
    ray_start(num_cpus=6)
    try:
        base = serve_app(
            storage,
            args.port,
            [
                model_spec("tiny", "tiny", autoscaling={**auto, "min_replicas": 1, "max_replicas": 2}),
                model_spec(
                    "zero",
                    "tiny",
                    autoscaling={
                        **auto,
                        "min_replicas": 0,
                        "initial_replicas": 0,
                        "max_replicas": 1,
                        "downscale_to_zero_delay_s": 1.0,
                    },
                ),
            ],
            app="scale",
        )
        url = f"{base}/v1/completions"
        colds = cold_starts(url, "scale", reps)
        reacts = [reaction(url, "scale", 20.0) for _ in range(reps)]
    finally:
        ray_stop()
    cold = median(colds)
    react = median([r["reaction_s"] for r in reacts])
    bound = UPSCALE_DELAY_S + METRICS_INTERVAL_S + cold + 2.0
    res = {
        "upscale_delay_s": UPSCALE_DELAY_S,
        "metrics_interval_s": METRICS_INTERVAL_S,
        "cold_start_s": colds,
        "cold_start_median_s": cold,
        "cold_start_target_s": 5.0,
        "reactions": reacts,
        "reaction_median_s": react,
        "reaction_target_s": bound,
    }
    print(f"cold start (scale from zero, first token answered): median {cold:.2f} s of {colds}")
    print(f"load step -> first answer from a new replica: median {react:.2f} s (target <= {bound:.2f} s)")
    print(f"-> {save('autoscale', {'model': 'tiny GPT, 1 CPU per replica', 'quick': args.quick, **res})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
