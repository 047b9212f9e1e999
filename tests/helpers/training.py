"""Training inputs and outputs: the tiny preset made quick, and a run's metrics records."""

from __future__ import annotations

import json
from pathlib import Path

TEST_SOURCES = ["stdlib:json/*.py", "stdlib:email/*.py"]


def tiny_config(storage: Path, data_path: str, overrides: list[str] = ()):  # type: ignore[assignment]
    """The tiny preset made quick for tests: short runs, frequent eval and checkpoints."""
    from modelfleet.presets import load_config

    base = [
        f"storage.path={storage}",
        f"data.path={data_path}",
        "train.max_steps=30",
        "train.eval_every=10",
        "train.checkpoint_every=10",
        "train.eval_batches=2",
    ]
    return load_config(preset="tiny", overrides=[*base, *overrides])


def step_record(t: float, step: int, **over):
    """A rank-0 ``step`` record (train/progress.py) at time ``t``: fixed figures, ``over`` set."""
    from modelfleet.train import progress as pr

    fields = dict(
        max_steps=99, loss=1.0, lr=1e-3, grad_norm=None, step_time_s=1.0, samples_per_s=8.0, tokens_per_s=None,
        model_flops_per_token=None, mfu=None, mfu_basis="none", peak_flops=None, peak_mem_bytes=0,
        peak_mem_basis="process_max_rss", elapsed_s=t, epoch=0,
    )  # fmt: skip
    return pr.Step(time=t, step=step, **{**fields, **over})


def built_record(t: float, world: int):
    """A rank-0 ``built`` record: a group of ``world`` workers built its engine at time ``t``."""
    from modelfleet.train import progress as pr

    return pr.Built(time=t, world=world, sharded=True, full_bytes=1000, max_local_bytes=0, transient_bytes=0)


def read_records(run_dir: str | Path) -> list[dict]:
    """The run's ``metrics.jsonl`` records (step, eval, checkpoint, resume), [] before the first.
    Safe to call while the driver appends: a last line without its newline is not complete yet."""
    from modelfleet import storage

    path = storage.join(str(run_dir), "metrics.jsonl")
    if not storage.exists(path):
        return []
    lines = storage.read_text(path).split("\n")[:-1]  # the piece after the last newline is unfinished
    return [json.loads(x) for x in lines if x.strip()]


SINGLE_RANK_PREAMBLE = r"""
import json, os, socket, sys
import torch

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                  DS_ACCELERATOR="cpu")
import deepspeed
from modelfleet.train.deepspeed import skip_cpu_inference_comm_op, skip_muon_import

# As training's workers do: no g++ build of an op only inference uses, no Muon kernels compiled.
skip_cpu_inference_comm_op()
skip_muon_import()
deepspeed.init_distributed(dist_backend="gloo")
"""


def run_single_rank(body: str, *args: str, timeout_s: float = 600) -> dict:
    """Run ``body`` as one DeepSpeed rank (gloo, world size 1) in a fresh interpreter, so
    torch.distributed state never leaks into the test session; ``body`` prints ``RESULT <json>``."""
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", SINGLE_RANK_PREAMBLE + body, *args], capture_output=True, text=True, timeout=timeout_s
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])


def assert_sharded_share(run_dir: str | Path, workers: int) -> None:
    """A ZeRO-3 run's ``built`` record: each rank held <= 1/N + 10% of a not-trivially-small model
    right after construction, and no more than one module's full tensors at once while building."""
    built = next(r for r in read_records(run_dir) if r["kind"] == "built")
    share = built["max_local_bytes"] / built["full_bytes"]
    print(
        f"\n[sharded build] N={workers}: full {built['full_bytes'] / 2**20:.1f} MiB, largest rank "
        f"{built['max_local_bytes'] / 2**20:.2f} MiB ({share:.3f} of the model), transient peak "
        f"{built['transient_bytes'] / 2**20:.2f} MiB (one module's full tensors)"
    )
    assert built["sharded"] and built["world"] == workers
    assert built["full_bytes"] > 20 * 2**20  # ~6.5M fp32 parameters: the model is not trivially small
    assert share <= 1 / workers + 0.10, built
    assert built["transient_bytes"] < built["full_bytes"] / 2, built
