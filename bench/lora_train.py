"""lora-train: LoRA fine-tuning next to full fine-tuning of the same GPT, in one run.

The model is the ``small`` preset (4 layers x 256 wide, 256-token context, byte vocabulary),
randomly initialised and published as a base artifact (training cost does not depend on the
weights' values). Each mode trains it with DeepSpeed as ``train/loop.py`` does (one gloo rank,
fp32, AdamW, gradient clipping, the LR schedule, ``deepspeed.initialize`` given only the
parameters that require grad), on the same micro-batches, under ZeRO stage 1 (and 2):

* ``full``: every weight of the base artifact trains (loaded with the family's ``build_base``);
* ``lora``: ``model.params.lora`` = {base: <the artifact's URI>, r: 8, alpha: 16} on the gpt
  family's default targets (``c_attn``, ``c_proj``, ``c_fc``): the family loads the base's
  weights, peft freezes them and only the adapter trains.

Per mode and stage, measured after warm-up steps: the median step time (forward + backward +
``engine.step()``) over ``--steps`` steps, the trainable and total parameter counts, the engine's
model-state bytes on the rank (parameters, gradients, optimizer fp32 masters and Adam moments,
each storage once; counted after a backward, before ``step()`` frees the gradients, with
bench/zero_memory.py's counter), and the process's peak RSS (``ru_maxrss``; each mode and stage
runs in its own interpreter so the peak is that mode's own), also as growth above the libraries
the mode imports (LoRA imports peft, which imports transformers). Ratios are LoRA / full.
RSS is what glibc malloc keeps, not only what is live: peft's LoRA forward allocates a few
transient activation-sized tensors per adapted layer, and freed heap blocks are not all returned.

Data: the first rows of the train split of bench/common.py's ``tiny_dataset`` at the model's
block size (byte tokens of Python's json/ and email/ sources), the same rows in the same order
for both modes.

    python bench/lora_train.py [--quick] [--steps 20] [--stages 1 2] [--threads 1]

Writes bench/results/lora_train.json. ``--quick``: 10 steps, stage 1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, median, save, table, tiny_dataset

LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
"""The adapter settings (targets: the gpt family's default, c_attn/c_proj/c_fc)."""
MODES = ("full", "lora")


def _maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One mode at one ZeRO stage as one DeepSpeed rank (gloo, world size 1) in this fresh
    interpreter: build, warm up, count model states, time ``steps`` steps."""
    import socket

    # tests/helpers/training.py's SINGLE_RANK_PREAMBLE: a free port and a world of one rank.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", DS_ACCELERATOR="cpu"
    )
    import deepspeed
    import numpy as np
    import torch
    from deepspeed.utils import logger as ds_logger
    from zero_memory import _engine_bytes

    from modelfleet.config import Config
    from modelfleet.families import build_model, get_family
    from modelfleet.registry import fetch
    from modelfleet.train.deepspeed import build_ds_config, lr_lambda

    ds_logger.setLevel("ERROR")
    torch.set_num_threads(spec["threads"])  # what a Ray Train worker with that many CPUs gets
    deepspeed.init_distributed(dist_backend="gloo")
    rss_import = _maxrss_bytes()  # the floor every mode pays: torch + deepspeed + a process group
    if spec["mode"] == "lora":
        import peft  # noqa: F401  (imports transformers: a floor of its own, measured apart)
    rss_libs = _maxrss_bytes()

    cfg = Config.from_dict(spec["config"])
    cfg.deepspeed.zero_stage = spec["stage"]
    family = get_family(cfg.model.family)
    torch.manual_seed(cfg.train.seed)
    if spec["mode"] == "lora":
        cfg.model.params = {"lora": {"base": spec["base_uri"], **LORA}}
        model = build_model(cfg.model)  # the base artifact's weights, frozen, + a fresh adapter
    else:
        # Full fine-tuning of the same weights (the family's own base loader): both modes start
        # from the same model, so their first losses agree (a fresh adapter's update is zero).
        model = family.build_base(cfg.model, fetch(spec["base_uri"]))
    # The loop's call: frozen base weights get no gradients and no optimizer state.
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=trainable,
        config=build_ds_config(cfg, 1),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
    )
    rss_built = _maxrss_bytes()  # + model, peft's lazy imports, the engine; before any step

    rows = torch.from_numpy(np.load(spec["data"]))
    mbs = cfg.train.micro_batch_size
    n_batches = len(rows) // mbs

    def batch(i: int) -> dict[str, Any]:
        return {"tokens": rows[(i % n_batches) * mbs : (i % n_batches + 1) * mbs].to(engine.device)}

    warmup, losses, state = spec["warmup"], [], None
    for i in range(warmup):  # the first step allocates Adam's moments and DeepSpeed's buffers
        loss = family.loss(engine, batch(i))
        engine.backward(loss)
        if i == warmup - 1:
            state = _engine_bytes(engine)  # gradients live now; step() frees or reuses them
        engine.step()
        losses.append(float(loss))
    times = []
    for i in range(warmup, warmup + spec["steps"]):
        t0 = time.perf_counter()
        loss = family.loss(engine, batch(i))
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))  # after the clock stops: the host sync is not step time
    return {
        "mode": spec["mode"],
        "zero_stage": spec["stage"],
        "step_s": times,
        "losses": losses,
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in model.parameters()),
        "state_bytes": state,
        "rss_import_bytes": rss_import,
        "rss_libs_bytes": rss_libs,
        "rss_built_bytes": rss_built,
        "peak_rss_bytes": _maxrss_bytes(),
    }


def run_mode(spec: dict[str, Any], timeout_s: float = 600) -> dict[str, Any]:
    """``_worker`` in a fresh interpreter: torch.distributed state and the RSS peak are its own."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "bench")]),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": str(spec["threads"]),
    }
    r = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout_s,
    )
    if r.returncode != 0:
        raise RuntimeError(f"{spec['mode']} stage {spec['stage']} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return json.loads(next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))[7:])


def publish_base(storage: str, cfg: Any) -> Any:
    """The ``small`` GPT, randomly initialised, as a full-model artifact (no training run)."""
    import torch

    from modelfleet import registry
    from modelfleet.families import build_model
    from modelfleet.train.export import write_artifact_dir

    torch.manual_seed(0)
    return registry.publish(
        storage, "small-base", write_artifact_dir(build_model(cfg.model).eval(), cfg, {}), consume=True
    )


def token_rows(data_path: str, n: int) -> Any:
    """The first ``n`` rows (``block_size + 1`` tokens each) of the dataset's train split."""
    import numpy as np
    import pyarrow.parquet as pq

    col = pq.read_table(f"{data_path}/train", columns=["tokens"]).column("tokens").to_numpy(zero_copy_only=False)
    rows = np.stack(col[:n]).astype(np.int64)
    assert len(rows) == n, f"train split has {len(rows)} rows, fewer than the {n} needed"
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per mode and stage")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    ap.add_argument("--stages", nargs="+", type=int, default=[1, 2], choices=[1, 2])
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (the loop: cpus_per_worker)")
    ap.add_argument("--quick", action="store_true", help="10 steps, stage 1 only")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(_worker(json.loads(args.worker))), flush=True)
        return 0
    if args.quick:
        args.steps, args.stages = 10, [1]

    import numpy as np

    from modelfleet.presets import load_config

    t_start = time.time()
    work = Path(tempfile.mkdtemp(prefix="mf-bench-lora-"))
    cfg = load_config(preset="small", overrides=[f"storage.path={work}"])
    ref = publish_base(str(work), cfg)
    data = tiny_dataset(work, cfg.model.block_size)
    rows_path = str(work / "rows.npy")
    np.save(rows_path, token_rows(data, (args.warmup + args.steps) * cfg.train.micro_batch_size))

    results: dict[int, dict[str, dict[str, Any]]] = {}
    for stage in args.stages:
        for mode in MODES:  # full first, then lora, one interpreter each
            t0 = time.time()
            r = run_mode(
                {
                    "mode": mode,
                    "stage": stage,
                    "config": cfg.to_dict(),
                    "base_uri": ref.uri,
                    "data": rows_path,
                    "steps": args.steps,
                    "warmup": args.warmup,
                    "threads": args.threads,
                }
            )
            results.setdefault(stage, {})[mode] = r
            print(
                f"stage {stage} {mode}: median step {median(r['step_s']) * 1e3:.0f} ms "
                f"({time.time() - t0:.0f} s incl. start-up)",
                flush=True,
            )

    rows = []
    for stage in args.stages:
        per = {}
        for mode in MODES:
            r = results[stage][mode]
            per[mode] = {
                "step_ms": median(r["step_s"]) * 1e3,
                "state_mib": sum(r["state_bytes"].values()) / 2**20,
                "peak_rss_mib": r["peak_rss_bytes"] / 2**20,
                "rss_growth_mib": (r["peak_rss_bytes"] - r["rss_libs_bytes"]) / 2**20,
            }
            rows.append(
                {
                    "zero_stage": stage,
                    "mode": mode,
                    "trainable_params": r["trainable_params"],
                    "total_params": r["total_params"],
                    **per[mode],
                    **{f"{k}_mib": v / 2**20 for k, v in r["state_bytes"].items()},
                    "rss_import_mib": r["rss_import_bytes"] / 2**20,
                    "rss_peft_import_mib": (r["rss_libs_bytes"] - r["rss_import_bytes"]) / 2**20,
                    "rss_build_mib": (r["rss_built_bytes"] - r["rss_libs_bytes"]) / 2**20,
                    "rss_steps_mib": (r["peak_rss_bytes"] - r["rss_built_bytes"]) / 2**20,
                    "first_loss": r["losses"][0],
                    "raw_step_s": r["step_s"],
                    "losses": r["losses"],
                }
            )
        # LoRA / full: < 1 is what LoRA saves. RSS growth is the peak above the libraries each mode
        # imports (LoRA's floor is higher by peft + transformers), i.e. model, data, activations.
        rows.append(
            {
                "zero_stage": stage,
                "mode": "lora/full",
                "trainable_params": results[stage]["lora"]["trainable_params"]
                / results[stage]["full"]["trainable_params"],
                **{k: per["lora"][k] / per["full"][k] for k in per["full"]},
            }
        )
    print(
        table(
            rows, ["zero_stage", "mode", "trainable_params", "step_ms", "state_mib", "peak_rss_mib", "rss_growth_mib"]
        )
    )
    print(
        table(
            [r for r in rows if r["mode"] != "lora/full"],
            [
                "zero_stage",
                "mode",
                "params_mib",
                "grads_mib",
                "optimizer_master_mib",
                "optimizer_moments_mib",
                "rss_import_mib",
                "rss_peft_import_mib",
                "rss_build_mib",
                "rss_steps_mib",
                "first_loss",
            ],
        )
    )
    m = cfg.model
    out = save(
        "lora_train",
        {
            "model": f"small preset GPT ({m.n_layer} layers x {m.n_embd} wide, {m.block_size} context, vocab "
            f"{m.vocab_size}), random init, fp32, micro-batch {cfg.train.micro_batch_size}, 1 gloo rank x "
            f"{args.threads} thread(s), DeepSpeed AdamW",
            "lora": {**LORA, "target_modules": ["c_attn", "c_proj", "c_fc"]},
            "data": "first train rows of bench/common.py tiny_dataset (byte tokens of stdlib json/ + email/)",
            "steps": args.steps,
            "warmup_steps_excluded": args.warmup,
            "wall_s": time.time() - t_start,
            "rows": rows,
        },
    )
    shutil.rmtree(work, ignore_errors=True)  # the base artifact and dataset are only for this run
    print(f"-> {out} ({time.time() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
