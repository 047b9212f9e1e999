"""co-location: Serve p50 while a training job runs / idle p50 (target <= 1.2), and training step
time under serving load / idle (target <= 1.1), on one Ray instance where serving's replica and
training's workers each hold their own logical CPUs (the reservation of the cluster issue).

    python bench/colocation.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import median, save, step_times, tiny_dataset
from serve_common import load, model_spec, publish_tiny, ray_start, ray_stop, serve_app


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--port", type=int, default=8430)
    args = ap.parse_args()
    steps = 25 if args.quick else 50

    from modelfleet.presets import load_config
    from modelfleet.train import train

    work = Path(tempfile.mkdtemp(prefix="mf-bench-coloc-"))
    data = tiny_dataset(work)
    publish_tiny(str(work))

    def cfg(name: str):
        return load_config(
            preset="tiny",
            overrides=[
                f"data.path={data}",
                f"storage.path={work}",
                f"train.max_steps={steps}",
                "train.eval_every=0",
                "train.checkpoint_every=0",
                "train.eval_batches=1",
                f"storage.run_name={name}",
            ],
        )

    warm = 5
    ray_start(num_cpus=6)
    try:
        url = serve_app(str(work), args.port, [model_spec("tiny", "tiny")]) + "/v1/completions"
        idle_serve = load(url, 60, 1).summary()
        c = cfg("idle")
        idle_train = median(step_times(train(c, export=False, show_progress=False).run_dir, c)[warm:])

        # Serving latency while training runs: sequential requests for as long as training lasts.
        c = cfg("beside-serving")
        box: dict = {}
        th = threading.Thread(target=lambda: box.update(res=train(c, export=False, show_progress=False)))
        th.start()
        run_dir = work / "runs" / "beside-serving"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (run_dir / "metrics.jsonl").exists():
            time.sleep(0.2)  # wait for the first step before measuring
        lat = []
        while th.is_alive() and len(lat) < 2000:
            got = load(url, 10, 1, warmup=0)
            lat += got.latencies
        th.join()
        busy_serve_p50 = median(lat) * 1e3 if lat else float("nan")

        # Training under serving load: concurrency 4 for the whole run.
        c = cfg("under-load")
        stop = threading.Event()
        served = []

        def hammer() -> None:
            while not stop.is_set() and len(served) < 20000:
                served.extend(load(url, 20, 4, warmup=0).latencies)

        h = threading.Thread(target=hammer)
        h.start()
        try:
            busy_train = median(step_times(train(c, export=False, show_progress=False).run_dir, c)[warm:])
        finally:
            stop.set()
            h.join()
    finally:
        ray_stop()
    res = {
        "serve_idle_p50_ms": idle_serve["p50_ms"],
        "serve_busy_p50_ms": busy_serve_p50,
        "serve_ratio": busy_serve_p50 / idle_serve["p50_ms"],
        "serve_target": 1.2,
        "serve_requests_during_training": len(lat),
        "train_idle_step_ms": idle_train * 1e3,
        "train_busy_step_ms": busy_train * 1e3,
        "train_ratio": busy_train / idle_train,
        "train_target": 1.1,
        "requests_served_during_training": len(served),
    }
    for k, v in res.items():
        print(f"{k:>34}: {v:.3f}" if isinstance(v, float) else f"{k:>34}: {v}")
    print(
        f"-> {save('colocation', {'model': 'tiny GPT: serving 1 replica x 1 CPU; training 2 workers x 1 CPU, ZeRO-3', 'quick': args.quick, **res})}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
