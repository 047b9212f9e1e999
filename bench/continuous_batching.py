"""continuous batching (issue 14): the engine against static batching in process, and through Ray
Serve against the in-process engine and plain uvicorn, in one run.

In process (no Ray, one torch thread, the tiny artifact ``publish_tiny`` makes), on one fixed
request list: ``N_REQUESTS`` greedy requests of the 20-token prompt, a quarter asking for exactly 8
tokens and the rest for uniform 9..cap (cap = 128, or the context minus the prompt if smaller):

* tokens/s at concurrency 16, closed loop (a new request enters as soon as one finishes), engine
  vs static batching (``generate_steps`` over batches of 16, each decoded to its end before the
  next starts; a batch's requests arrive when their predecessor in the same client finished);
* short requests are not held by long ones: p50 latency of the 8-token requests in that mix vs
  16 equal 8-token requests arriving together through the engine (target <= 2x); the same burst
  through static batching, for context;
* TTFT and TPOT p50 at concurrency 1 and 16 (``Sequence.arrived`` / ``first_token_at`` / the end
  of the step that finished it).

Over HTTP ``POST /v1/completions`` (the same cores also run the load generator):

* Ray Serve, one replica (1 CPU), ``batching.max_batch_size`` 16: tokens/s on the same mixed load
  at concurrency 16 (``usage.completion_tokens``) / the in-process engine (target >= 0.8), and the
  same for ``bench/uvicorn_baseline.py --core`` (plain FastAPI hosting the same engine core process
  a replica runs, no Ray); Serve / that baseline (target >= 0.95, issue 26);
* p50 latency at concurrency 1 (16 new tokens, serve_latency's BODY), Serve vs uvicorn (target:
  Serve <= uvicorn + 3 ms).

Writes bench/results/continuous_batching.json.

    python bench/continuous_batching.py [--quick]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from common import median, save, table
from serve_common import BODY, PROMPT, Uvicorn, load, model_spec, publish_tiny, ray_start, ray_stop, serve_app

from modelfleet.cluster.haproxy import haproxy_env

CONC = 16
N_REQUESTS = 48
SHORT = 8
LONGEST = 128
SEED = 14


@dataclass
class Rec:
    """One request's timeline (perf_counter seconds) and output."""

    max_tokens: int
    arrived: float
    first: float | None = None
    done: float | None = None
    tokens: int = 0

    @property
    def latency(self) -> float:
        return self.done - self.arrived

    @property
    def tpot(self) -> float | None:
        return (self.done - self.first) / (self.tokens - 1) if self.tokens > 1 else None


def max_tokens_list(n: int, cap: int, seed: int = SEED) -> list[int]:
    """A quarter exactly SHORT, the rest uniform in SHORT+1..cap; shuffled, fixed seed."""
    rng = random.Random(seed)
    out = [SHORT] * (n // 4) + [rng.randint(SHORT + 1, cap) for _ in range(n - n // 4)]
    rng.shuffle(out)
    return out


def figures(recs: list[Rec], t0: float) -> dict[str, Any]:
    """tokens/s over the whole run (first arrival to last finish) and the per-request p50s."""
    done = [r for r in recs if r.done is not None]
    short = [r.latency for r in done if r.max_tokens == SHORT]
    tpot = [r.tpot for r in done if r.tpot is not None]
    wall = max(r.done for r in done) - t0
    return {
        "requests": len(done),
        "of": len(recs),
        "tokens": sum(r.tokens for r in done),
        "wall_s": wall,
        "tokens_per_s": sum(r.tokens for r in done) / wall,
        "latency_p50_ms": 1e3 * median([r.latency for r in done]),
        "short_latency_p50_ms": 1e3 * median(short) if short else None,
        "ttft_p50_ms": 1e3 * median([r.first - r.arrived for r in done]),
        "tpot_p50_ms": 1e3 * median(tpot) if tpot else None,
    }


def engine_run(model: Any, tok: Any, jobs: list[Any], conc: int, timeout_s: float) -> dict[str, Any]:
    """``jobs`` through a fresh engine, ``conc`` in flight (closed loop), bounded by ``timeout_s``."""
    from modelfleet.serve.engine import Engine, EngineConfig

    engine = Engine(
        model,
        eos_id=tok.eos_id,
        decode=tok.decode,
        config=EngineConfig(max_num_seqs=CONC, prefill_chunk=64, max_waiting=len(jobs)),
    )
    todo, recs = iter(jobs), {}

    def submit() -> None:
        job = next(todo, None)
        if job is not None:
            seq = engine.add(job)
            recs[id(seq)] = (seq, Rec(job.max_tokens, seq.arrived))

    t0 = time.perf_counter()
    deadline = t0 + timeout_s
    for _ in range(conc):
        submit()
    while engine.has_work and time.perf_counter() < deadline:
        out = engine.step()
        now = time.perf_counter()
        for seq, step in out.outputs:
            if step.finish_reason:
                r = recs[id(seq)][1]
                r.first, r.done, r.tokens = seq.first_token_at, now, seq.produced
                submit()
    return figures([r for _, r in recs.values()], t0)


def static_run(model: Any, tok: Any, jobs: list[Any], timeout_s: float) -> dict[str, Any]:
    """Static batching: batches of CONC in list order, each decoded to its end before the next
    starts. The k-th request of a batch arrives when the k-th of the previous batch finished (the
    same closed-loop client), so its latency includes waiting for the previous batch's longest."""
    from modelfleet.serve.generation import generate_steps

    t0 = time.perf_counter()
    deadline = t0 + timeout_s
    recs: list[Rec] = []
    prev: list[Rec] = []
    for b in range(0, len(jobs), CONC):
        if time.perf_counter() >= deadline:
            break
        batch = jobs[b : b + CONC]
        cur = [Rec(j.max_tokens, prev[k].done if k < len(prev) else t0) for k, j in enumerate(batch)]
        for out in generate_steps(model, batch, eos_id=tok.eos_id, decode=tok.decode):
            now = time.perf_counter()
            for r, s in zip(cur, out):
                if s is None:
                    continue
                r.tokens += s.tokens
                if r.first is None:
                    r.first = now
                if s.finish_reason:
                    r.done = now
        recs += cur
        prev = cur
    return figures(recs, t0)


def in_process(model: Any, tok: Any, max_tokens: list[int], reps: int, timeout_s: float) -> dict[str, Any]:
    import torch

    from modelfleet.serve.generation import Job

    torch.set_num_threads(1)  # a replica gets one CPU
    ids = tok.encode(PROMPT)
    mixed = [Job(prompt_ids=ids, max_tokens=m, temperature=0) for m in max_tokens]
    equal = [Job(prompt_ids=ids, max_tokens=SHORT, temperature=0) for _ in range(CONC)]
    engine_run(model, tok, mixed[:CONC], CONC, timeout_s)  # warm-up
    static_run(model, tok, mixed[:CONC], timeout_s)
    runs: list[dict[str, Any]] = []
    for _ in range(reps):  # interleaved, so a noisy neighbour hits both sides alike
        runs.append(
            {
                "engine_c16": engine_run(model, tok, mixed, CONC, timeout_s),
                "static_c16": static_run(model, tok, mixed, timeout_s),
                "engine_equal_short": engine_run(model, tok, equal, CONC, timeout_s),
                "static_equal_short": static_run(model, tok, equal, timeout_s),
                "engine_c1": engine_run(model, tok, mixed[:CONC], 1, timeout_s),
            }
        )
    med = {k: {f: median([r[k][f] for r in runs]) for f in runs[0][k] if runs[0][k][f] is not None} for k in runs[0]}
    return {"median": med, "runs": runs}


def http_mixed(url: str, bodies: list[dict], reps: int, timeout_s: float) -> dict[str, Any]:
    """tokens/s and the 8-token requests' p50 over HTTP, same list, closed loop at CONC."""
    out = []
    for _ in range(reps):
        ld = load(url, len(bodies), CONC, bodies=bodies, tokens=True, timeout_s=timeout_s)
        short = [lat for i, lat in ld.sent if bodies[i]["max_tokens"] == SHORT]
        out.append({**ld.summary(), "short_latency_p50_ms": 1e3 * median(short) if short else None})
    return {
        "median": {f: median([r[f] for r in out]) for f in ("tokens_per_s", "short_latency_p50_ms", "p50_ms")},
        "runs": out,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and c1 requests (< 2 min)")
    ap.add_argument("--port", type=int, default=8440)
    args = ap.parse_args()
    # One pass over the 48 requests takes ~0.3 s in process and ~1 s over HTTP: repeat, report medians.
    reps, http_reps, n_c1 = (2, 1, 40) if args.quick else (9, 5, 150)
    timeout_s = 30 if args.quick else 60  # per load loop

    from modelfleet.families.artifact import load_artifact

    storage = tempfile.mkdtemp(prefix="mf-bench-cb-")
    _, ref = publish_tiny(storage)
    model, tok, _ = load_artifact(ref.uri)  # what the replica and uvicorn load
    prompt_len = len(tok.encode(PROMPT))
    cap = min(LONGEST, model.cfg.block_size - prompt_len)
    note = None
    if cap < LONGEST:
        note = (
            f"the tiny model's context is {model.cfg.block_size} tokens and the prompt {prompt_len}: "
            f"max_tokens drawn up to {cap}, not {LONGEST}"
        )
        print(f"note: {note}")
    max_tokens = max_tokens_list(N_REQUESTS, cap)
    bodies = [{**BODY, "max_tokens": m} for m in max_tokens]

    t = time.perf_counter()
    ip = in_process(model, tok, max_tokens, reps, timeout_s)
    m = ip["median"]
    print(
        f"in-process ({time.perf_counter() - t:.0f} s): engine {m['engine_c16']['tokens_per_s']:.0f} tok/s, "
        f"static {m['static_c16']['tokens_per_s']:.0f} tok/s"
    )

    with Uvicorn(ref.uri, args.port + 1, core=True) as uv:  # the replica's engine core, bare uvicorn in front
        url = f"{uv.url}/v1/completions"
        uv_c1 = load(url, n_c1, 1, timeout_s=timeout_s).summary()
        uv_mixed = http_mixed(url, bodies, http_reps, timeout_s)
    print(f"uvicorn: c1 p50 {uv_c1['p50_ms']:.1f} ms, c16 mixed {uv_mixed['median']['tokens_per_s']:.0f} tok/s")

    # The product's default cluster (HAProxy -> the replica, one hop) and, for what HAProxy buys,
    # the same one-hop app behind Serve's Python proxy (MODELFLEET_HAPROXY=0).
    variants: dict[str, dict[str, Any]] = {}
    for name, env in (("haproxy", haproxy_env()), ("python_proxy", {})):
        ray_start(env)
        try:
            spec = model_spec("tiny", "tiny", batching={"max_batch_size": CONC}, max_ongoing_requests=64)
            url = f"{serve_app(storage, args.port, [spec])}/v1/completions"
            variants[name] = {
                "c1": load(url, n_c1, 1, timeout_s=timeout_s).summary(),
                "mixed_c16": http_mixed(url, bodies, http_reps, timeout_s),
            }
        finally:
            ray_stop(env)
        v = variants[name]
        print(
            f"serve ({name}): c1 p50 {v['c1']['p50_ms']:.1f} ms, "
            f"c16 mixed {v['mixed_c16']['median']['tokens_per_s']:.0f} tok/s"
        )
    serve_c1, serve_mixed = variants["haproxy"]["c1"], variants["haproxy"]["mixed_c16"]
    py_c1 = variants["python_proxy"]["c1"]

    eng, sta, eq, c1 = m["engine_c16"], m["static_c16"], m["engine_equal_short"], m["engine_c1"]
    srv, uvm = serve_mixed["median"], uv_mixed["median"]
    ratios = {
        "engine_over_static_tokens_per_s": eng["tokens_per_s"] / sta["tokens_per_s"],
        "short_in_mix_over_equal_short_p50": eng["short_latency_p50_ms"] / eq["latency_p50_ms"],
        "serve_over_in_process_tokens_per_s": srv["tokens_per_s"] / eng["tokens_per_s"],
        "uvicorn_over_in_process_tokens_per_s": uvm["tokens_per_s"] / eng["tokens_per_s"],
        "serve_c1_p50_minus_uvicorn_ms": serve_c1["p50_ms"] - uv_c1["p50_ms"],
        "serve_over_uvicorn_core_tokens_per_s": srv["tokens_per_s"] / uvm["tokens_per_s"],
    }
    rows = [
        {
            "figure": "tok/s c16 mixed: engine | static",
            "subject": eng["tokens_per_s"],
            "baseline": sta["tokens_per_s"],
            "ratio": ratios["engine_over_static_tokens_per_s"],
            "target": "-",
        },
        {
            "figure": "8-tok p50 ms: in mix | 16 equal (engine)",
            "subject": eng["short_latency_p50_ms"],
            "baseline": eq["latency_p50_ms"],
            "ratio": ratios["short_in_mix_over_equal_short_p50"],
            "target": "<= 2",
        },
        {
            "figure": "16 equal 8-tok at once, p50 ms: engine | static",
            "subject": eq["latency_p50_ms"],
            "baseline": m["static_equal_short"]["latency_p50_ms"],
            "ratio": eq["latency_p50_ms"] / m["static_equal_short"]["latency_p50_ms"],
            "target": "-",
        },
        {
            "figure": "8-tok p50 ms in mix: engine | static",
            "subject": eng["short_latency_p50_ms"],
            "baseline": sta["short_latency_p50_ms"],
            "ratio": eng["short_latency_p50_ms"] / sta["short_latency_p50_ms"],
            "target": "-",
        },
        {
            "figure": "TTFT p50 ms: engine c1 | c16",
            "subject": c1["ttft_p50_ms"],
            "baseline": eng["ttft_p50_ms"],
            "ratio": "",
            "target": "-",
        },
        {
            "figure": "TPOT p50 ms: engine c1 | c16",
            "subject": c1["tpot_p50_ms"],
            "baseline": eng["tpot_p50_ms"],
            "ratio": "",
            "target": "-",
        },
        {
            "figure": "TTFT | TPOT p50 ms: static c16",
            "subject": sta["ttft_p50_ms"],
            "baseline": sta["tpot_p50_ms"],
            "ratio": "",
            "target": "-",
        },
        {
            "figure": "tok/s c16 mixed: Serve | in-process engine",
            "subject": srv["tokens_per_s"],
            "baseline": eng["tokens_per_s"],
            "ratio": ratios["serve_over_in_process_tokens_per_s"],
            "target": ">= 0.8",
        },
        {
            "figure": "tok/s c16 mixed: Serve | uvicorn hosting the core",
            "subject": srv["tokens_per_s"],
            "baseline": uvm["tokens_per_s"],
            "ratio": ratios["serve_over_uvicorn_core_tokens_per_s"],
            "target": ">= 0.95",
        },
        {
            "figure": "tok/s c16 mixed: uvicorn | in-process engine",
            "subject": uvm["tokens_per_s"],
            "baseline": eng["tokens_per_s"],
            "ratio": ratios["uvicorn_over_in_process_tokens_per_s"],
            "target": "-",
        },
        {
            "figure": "8-tok p50 ms in mix: Serve | uvicorn",
            "subject": srv["short_latency_p50_ms"],
            "baseline": uvm["short_latency_p50_ms"],
            "ratio": srv["short_latency_p50_ms"] / uvm["short_latency_p50_ms"],
            "target": "-",
        },
        {
            "figure": "c1 p50 ms (16 tok): Serve | uvicorn",
            "subject": serve_c1["p50_ms"],
            "baseline": uv_c1["p50_ms"],
            "ratio": f"+{ratios['serve_c1_p50_minus_uvicorn_ms']:.1f} ms",
            "target": "<= +3 ms",
        },
        {
            "figure": "c1 p50 ms: Serve via Python proxy | uvicorn",
            "subject": py_c1["p50_ms"],
            "baseline": uv_c1["p50_ms"],
            "ratio": f"+{py_c1['p50_ms'] - uv_c1['p50_ms']:.1f} ms",
            "target": "-",
        },
    ]
    print(table(rows, ["figure", "subject", "baseline", "ratio", "target"]))
    result = {
        "model": "tiny GPT (2 layers, 128 wide, context 128), random init, 20-token prompt, greedy; "
        "in-process, replica and uvicorn each 1 CPU thread",
        "quick": args.quick,
        "reps": reps,
        "http_reps": http_reps,
        "concurrency": CONC,
        "max_tokens": max_tokens,
        "max_tokens_note": note,
        "in_process": ip,
        "uvicorn": {"c1": uv_c1, "mixed_c16": uv_mixed},
        "serve": variants["haproxy"],
        "serve_python_proxy": variants["python_proxy"],
        "ratios": ratios,
        "targets": {
            "short_in_mix_over_equal_short_p50": "<= 2",
            "serve_over_in_process_tokens_per_s": ">= 0.8",
            "serve_c1_p50_minus_uvicorn_ms": "<= 3",
            "serve_over_uvicorn_core_tokens_per_s": ">= 0.95",
        },
        "rows": rows,
    }
    print(f"-> {save('continuous_batching', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
