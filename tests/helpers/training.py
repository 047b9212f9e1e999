"""Training inputs and outputs: the tiny preset made quick, and a run's metrics records."""

from __future__ import annotations

import json
from pathlib import Path

TEST_SOURCES = ["stdlib:json/*.py", "stdlib:email/*.py"]


def tiny_config(storage: Path, data_path: str, overrides: list[str] = ()):  # type: ignore[assignment]
    """The tiny preset made quick for tests: short runs, frequent eval and checkpoints."""
    from modelfleet.presets import load_config

    base = [f"storage.path={storage}", f"data.path={data_path}", "train.max_steps=30",
            "train.eval_every=10", "train.checkpoint_every=10", "train.eval_batches=2"]
    return load_config(preset="tiny", overrides=[*base, *overrides])


def read_records(run_dir: str | Path) -> list[dict]:
    """The run's ``metrics.jsonl`` records (step, eval, checkpoint, resume), [] before the first.
    Safe to call while the driver appends: a last line without its newline is not complete yet."""
    path = Path(run_dir, "metrics.jsonl")
    if not path.exists():
        return []
    lines = path.read_text().split("\n")[:-1]  # the piece after the last newline is unfinished
    return [json.loads(x) for x in lines if x.strip()]
