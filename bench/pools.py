"""pools (issue 17): one base + 20 LoRA variants on 2 replicas vs the same 20 variants as separate
deployments, in one run; and, in process, whether mixing adapters in one decode batch pays.

Over HTTP (``POST /v1/completions`` through the application's ingress, which passes each
variant to Serve as the multiplexed model id):

* **Pool**: ``tiny`` base + 20 random LoRA adapters (r=8 on c_attn, c_proj, c_fc), 2 replicas,
  ``max_models_per_replica: 8``; ``N`` greedy 8-token requests whose ``model`` is drawn Zipf
  (s = 1.0) over the 20 variants (seeded), the first 10% as warm-up, from 8 closed-loop clients.
  Hit rate = requests answered by a replica that already held the variant
  (``x-modelfleet-variant-cache: hit``) after warm-up (target >= 90%); cold adapter load p50 =
  the replica's own fetch + check + load time of each miss (target <= 1 s); model tensor bytes
  per replica (``x-modelfleet-tensor-bytes``: every parameter and buffer of the base and its
  loaded adapters) / (base + 8 adapters) (target <= 1.10); latency p50.
* **Separate deployments**: the same 20 variants merged into full models, one deployment (one
  replica) each behind the same ingress; the same request sequence: replicas, tensor bytes
  (20 full models), latency p50.

In process (no Ray; one torch thread): one decode step of 8 sequences holding 8 different
adapters, as one mixed batch (peft applies each row's adapter inside every LoRA layer) vs 8
per-adapter batches of one, vs 8 rows on the base alone.

Writes bench/results/pools.json.

    python bench/pools.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import tempfile
import time
from collections import Counter
from typing import Any

import numpy as np
from common import median, pct, save, table
from serve_common import publish_tiny, ray_start, ray_stop, serve_app

from modelfleet.cluster.haproxy import haproxy_env

N_VARIANTS = 20
PER_REPLICA = 8
TARGETS = ["c_attn", "c_proj", "c_fc"]
PROMPT = "def main(argv):\n    "
CONC = 8


def publish_variants(storage: str, base_ref: Any, n: int) -> tuple[dict[str, str], dict[str, str], int]:
    """``n`` random adapters over ``base_ref`` (adapter artifacts), the same merged into full
    models (for the comparison), and one adapter's tensor bytes."""
    import torch
    from peft import LoraConfig, get_peft_model

    from modelfleet import registry
    from modelfleet.config import Config
    from modelfleet.families import get_family
    from modelfleet.families.artifact import load_artifact
    from modelfleet.families.lora import write_adapter_dir
    from modelfleet.serve.pool import tensor_bytes
    from modelfleet.train.export import write_artifact_dir

    manifest = registry.read_json(base_ref.uri, "manifest.json")
    cfg = Config.from_dict(manifest["config"])
    base, _, _ = load_artifact(base_ref.uri)
    adapters, merged, one = {}, {}, 0
    for i in range(n):
        torch.manual_seed(1000 + i)
        pm = get_peft_model(
            copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
        ).eval()
        one = tensor_bytes(pm) - tensor_bytes(base)
        cfg.model.params = {
            "lora": {
                "base": base_ref.uri,
                "base_ref": f"{base_ref.name}@{base_ref.version}",
                "base_sha256": manifest["weights_sha256"],
                "r": 8,
                "alpha": 16.0,
                "target_modules": TARGETS,
            }
        }
        name = f"v{i:02d}"
        adapters[name] = f"{registry.publish(storage, name, write_adapter_dir(pm, cfg, {}), consume=True).name}@v1"
        plain = Config.from_dict(manifest["config"])
        full = get_family("gpt").merged(pm)
        merged[name] = (
            f"{registry.publish(storage, 'm' + name, write_artifact_dir(full, plain, {}), consume=True).name}@v1"
        )
    return adapters, merged, one


def zipf_sequence(n: int, names: list[str], s: float = 1.0, seed: int = 17) -> list[str]:
    w = np.array([1 / (k + 1) ** s for k in range(len(names))])
    rng = np.random.default_rng(seed)
    return list(rng.choice(names, size=n, p=w / w.sum()))


async def _run(url: str, models: list[str], timeout_s: float) -> list[dict[str, Any]]:
    """Closed loop, ``CONC`` clients, request ``i`` asks for ``models[i]``; bounded in count and time."""
    import httpx

    out: list[dict[str, Any]] = []
    nxt, deadline = [0], time.perf_counter() + timeout_s
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=CONC + 1)) as c:

        async def worker() -> None:
            while nxt[0] < len(models) and time.perf_counter() < deadline:
                i = nxt[0]
                nxt[0] += 1
                t = time.perf_counter()
                r = await c.post(
                    f"{url}/v1/completions",
                    json={"model": models[i], "prompt": PROMPT, "max_tokens": 8, "temperature": 0},
                )
                h = r.headers
                out.append(
                    {
                        "i": i,
                        "model": models[i],
                        "status": r.status_code,
                        "latency": time.perf_counter() - t,
                        "cache": h.get("x-modelfleet-variant-cache"),
                        "pid": h.get("x-modelfleet-replica-pid"),
                        "load_s": float(h.get("x-modelfleet-variant-load-s", 0) or 0),
                        "tensor_bytes": int(h.get("x-modelfleet-tensor-bytes", 0) or 0),
                    }
                )

        await asyncio.gather(*(worker() for _ in range(CONC)))
    return sorted(out, key=lambda r: r["i"])


def pool_run(storage: str, port: int, adapters: dict[str, str], seq: list[str], warmup: int) -> dict[str, Any]:
    from ray import serve

    url = serve_app(
        storage,
        port,
        [
            {
                "name": "tiny",
                "artifact": "tiny@v1",
                "num_replicas": 2,
                "ray_actor_options": {"num_cpus": 0.5},
                "max_ongoing_requests": 32,
                "max_queued_requests": -1,
                "max_models_per_replica": PER_REPLICA,
                "variants": adapters,
            }
        ],
        app="pool",
    )
    try:
        t0 = time.perf_counter()
        rows = asyncio.run(_run(url, seq, timeout_s=900))
        wall = time.perf_counter() - t0
    finally:
        serve.delete("pool")
    measured = [r for r in rows if r["i"] >= warmup]
    misses = [r["load_s"] for r in rows if r["cache"] == "miss"]
    by_pid: dict[str, int] = {}
    for r in rows:
        if r["pid"]:
            by_pid[r["pid"]] = max(by_pid.get(r["pid"], 0), r["tensor_bytes"])
    return {
        "requests": len(rows),
        "ok": sum(r["status"] == 200 for r in rows),
        "wall_s": wall,
        "measured": len(measured),
        "hits": sum(r["cache"] == "hit" for r in measured),
        "hit_rate": sum(r["cache"] == "hit" for r in measured) / max(1, len(measured)),
        "cold_loads": len(misses),
        "cold_load_p50_s": median(misses) if misses else None,
        "cold_load_p99_s": pct(misses, 99) if misses else None,
        "replicas": len(by_pid),
        "max_tensor_bytes_per_replica": max(by_pid.values()),
        "tensor_bytes_by_replica": by_pid,
        "p50_ms": 1e3 * median([r["latency"] for r in measured]),
        "p99_ms": 1e3 * pct([r["latency"] for r in measured], 99),
        "replica_of_variant": {m: sorted({r["pid"] for r in measured if r["model"] == m}) for m in sorted(set(seq))},
    }


def separate_run(storage: str, port: int, merged: dict[str, str], seq: list[str], warmup: int) -> dict[str, Any]:
    from ray import serve

    models = [
        {
            "name": name,
            "artifact": art,
            "ray_actor_options": {"num_cpus": 0.05},
            "max_ongoing_requests": 32,
            "max_queued_requests": -1,
        }
        for name, art in merged.items()
    ]
    t0 = time.perf_counter()
    url = serve_app(storage, port, models, app="separate")
    up_s = time.perf_counter() - t0
    try:
        rows = asyncio.run(_run(url, seq, timeout_s=900))
    finally:
        serve.delete("separate")
    measured = [r for r in rows if r["i"] >= warmup]
    return {
        "requests": len(rows),
        "ok": sum(r["status"] == 200 for r in rows),
        "replicas": len(merged),
        "deploy_s": up_s,
        "p50_ms": 1e3 * median([r["latency"] for r in measured]),
        "p99_ms": 1e3 * pct([r["latency"] for r in measured], 99),
    }


def mixed_batch_step(storage: str, adapters: dict[str, str], reps: int) -> dict[str, float]:
    """ms per decode step of 8 sequences: one mixed batch vs per-adapter batches vs the base alone."""
    import torch

    from modelfleet import registry
    from modelfleet.families import get_family
    from modelfleet.families.artifact import load_artifact
    from modelfleet.models.lora import BASE_ROW, adapter_rows
    from modelfleet.serve.pool import AdapterPool

    torch.set_num_threads(1)
    base, _, _ = load_artifact(registry.resolve(storage, "tiny@v1").uri)
    pool = AdapterPool(base, get_family("gpt"))
    names = list(adapters)[:8]
    for n in names:
        pool.load(n, registry.fetch(registry.resolve(storage, adapters[n]).uri))
    model = pool.model
    cache = model.new_slot_cache(8, 64)
    idx = torch.randint(0, 256, (8, 1))
    slots, starts = list(range(8)), [10] * 8

    def timed(fn: Any) -> float:
        for _ in range(3):
            fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return 1e3 * (time.perf_counter() - t) / reps

    with torch.inference_mode():

        def mixed() -> None:
            with adapter_rows(names):
                model.forward_slots(idx, cache, slots, starts)

        def per_adapter() -> None:
            for i, n in enumerate(names):
                with adapter_rows([n]):
                    model.forward_slots(idx[i : i + 1], cache, [i], [10])

        def base_only() -> None:
            with adapter_rows([BASE_ROW] * 8):
                model.forward_slots(idx, cache, slots, starts)

        return {
            "mixed_batch_ms": timed(mixed),
            "per_adapter_batches_ms": timed(per_adapter),
            "base_only_ms": timed(base_only),
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="400 requests instead of 2,000")
    ap.add_argument("--port", type=int, default=8290)
    args = ap.parse_args()
    n = 400 if args.quick else 2000
    warmup = n // 10
    storage = tempfile.mkdtemp(prefix="mf-bench-pools-")
    base_model, base_ref = publish_tiny(storage)
    from modelfleet.serve.pool import tensor_bytes

    base_bytes = tensor_bytes(base_model)
    adapters, merged, adapter_bytes = publish_variants(storage, base_ref, N_VARIANTS)
    seq = zipf_sequence(n, list(adapters))
    step = mixed_batch_step(storage, adapters, reps=50 if args.quick else 200)
    env = haproxy_env()
    ray_start(env)
    try:
        pool = pool_run(storage, args.port, adapters, seq, warmup)
        sep = separate_run(storage, args.port, merged, seq[: max(warmup + 200, n // 4)], warmup)
    finally:
        ray_stop(env)
    budget = base_bytes + PER_REPLICA * adapter_bytes
    res = {
        "requests": n,
        "warmup": warmup,
        "variants": N_VARIANTS,
        "max_models_per_replica": PER_REPLICA,
        "zipf_s": 1.0,
        "request_share_by_variant": dict(Counter(seq).most_common()),
        "base_tensor_bytes": base_bytes,
        "adapter_tensor_bytes": adapter_bytes,
        "pool": pool,
        "separate": sep,
        "decode_step": step,
        "ratios": {
            "hit_rate": pool["hit_rate"],
            "tensor_bytes_per_replica_over_base_plus_8": pool["max_tensor_bytes_per_replica"] / budget,
            "separate_tensor_bytes_over_pool_replica": N_VARIANTS * base_bytes / pool["max_tensor_bytes_per_replica"],
            "p50_pool_over_separate": pool["p50_ms"] / sep["p50_ms"],
            "mixed_over_per_adapter_step": step["mixed_batch_ms"] / step["per_adapter_batches_ms"],
            "mixed_over_base_step": step["mixed_batch_ms"] / step["base_only_ms"],
        },
        "targets": {
            "hit_rate": ">= 0.90",
            "cold_load_p50_s": "<= 1.0",
            "tensor_bytes_per_replica_over_base_plus_8": "<= 1.10",
        },
    }
    save("pools", res)
    rows = [
        ["pool: hit rate after warm-up", f"{pool['hit_rate']:.3f}", ">= 0.90"],
        [
            "pool: cold adapter load p50 / p99 (s)",
            f"{pool['cold_load_p50_s']:.3f} / {pool['cold_load_p99_s']:.3f}",
            "<= 1.0",
        ],
        [
            "pool: tensor bytes per replica / (base + 8 adapters)",
            f"{res['ratios']['tensor_bytes_per_replica_over_base_plus_8']:.3f}",
            "<= 1.10",
        ],
        ["pool: replicas, p50 / p99 ms", f"{pool['replicas']}, {pool['p50_ms']:.1f} / {pool['p99_ms']:.1f}", ""],
        ["separate: replicas, p50 / p99 ms", f"{sep['replicas']}, {sep['p50_ms']:.1f} / {sep['p99_ms']:.1f}", ""],
        [
            "tensor bytes: 20 deployments / one pool replica",
            f"{res['ratios']['separate_tensor_bytes_over_pool_replica']:.1f}",
            "",
        ],
        [
            "decode step, 8 rows: mixed / per-adapter batches / base (ms)",
            f"{step['mixed_batch_ms']:.2f} / {step['per_adapter_batches_ms']:.2f} / {step['base_only_ms']:.2f}",
            "",
        ],
    ]
    print(table([dict(zip(("measure", "value", "target"), r)) for r in rows], ["measure", "value", "target"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
