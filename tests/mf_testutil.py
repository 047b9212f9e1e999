"""Helpers the test modules import by name (``from mf_testutil import ...``): a module of its own
because several conftest.py files exist and ``from conftest import`` would pick one at random."""

from __future__ import annotations

from pathlib import Path

TEST_SOURCES = ["stdlib:json/*.py", "stdlib:email/*.py"]


def tiny_config(storage: Path, data_path: str, overrides: list[str] = ()):  # type: ignore[assignment]
    """The tiny preset made quick for tests: short runs, frequent eval and checkpoints."""
    from modelfleet.config import load_config

    base = [f"storage.path={storage}", f"data.path={data_path}", "train.max_steps=30",
            "train.eval_every=10", "train.checkpoint_every=10", "train.eval_batches=2"]
    return load_config(preset="tiny", overrides=[*base, *overrides])


def train_worker_pids() -> list[int]:
    """PIDs of live Ray Train worker processes (Ray titles them ``ray::RayTrainWorker...``),
    sorted; found through the OS so drills work without the dashboard's state API."""
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::RayTrainWorker"):
            pids.append(p.info["pid"])
    return sorted(pids)
