"""checkpoint-stall: how long training visibly stops for each checkpoint today (synchronous saves).

The `small` preset on 2 workers, ZeRO-2 and ZeRO-3, evaluation off, a checkpoint every K steps.
Per checkpoint at step k: stall = (time of step k+1's record - time of step k's record) - the
median of the same interval over steps without a checkpoint. The records' times are the driver's
receipt of rank 0's sends, so the stall includes everything a save costs the step loop: the
barriers, every rank's DeepSpeed write, Ray Train's report (its copy into the run directory) and
the COMPLETE marker. The final step's checkpoint has no next step and is left out.

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


def stalls(run_dir: str) -> tuple[list[dict], float]:
    """(one row per checkpoint with its stall, the median step-to-step interval without one)."""
    recs = [json.loads(x) for x in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    step_t = {r["step"]: r["time"] for r in recs if r["kind"] == "step"}
    saved = {r["step"] for r in recs if r["kind"] == "checkpoint"}
    steps = sorted(step_t)
    gaps = {s: step_t[s + 1] - step_t[s] for s in steps if s + 1 in step_t}
    warm = steps[: max(3, len(steps) // 10)]  # start-up steps: allocator, first all-reduce
    plain = [g for s, g in gaps.items() if s not in saved and s not in warm]
    base = median(plain)
    rows = [{"step": s, "interval_s": gaps[s], "stall_s": gaps[s] - base} for s in sorted(saved) if s in gaps]
    return rows, base


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
            cfg = load_config(
                preset="small",
                overrides=[
                    "train.num_workers=2",
                    f"train.max_steps={args.steps}",
                    f"train.checkpoint_every={args.every}",
                    "train.eval_every=0",
                    "train.eval_batches=1",
                    f"deepspeed.zero_stage={stage}",
                    f"data.path={data}",
                    f"storage.path={work}",
                    f"storage.run_name=stage{stage}",
                ],
            )
            t0 = time.time()
            res = train(cfg, show_progress=False, export=False)
            per_ckpt, base = stalls(res.run_dir)
            ckpt_bytes = sum(f.stat().st_size for f in Path(res.run_dir, step_dir_name(args.steps)).rglob("*"))
            raw[f"zero{stage}"] = per_ckpt
            rows.append(
                {
                    "zero_stage": stage,
                    "median_step_s": base,
                    "stall_median_s": median([r["stall_s"] for r in per_ckpt]),
                    "stall_max_s": max(r["stall_s"] for r in per_ckpt),
                    "stall_over_step": median([r["stall_s"] for r in per_ckpt]) / base,
                    "checkpoints": len(per_ckpt),
                    "checkpoint_mb": ckpt_bytes / 2**20,
                    "run_s": time.time() - t0,
                }
            )
    finally:
        ray.shutdown()
    cols = ["zero_stage", "median_step_s", "stall_median_s", "stall_max_s", "stall_over_step", "checkpoints"]
    print(table(rows, [*cols, "checkpoint_mb"]))
    out = save("checkpoint_stall", {"args": vars(args), "rows": rows, "raw": raw})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
