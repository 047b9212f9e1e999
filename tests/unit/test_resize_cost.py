"""What a resize costs, as the driver's progress sink counts it (train/sink.py): synthetic
rank-0 records through ``ProgressSink.handle``, the way the sink's thread handles them. Lost time
runs from the old group's last step to the start of the first step past it, so the steps redone
from the checkpoint count; the parts add up to it."""

from __future__ import annotations

import json

import pytest

from helpers import built_record, step_record
from modelfleet.config import Config
from modelfleet.train import progress as pr
from modelfleet.train.sink import ProgressSink


def _step(t: float, step: int, *, dt: float = 1.0, started: float = 0.0) -> pr.Step:
    return step_record(t, step, step_time_s=dt, elapsed_s=t - started)


def _sink(tmp_path) -> ProgressSink:
    cfg = Config.from_dict({"storage": {"path": str(tmp_path), "run_name": "r"}, "tracking": {"enabled": False}})
    return ProgressSink(None, cfg, str(tmp_path / "runs" / "r"), show=False)


def _resizes(sink: ProgressSink) -> list[dict]:
    """The sink's resize records as metrics.jsonl has them."""
    return [json.loads(pr.to_line(r)) for r in sink.records if isinstance(r, pr.Resize)]


def test_a_shrink_counts_detection_start_restore_first_step_and_redone_steps(tmp_path):
    sink = _sink(tmp_path)
    recs: list[pr.Progress] = [built_record(0.0, 4)]
    recs += [_step(float(s), s) for s in range(1, 16)]  # steps 1..15 at t=1..15, 1 s each
    # Killed after step 15 (t=15); the new 2-worker group starts at t=40, is built at t=50,
    # restores the step-10 checkpoint by t=53, trains step 11 by t=58 (the data pipeline's start),
    # redoes 12..15, then step 16 (2 s, t=66..68) is the first step past the old group's last.
    recs += [built_record(50.0, 2), pr.Resume(time=53.0, step=10, skipped=[])]
    recs += [_step(58.0, 11, started=40.0)] + [_step(58.0 + 2 * i, 11 + i, dt=2.0, started=40.0) for i in range(1, 6)]
    for r in recs:
        sink.handle(r)
    (resize,) = _resizes(sink)
    assert resize["time"] == 68.0 and resize["step"] == 10 and (resize["from_workers"], resize["to_workers"]) == (4, 2)
    assert resize["lost_s"] == 66.0 - 15.0  # step 16 began at 66; the old group's step 15 ended at 15
    assert resize["detection_s"] == 25.0 and resize["group_start_s"] == 10.0 and resize["restore_s"] == 3.0
    assert resize["first_step_s"] == 5.0 and resize["redone_s"] == 66.0 - 58.0 and resize["redone_steps"] == 5
    parts = ("detection_s", "group_start_s", "restore_s", "first_step_s", "redone_s")
    assert sum(resize[k] for k in parts) == pytest.approx(resize["lost_s"])
    assert resize["took_s"] == 58.0 - 15.0  # the earlier figure: to the new group's first step


def test_a_resize_from_the_last_step_redoes_nothing(tmp_path):
    sink = _sink(tmp_path)
    recs = [built_record(0.0, 2)] + [_step(float(s), s) for s in range(1, 11)]
    recs += [built_record(30.0, 4), pr.Resume(time=32.0, step=10, skipped=[])]
    recs += [_step(37.0, 11, dt=3.0, started=20.0)]
    for r in recs:
        sink.handle(r)
    (resize,) = _resizes(sink)
    assert resize["redone_steps"] == 0 and resize["redone_s"] == 0.0
    assert resize["lost_s"] == 34.0 - 10.0 and resize["first_step_s"] == 34.0 - 32.0
    assert len(_resizes(sink)) == 1
