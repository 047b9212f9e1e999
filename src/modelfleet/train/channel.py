"""One run's line between the driver and rank 0: progress records in, the stop request out.

A single small actor on the driver's node per ``fit`` (it must outlive any worker node a failure
takes down). It used to be two, Ray's ``ray.util.queue.Queue`` and a stop-flag actor: each actor
is a worker process of its own (a Python start and ``import ray``, ~1 s of CPU on the 2-core
machine), and a fit already starts nine more of Ray's (controller, workers, Ray Data's split
coordinators, ...). One actor with both jobs starts one process.

- Rank 0 ``put``s a record (train/progress.py, packed: the channel holds bytes and reads none of
  them) and never waits for it (``ProgressSender``); when the
  channel holds ``MAX_ITEMS`` unread records (a driver that stopped reading) new ones are dropped:
  a progress line is never worth a stalled step.
- The driver ``take``s every record waiting, blocking up to a timeout for the first one.
- The driver's signal handler ``set``s the stop reason (train/stopping.py); rank 0 ``get``s it with
  a call it never waits on.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from modelfleet.train import progress as pr

MAX_ITEMS = 100_000


class RunChannel:
    """The actor's class (async: a ``take`` waiting for records does not hold up ``put`` or ``get``)."""

    def __init__(self, max_items: int = MAX_ITEMS) -> None:
        self._items: asyncio.Queue[bytes] = asyncio.Queue(max_items)
        self._reason = ""

    async def put(self, item: bytes) -> bool:
        """Queue one record; False (and dropped) when the channel is full."""
        try:
            self._items.put_nowait(item)
        except asyncio.QueueFull:
            return False
        return True

    async def take(self, timeout_s: float = 0.0) -> list[bytes]:
        """Every record waiting, in order; waits up to ``timeout_s`` for the first when none is."""
        if self._items.empty() and timeout_s > 0:
            try:
                first = await asyncio.wait_for(self._items.get(), timeout_s)
            except TimeoutError:
                return []
            out = [first]
        else:
            out = []
        while not self._items.empty():
            out.append(self._items.get_nowait())
        return out

    async def set(self, reason: str) -> None:
        """Ask the ranks to checkpoint and end; the first reason is kept."""
        self._reason = self._reason or reason

    async def get(self) -> str:
        """The stop reason, "" while none was asked for."""
        return self._reason


def start_channel(actor_options: dict[str, Any]) -> Any:
    """The run's channel actor (no CPU of its own: it only moves small records)."""
    import ray

    return ray.remote(RunChannel).options(num_cpus=0, **actor_options).remote()


class ProgressSender:
    """Rank 0's end: sends progress records (train/progress.py) to the run's channel without
    ever blocking training on it (other ranks send nothing)."""

    def __init__(self, channel: Any, rank: int) -> None:
        self.channel = channel if rank == 0 else None

    def send(self, record: pr.Progress) -> None:
        if self.channel is None:
            return
        record.time = time.time()
        try:
            self.channel.put.remote(pr.pack(record))
        except Exception:  # a progress line is never worth a failed training step
            pass
