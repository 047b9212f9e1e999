"""train-overhead: steady-state step time of `modelfleet train` (Ray Train + DeepSpeed, 2 workers,
ZeRO stages 0/2/3) divided by a plain PyTorch DDP loop over the same model, data, micro-batch,
optimizer and backend (gloo, 1 thread per rank), both measured in this run; plus time to the
first step split into its parts. Targets: ratio <= 1.05 (stages 0-2), <= 1.10 (stage 3);
time to first step <= 15 s.

    python bench/train_overhead.py [--steps 40] [--stages 0 2 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import median, save, step_times, table, tiny_dataset


def _ddp_rank(rank: int, world: int, data_path: str, steps: int, cfg_dict: dict, port: int, out: str) -> None:
    """One rank of the baseline: DDP + AdamW with the same LR schedule, reading the same shards."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from modelfleet.config import Config
    from modelfleet.families import build_model
    from modelfleet.train.deepspeed import lr_lambda

    cfg = Config.from_dict(cfg_dict)
    torch.set_num_threads(1)  # what a 1-CPU Ray Train worker gets
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    table_ = pq.read_table(f"{data_path}/train")
    tokens = np.stack(table_.column("tokens").to_numpy(zero_copy_only=False)).astype(np.int64)
    mine = torch.from_numpy(tokens[rank::world])  # the same split Ray Data's shard gives: disjoint
    torch.manual_seed(cfg.train.seed)
    model = DDP(build_model(cfg.model))
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    mbs, times = t.micro_batch_size, []
    for step in range(steps):
        i = (step * mbs) % (len(mine) - mbs)
        seq = mine[i : i + mbs]
        t0 = time.perf_counter()
        loss = model(seq[:, :-1], seq[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        sched.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)  # modelfleet's loop all-reduces the logged loss too
        times.append(time.perf_counter() - t0)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def ddp_baseline(cfg, data_path: str, steps: int) -> list[float]:
    import torch.multiprocessing as mp

    out = tempfile.mktemp(suffix=".json")
    mp.spawn(
        _ddp_rank,
        args=(cfg.train.num_workers, data_path, steps, cfg.to_dict(), 29533, out),
        nprocs=cfg.train.num_workers,
        join=True,
    )
    return json.loads(Path(out).read_text())


def modelfleet_run(cfg) -> tuple[list[float], dict]:
    from modelfleet.train import train

    res = train(cfg, export=False, show_progress=False)
    times = step_times(res.run_dir, cfg)
    recs = [json.loads(line) for line in Path(res.run_dir, "metrics.jsonl").read_text().splitlines()]
    first = next((r for r in recs if r["kind"] == "first_step"), {})
    return times, {**res.timings, "worker_init_s": first.get("init_s"), "first_step_s": first.get("first_step_s")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--stages", nargs="+", type=int, default=[0, 2, 3])
    ap.add_argument("--quick", action="store_true", help="25 steps, stages 0 and 3")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.stages = 25, [0, 3]

    import ray

    from modelfleet.presets import load_config

    work = Path(tempfile.mkdtemp(prefix="mf-bench-train-"))
    data = tiny_dataset(work)
    warm = max(3, args.steps // 5)  # leave out start-up steps (allocator, first all-reduce)
    base_over = [
        "train.num_workers=2",
        f"train.max_steps={args.steps}",
        f"data.path={data}",
        f"storage.path={work}",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.eval_batches=1",
    ]
    base_cfg = load_config(preset="tiny", overrides=base_over)
    t0 = time.time()
    ddp = ddp_baseline(base_cfg, data, args.steps)
    ddp_med = median(ddp[warm:])
    print(f"plain DDP: median step {ddp_med * 1e3:.1f} ms ({time.time() - t0:.0f} s)")
    t_ray = time.time()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray_start = time.time() - t_ray
    rows = []
    try:
        for stage in args.stages:
            cfg = load_config(
                preset="tiny", overrides=[*base_over, f"deepspeed.zero_stage={stage}", f"storage.run_name=stage{stage}"]
            )
            times, timings = modelfleet_run(cfg)
            med = median(times[warm:])
            rows.append(
                {
                    "zero_stage": stage,
                    "modelfleet_step_ms": med * 1e3,
                    "ddp_step_ms": ddp_med * 1e3,
                    "ratio": med / ddp_med,
                    "target": 1.10 if stage == 3 else 1.05,
                    "time_to_first_step_s": timings.get("time_to_first_step_s"),
                    "worker_init_s": timings.get("worker_init_s"),
                    "raw_step_s": times,
                    "timings": timings,
                }
            )
            print(f"stage {stage}: median step {med * 1e3:.1f} ms -> {med / ddp_med:.2f} x DDP")
    finally:
        ray.shutdown()
    print(
        table(
            rows,
            [
                "zero_stage",
                "modelfleet_step_ms",
                "ddp_step_ms",
                "ratio",
                "target",
                "time_to_first_step_s",
                "worker_init_s",
            ],
        )
    )
    out = save(
        "train_overhead",
        {
            "model": "tiny preset (2 layers, 128 wide, 128 context), micro-batch 8, fp32, 2 workers x 1 CPU, gloo",
            "steps": args.steps,
            "warmup_steps_excluded": warm,
            "ray_start_s": ray_start,
            "ddp_raw_step_s": ddp,
            "ddp_step_ms": ddp_med * 1e3,
            "stages": rows,
        },
    )
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
