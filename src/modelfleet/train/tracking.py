"""Experiment tracking from the driver: TensorBoard event files and an MLflow run.

The driver's progress sink already sees every rank-0 record (``train/sink.py``), so tracking
is fed there and never from a training process: ``Tracker.record`` puts the record on a bounded
queue and returns (the sink never waits on a tracking backend); one background thread turns
records into ``Scalars`` and writes them with TensorBoard's own writer (through
``torch.utils.tensorboard``) under ``<run dir>/tensorboard`` and with ``MlflowClient.log_batch``
to one MLflow run (params: the flattened config; metrics: every number of every record, by step;
tags: the run name, the artifact's URI and weights sha256). A full queue drops records for
tracking only, and a backend that fails (a server that is down, a refused write) is reported in
one line and switched off for the rest of the run: metrics.jsonl, written by the sink itself, is
never affected.

Where MLflow writes: ``tracking.mlflow_uri``, else ``MLFLOW_TRACKING_URI`` read as MLflow reads it,
else a SQLite store (MLflow's own default kind) in ``<run dir>/mlflow/mlflow.db``. A run on an
object store has no local directory and SQLite cannot live on ``s3://``: the database and the
event files are written to a local staging directory and uploaded beside ``metrics.jsonl`` when
the tracker closes (a resumed run downloads its database first and continues the same MLflow
run, found by its ``modelfleet.run`` tag).

Why not Ray's ``ray.air.integrations.mlflow``: its ``setup_mlflow`` configures MLflow *inside the
training function* (rank 0 by default), i.e. in a worker process, which is what this design keeps
tracking out of (a slow or dead server would stall a training step, and the GPU kit would have to
carry MLflow); its ``MLflowLoggerCallback`` is a Ray Tune logger callback, which Ray Train V2's
``RunConfig(callbacks=...)`` (used here: elastic scaling) refuses. The driver-side records are
already here, so a direct ``MlflowClient`` is a few lines and needs no Ray integration.

mlflow and tensorboard come with the optional ``tracking`` extra, imported only on the writer
thread; without them tracking is off, said in one line.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from modelfleet.config import Config
from modelfleet.storage import download_file, exists, filesystem, is_remote, join
from modelfleet.train import progress as pr

QUEUE_SIZE = 10_000
"""Records waiting for the writer thread; past this they are dropped (for tracking only)."""
CLOSE_TIMEOUT_S = 30.0
"""How long closing waits for the writer to finish what is queued (a dead server must not hold
the end of a run for MLflow's whole retry budget)."""
_NOT_METRICS = frozenset({"time", "step", "max_steps", "epoch"})
_BATCH = 1000  # MLflow's log_batch takes at most 1000 metrics


@dataclass(frozen=True)
class Scalars:
    """The numbers of one progress record at one step, as both backends log them: tags are
    ``<section>/<field>`` (``train/loss``, ``eval/val_loss``, ``resize/took_s``)."""

    step: int
    wall_time: float
    values: tuple[tuple[str, float], ...]

    @classmethod
    def from_record(cls, record: pr.Progress, last_step: int) -> Scalars | None:
        kind = pr.kind(record)
        section = "train" if kind == "step" else kind
        values = tuple((f"{section}/{k}", v) for k, v in pr.numbers(record).items() if k not in _NOT_METRICS)
        if not values:
            return None
        step = getattr(record, "step", None)
        return cls(
            step=step if isinstance(step, int) else last_step,
            wall_time=record.time or time.time(),
            values=values,
        )


@dataclass(frozen=True)
class ArtifactLogged:
    """The exported artifact, logged as tags of the MLflow run and a TensorBoard text summary."""

    uri: str
    sha256: str


@dataclass(frozen=True)
class TrackingSummary:
    """Where a run's tracking went, what was written and what was not."""

    tensorboard_dir: str | None
    mlflow_uri: str | None
    """The tracking URI, or for a run on an object store where its SQLite store was uploaded."""
    mlflow_run_id: str | None
    records: int
    """Records the writer thread logged (to every backend still on)."""
    dropped: int
    """Records dropped because the queue was full (they are still in metrics.jsonl)."""
    errors: tuple[str, ...]
    """One line per backend that failed and was switched off."""


def flat_params(d: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """``{"train": {"lr": 0.001}}`` -> ``[("train.lr", "0.001")]`` (MLflow caps a value at 6000 chars)."""
    out: list[tuple[str, str]] = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.extend(flat_params(v, f"{prefix}{k}."))
        else:
            out.append((f"{prefix}{k}", str(v)[:6000]))
    return out


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as absent
        return False


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, local_dir: str, dest: str | None) -> None:
        self.local_dir, self.dest = local_dir, dest
        self.writer: Any = None

    def open(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=self.local_dir, flush_secs=5)

    def write(self, items: list[Scalars | ArtifactLogged]) -> None:
        for it in items:
            if isinstance(it, Scalars):
                for tag, value in it.values:
                    self.writer.add_scalar(tag, value, global_step=it.step, walltime=it.wall_time)
            else:
                self.writer.add_text("artifact", f"{it.uri} (weights sha256 {it.sha256})")

    def close(self, failed: bool) -> None:
        self.writer.close()
        if self.dest:
            _upload_dir(self.local_dir, self.dest)


class _MLflow:
    name = "mlflow"

    def __init__(self, cfg: Config, local_dir: str, dest_dir: str | None) -> None:
        self.cfg, self.local_dir, self.dest_dir = cfg, local_dir, dest_dir
        self.uri: str | None = None
        self.local_db: str | None = None
        self.dest_db: str | None = None
        self.client: Any = None
        self.run_id: str | None = None

    def open(self) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param
        from mlflow.environment_variables import MLFLOW_TRACKING_URI
        from mlflow.exceptions import MlflowException

        # The config's URI, else MLFLOW_TRACKING_URI as MLflow itself reads it, else SQLite here.
        self.uri = self.cfg.tracking.mlflow_uri or MLFLOW_TRACKING_URI.get() or None
        if self.uri is None:
            self.local_db = os.path.join(os.path.abspath(self.local_dir), "mlflow", "mlflow.db")
            self.dest_db = join(self.dest_dir, "mlflow", "mlflow.db") if self.dest_dir else None
            self.uri = f"sqlite:///{self.local_db}"
            os.makedirs(os.path.dirname(self.local_db), exist_ok=True)
            if self.dest_db and exists(self.dest_db):  # a resumed run on an object store
                download_file(self.dest_db, self.local_db)
        self.client = client = MlflowClient(tracking_uri=self.uri)
        name, run = self.cfg.tracking.experiment, self.cfg.storage.run_name
        exp = client.get_experiment_by_name(name)
        if exp is None:
            where = join(os.path.dirname(self.dest_db or self.local_db or ""), "artifacts") if self.local_db else None
            try:
                exp_id = client.create_experiment(name, artifact_location=where)
            except MlflowException:  # another driver created it meanwhile
                exp_id = client.get_experiment_by_name(name).experiment_id
        else:
            exp_id = exp.experiment_id
        earlier = client.search_runs([exp_id], filter_string=f"tags.`modelfleet.run` = '{run}'", max_results=1)
        if earlier:  # --resume: the same MLflow run goes on (its params are already there)
            self.run_id = earlier[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
            return
        self.run_id = client.create_run(exp_id, run_name=run, tags={"modelfleet.run": run}).info.run_id
        params = [Param(k, v) for k, v in flat_params(self.cfg.to_dict())]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params
            client.log_batch(self.run_id, params=params[i : i + 100])

    def write(self, items: list[Scalars | ArtifactLogged]) -> None:
        from mlflow.entities import Metric, RunTag

        metrics = [
            Metric(tag, value, int(it.wall_time * 1000), it.step)
            for it in items
            if isinstance(it, Scalars)
            for tag, value in it.values
        ]
        for i in range(0, len(metrics), _BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + _BATCH])
        for it in items:
            if isinstance(it, ArtifactLogged):
                tags = [RunTag("modelfleet.artifact_uri", it.uri), RunTag("modelfleet.artifact_sha256", it.sha256)]
                self.client.log_batch(self.run_id, tags=tags)

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
        if self.dest_db:
            _upload_file(self.local_db, self.dest_db)


def _upload_file(local: str, dest: str) -> None:
    fs, path = filesystem(dest)
    pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def _upload_dir(local: str, dest: str) -> None:
    for base, _, files in os.walk(local):
        for f in files:
            src = os.path.join(base, f)
            _upload_file(src, join(dest, os.path.relpath(src, local)))


_CLOSE = object()


class Tracker:
    """The driver's tracking writer; ``Tracker.start(cfg, run_dir)`` (off: a tracker that does nothing)."""

    def __init__(self, backends: list[_TensorBoard | _MLflow], staging: str | None = None) -> None:
        self._backends = backends
        self._staging = staging
        self._q: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_SIZE)
        self._records = self._dropped = 0
        self._errors: list[str] = []
        self._failed = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="modelfleet-tracking", daemon=True)
        if backends:
            self._thread.start()

    @classmethod
    def start(cls, cfg: Config, run_dir: str) -> Tracker:
        t = cfg.tracking
        if not t.enabled or not (t.tensorboard or t.mlflow):
            return cls([])
        missing = [m for m, on in (("tensorboard", t.tensorboard), ("mlflow", t.mlflow)) if on and not _installed(m)]
        if missing:
            print(
                f"tracking: {' and '.join(missing)} not installed, so {'that part' if len(missing) == 1 else 'it'} "
                "is off (pip install 'modelfleet[tracking]'; tracking.enabled=false silences this)",
                file=sys.stderr,
            )
        remote = is_remote(run_dir)
        staging = tempfile.mkdtemp(prefix="mf-tracking-") if remote else None
        local = staging or run_dir
        backends: list[_TensorBoard | _MLflow] = []
        if t.tensorboard and "tensorboard" not in missing:
            backends.append(
                _TensorBoard(os.path.join(local, "tensorboard"), join(run_dir, "tensorboard") if remote else None)
            )
        if t.mlflow and "mlflow" not in missing:
            backends.append(_MLflow(cfg, local, run_dir if remote else None))
        return cls(backends, staging)

    def record(self, record: pr.Progress) -> None:
        """A progress record, queued for the writer; never blocks (a full queue drops it here)."""
        if self._backends and not self._closed:
            self._put(record)

    def artifact(self, uri: str, sha256: str) -> None:
        """The exported artifact: its URI and weights sha256 go to the MLflow run's tags."""
        if self._backends and not self._closed:
            self._put(ArtifactLogged(uri, sha256))

    def _put(self, item: Any) -> None:
        try:
            self._q.put_nowait(item)
        except queue.Full:
            self._dropped += 1
            if self._dropped == 1:
                print(
                    f"tracking: the writer is {QUEUE_SIZE} records behind; dropping records (metrics.jsonl has them)",
                    file=sys.stderr,
                )

    def close(self, *, failed: bool = False, timeout_s: float = CLOSE_TIMEOUT_S) -> TrackingSummary | None:
        """Finish what is queued (bounded by ``timeout_s``), end the MLflow run (``FAILED`` when
        ``failed``), upload staged files; idempotent. None when tracking is off."""
        if self._backends and not self._closed:
            self._closed, self._failed = True, failed
            t0 = time.monotonic()
            try:
                self._q.put(_CLOSE, timeout=timeout_s)  # the writer is draining: a slot frees up
            except queue.Full:
                pass
            self._thread.join(timeout=max(0.0, timeout_s - (time.monotonic() - t0)))
            if self._thread.is_alive():
                self._error(
                    "writer", f"still busy after {timeout_s:g} s ({self._q.qsize()} records queued); left behind"
                )
            elif self._staging:
                shutil.rmtree(self._staging, ignore_errors=True)
        return self.summary() if self._backends else None

    def summary(self) -> TrackingSummary:
        tb = next((b for b in self._backends if isinstance(b, _TensorBoard)), None)
        ml = next((b for b in self._backends if isinstance(b, _MLflow)), None)
        return TrackingSummary(
            tensorboard_dir=(tb.dest or tb.local_dir) if tb else None,
            mlflow_uri=(ml.dest_db or ml.uri) if ml else None,
            mlflow_run_id=ml.run_id if ml else None,
            records=self._records,
            dropped=self._dropped,
            errors=tuple(self._errors),
        )

    def _error(self, what: str, msg: str) -> None:
        self._errors.append(f"{what}: {msg}")
        print(f"tracking: {what}: {msg}; training goes on (metrics.jsonl is unaffected)", file=sys.stderr)

    def _run(self) -> None:
        live = []
        for b in self._backends:
            try:
                b.open()
                live.append(b)
            except Exception as e:  # noqa: BLE001 - a tracking backend never fails training
                self._error(b.name, f"cannot start ({type(e).__name__}: {_first_line(e)})")
        last_step, done = 0, False
        while not done:
            batch, items = [self._q.get()], []
            while len(batch) < _BATCH:
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            for it in batch:
                if it is _CLOSE:
                    done = True
                elif isinstance(it, ArtifactLogged):
                    items.append(it)
                elif (s := Scalars.from_record(it, last_step)) is not None:
                    last_step = s.step
                    items.append(s)
            n = sum(1 for it in batch if isinstance(it, pr.Record))
            for b in list(live):
                try:
                    b.write(items)
                except Exception as e:  # noqa: BLE001 - switched off, reported once
                    live.remove(b)
                    self._error(b.name, f"write failed ({type(e).__name__}: {_first_line(e)}), switched off")
            self._records += n if live else 0
        for b in live:
            try:
                b.close(self._failed)
            except Exception as e:  # noqa: BLE001
                self._error(b.name, f"close failed ({type(e).__name__}: {_first_line(e)})")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""
