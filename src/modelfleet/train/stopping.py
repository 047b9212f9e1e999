"""Ending a run early without losing work: a stop request (``jobs stop``, Ctrl-C) or a node drain
(spot reclaim, maintenance) is answered with a checkpoint at the next step boundary.

Where each signal comes from, and why so:

- **Stop request.** The driver (``train()``) handles SIGTERM and SIGINT, which ``jobs stop`` sends
  (Ray's job supervisor: SIGTERM to the entrypoint's process tree, SIGKILL after
  ``RAY_JOB_STOP_WAIT_TIME_S``, which ``modelfleet submit`` (cluster/jobs.py) and the Helm
  RayJob set to 120 s). The handler only sets the stop reason on the run's channel actor
  (train/channel.py): the train function runs off the workers' main thread (it cannot install a
  signal handler) and a SIGTERM to a worker process would end it mid-step. Rank 0 reads the
  reason without blocking (an outstanding call it checks at each step) and every rank learns it
  through the step's loss all-reduce, which carries rank 0's vote: the ranks agree on the same
  step with no extra collective.
- **Node drain.** ``ray.train.get_preemption_info()`` (Ray Train 2.60, driven by
  ``ray drain-node``): a collective every rank calls, so it is called at the steps where the loss
  reaches the host anyway (``train.log_every``). On a notice the ranks checkpoint at once and then
  wait, training nothing more, until Ray Train tears the group down at the drain's deadline and
  restarts it (``FailureConfig.max_preemption_failures``) from that checkpoint: the restarted run
  redoes no step. If the drain is cancelled, training goes on.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from modelfleet.train import progress as pr
from modelfleet.train.collectives import LossMeter, to_host

IDLE_POLL_S = 0.5


class StopRequest:
    """Driver side: the signal handlers that, during ``fit``, set the stop reason on the run's
    channel actor (train/channel.py), where rank 0 reads it."""

    def __init__(self, channel: Any) -> None:
        self.actor = channel
        self.reason = ""
        self._lock = threading.Lock()

    def request(self, reason: str) -> None:
        """Ask the ranks to checkpoint and end (idempotent: the first reason is kept)."""
        with self._lock:
            if self.reason:
                return
            self.reason = reason
        self.actor.set.remote(reason)

    @contextmanager
    def on_signals(self) -> Iterator[None]:
        """SIGTERM and SIGINT ask for a stop while the block runs; a second one interrupts at
        once. Main thread only (elsewhere, e.g. a notebook's worker thread, the signals keep
        their handlers).

        Python runs a signal handler only when the main thread next executes bytecode, which
        ``fit`` (blocked in Ray's get) does about once a second, so the signal is also relayed at
        once by a thread reading the wakeup fd the C-level handler writes to."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        names = {int(signal.SIGTERM): "SIGTERM", int(signal.SIGINT): "SIGINT"}
        seen = [0]

        def handler(signum: int, _frame: Any) -> None:
            seen[0] += 1
            if seen[0] > 1:  # a second signal: the user means it; stop at once
                raise KeyboardInterrupt
            self.request(f"{names[signum]} to the driver")

        reader, writer = socket.socketpair()
        writer.setblocking(False)

        def relay() -> None:
            while data := reader.recv(64):
                for signum in data:
                    if signum in names:
                        self.request(f"{names[signum]} to the driver")

        old = {s: signal.signal(s, handler) for s in names}
        old_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        thread = threading.Thread(target=relay, name="modelfleet-stop-relay", daemon=True)
        thread.start()
        try:
            yield
        finally:
            signal.set_wakeup_fd(old_fd)
            for s, h in old.items():
                signal.signal(s, h)
            writer.close()  # the relay reads EOF and ends
            thread.join(timeout=5)
            reader.close()


class StopWatch:
    """Worker side: rank 0's non-blocking read of the stop flag, and the drain check."""

    def __init__(self, actor: Any, rank: int) -> None:
        self.actor = actor if rank == 0 else None
        self._ref: Any = None
        self.reason = ""
        self.checks, self.check_s = 0, 0.0

    def vote(self) -> float:
        """1.0 once rank 0 has seen a stop request (never blocks), else 0.0; other ranks 0.0."""
        if self.actor is None or self.reason:
            return 1.0 if self.reason else 0.0
        import ray

        if self._ref is None:
            self._ref = self.actor.get.remote()
        ready, _ = ray.wait([self._ref], timeout=0)
        if ready:
            self.reason = ray.get(self._ref)
            # The next read in flight at once: a request set now is seen at the next step.
            self._ref = None if self.reason else self.actor.get.remote()
        return 1.0 if self.reason else 0.0

    def preemption(self) -> Any:
        """Ray Train's drain notice (a collective: every rank calls it at the same steps); its
        cost is kept in ``checks`` and ``check_s`` (the run's ``done`` record reports them)."""
        import ray.train

        t0 = time.perf_counter()
        info = ray.train.get_preemption_info()
        self.checks, self.check_s = self.checks + 1, self.check_s + time.perf_counter() - t0
        return info

    def idle_while_draining(self, on_wait: Callable[[], None] | None = None) -> None:
        """After the drain's checkpoint: train nothing more until Ray Train tears the group down;
        return if the drain is cancelled (no notice any more)."""
        while self.preemption() is not None:
            if on_wait is not None:
                on_wait()
            time.sleep(IDLE_POLL_S)


def halt_requested(watch: StopWatch, meter: LossMeter) -> pr.Stopped | pr.Preempted | None:
    """At a log step: ``Stopped`` when rank 0 voted for the driver's stop request in this step's
    all-reduce, ``Preempted`` on a drain notice (every rank calls this at the same steps: the
    notice is a collective), else None. The step is set where the record is sent."""
    if to_host(meter.votes) > 0:
        return pr.Stopped(step=0, reason=watch.reason or "stop requested")
    info = watch.preemption()
    if info is not None:
        return pr.Preempted(step=0, deadline_ms=info.deadline_ms, ranks=list(info.preempted_ranks))
    return None
