"""routing (issue 27): the cache-aware router against HAProxy's leastconn on the one-hop path, in one run.

Two replicas of a bench GPT with a 1,024-token context (random weights: routing does not depend
on them) on the local Ray, HAProxy's ingress in front. Each arm deploys the same app, once with
``serve.router.enabled: true`` (HAProxy asks our router, ``serve/route_front.py``) and once with
``false`` (HAProxy's ``leastconn``), and plays the same seeded workload:

* 16 customers, each with its own ~640-token context prefix; a conversation picks a customer
  Zipf (s = 1.0) and has 1 + up to 2 follow-up turns, each turn a <= 48-token question and a
  48-token answer, the follow-ups resending the whole history (as chat clients do);
* per-replica KV budget ``KV_TOKENS`` (6,144 tokens): the customers' prefixes need ~1.7x one
  replica's blocks and fit the fleet's;
* ``CONC`` closed-loop conversations at a time, streamed: TTFT = first SSE chunk.

Reported per arm: prefix hit rate (cached prompt tokens / prompt tokens, from ``usage``), the same
÷ an ideal replay (every turn but a customer's very first finds its customer's whole shared
prefix cached: an upper bound that ignores eviction), TTFT p50/p90, output tokens/s, the
routing decisions (``x-modelfleet-route``). A hot-prefix skew (one customer sends half of the
conversations) runs on the router arm: 429/503 count and TTFT p90 ÷ the uniform workload's. And
the routing cost: concurrency-1 p50 of a short completion, router on − off, from two one-replica
apps deployed side by side and asked in turn (``c1_cost``).

Writes bench/results/routing.json.

    python bench/routing.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from collections import Counter
from typing import Any

from common import machine, median, pct, save, table
from serve_common import ray_start, ray_stop

from modelfleet.cluster.haproxy import haproxy_env

CUSTOMERS = 16
PREFIX_CHARS = 640
TURN_CHARS = 48
ANSWER_TOKENS = 48
KV_TOKENS = 6144
CONTEXT = 1024
"""The bench model's context (``model.block_size``): a follow-up asks for at most what is left."""
CONC = 8
PORT = 8471


def publish_bench_model(storage: str) -> str:
    import torch

    from modelfleet import registry
    from modelfleet.families import build_model
    from modelfleet.presets import load_config
    from modelfleet.train.export import write_artifact_dir

    cfg = load_config(
        preset="tiny",
        overrides=[f"storage.path={storage}", f"model.block_size={CONTEXT}", "model.n_layer=4", "model.n_embd=256"],
    )
    torch.manual_seed(0)
    registry.publish(storage, "bench", write_artifact_dir(build_model(cfg.model).eval(), cfg, {}), consume=True)
    return "bench"


def prefixes(rng: random.Random) -> list[str]:
    words = "alpha beta gamma delta kappa lambda omega sigma theta zeta".split()
    out = []
    for c in range(CUSTOMERS):
        text = f"Customer {c} context. "
        while len(text) < PREFIX_CHARS:
            text += rng.choice(words) + f"{c} "
        out.append(text[:PREFIX_CHARS])
    return out


def conversations(n: int, rng: random.Random, *, hot: bool = False) -> list[tuple[int, list[str]]]:
    """(customer, its questions) for ``n`` conversations; ``hot``: customer 0 sends half."""
    weights = [1 / (k + 1) for k in range(CUSTOMERS)]
    out = []
    for i in range(n):
        who = 0 if hot and i % 2 == 0 else rng.choices(range(CUSTOMERS), weights)[0]
        turns = 1 + rng.randint(0, 2)
        out.append((who, [f"\nQ{i}.{t}: " + "x" * rng.randint(8, TURN_CHARS - 8) + "?" for t in range(turns)]))
    return out


def ideal_hit(convs: list[tuple[int, list[str]]], pre: list[str], bs: int = 16) -> float:
    """Cached ÷ prompt tokens if every turn found its customer's whole shared history cached."""
    seen, cached, total = set(), 0, 0
    for who, qs in convs:
        history = pre[who]
        for t, q in enumerate(qs):
            prompt = history + q
            total += len(prompt.encode())
            if who in seen or t > 0:
                shared = len(history.encode()) if t > 0 else len(pre[who].encode())
                cached += (min(shared, len(prompt.encode()) - 1) // bs) * bs
            history = prompt + "x" * ANSWER_TOKENS  # an answer's bytes (the replay's stand-in)
        seen.add(who)
    return cached / total


async def play(url: str, convs: list[tuple[int, list[str]]], pre: list[str], deadline_s: float) -> dict[str, Any]:
    import httpx

    ttft, statuses, routes = [], Counter(), Counter()
    errors: dict[int, str] = {}  # the first error body per status: what a refused turn was told
    cached = prompt = tokens = 0
    queue = list(convs)
    deadline = time.perf_counter() + deadline_s

    async def turn(c: httpx.AsyncClient, text: str) -> str | None:
        nonlocal cached, prompt, tokens
        # Byte-level tokenizer: one token per UTF-8 byte. Random weights answer with
        # bytes that decode to U+FFFD (3 bytes again), so a resent history grows faster than its
        # tokens did; like a chat client, a conversation ends when its history no longer leaves
        # room for an answer, instead of sending a request the server must refuse.
        room = CONTEXT - len(text.encode())
        if room < 8:
            return None
        body = {
            "prompt": text,
            "max_tokens": min(ANSWER_TOKENS, room),
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        t0 = time.perf_counter()
        answer, first = "", None
        async with c.stream("POST", f"{url}/v1/completions", json=body) as r:
            statuses[r.status_code] += 1
            if r.status_code != 200:
                errors.setdefault(r.status_code, (await r.aread()).decode(errors="replace")[:300])
                return ""
            routes[r.headers.get("x-modelfleet-route", "leastconn").split(";")[0]] += 1
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None:
                    first = time.perf_counter() - t0
                for ch in chunk.get("choices", []):
                    answer += ch.get("text", "")
                usage = chunk.get("usage")
                if usage:
                    prompt += usage["prompt_tokens"]
                    tokens += usage["completion_tokens"]
                    cached += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        if first is not None:
            ttft.append(first)
        return answer

    async def worker(c: httpx.AsyncClient) -> None:
        while queue and time.perf_counter() < deadline:  # bounded in count and time
            who, qs = queue.pop(0)
            history = pre[who]
            for q in qs:
                history += q
                answer = await turn(c, history)
                if answer is None:
                    break
                history += answer

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=CONC + 1)) as c:
        await asyncio.gather(*(worker(c) for _ in range(CONC)))
    wall = time.perf_counter() - t0
    return {
        "turns": len(ttft),
        "statuses": dict(statuses),
        "errors": errors,
        "routes": dict(routes),
        "hit_rate": cached / prompt if prompt else 0.0,
        "ttft_p50_ms": 1e3 * median(ttft),
        "ttft_p90_ms": 1e3 * pct(ttft, 90),
        "output_tokens_per_s": tokens / wall,
        "wall_s": wall,
    }


def c1_cost(storage: str, n: int) -> dict[str, float]:
    """The router's cost at concurrency 1: two apps side by side (one replica each), ``/r`` with
    the router and ``/l`` without (HAProxy's leastconn), and short completions sent to them in
    turn, so both see the same machine at the same time. (Timing each arm's app in its own run,
    as this bench first did, put the routed arm's figure right after its deploy and the other's
    minutes later: +16.1 ms, where interleaving measures ~3.5 ms.)"""
    import httpx
    from ray import serve

    from modelfleet.serve.operations import deploy

    for name, routed in (("r", True), ("l", False)):
        spec = {**_SPEC, "num_replicas": 1}
        app = {"port": PORT, "storage_path": storage, "app_name": f"c1-{name}", "route_prefix": f"/{name}"}
        deploy({**app, "logging": _QUIET, "router": {"enabled": routed}, "models": [spec]})
    url = f"http://127.0.0.1:{PORT}"
    wait_routed(f"{url}/r", replicas=1)
    lat: dict[str, list[float]] = {"r": [], "l": []}
    with httpx.Client(timeout=60) as c:
        for i in range(n + 5):
            for name in ("r", "l") if i % 2 else ("l", "r"):
                t0 = time.perf_counter()
                c.post(
                    f"{url}/{name}/v1/completions", json={"prompt": f"hi {i % 4}", "max_tokens": 1}
                ).raise_for_status()
                if i >= 5:
                    lat[name].append(time.perf_counter() - t0)
    for name in lat:
        serve.delete(f"c1-{name}")
    return {"router_p50_ms": 1e3 * median(lat["r"]), "leastconn_p50_ms": 1e3 * median(lat["l"])}


def wait_routed(url: str, timeout_s: float = 60, replicas: int = 2) -> None:
    """Until HAProxy's reloads after the deploy put the app's replicas behind the router."""
    import httpx

    seen, deadline = set(), time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(seen) < replicas:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "warm", "max_tokens": 1}, timeout=60)
        if r.headers.get("x-modelfleet-route"):
            seen.add(r.headers["x-modelfleet-replica-pid"])
    if len(seen) < replicas:
        raise TimeoutError(f"HAProxy did not route through the cache-aware router to {replicas} replicas")


_SPEC = {
    "name": "bench",
    "artifact": "bench",
    "num_replicas": 2,
    "ray_actor_options": {"num_cpus": 1},
    "max_ongoing_requests": 32,
    "max_queued_requests": -1,
    "batching": {"max_batch_size": 8, "kv_cache_tokens": KV_TOKENS},
}
_QUIET = {"enable_access_log": False, "log_level": "WARNING"}


def arm(storage: str, routed: bool, workloads: dict[str, list], pre: list[str]) -> dict[str, Any]:
    from ray import serve

    name = "routed" if routed else "leastconn"
    from modelfleet.serve.operations import deploy

    deploy(
        {
            "port": PORT,
            "storage_path": storage,
            "app_name": name,
            "route_prefix": "/",
            "logging": _QUIET,
            "router": {"enabled": routed},
            "models": [_SPEC],
        }
    )
    url = f"http://127.0.0.1:{PORT}"
    if routed:
        wait_routed(url)
    out: dict[str, Any] = {}
    for wl, convs in workloads.items():
        out[wl] = asyncio.run(play(url, convs, pre, 300))
    serve.delete(name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n_conv, c1_n = (48, 200) if args.quick else (128, 400)
    rng = random.Random(0)
    pre = prefixes(rng)
    uniform = conversations(n_conv, random.Random(1))
    workloads = {"uniform": uniform}
    env = haproxy_env()
    ray_start(env)
    try:
        storage = tempfile.mkdtemp(prefix="bench-routing-")
        publish_bench_model(storage)
        routed = arm(storage, True, {**workloads, "hot": conversations(n_conv, random.Random(2), hot=True)}, pre)
        base = arm(storage, False, workloads, pre)
        c1 = c1_cost(storage, c1_n)
    finally:
        ray_stop(env)
    ideal = ideal_hit(uniform, pre)
    r, b = routed["uniform"], base["uniform"]
    result = {
        "machine": machine(),
        "conversations": n_conv,
        "routed": routed,
        "leastconn": base,
        "ideal_hit_rate": ideal,
        "hit_rate_over_ideal": r["hit_rate"] / ideal if ideal else 0.0,
        "ttft_p90_routed_over_leastconn": r["ttft_p90_ms"] / b["ttft_p90_ms"] if b["ttft_p90_ms"] else 0.0,
        "tokens_per_s_routed_over_leastconn": r["output_tokens_per_s"] / b["output_tokens_per_s"]
        if b["output_tokens_per_s"]
        else 0.0,
        "hot_ttft_p90_over_uniform": routed["hot"]["ttft_p90_ms"] / r["ttft_p90_ms"] if r["ttft_p90_ms"] else 0.0,
        "hot_refused": sum(v for k, v in routed["hot"]["statuses"].items() if int(k) in (429, 503)),
        "c1": c1,
        "c1_p50_router_minus_leastconn_ms": c1["router_p50_ms"] - c1["leastconn_p50_ms"],
    }
    rows = [
        {"arm": "router", **{k: r[k] for k in ("hit_rate", "ttft_p50_ms", "ttft_p90_ms", "output_tokens_per_s")}},
        {"arm": "leastconn", **{k: b[k] for k in ("hit_rate", "ttft_p50_ms", "ttft_p90_ms", "output_tokens_per_s")}},
    ]
    print(table(rows, ["arm", "hit_rate", "ttft_p50_ms", "ttft_p90_ms", "output_tokens_per_s"]))
    print(json.dumps({k: v for k, v in result.items() if k not in ("routed", "leastconn", "machine")}, indent=1))
    print("routes:", r["routes"], "hot:", routed["hot"]["routes"], routed["hot"]["statuses"])
    save("routing", result)


if __name__ == "__main__":
    main()
