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

    python bench/checkpoint_stall.py [--steps 40] [--every 10] [--stages 2 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import median, save, table, tiny_dataset

MODES = ("sync", "async", "none")


def figures(run_dir: str) -> dict:
    """The figures of one run from its metrics.jsonl (see the module docstring)."""
    recs = [json.loads(x) for x in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
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
        # A step is "during a write" when its record arrived between the snapshot and COMPLETE.
        spans = [(step_t[w["step"]], published[w["step"]]["time"]) for w in writes]
        during = [g for s, g in gaps.items() if s not in saved and any(a < step_t[s + 1] <= b for a, b in spans)]
        quiet = [g for s, g in gaps.items() if s not in saved and s not in warm and g not in during]
        out.update(
            write_s=[round(w["write_s"], 3) for w in writes],
            write_cpu_s=[round(w["write_cpu_s"], 3) for w in writes],
            step_during_write_s=median(during) if during else None,
            step_without_write_s=median(quiet) if quiet else None,
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    args = ap.parse_args()

    import ray

    from modelfleet.presets import load_config
    from modelfleet.train import train
    from modelfleet.train.checkpoint import step_dir_name

    work = Path(tempfile.mkdtemp(prefix="mf-bench-ckpt-"))
    data = tiny_dataset(work, block_size=256)  # the small preset's context
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
                        f"storage.path={work}",
                        f"storage.run_name=stage{stage}-{mode}",
                    ],
                )
                t0 = time.time()
                res = train(cfg, show_progress=False, export=False)
                f = figures(res.run_dir)
                f["run_s"] = time.time() - t0
                f["checkpoint_mb"] = (
                    sum(p.stat().st_size for p in Path(res.run_dir, step_dir_name(args.steps)).rglob("*")) / 2**20
                )
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
    out = save("checkpoint_stall", {"args": vars(args), "rows": rows, "raw": raw, "targets": targets})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
