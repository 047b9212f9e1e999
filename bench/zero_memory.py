"""zero-memory: per-worker bytes of parameters + gradients + optimizer states under DeepSpeed
ZeRO stages 1-3 with N = 1, 2, 4 Ray Train workers, divided by the N = 1 figure, next to ZeRO's
theory (``modelfleet.train.memory.model_state_bytes``). Target: within 10% of theory.

Each worker builds the engine as the training loop does, runs one step, and then counts the
tensors the engine holds (module parameters or their ZeRO-3 partitions, gradients or their
partitions, the optimizer's fp32 master copies and Adam moments), each storage once.

    python bench/zero_memory.py [--workers 1 2 4] [--stages 1 2 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import save, table


def _storages(tensors: Any) -> dict[int, int]:
    out = {}
    for t in tensors:
        if t is not None and t.numel():
            s = t.untyped_storage()
            out[s.data_ptr()] = s.nbytes()
    return out


def _engine_bytes(engine: Any) -> dict[str, int]:
    """Bytes the engine holds for model states on this rank, each storage counted once."""
    import torch

    params = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)  # ZeRO wraps the torch optimizer
    masters = [p for g in inner.param_groups for p in g["params"]]
    states = [v for st in inner.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    grads = [p.grad for p in engine.module.parameters()] + [p.grad for p in masters]
    for attr in ("averaged_gradients", "fp32_partitioned_groups_flat"):
        obj = getattr(opt, attr, None)
        if isinstance(obj, dict):
            grads += [t for v in obj.values() for t in (v if isinstance(v, list) else [v])]
    p_s, m_s, s_s = _storages(params), _storages(masters), _storages(states)
    g_s = _storages(grads)
    # A storage is counted under the first category that holds it (stage 0 trains the module's
    # own fp32 parameters: they are both the weights and the optimizer's params).
    seen: set[int] = set()
    out = {}
    for name, d in (("params", p_s), ("grads", g_s), ("optimizer_master", m_s), ("optimizer_moments", s_s)):
        out[name] = sum(n for k, n in d.items() if k not in seen)
        seen |= set(d)
    return out


def _loop(config: dict[str, Any]) -> None:

    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    import ray.train
    import torch
    from deepspeed.utils import logger

    from modelfleet.config import Config
    from modelfleet.families import build_model
    from modelfleet.train.deepspeed import build_ds_config

    logger.setLevel("ERROR")
    torch.set_num_threads(1)
    results = {}
    for stage in config["stages"]:
        cfg = Config.from_dict(config["config"])
        cfg.deepspeed.zero_stage = stage
        torch.manual_seed(0)
        model = build_model(cfg.model)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=build_ds_config(cfg))
        seq = torch.randint(0, cfg.model.vocab_size, (2, 33))
        for _ in range(2):  # the first step allocates Adam's moments
            loss = engine(seq[:, :-1], seq[:, 1:])
            engine.backward(loss)
            engine.step()
        loss = engine(seq[:, :-1], seq[:, 1:])
        engine.backward(loss)  # gradients live now; count before step() frees them
        results[stage] = _engine_bytes(engine)
        engine.step()
        del engine, model
    # Train V2 keeps only metrics reported with a checkpoint: each rank writes a file instead
    # (the benchmark runs on one machine).
    rank = ray.train.get_context().get_world_rank()
    with open(os.path.join(config["out"], f"rank-{rank}.json"), "w") as f:
        json.dump(results, f)


def measure(n: int, stages: list[int], cfg) -> dict[int, dict[str, int]]:
    import ray.train
    from ray.train.torch import TorchTrainer

    out = tempfile.mkdtemp(prefix="mf-zm-out-")
    trainer = TorchTrainer(
        _loop,
        train_loop_config={"config": cfg.to_dict(), "stages": stages, "out": out},
        scaling_config=ray.train.ScalingConfig(num_workers=n),
        run_config=ray.train.RunConfig(storage_path=tempfile.mkdtemp(prefix="mf-zm-"), name=f"zero-mem-{n}"),
    )
    trainer.fit()
    ranks = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank-*.json"))]
    assert len(ranks) == n, f"expected {n} rank reports, got {len(ranks)}"
    # The busiest rank: what a GPU of that size must hold.
    return {int(st): max((r[st] for r in ranks), key=lambda d: sum(d.values())) for st in ranks[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--stages", nargs="+", type=int, default=[1, 2, 3])
    args = ap.parse_args()

    import ray

    from modelfleet.families import build_model
    from modelfleet.models import num_params
    from modelfleet.presets import load_config
    from modelfleet.train.memory import model_state_bytes

    # 8 layers x 256 wide (6.4 M parameters): big enough that per-tensor padding is noise.
    cfg = load_config(preset="tiny", overrides=["model.n_layer=8", "model.n_embd=256", "model.n_head=4"])
    psi = num_params(build_model(cfg.model))
    ray.init(num_cpus=max(4, max(args.workers)), include_dashboard=False, log_to_driver=False)
    try:
        measured = {n: measure(n, args.stages, cfg) for n in args.workers}
    finally:
        ray.shutdown()
    rows = []
    for stage in args.stages:
        base = sum(measured[args.workers[0]][stage].values())
        theory_base = sum(model_state_bytes(psi, stage, args.workers[0], "fp32"))
        for n in args.workers:
            got = measured[n][stage]
            total = sum(got.values())
            theory = sum(model_state_bytes(psi, stage, n, "fp32")) / theory_base
            rows.append(
                {
                    "zero_stage": stage,
                    "workers": n,
                    "mib_per_worker": total / 2**20,
                    "ratio_vs_n1": total / base,
                    "theory_ratio": theory,
                    "off_theory": total / base / theory - 1,
                    **{f"{k}_mib": v / 2**20 for k, v in got.items()},
                }
            )
    print(
        table(
            rows,
            [
                "zero_stage",
                "workers",
                "mib_per_worker",
                "ratio_vs_n1",
                "theory_ratio",
                "off_theory",
                "params_mib",
                "grads_mib",
                "optimizer_master_mib",
                "optimizer_moments_mib",
            ],
        )
    )
    out = save(
        "zero_memory",
        {
            "model": f"GPT 8 layers x 256 wide, {psi} parameters, fp32, CPU workers",
            "params": psi,
            "target": "ratio within 10% of ZeRO's theory",
            "rows": rows,
        },
    )
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
