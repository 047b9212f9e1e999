"""checkpoint-stall: how long training stops for each checkpoint, synchronous against asynchronous.

The `small` preset on 2 workers, ZeRO-2 and ZeRO-3, evaluation off, N steps with a checkpoint
every K, in three runs per stage: ``train.checkpoint_mode=sync``, ``=async``, and no checkpoint
but the final one (``checkpoint_every=0``). Per run:

- stall per checkpoint: the step loop's own measure (the ``save`` record's ``stall_s``: from
  entering the save to the next step, barriers, waiting for the previous save and Ray's report
  included), median over the checkpoints before the final one;
- the same from step intervals: (step k+1's record time - step k's) - the median interval
  without a save (noisy on a shared machine, kept as a check on the direct figure);
- wall time of the N steps (first to last step record: the final save is after them) over the
  run without checkpoints;
- the drain check's cost (``ray.train.get_preemption_info``, a collective at each log step);
- async only: each save's background write (``write_s``: from the snapshot to COMPLETE) and the
  upload thread's CPU-seconds, and the median step time while a write is in flight against
  steps with none (the slowdown the writer causes).

Targets (issue 29): async stall / sync stall <= 1/10; async wall / no-checkpoint wall <= 1.05.

With ``--s3`` the run directory is on an S3 endpoint (moto's server on 127.0.0.1, started here):
what a synchronous save pays for its upload, and what an asynchronous one moves off the step.

    python bench/checkpoint_stall.py [--steps 40] [--every 10] [--stages 2 3] [--s3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import median, save, table, tiny_dataset

MODES = ("sync", "async", "none")


def figures(run_dir: str) -> dict:
    """The figures of one run from its metrics.jsonl (see the module docstring)."""
    from modelfleet.storage import join, read_text

    recs = [json.loads(x) for x in read_text(join(run_dir, "metrics.jsonl")).splitlines()]
    step_t = {r["step"]: r["time"] for r in recs if r["kind"] == "step"}
    saves = [r for r in recs if r["kind"] == "save"]
    published = {r["step"]: r for r in recs if r["kind"] == "checkpoint"}
    steps = sorted(step_t)
    last = steps[-1]
    gaps = {s: step_t[s + 1] - step_t[s] for s in steps if s + 1 in step_t}
    saved = {r["step"] for r in saves}
    warm = set(steps[: max(3, len(steps) // 10)])  # start-up steps: allocator, first all-reduce
    base = median([g for s, g in gaps.items() if s not in saved and s not in warm])
    mid = [r for r in saves if r["step"] != last]  # the final save has no next step
    out = {
        "steps_wall_s": step_t[last] - step_t[steps[0]],
        "median_step_s": base,
        "stall_s": [round(r["stall_s"], 4) for r in mid],
        "stall_median_s": median([r["stall_s"] for r in mid]) if mid else None,
        "interval_stall_median_s": median([gaps[r["step"]] - base for r in mid]) if mid else None,
    }
    done = [r for r in recs if r["kind"] == "done"]
    out["drain_check_mean_s"] = done[-1].get("drain_check_mean_s") if done else None
    writes = [published[r["step"]] for r in mid if "write_s" in published.get(r["step"], {})]
    if writes:
        # A step is "during a write" when it ran while one was in flight (snapshot to COMPLETE).
        spans = [(step_t[w["step"]], published[w["step"]]["time"]) for w in writes]
        during = [
            g for s, g in gaps.items() if s not in saved and any(step_t[s] < b and step_t[s + 1] > a for a, b in spans)
        ]
        quiet = [g for s, g in gaps.items() if s not in saved and s not in warm and g not in during]
        out.update(
            write_s=[round(w["write_s"], 3) for w in writes],
            write_cpu_s=[round(w["write_cpu_s"], 3) for w in writes],
            step_during_write_s=median(during) if during else None,
            step_without_write_s=median(quiet) if quiet else None,
        )
    return out


def moto_s3(bucket: str) -> subprocess.Popen:
    """moto's S3 server on a free loopback port, its endpoint in this process's environment (Ray's
    workers inherit it), and ``bucket`` created."""
    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_REGION="us-east-1",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_EC2_METADATA_DISABLED="true",
    )
    deadline = time.monotonic() + 60
    while True:  # until it answers (bounded)
        try:
            boto3.client("s3").create_bucket(Bucket=bucket)
            return proc
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--s3", action="store_true", help="run directories on a local S3 endpoint (moto)")
    args = ap.parse_args()
    moto = moto_s3("bench") if args.s3 else None

    import pyarrow.fs as pafs
    import ray

    from modelfleet.presets import load_config
    from modelfleet.storage import join
    from modelfleet.train import train
    from modelfleet.train.checkpoint import step_dir_name

    work = Path(tempfile.mkdtemp(prefix="mf-bench-ckpt-"))
    data = tiny_dataset(work, block_size=256)  # the small preset's context
    store = "s3://bench/ckpt" if args.s3 else str(work)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    rows, raw = [], {}
    try:
        for stage in args.stages:
            per_mode = {}
            for mode in MODES:
                cfg = load_config(
                    preset="small",
                    overrides=[
                        "train.num_workers=2",
                        f"train.max_steps={args.steps}",
                        f"train.checkpoint_every={0 if mode == 'none' else args.every}",
                        f"train.checkpoint_mode={'sync' if mode == 'none' else mode}",
                        "train.eval_every=0",
                        "train.eval_batches=1",
                        f"deepspeed.zero_stage={stage}",
                        f"data.path={data}",
                        f"storage.path={store}",
                        "tracking.enabled=false",  # the figures are the checkpoint's alone
                        f"storage.run_name=stage{stage}-{mode}",
                    ],
                )
                t0 = time.time()
                res = train(cfg, show_progress=False, export=False)
                f = figures(res.run_dir)
                f["run_s"] = time.time() - t0
                fs, base = pafs.FileSystem.from_uri(join(res.run_dir, step_dir_name(args.steps)))
                files = fs.get_file_info(pafs.FileSelector(base, recursive=True))
                f["checkpoint_mb"] = sum(x.size or 0 for x in files) / 2**20
                per_mode[mode] = f
            raw[f"zero{stage}"] = per_mode
            s, a, n = per_mode["sync"], per_mode["async"], per_mode["none"]
            rows.append(
                {
                    "zero_stage": stage,
                    "median_step_s": n["median_step_s"],
                    "sync_stall_s": s["stall_median_s"],
                    "async_stall_s": a["stall_median_s"],
                    "async_over_sync_stall": a["stall_median_s"] / s["stall_median_s"],
                    "async_wall_over_none": a["steps_wall_s"] / n["steps_wall_s"],
                    "sync_wall_over_none": s["steps_wall_s"] / n["steps_wall_s"],
                    "write_s": median(a.get("write_s") or [0.0]),
                    "write_cpu_s": median(a.get("write_cpu_s") or [0.0]),
                    "step_during_write_s": a.get("step_during_write_s"),
                    "step_without_write_s": a.get("step_without_write_s"),
                    "checkpoint_mb": a["checkpoint_mb"],
                    "drain_check_s": a["drain_check_mean_s"],
                }
            )
    finally:
        ray.shutdown()
        if moto is not None:
            moto.kill()
    cols = [
        "zero_stage",
        "median_step_s",
        "sync_stall_s",
        "async_stall_s",
        "async_over_sync_stall",
        "async_wall_over_none",
        "sync_wall_over_none",
        "write_s",
        "write_cpu_s",
        "step_during_write_s",
        "step_without_write_s",
        "checkpoint_mb",
        "drain_check_s",
    ]
    print(table(rows, cols))
    targets = {"async_over_sync_stall <= 0.1": 0.1, "async_wall_over_none <= 1.05": 1.05}
    ratios = {
        f"zero{r['zero_stage']}_{k}": r[k] for r in rows for k in ("async_over_sync_stall", "async_wall_over_none")
    }
    out = save(
        "checkpoint_stall_s3" if args.s3 else "checkpoint_stall",
        {"args": vars(args), "rows": rows, "raw": raw, "targets": targets, "ratios": ratios},
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
