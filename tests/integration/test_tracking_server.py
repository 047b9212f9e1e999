"""Experiment tracking end to end: the session's ZeRO-3 run (``stage_runs``, trained through
``train()`` with tracking on) has TensorBoard event files and an MLflow run that match its
metrics.jsonl and its artifact; and the driver's tracker logs to a real ``mlflow server`` on
127.0.0.1, read back through MLflow's client over HTTP."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import read_records, step_record
from helpers.mlflow_server import MlflowServer
from modelfleet.config import Config
from modelfleet.train.sink import ProgressSink


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server
    server.stop()


def test_a_trained_run_is_tracked_in_tensorboard_and_mlflow(stage_runs):
    cfg, res = stage_runs[1][3]
    assert cfg.tracking.enabled and res.tracking is not None and res.tracking.errors == ()
    steps = [r for r in read_records(res.run_dir) if r["kind"] == "step"]
    assert len(steps) == cfg.train.max_steps

    acc = EventAccumulator(res.tracking.tensorboard_dir).Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
        (s["step"], pytest.approx(s["loss"])) for s in steps
    ]
    assert len(acc.Scalars("eval/val_loss")) == len([r for r in read_records(res.run_dir) if r["kind"] == "eval"])

    client = MlflowClient(tracking_uri=res.tracking.mlflow_uri)
    run = client.get_run(res.tracking.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == cfg.storage.run_name
    assert run.data.params["deepspeed.zero_stage"] == "3"
    history = client.get_metric_history(run.info.run_id, "train/tokens_per_s")
    assert sorted(m.step for m in history) == [s["step"] for s in steps]
    manifest = json.loads(Path(res.artifact.uri, "manifest.json").read_text())
    assert run.data.tags["modelfleet.artifact_uri"] == res.artifact.uri
    assert run.data.tags["modelfleet.artifact_sha256"] == manifest["weights_sha256"]
    assert json.loads(Path(res.run_dir, "result.json").read_text())["tracking"]["mlflow_run_id"] == run.info.run_id


def test_the_driver_logs_to_a_real_mlflow_server(mlflow_server, tmp_path):
    cfg = Config.from_dict(
        {
            "storage": {"path": str(tmp_path), "run_name": "served"},
            "tracking": {"enabled": True, "mlflow_uri": mlflow_server.url, "experiment": "server-test"},
        }
    )
    sink = ProgressSink(None, cfg, str(tmp_path / "runs" / "served"), show=False)
    now = time.time()
    for i in range(1, 21):
        sink.handle(step_record(now + i, i, max_steps=20, loss=3.0 / i))
    sink.tracker.artifact("s3://bucket/models/tiny/v7", "cd" * 32)
    summary = sink.tracker.close()
    assert summary.errors == () and summary.mlflow_uri == mlflow_server.url

    client = MlflowClient(tracking_uri=mlflow_server.url)
    (run,) = client.search_runs([client.get_experiment_by_name("server-test").experiment_id])
    assert run.info.run_id == summary.mlflow_run_id and run.info.status == "FINISHED"
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in loss) == [(i, pytest.approx(3.0 / i)) for i in range(1, 21)]
    assert run.data.tags["modelfleet.artifact_sha256"] == "cd" * 32
    assert run.data.params["tracking.experiment"] == "server-test"
