"""The replica's side of its engine core process (``serve/engine_core.py``): starts it, sends it
requests, and hands each step's report to the replica from one reader thread (the only wake-up of
the replica's event loop per engine step, as the in-process ``EngineLoop`` had).

The core is the replica's child on two pipes. The replica owns it: ``stop`` ends it after the
requests it holds finish; if the replica dies, the core reads end-of-file and exits. A core that
exits, or stops reporting while it has work for longer than ``hang_s``, makes ``problem`` say
so: the replica's health check raises it and Serve replaces the replica.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import msgspec

from modelfleet.errors import ArtifactError, ConfigError
from modelfleet.serve import core_messages as cm

logger = logging.getLogger("ray.serve")

START_TIMEOUT_S = 300.0
"""Loading an artifact (from object storage, onto a GPU) can take minutes."""


class CoreError(RuntimeError):
    """The engine core could not start, or ended."""


class CoreClient:
    """One engine core process and the reader thread that listens to it."""

    def __init__(
        self,
        start: cm.Start,
        deliver: Callable[[cm.StepReport], None],
        refused: Callable[[cm.Refused], None],
        *,
        hang_s: float = 60.0,
    ) -> None:
        self.deliver, self.refused, self.hang_s = deliver, refused, hang_s
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(cm.FromCore)
        self._ids = itertools.count(1)
        self._calls: dict[int, concurrent.futures.Future[Any]] = {}
        self._send_lock = threading.Lock()
        self.error: str | None = None
        """Why the core ended (set by the reader thread)."""
        self.last: cm.StepReport | None = None
        self._live: set[int] = set()  # submitted, not yet finished, refused or cancelled
        self.stopping = False
        self._heard = time.monotonic()
        # A fresh interpreter, never a fork of this Ray worker; stderr is the replica's log.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "modelfleet.serve.engine_core"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._out = Connection(os.dup(self.proc.stdin.fileno()), readable=False)
        self._in = Connection(os.dup(self.proc.stdout.fileno()), writable=False)
        self.proc.stdin.close()
        self.proc.stdout.close()
        self._send(start)
        self.started = self._await_start()
        self._reader = threading.Thread(target=self._read, name="engine-core-reader", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _send(self, msg: cm.ToCore) -> None:
        data = self._enc.encode(msg)
        with self._send_lock:
            self._out.send_bytes(data)

    def _await_start(self) -> cm.Started:
        if not self._in.poll(START_TIMEOUT_S):
            self.proc.kill()
            raise CoreError(f"the engine core (pid {self.proc.pid}) did not start within {START_TIMEOUT_S:g} s")
        try:
            msg = self._dec.decode(self._in.recv_bytes())
        except EOFError:
            code = self.proc.wait(30)
            raise CoreError(f"the engine core exited with code {code} while starting (its log is above)") from None
        if isinstance(msg, cm.Done):
            self.proc.wait(30)
            kind = {"ConfigError": ConfigError, "ArtifactError": ArtifactError}.get(msg.error_type, CoreError)
            raise kind(msg.error if kind is not CoreError else f"the engine core could not load the model: {msg.error}")
        assert isinstance(msg, cm.Started), msg
        return msg

    # ------------------------------------------------------------------ requests
    def submit(self, rid: int, job: Any, *, adapter_dir: str | None = None) -> None:
        """Queue ``job`` (``serve.generation.Job``) in the core as request ``rid`` (unique across
        the replica's cores). A refusal (the engine's queue full) comes back through ``refused``."""
        self._check()
        self._live.add(rid)
        self._send(
            cm.Submit(
                rid,
                job.prompt_ids,
                job.max_tokens,
                job.temperature,
                job.top_p,
                job.seed,
                list(job.stop),
                job.adapter,
                adapter_dir,
                job.cache_salt,
            )
        )

    def cancel(self, rid: int) -> None:
        """Free the request's sequence and KV blocks in the core (its client went away)."""
        self._live.discard(rid)
        if self.error is None:
            try:
                self._send(cm.Cancel(rid))
            except OSError:
                pass  # the core is gone: so is the sequence

    def load_adapter(self, key: str, local_dir: str) -> concurrent.futures.Future[cm.Done]:
        """Pools: load an adapter between two steps; the future holds the core's answer."""
        self._check()
        cid = next(self._ids)
        fut: concurrent.futures.Future[cm.Done] = concurrent.futures.Future()
        self._calls[cid] = fut
        self._send(cm.LoadAdapter(cid, key, local_dir))
        return fut

    def digest(self) -> concurrent.futures.Future[cm.CacheDigest]:
        """The core's prefix-cache keys and queued work (the replica's routing stats)."""
        self._check()
        cid = next(self._ids)
        fut: concurrent.futures.Future[cm.CacheDigest] = concurrent.futures.Future()
        self._calls[cid] = fut
        self._send(cm.Digest(cid))
        return fut

    def retain(self, keys: list[str]) -> None:
        """Pools: evict every adapter not in ``keys`` (once unused)."""
        if self.error is None:
            self._send(cm.Retain(keys))

    def evict(self, key: str) -> None:
        """Pools: evict one adapter (once unused)."""
        if self.error is None:
            self._send(cm.Evict([key]))

    def stop(self, timeout_s: float = 60.0) -> None:
        """Let the core finish what it holds, then end it (in the background: a reconfigure does
        not wait for the old weights' requests)."""
        self.stopping = True
        if self.error is None:
            try:
                self._send(cm.Shutdown())
            except OSError:
                return

        def reap() -> None:
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("engine core %d did not exit %g s after shutdown; killing it", self.pid, timeout_s)
                self.proc.kill()
                self.proc.wait()

        threading.Thread(target=reap, name="engine-core-reaper", daemon=True).start()

    # ------------------------------------------------------------------ health
    @property
    def in_flight(self) -> int:
        return len(self._live)

    @property
    def problem(self) -> str | None:
        """Why this core cannot serve, or None."""
        if self.error is not None:
            return self.error
        if self.last is not None and not self.last.healthy:
            return f"{self.last.failed_steps_in_a_row} decoding steps failed in a row"
        idle = time.monotonic() - self._heard
        if self.in_flight > 0 and idle > self.hang_s:
            return f"the engine core (pid {self.pid}) has {self.in_flight} requests and sent nothing for {idle:.0f} s"
        return None

    def _check(self) -> None:
        if self.error is not None:
            raise CoreError(self.error)

    # ------------------------------------------------------------------ the reader thread
    def _read(self) -> None:
        while True:
            try:
                msg = self._dec.decode(self._in.recv_bytes())
            except (EOFError, OSError):
                break
            self._heard = time.monotonic()
            if isinstance(msg, cm.StepReport):
                self.last = msg
                self._live.difference_update(s.rid for s in msg.seqs if s.finish_reason)
                self.deliver(msg)
                if msg.fatal is not None:
                    self.error = f"the engine core's step loop failed: {msg.fatal}"
                    self._fail_live()
            elif isinstance(msg, (cm.Done, cm.CacheDigest)):
                fut = self._calls.pop(msg.cid, None)
                if fut is not None and not fut.done():  # a waiter that timed out cancelled it
                    fut.set_result(msg)
            elif isinstance(msg, cm.Refused):
                self._live.discard(msg.rid)
                self.refused(msg)
        code = self.proc.wait()
        if self.error is None:
            self.error = f"the engine core (pid {self.pid}) exited with code {code}"
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(CoreError(self.error))
        self._calls.clear()
        if self.stopping and code == 0 and not self._live:
            return  # shut down after its last request, as asked
        logger.error("%s", self.error)
        self._fail_live()

    def _fail_live(self) -> None:
        """Every request this core still holds fails with the cause (and nothing else does)."""
        held = self._live.copy()  # one atomic copy: the event loop's thread may submit meanwhile
        self._live.difference_update(held)
        lost = [cm.SeqStep(rid, "", 0, "error", 0, 0, 0, error=self.error) for rid in sorted(held)]
        if lost:
            self.deliver(cm.StepReport(lost, 0, 0, 0, 0, 0.0, False, 0, fatal=self.error))
