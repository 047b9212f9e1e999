"""Experiment tracking from the driver's progress sink (train/tracking.py), without a Ray fit:
synthetic progress records go through ``ProgressSink`` (train/sink.py) as rank 0's would, and what was written is
read back with the libraries' own readers (TensorBoard's EventAccumulator, MLflow's client). The
real ``mlflow server`` test is tests/integration/test_tracking_server.py."""

from __future__ import annotations

import socket
import sys
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import built_record, read_records, step_record
from modelfleet.config import Config
from modelfleet.errors import ConfigError
from modelfleet.train import progress as pr
from modelfleet.train import tracking
from modelfleet.train.sink import ProgressSink

STEPS = 12


def _cfg(storage: str, run: str = "r1", train: dict | None = None, **tracking_cfg) -> Config:
    return Config.from_dict(
        {
            "storage": {"path": storage, "run_name": run},
            "train": train or {},
            "tracking": {"enabled": True, **tracking_cfg},
        }
    )


def _records(steps: int = STEPS, first: int = 1) -> list[pr.Progress]:
    now = time.time()
    recs: list[pr.Progress] = [built_record(now, 2)]
    for i in range(first, first + steps):
        recs.append(
            step_record(
                now + i,
                i,
                loss=5.0 / i,
                lr=1e-3 * i,
                grad_norm=0.5 + i,
                tokens_per_s=100.0 * i,
                mfu=0.01,
                mfu_basis="cpu_gemm_measured",  # a string: not a metric
            )
        )
    recs.append(pr.Eval(time=now + steps, step=first + steps - 1, val_loss=1.25, val_ppl=3.49))
    return recs


def _feed(cfg: Config, run_dir: str, records: list[pr.Progress]) -> ProgressSink:
    """What the sink's thread does with each record taken off the queue."""
    sink = ProgressSink(None, cfg, run_dir, show=False)
    for r in records:
        sink.handle(r)
    return sink


def _mlflow_run(uri: str, run_id: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return client, client.get_run(run_id)


def test_progress_records_reach_tensorboard_and_mlflow(tmp_path):
    run_dir = str(tmp_path / "runs" / "r1")
    cfg = _cfg(str(tmp_path), train={"lr": 0.002})
    sink = _feed(cfg, run_dir, _records())
    sink.tracker.artifact(str(tmp_path / "models/tiny/v1"), "ab" * 32)
    summary = sink.tracker.close()
    assert summary.errors == () and summary.dropped == 0 and summary.records == STEPS + 2

    acc = EventAccumulator(summary.tensorboard_dir).Reload()
    assert summary.tensorboard_dir == f"{run_dir}/tensorboard"
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/val_loss"} <= set(
        acc.Tags()["scalars"]
    )
    assert "train/mfu_basis" not in acc.Tags()["scalars"] and "train/epoch" not in acc.Tags()["scalars"]
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, STEPS + 1))
    assert [e.value for e in loss] == pytest.approx([5.0 / i for i in range(1, STEPS + 1)])
    assert [(e.step, e.value) for e in acc.Scalars("eval/val_loss")] == [(STEPS, 1.25)]

    # The default store: SQLite in the run's directory, as MLflow's own default kind is.
    assert summary.mlflow_uri == f"sqlite:///{run_dir}/mlflow/mlflow.db"
    client, run = _mlflow_run(summary.mlflow_uri, summary.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert run.data.params["train.lr"] == "0.002" and run.data.params["storage.run_name"] == "r1"
    assert run.data.tags["modelfleet.artifact_uri"] == str(tmp_path / "models/tiny/v1")
    assert run.data.tags["modelfleet.artifact_sha256"] == "ab" * 32
    hist = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in hist) == [(i, pytest.approx(5.0 / i)) for i in range(1, STEPS + 1)]
    assert run.data.metrics["eval/val_ppl"] == pytest.approx(3.49)
    assert client.get_experiment(run.info.experiment_id).name == "modelfleet"
    # The sink's own file has every record, as without tracking.
    assert len(read_records(run_dir)) == STEPS + 2


def test_a_resumed_run_continues_its_mlflow_run(tmp_path):
    run_dir = str(tmp_path / "runs" / "r1")
    first = _feed(_cfg(str(tmp_path)), run_dir, _records(5)).tracker.close(failed=True)
    second = _feed(_cfg(str(tmp_path)), run_dir, _records(5, first=6)).tracker.close()
    assert second.mlflow_run_id == first.mlflow_run_id
    client, run = _mlflow_run(second.mlflow_uri, second.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == list(range(1, 11))


def test_off_by_config_by_environment_and_without_the_extra(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "runs" / "r1"
    sink = _feed(_cfg(str(tmp_path), enabled=False), str(run_dir), _records(3))
    assert sink.tracker.close() is None
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]

    monkeypatch.setenv("MODELFLEET_TRACKING", "0")
    assert Config().tracking.enabled is False
    monkeypatch.setenv("MODELFLEET_TRACKING", "1")
    assert Config().tracking.enabled is True

    # Neither package importable (as on an install without the extra, e.g. the GPU kit).
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    other = tmp_path / "runs" / "r2"
    sink = _feed(_cfg(str(tmp_path), "r2"), str(other), _records(3))
    assert sink.tracker.close() is None
    err = capsys.readouterr().err
    assert err.count("tracking:") == 1 and "tensorboard and mlflow not installed" in err
    assert sorted(p.name for p in other.iterdir()) == ["metrics.jsonl"] and len(read_records(other)) == 5


@pytest.mark.parametrize(
    "section, key",
    [
        ({"enabled": "yes"}, "tracking.enabled"),
        ({"experiment": " "}, "tracking.experiment"),
        ({"mlflow_uri": "localhost"}, "tracking.mlflow_uri"),
        ({"mlflow": 1}, "tracking.mlflow"),
        ({"wandb": True}, "tracking.wandb"),
    ],
)
def test_bad_tracking_values_name_the_key(section, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        Config.from_dict({"tracking": section})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_server_is_reported_once_and_loses_nothing_else(tmp_path, monkeypatch, capsys):
    """Nothing listens at the URI: MLflow is switched off with one line; TensorBoard and
    metrics.jsonl get every record."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    run_dir = str(tmp_path / "runs" / "r1")
    sink = _feed(_cfg(str(tmp_path), mlflow_uri=f"http://127.0.0.1:{_free_port()}"), run_dir, _records())
    summary = sink.tracker.close()
    assert len(summary.errors) == 1 and summary.errors[0].startswith("mlflow: cannot start")
    assert capsys.readouterr().err.count("tracking: mlflow") == 1
    assert len(EventAccumulator(summary.tensorboard_dir).Reload().Scalars("train/loss")) == STEPS
    assert len(read_records(run_dir)) == STEPS + 2


def test_a_hung_server_never_blocks_the_sink(tmp_path, monkeypatch):
    """A server that accepts connections and never answers: the writer thread waits on it, the
    queue fills, the sink keeps going (records past the bound are dropped for tracking only) and
    closing gives up after its timeout."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        cfg = _cfg(str(tmp_path), mlflow_uri=f"http://127.0.0.1:{hung.getsockname()[1]}", tensorboard=False)
        n = tracking.QUEUE_SIZE + 500
        sink = _feed(cfg, str(tmp_path / "runs" / "r1"), [])
        recs = _records(n)
        for r in recs:  # returns although the writer is stuck: a blocking put would hang here
            sink.tracker.record(r)
        # (The sink's CPU per record is a benchmark figure: bench/tracking_sink.py.)
        t0 = time.monotonic()
        summary = sink.tracker.close(timeout_s=2)
        assert time.monotonic() - t0 < 10
    assert summary.dropped >= 500 and summary.errors[-1].startswith("writer: still busy after 2 s")


def test_a_run_on_object_storage_uploads_its_event_files_and_database(s3, tmp_path):
    from pyarrow import fs as pafs

    root = f"s3://modelfleet/tracking-{int(time.time() * 1000)}"
    run_dir = f"{root}/runs/r1"
    summary = _feed(_cfg(root), run_dir, _records()).tracker.close()
    assert summary.errors == () and summary.mlflow_uri == f"{run_dir}/mlflow/mlflow.db"
    keys = s3.keys("modelfleet", run_dir.removeprefix("s3://modelfleet/"))
    assert any("/tensorboard/events.out.tfevents." in k for k in keys) and any(k.endswith("/mlflow.db") for k in keys)
    local = tmp_path / "copy"
    fs, path = pafs.FileSystem.from_uri(run_dir)
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    assert len(EventAccumulator(str(local / "tensorboard")).Reload().Scalars("train/loss")) == STEPS
    client, run = _mlflow_run(f"sqlite:///{local}/mlflow/mlflow.db", summary.mlflow_run_id)
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == STEPS
    assert run.data.params["storage.path"] == root
