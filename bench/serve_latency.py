"""Serve latency and throughput for the tiny model, next to the in-process baseline (same run).

Measures, for a randomly initialised ``tiny`` GPT published to a temporary registry:
  * in-process: one forward pass over the prompt, and the whole generation (same batched
    KV-cache generator the replica runs), without Ray;
  * through Ray Serve over HTTP on 127.0.0.1: p50/p99 latency at concurrency 1, and requests/s
    at concurrency 16 (where ``@serve.batch`` combines requests).
Prints a table and writes bench/results/serve_latency.json. Usage: python bench/serve_latency.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

PROMPT = "def main(argv):\n    "
OUT = Path(__file__).resolve().parent / "results" / "serve_latency.json"


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def in_process(model, tok, max_tokens: int, reps: int) -> dict[str, float]:
    import torch

    from modelfleet.serve.generation import Job, generate_steps

    ids = torch.tensor([tok.encode(PROMPT)])
    fwd, gen = [], []
    with torch.inference_mode():
        for _ in range(reps):
            t = time.perf_counter()
            model(ids)
            fwd.append(time.perf_counter() - t)
        for _ in range(reps):
            t = time.perf_counter()
            for _ in generate_steps(model, [Job(prompt_ids=ids[0].tolist(), max_tokens=max_tokens, temperature=0)],
                                    eos_id=tok.eos_id, decode=tok.decode):
                pass
            gen.append(time.perf_counter() - t)
    return {"forward_ms_p50": 1e3 * statistics.median(fwd), "generate_ms_p50": 1e3 * statistics.median(gen)}


async def through_serve(url: str, max_tokens: int, n_seq: int, n_conc: int, conc: int) -> dict[str, float]:
    import httpx

    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=conc)) as c:
        for _ in range(5):  # warm up connections and the replica
            (await c.post(f"{url}/v1/completions", json=body)).raise_for_status()
        lat = []
        for _ in range(n_seq):
            t = time.perf_counter()
            (await c.post(f"{url}/v1/completions", json=body)).raise_for_status()
            lat.append(time.perf_counter() - t)
        todo, batch_sizes = list(range(n_conc)), []

        async def worker() -> None:
            while todo:
                todo.pop()
                r = await c.post(f"{url}/v1/completions", json=body)
                r.raise_for_status()
                batch_sizes.append(int(r.headers["x-modelfleet-batch-size"]))

        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        wall = time.perf_counter() - t
    return {"c1_p50_ms": 1e3 * statistics.median(lat), "c1_p99_ms": 1e3 * _pct(lat, 99),
            f"c{conc}_requests_per_s": n_conc / wall, f"c{conc}_mean_batch_size": statistics.mean(batch_sizes)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--requests", type=int, default=100, help="sequential requests at concurrency 1")
    ap.add_argument("--concurrent-requests", type=int, default=320, help="requests at concurrency 16")
    args = ap.parse_args()

    import ray
    import torch
    from ray import serve

    from modelfleet import registry
    from modelfleet.config import load_config
    from modelfleet.data.tokenizer import ByteTokenizer
    from modelfleet.models import build_model
    from modelfleet.serve.app import deploy
    from modelfleet.train.export import write_artifact_dir

    storage = tempfile.mkdtemp(prefix="mf-bench-")
    cfg = load_config(preset="tiny", overrides=[f"storage.path={storage}"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    registry.publish(storage, "tiny", write_artifact_dir(model, cfg, {}))
    torch.set_num_threads(1)  # the replica gets one CPU; compare like with like
    base = in_process(model, ByteTokenizer(), args.max_tokens, 50)

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        deploy({"port": args.port, "storage_path": storage, "app_name": "bench",
                "models": [{"name": "tiny", "artifact": "tiny", "ray_actor_options": {"num_cpus": 1},
                            "max_ongoing_requests": 32, "max_queued_requests": -1,
                            "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.005}}]})
        served = asyncio.run(through_serve(f"http://127.0.0.1:{args.port}", args.max_tokens, args.requests,
                                           args.concurrent_requests, 16))
    finally:
        serve.shutdown()
        ray.shutdown()
    res = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, no GPU",
           "model": "tiny (2 layers, 128 wide, 128 context), random init", "prompt_tokens": len(PROMPT.encode()),
           "max_tokens": args.max_tokens, **{k: round(v, 3) for k, v in {**base, **served}.items()},
           "c1_p50_over_in_process_generate": round(served["c1_p50_ms"] / base["generate_ms_p50"], 2)}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=1) + "\n")
    for k, v in res.items():
        print(f"{k:>36}: {v}")
    print(f"-> {OUT}")


if __name__ == "__main__":
    main()
