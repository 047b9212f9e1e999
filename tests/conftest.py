"""Shared fixtures: one Ray instance per test session (start-up costs ~10 s here) and one
prepared tiny dataset built from files shipped with Python (no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

TEST_SOURCES = ["stdlib:json/*.py", "stdlib:email/*.py"]


def tiny_config(storage: Path, data_path: str, overrides: list[str] = ()):  # type: ignore[assignment]
    """The tiny preset made quick for tests: short runs, frequent eval and checkpoints."""
    from modelfleet.config import load_config

    base = [f"storage.path={storage}", f"data.path={data_path}", "train.max_steps=30",
            "train.eval_every=10", "train.checkpoint_every=10", "train.eval_batches=2"]
    return load_config(preset="tiny", overrides=[*base, *overrides])


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    from modelfleet.config import DataConfig
    from modelfleet.data.prepare import prepare_dataset
    from modelfleet.data.tokenizer import ByteTokenizer

    path = tmp_path_factory.mktemp("data") / "tiny"
    prepare_dataset(DataConfig(sources=TEST_SOURCES, path=str(path)), 128, ByteTokenizer())
    return str(path)


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
