"""engine v2 (issue 25): prefix-hit TTFT through Serve, the shipped path (HAProxy ingress, the
one-hop front, the replica and its engine core process), on the ``bench-lm`` preset's model (4
layers x 256 width, 1,024-token context, random weights, byte tokenizer: one ASCII character is
one token).

Each repeat sends a fresh 896-character shared prefix + 64 characters once (its 56 full blocks go
into the prefix cache), then, streaming, the same prefix + 64 new characters (warm: 896 cached
tokens, checked in ``usage.prompt_tokens_details``) and a fresh 960-character prompt (cold). TTFT
is the client's time from sending the request (``max_tokens: 1``) to the first streamed event
with a choice. Target: warm / cold
<= 1/3 (in process it is <= 1/5: bench/paged_engine.py).

Writes bench/results/prefix_serve.json.

    python bench/prefix_serve.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import string
import tempfile
import time

import httpx
from common import median, save, table
from serve_common import model_spec, ray_start, ray_stop, serve_app

PORT = 8417
SEED = 25


def _publish(storage: str) -> str:
    import torch

    from modelfleet import registry
    from modelfleet.families import build_model
    from modelfleet.presets import load_config
    from modelfleet.train.export import write_artifact_dir

    cfg = load_config(preset="bench-lm", overrides=[f"storage.path={storage}"])
    torch.manual_seed(SEED)
    model = build_model(cfg.model).eval()
    ref = registry.publish(storage, "bench-lm", write_artifact_dir(model, cfg, {}), consume=True)
    return f"{ref.name}@{ref.version}"


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.ascii_letters) for _ in range(n))


def _ttft(client: httpx.Client, url: str, prompt: str) -> tuple[float, int]:
    """Seconds to the first streamed token, and the prompt tokens the replica found cached."""
    body = {
        "prompt": prompt,
        "max_tokens": 1,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0, first, cached = time.perf_counter(), None, -1
    with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            # The first event with a choice carries the one token (its text may be empty: random
            # weights can emit half a UTF-8 character, which the stream holds back).
            if first is None and event["choices"]:
                first = time.perf_counter() - t0
            if event.get("usage"):
                cached = event["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert first is not None, "no choice was streamed"
    return first, cached


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="5 repeats instead of 15")
    args = ap.parse_args()
    repeats = 5 if args.quick else 15
    storage = tempfile.mkdtemp(prefix="bench-prefix-serve-")
    ray_start()
    try:
        url = serve_app(storage, PORT, [model_spec("bench-lm", _publish(storage))])
        rng = random.Random(SEED)
        warm, cold = [], []
        with httpx.Client(timeout=120) as c:
            _ttft(c, url, _text(rng, 960))  # the replica's first request (lazy work) is not timed
            for _ in range(repeats):
                shared = _text(rng, 896)
                _, seeded = _ttft(c, url, shared + _text(rng, 64))
                assert seeded == 0, seeded
                t_warm, hit = _ttft(c, url, shared + _text(rng, 64))
                assert hit == 896, hit
                t_cold, miss = _ttft(c, url, _text(rng, 960))
                assert miss == 0, miss
                warm.append(t_warm)
                cold.append(t_cold)
    finally:
        ray_stop()
        shutil.rmtree(storage, ignore_errors=True)
    ratio = median(warm) / median(cold)
    result = {
        "repeats": repeats,
        "ttft_warm_s": median(warm),
        "ttft_cold_s": median(cold),
        "ratios": {"ttft_hit_over_cold_through_serve": ratio},
        "target": "<= 1/3",
    }
    print(
        table(
            [{**result, "ttft_hit_over_cold": ratio}], ["repeats", "ttft_warm_s", "ttft_cold_s", "ttft_hit_over_cold"]
        )
    )
    print(f"wrote {save('prefix_serve', result)}")


if __name__ == "__main__":
    main()
