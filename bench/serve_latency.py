"""serve-latency, serve-throughput and batching, each against its baseline in the same run.

Variant measured: Serve's Python HTTP proxy in front of a replica that batches with
``@serve.batch``. That is NOT the path the product ships (one hop through HAProxy into the
replica's continuous-batching engine): bench/continuous_batching.py measures that one. Kept in
``make bench-quick`` as the reference for Serve's own proxy and batching overheads.

* latency: p50/p99 at concurrency 1 through Ray Serve over HTTP vs the in-process forward pass
  and generation vs the same model behind plain uvicorn + FastAPI (target: Serve p50 - in-process
  generation <= 3 ms);
* throughput: requests/s at concurrency 1..64 through Serve / plain uvicorn (target >= 0.5),
  for each Serve variant tried (default; Ray's throughput-optimised flags; gRPC between proxy and
  replicas);
* batching: the throughput gain of ``@serve.batch`` (max batch 16 vs 1, concurrency 16) / the
  in-process gain of decoding the same 16 requests together vs one by one (target >= 0.8).

Writes bench/results/serve_latency.json, serve_throughput.json and batching.json.

    python bench/serve_latency.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from typing import Any

from common import median, save, table
from serve_common import BODY, PROMPT, Uvicorn, load, model_spec, publish_tiny, ray_start, ray_stop, serve_app

# What Ray 2.60 offers to cut Serve's per-request cost (env flags read when Serve starts).
VARIANTS: dict[str, dict[str, str]] = {
    "default": {},
    # Ray's "throughput-optimized" recipe: user code and the router on the replica's main loop,
    # buffered request-path logs.
    "throughput_optimized": {
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
        "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
        "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
    },
    "grpc_transport": {"RAY_SERVE_PROXY_USE_GRPC": "1"},
}


def in_process(model: Any, reps: int) -> dict[str, float]:
    import torch

    from modelfleet.data.tokenizer import ByteTokenizer
    from modelfleet.serve.generation import Job, generate_steps

    tok = ByteTokenizer()
    ids = tok.encode(PROMPT)
    torch.set_num_threads(1)  # a replica gets one CPU

    def run(jobs: list[Job]) -> None:
        for _ in generate_steps(model, jobs, eos_id=tok.eos_id, decode=tok.decode):
            pass

    job = lambda: Job(prompt_ids=ids, max_tokens=BODY["max_tokens"], temperature=0)  # noqa: E731
    fwd, gen, one_by_one, together = [], [], [], []
    with torch.inference_mode():
        x = torch.tensor([ids])
        for _ in range(reps):
            t = time.perf_counter()
            model(x)
            fwd.append(time.perf_counter() - t)
            t = time.perf_counter()
            run([job()])
            gen.append(time.perf_counter() - t)
        for _ in range(max(3, reps // 10)):
            t = time.perf_counter()
            for _ in range(16):
                run([job()])
            one_by_one.append(time.perf_counter() - t)
            t = time.perf_counter()
            run([job() for _ in range(16)])
            together.append(time.perf_counter() - t)
    return {
        "forward_ms_p50": 1e3 * median(fwd),
        "generate_ms_p50": 1e3 * median(gen),
        "batch16_gain": median(one_by_one) / median(together),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests, default Serve only")
    ap.add_argument("--port", type=int, default=8410)
    args = ap.parse_args()
    n_seq = 60 if args.quick else 150
    per_level = 96 if args.quick else 256
    levels = [1, 4, 16, 64]
    variants = ["default"] if args.quick else list(VARIANTS)  # quick: under 10 min for all benches

    storage = tempfile.mkdtemp(prefix="mf-bench-serve-")
    model, ref = publish_tiny(storage)
    base = in_process(model, 30 if args.quick else 60)
    print(
        f"in-process: forward {base['forward_ms_p50']:.2f} ms, generate {base['generate_ms_p50']:.2f} ms, "
        f"batch-16 gain {base['batch16_gain']:.2f}x"
    )

    with Uvicorn(ref.uri, args.port + 1) as uv:
        url = f"{uv.url}/v1/completions"
        uv_c1 = load(url, n_seq, 1).summary()
        uv_levels = {c: load(url, per_level, c).summary() for c in levels}
    print(
        f"uvicorn: c1 p50 {uv_c1['p50_ms']:.1f} ms; "
        + ", ".join(f"c{c} {s['requests_per_s']:.0f}/s" for c, s in uv_levels.items())
    )

    runs: dict[str, Any] = {}
    batching: dict[str, Any] = {}
    for name in variants:
        env = VARIANTS[name]
        ray_start(env)
        try:
            models = [model_spec("tiny", "tiny", batching={"max_batch_size": 16, "batch_wait_timeout_s": 0.005})]
            if name == "default":
                models.append(
                    model_spec("nobatch", "tiny", batching={"max_batch_size": 1, "batch_wait_timeout_s": 0.0})
                )
            base_url = serve_app(storage, args.port, models)
            url = f"{base_url}/v1/completions"
            c1 = load(url, n_seq, 1).summary()
            per = {c: load(url, per_level, c).summary() for c in levels}
            runs[name] = {"env": env, "c1": c1, "levels": per}
            print(
                f"serve[{name}]: c1 p50 {c1['p50_ms']:.1f} ms; "
                + ", ".join(f"c{c} {s['requests_per_s']:.0f}/s" for c, s in per.items())
            )
            if name == "default":
                b1 = load(url, per_level, 16, {**BODY, "model": "nobatch"}).summary()
                batching = {
                    "serve_rps_batch1": b1["requests_per_s"],
                    "serve_rps_batch16": per[16]["requests_per_s"],
                    "mean_batch_size": per[16]["mean_batch_size"],
                }
        finally:
            ray_stop(env)

    d = runs["default"]["c1"]
    lat = {
        "in_process": base,
        "uvicorn_c1": uv_c1,
        "serve_c1": {k: v["c1"] for k, v in runs.items()},
        "serve_p50_minus_generate_ms": d["p50_ms"] - base["generate_ms_p50"],
        "serve_p50_minus_uvicorn_p50_ms": d["p50_ms"] - uv_c1["p50_ms"],
        "target_ms": 3.0,
    }
    rows = []
    for name, r in runs.items():
        for c in levels:
            rows.append(
                {
                    "variant": name,
                    "concurrency": c,
                    "serve_rps": r["levels"][c]["requests_per_s"],
                    "uvicorn_rps": uv_levels[c]["requests_per_s"],
                    "ratio": r["levels"][c]["requests_per_s"] / uv_levels[c]["requests_per_s"],
                    "serve_p50_ms": r["levels"][c]["p50_ms"],
                    "mean_batch": r["levels"][c]["mean_batch_size"],
                    "failed": r["levels"][c]["requests"] - r["levels"][c]["ok"],
                }
            )
    thr = {"levels": levels, "uvicorn": uv_levels, "rows": rows, "target_ratio": 0.5}
    if batching:
        batching["serve_gain"] = batching["serve_rps_batch16"] / batching["serve_rps_batch1"]
        batching["in_process_gain"] = base["batch16_gain"]
        batching["ratio"] = batching["serve_gain"] / base["batch16_gain"]
        batching["target_ratio"] = 0.8
    common = {
        "model": "tiny GPT (2 layers, 128 wide), random init, 20-token prompt, 16 new tokens, "
        "greedy; replica and uvicorn each 1 CPU thread",
        "quick": args.quick,
    }
    print(
        table(
            rows,
            ["variant", "concurrency", "serve_rps", "uvicorn_rps", "ratio", "serve_p50_ms", "mean_batch", "failed"],
        )
    )
    print(
        f"latency: Serve c1 p50 {d['p50_ms']:.1f} ms, in-process generate {base['generate_ms_p50']:.1f} ms, "
        f"uvicorn c1 p50 {uv_c1['p50_ms']:.1f} ms -> Serve - in-process = {lat['serve_p50_minus_generate_ms']:.1f} ms"
    )
    if batching:
        print(
            f"batching: Serve gain {batching['serve_gain']:.2f}x / in-process gain "
            f"{batching['in_process_gain']:.2f}x = {batching['ratio']:.2f}"
        )
    for name, res in (("serve_latency", lat), ("serve_throughput", thr), ("batching", batching)):
        print(f"-> {save(name, {**common, **res})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
