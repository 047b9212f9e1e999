"""``make demo``: the mission on one machine, with the project's own commands and a real cluster."""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from ray import serve

from modelfleet.cli.commands import load_args
from modelfleet.config import Config
from modelfleet.data.prepare import prepare_dataset
from modelfleet.data.tokenizer import ByteTokenizer
from modelfleet.serve.operations import deploy, status, wait_for
from modelfleet.train.trainer import train


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(load_args(args))


def run_demo(cfg: Config) -> int:
    t0 = time.time()
    print(
        f"== modelfleet demo: preset {cfg.preset}, ZeRO-{cfg.deepspeed.zero_stage}, "
        f"{cfg.train.num_workers} workers, {cfg.train.max_steps} steps"
    )
    if not os.path.isfile(os.path.join(cfg.data.path, "meta.json")):
        meta = prepare_dataset(cfg.data, cfg.model.block_size, ByteTokenizer())
        print(
            f"== prepared {meta['train_rows']} train / {meta['val_rows']} val sequences "
            f"from {meta['num_documents']} Python stdlib files -> {cfg.data.path}"
        )
    res = train(cfg)
    evals = [m for m in _read_metrics(res.run_dir) if m["kind"] == "eval"]
    print("== validation loss by step: " + ", ".join(f"{e['step']}: {e['val_loss']:.3f}" for e in evals))
    if len(evals) >= 2 and evals[-1]["val_loss"] < evals[0]["val_loss"]:
        print(f"== validation loss fell {evals[0]['val_loss']:.3f} -> {evals[-1]['val_loss']:.3f}")
    print(
        f"== time to first step {res.timings.get('time_to_first_step_s', float('nan')):.1f} s, "
        f"total {time.time() - t0:.1f} s"
    )
    if not res.artifact:
        print("== no artifact exported; nothing to serve")
        return 1
    print(f"== artifact: {res.artifact.uri}")
    serve_demo(cfg, f"{res.artifact.name}@{res.artifact.version}")
    import ray

    ray.shutdown()  # the local cluster train() started in this process
    print(f"== Ray shut down; demo finished in {time.time() - t0:.1f} s")
    return 0


# Short delays so the demo shows a scale-up and a scale-down within a minute; a production
# config keeps Serve's longer defaults (see deploy/modelfleet-serve.yaml).
DEMO_SERVE: dict = {
    "app_name": "modelfleet-demo",
    "host": "127.0.0.1",
    "port": 8000,
    "models": [
        {
            "name": "tiny",
            "ray_actor_options": {"num_cpus": 1},
            "batching": {"max_batch_size": 4},
            "max_ongoing_requests": 4,
            "autoscaling": {
                "min_replicas": 1,
                "initial_replicas": 1,
                "max_replicas": 2,
                "target_ongoing_requests": 1,
                "upscale_delay_s": 1,
                "downscale_delay_s": 5,
                "metrics_interval_s": 0.5,
                "look_back_period_s": 2,
            },
        }
    ],
}
PROMPTS = ["def main(", "import os\n", "class Parser:", "    return ", "# Copyright", "for line in "]


def serve_demo(
    cfg: Config, artifact: str, *, requests: int = 96, concurrency: int = 8, max_burst_s: float = 90.0
) -> None:
    """Deploy ``artifact`` with autoscaling, keep a bounded burst going until the autoscaler adds a
    replica (at least ``requests`` requests, at most ``max_burst_s``), show replicas rising and
    falling, print some completions, then delete the app and stop Serve. If no scale-up happens
    within the bound, say so plainly: the demo reports what it saw, not what it hoped for."""
    sc = copy.deepcopy(DEMO_SERVE)
    sc["models"][0]["artifact"] = artifact
    sc["storage_path"] = cfg.storage.path
    t0 = time.time()
    served = deploy(sc)
    url = f"http://{served.host}:{served.port}"
    max_replicas = served.models[0].autoscaling.max_replicas
    print(f"== serving {artifact} at {url}/v1/completions (OpenAI API), ready in {time.time() - t0:.1f} s")

    def replicas() -> int:
        return sum(r["running"] for r in status() if r["app"] == served.app_name and r["deployment"] == "model-tiny")

    counts: list[tuple[float, int]] = [(0.0, replicas())]
    done = threading.Event()
    t_burst = time.time()

    def watch() -> None:
        while not done.wait(0.5):
            n = replicas()
            if n != counts[-1][1]:
                counts.append((time.time() - t_burst, n))
                print(f"   t={counts[-1][0]:5.1f}s  model-tiny replicas: {n}")

    sent = itertools.count()
    results: list[tuple[int, str, str]] = []

    def keep_sending() -> None:
        with httpx.Client(timeout=120) as c:
            while True:
                scaled = max(n for _, n in counts) >= max_replicas
                i = next(sent)
                if (i >= requests and scaled) or time.time() - t_burst > max_burst_s:
                    return
                prompt = PROMPTS[i % len(PROMPTS)]
                r = c.post(
                    f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 48, "temperature": 0.8, "seed": i}
                )
                results.append(
                    (r.status_code, prompt, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text)
                )

    print(
        f"== burst at concurrency {concurrency} until the autoscaler adds a replica (at least {requests} "
        f"requests, at most {max_burst_s:.0f} s); replicas start at {counts[0][1]}"
    )
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda _: keep_sending(), range(concurrency)))
    elapsed = time.time() - t_burst
    ok = sum(1 for code, _, _ in results if code == 200)
    peak = max(n for _, n in counts)
    print(
        f"== {ok}/{len(results)} answered in {elapsed:.1f} s ({len(results) / elapsed:.1f} req/s); peak replicas {peak}"
    )
    if peak < max_replicas:
        print(
            f"== no scale-up seen: within {max_burst_s:.0f} s the autoscaler kept {peak} replica(s) "
            f"(target_ongoing_requests=1, max {max_replicas}); on a busy machine the burst may not queue enough"
        )
    for _, prompt, text in results[:3]:
        print(f"   {prompt!r} -> {text[:60]!r}")
    try:
        wait_for(lambda: replicas() == 1, 60, "scale-down after the burst")
    except TimeoutError as e:
        print(f"== {e}")
    done.set()
    watcher.join(timeout=2)
    print(f"== replicas back to {replicas()} after the load stopped")
    serve.delete(served.app_name)
    serve.shutdown()
    print("== Serve shut down")


def _read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
