"""The driver side of a run's channel (train/channel.py): rank 0's progress records
(train/progress.py) become ``metrics.jsonl`` in the run dir, the live progress line, the
Prometheus gauges and the tracking backends; a change in the worker group's size becomes a
``resize`` record."""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from modelfleet.config import Config
from modelfleet.storage import exists, is_remote, read_text, write_text
from modelfleet.train import progress as pr
from modelfleet.train.throughput import TrainingGauges
from modelfleet.train.tracking import Tracker


def _local_lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return f.readlines()


@dataclass
class _PendingResize:
    """A worker group of another size was built; its ``resize`` record waits for its first step
    past the old group's last."""

    from_workers: int
    to_workers: int
    built: float
    last: pr.Step | None
    """The old group's last logged step (None: it logged none)."""
    step: int = 0
    """The step the new group resumed from (0: it started from scratch)."""
    resumed: float | None = None
    first: pr.Step | None = None
    started: float | None = None


class ProgressSink:
    """A live progress line and ``metrics.jsonl`` in the run dir.

    A local file is appended to, a line per record. An object has no append: the driver keeps
    the run's lines (those of earlier attempts read back first) and PUTs the whole object again
    at most every ``ROLL_S`` seconds and when the run ends (a PUT is atomic: readers see the old or
    the new object). A driver that dies loses at most the last ``ROLL_S`` seconds of records."""

    ROLL_S = 5.0

    def __init__(self, channel: Any, cfg: Config, run_dir: str, show: bool) -> None:
        self.channel, self.cfg, self.show = channel, cfg, show
        self.records: list[pr.Progress] = []
        self.timings: dict[str, float] = {}
        self.t0 = time.time()
        self.local = None if is_remote(run_dir) else run_dir
        self.remote = f"{run_dir}/metrics.jsonl" if is_remote(run_dir) else None
        self._lines = read_text(self.remote).splitlines(keepends=True) if self.remote and exists(self.remote) else []
        self._rolled = len(self._lines)
        # Worker-group size across attempts (and earlier runs of a resumed one): a change is a resize.
        earlier = pr.read_lines(self._lines if self.remote else _local_lines(os.path.join(run_dir, "metrics.jsonl")))
        built = [r for r in earlier if isinstance(r, pr.Built)]
        steps = [r for r in earlier if isinstance(r, pr.Step)]
        self._world = built[-1].world if built else None
        self._last_step = steps[-1] if steps else None
        self._resized: _PendingResize | None = None
        self._rolled_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._bar: Any = None
        self._last_step_line = ""  # the latest step's figures (the bar's postfix, or the eval lines')
        self.gauges = TrainingGauges.for_run(cfg.storage.run_name)  # Prometheus: see train/throughput.py
        self.tracker = Tracker.start(cfg, run_dir)  # TensorBoard + MLflow, off the sink's thread: train/tracking.py

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._drain()
        self._roll(force=True)
        if self._bar is not None:
            self._bar.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain(timeout=0.5)
            self._roll()

    def _roll(self, force: bool = False) -> None:
        if not self.remote or len(self._lines) == self._rolled:
            return
        if force or time.time() - self._rolled_at >= self.ROLL_S:
            n = len(self._lines)
            write_text(self.remote, "".join(self._lines[:n]))
            self._rolled, self._rolled_at = n, time.time()

    def _drain(self, timeout: float = 0.0) -> None:
        import ray

        try:
            items = ray.get(self.channel.take.remote(timeout))
        except Exception:  # the channel actor is gone (cluster shutting down)
            return
        for data in items:
            try:
                record = pr.unpack(data)
            except Exception as e:  # noqa: BLE001 - a malformed record is reported, never fatal
                print(f"train: a progress record was not understood and is left out ({e})", file=sys.stderr)
                continue
            self.handle(record)

    def handle(self, record: pr.Progress) -> None:
        """One record off the channel (what the sink's thread does with each)."""
        self._track_resize(record)
        self._write(record)

    def _track_resize(self, r: pr.Progress) -> None:
        """A worker group of another size than the previous one is a ``resize`` record, written
        at the new group's first step past the old group's last (step P): ``lost_s`` is the
        training time the resize cost, that step's start minus step P's end, so steps redone
        from the checkpoint count. Its parts: ``detection_s`` (P's end to the new workers'
        start: failure detection, teardown, scheduling), ``group_start_s`` (worker start to the
        built engine), ``restore_s`` (checkpoint download and load), ``first_step_s`` (to the
        first step's end, the data pipeline's start included) and ``redone_s`` over
        ``redone_steps`` (steps P had already trained). ``took_s``: P's end to the first step."""
        pending = self._resized
        if isinstance(r, pr.Built):
            if self._world is not None and r.world != self._world:
                self._resized = _PendingResize(self._world, r.world, built=r.time, last=self._last_step)
            self._world = r.world
        elif pending is not None and isinstance(r, pr.Resume):
            pending.step, pending.resumed = r.step, r.time
        elif isinstance(r, pr.Step):
            if pending is not None:
                if pending.first is None:  # its elapsed_s runs from the new worker's start
                    pending.first, pending.started = r, r.time - r.elapsed_s
                if pending.last is None or r.step > pending.last.step:
                    self._write(_resize_record(pending, r))
                    self._resized = None
            if self._resized is None:
                self._last_step = r

    def _write(self, r: pr.Progress) -> None:
        self.records.append(r)
        line = pr.to_line(r) + "\n"
        if self.local:
            os.makedirs(self.local, exist_ok=True)
            with open(os.path.join(self.local, "metrics.jsonl"), "a") as f:
                f.write(line)
        elif self.remote:
            self._lines.append(line)
        self.tracker.record(r)
        if isinstance(r, pr.Step):
            self.gauges.record(r)
        if isinstance(r, pr.FirstStep):
            self.timings["time_to_first_step_s"] = r.time - self.t0
            self.timings["worker_init_s"] = r.init_s
        if not self.show:
            return
        if isinstance(r, pr.Step):
            self._show_step(r)
        elif (msg := _message(r, self._last_step_line if self._bar is None else "")) is not None:
            (self._bar.write if self._bar is not None else print)(msg)

    def _show_step(self, r: pr.Step) -> None:
        rate = f"{r.tokens_per_s:,.0f} tok/s" if r.tokens_per_s is not None else f"{r.samples_per_s:,.0f} samples/s"
        mfu = f" | MFU {r.mfu:.1%}" if r.mfu is not None else ""
        self._last_step_line = f"loss {r.loss:.3f} | {rate}{mfu} | lr {r.lr:.2e}"
        if not sys.stderr.isatty():
            # A log file or a pipe (a Ray job's log, a test): no bar, whose redraws become
            # lines there; the evaluation lines carry the training figures instead.
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=r.max_steps,
                initial=r.step - 1,
                unit="step",
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=0.5,
            )
        self._bar.set_postfix_str(self._last_step_line, refresh=False)
        self._bar.update(r.step - self._bar.n)


def _message(r: pr.Progress, step_line: str) -> str | None:
    """The progress line of a record other than a step (None: it has none); ``step_line``, the
    latest step's figures, goes on an evaluation's line when there is no bar to show them."""
    match r:
        case pr.Eval():
            return f"step {r.step}: val_loss {r.val_loss:.4f} ppl {r.val_ppl:.2f}" + (
                f" | {step_line}" if step_line else ""
            )
        case pr.Checkpoint():
            return f"step {r.step}: checkpoint saved"
        case pr.Resume():
            skipped = f" (skipped: {'; '.join(r.skipped)})" if r.skipped else ""
            return f"resumed from the checkpoint at step {r.step}{skipped}"
        case pr.Resize():
            lost = r.lost_s if r.lost_s is not None else r.took_s
            return (
                f"step {r.step}: {r.from_workers} -> {r.to_workers} workers "
                f"({lost} s of training lost, {r.redone_steps or 0} steps redone)"
            )
        case pr.Reshard():
            return (
                f"step {r.step}: checkpoint of {r.from_workers} ranks re-partitioned "
                f"for {r.to_workers} in {r.restore_s:.1f} s (grad_accum {r.grad_accum})"
            )
    return None


def _resize_record(p: _PendingResize, now: pr.Step) -> pr.Resize:
    """The ``resize`` record (see ``ProgressSink._track_resize``) at step ``now``, the first past
    the old group's last."""
    last, first = p.last, p.first
    took = None if last is None or first is None else round(first.time - last.time, 1)
    rec = pr.Resize(step=p.step, from_workers=p.from_workers, to_workers=p.to_workers, took_s=took)
    rec.time = now.time
    if last is None or first is None:
        return rec
    started = p.started if p.started is not None else p.built
    resumed = p.resumed if p.resumed is not None else p.built
    redone = last.step - rec.step
    begin_now = now.time - now.step_time_s  # when step P+1 itself began
    rec.lost_s = round(begin_now - last.time, 2)
    rec.detection_s = round(started - last.time, 2)
    rec.group_start_s = round(p.built - started, 2)
    rec.restore_s = round(resumed - p.built, 2)
    rec.first_step_s = round((first.time if redone else begin_now) - resumed, 2)
    rec.redone_s = round(begin_now - first.time if redone else 0.0, 2)
    rec.redone_steps = redone
    return rec
