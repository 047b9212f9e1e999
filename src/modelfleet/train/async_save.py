"""Asynchronous checkpoints (``train.checkpoint_mode: async``): a save stops the step loop only
for as long as it takes to copy each rank's state into host memory.

A save, on every rank:

1. Wait for this rank's previous save if it is still in flight: one snapshot in host memory at a
   time, so a slow store slows saves down instead of growing memory without bound.
2. ``engine.save_checkpoint`` runs as in a synchronous save (DeepSpeed's own layout, file names
   and collectives) through ``HostSnapshotEngine``: each state dict DeepSpeed would ``torch.save``
   is cloned to host memory (pinned, from a GPU) and kept instead of written. That copy is the
   whole stall: the next step may change every parameter and optimizer state in place.
3. ``ray.train.report(..., CheckpointUploadMode.ASYNC, checkpoint_upload_fn=...)`` returns once Ray
   has agreed the directory name across ranks (its one barrier), and Ray's upload thread (one per
   worker) runs ``BackgroundSave.publish``: write the snapshot's files to the local directory,
   this rank's marker (each file's size and sha256), upload the files and then the marker last.
   Rank 0 then waits until every rank's marker is in storage and writes ``COMPLETE``. Ray registers
   the checkpoint (so ``train.keep_checkpoints`` is kept by Ray Train, as in a synchronous save),
   deletes the local directory, and flushes its upload thread before the train function ends.

Never a half-published checkpoint: a rank killed before its marker is uploaded leaves no marker
and rank 0 never writes COMPLETE; rank 0 killed before COMPLETE leaves none; a failed write
raises in Ray's upload thread, which fails the attempt (Ray raises it into the training thread).
Either way the directory is partial and ``checkpoint.latest_complete`` skips it.

Why not DeepSpeed's decoupled writer (``"checkpoint": {"writer": {"decoupled": true}}``): it runs
the FastCheckpointEngine (the ``async_io`` op: libaio and a JIT build) in a spawned process that
is handed the live tensors, not a copy (ZeRO's optimizer updates them in place on the next step).
Why not Ray's async upload alone: the write itself (``torch.save`` of every shard) would still
stop the step; here it is the upload function that writes.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from modelfleet.errors import CheckpointError
from modelfleet.train import checkpoint as ck

MARKER_WAIT_S = 1800.0
"""How long rank 0 waits for the other ranks' markers before it gives the save up (unpublished)."""
PREVIOUS_WAIT_S = 3600.0
"""How long a save waits for this rank's previous one (Ray skips an upload whose barrier was reset
by a failed worker; the group is then torn down, and this bound ends the wait if it is not)."""


def host_copy(obj: Any, memo: dict[int, Any] | None = None) -> Any:
    """``obj`` with every tensor replaced by a host copy (containers rebuilt, other values shared:
    DeepSpeed builds them fresh for each save). A tensor seen twice (tied weights) is copied once."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            t = obj.detach()
            if t.device.type == "cpu":
                memo[id(obj)] = t.clone()
            else:  # pinned: the copy runs at PCIe speed and does not wait for pageable staging
                out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                memo[id(obj)] = out.copy_(t, non_blocking=True)
        return memo[id(obj)]
    if isinstance(obj, defaultdict):
        return defaultdict(obj.default_factory, {k: host_copy(v, memo) for k, v in obj.items()})
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, host_copy(v, memo)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: host_copy(v, memo) for k, v in obj.items()}
    if type(obj) is list:
        return [host_copy(v, memo) for v in obj]
    if type(obj) is tuple:  # exactly: torch.Size and namedtuples hold no tensors and keep their type
        return tuple(host_copy(v, memo) for v in obj)
    return obj


class HostSnapshotEngine:
    """A DeepSpeed checkpoint engine that keeps host copies instead of writing files; every other
    call (``load`` above all, and ``is_data_parallel_writer``) goes to the engine it wraps."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.files: list[tuple[str, Any]] = []
        self._cuda = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def create(self, info: Any) -> None:
        self.files = []
        self.inner.create(info)

    def save(self, state_dict: Any, path: str) -> None:
        self.files.append((path, host_copy(state_dict)))
        self._cuda = self._cuda or torch.cuda.is_available()

    def commit(self, info: Any) -> bool:
        return True  # nothing is written yet: BackgroundSave.publish commits

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def preserves_storage_sharing(self) -> bool:
        return False  # host_copy already makes compact copies: no device clone first

    def is_decoupled(self) -> bool:
        return False

    def take(self) -> list[tuple[str, Any]]:
        """The snapshot of the save just made, complete on the host (the device copies synced)."""
        if self._cuda:
            torch.cuda.synchronize()
        files, self.files = self.files, []
        return files


class BackgroundSave:
    """One rank's asynchronous saves: the snapshot engine installed on ``engine``, the previous
    save's completion, and the upload function Ray's thread runs."""

    def __init__(
        self, engine: Any, *, rank: int, world: int, runs_root: str, run_name: str, storage: tuple[Any, str]
    ) -> None:
        self.snapshot = HostSnapshotEngine(engine.checkpoint_engine)
        engine.checkpoint_engine = self.snapshot
        self.rank, self.world, self.runs_root, self.run_name = rank, world, runs_root, run_name
        self.fs, self.experiment_path = storage
        """Ray Train's storage filesystem and this run's directory on it (where Ray registers it)."""
        self._idle = threading.Event()
        self._idle.set()

    def wait_previous(self) -> float:
        """Block until this rank's previous save is published (or given up); the seconds waited."""
        t0 = time.monotonic()
        if not self._idle.wait(PREVIOUS_WAIT_S):
            raise CheckpointError(
                f"the previous checkpoint's background write did not finish in {PREVIOUS_WAIT_S:.0f} s"
            )
        return time.monotonic() - t0

    def upload_fn(self, step: int, on_published: Callable[[float, float], None]) -> Callable[[Any, str], Any]:
        """The ``checkpoint_upload_fn`` for the save just snapshotted (``snapshot.take()`` now)."""
        files = self.snapshot.take()
        self._idle.clear()
        t_submit = time.monotonic()

        def publish(checkpoint: Any, dir_name: str) -> Any:
            cpu0 = time.thread_time()  # this upload thread's CPU time: what the writer costs the host
            try:
                out = self.publish(checkpoint.path, dir_name, step, files)
                if self.rank == 0:
                    on_published(time.monotonic() - t_submit, time.thread_time() - cpu0)
                return out
            finally:
                files.clear()  # the host copy is not needed once written (or given up)
                self._idle.set()

        return publish

    def publish(self, local: str, dir_name: str, step: int, files: list[tuple[str, Any]]) -> Any:
        import ray.train

        for path, state in files:
            self.snapshot.inner.save(state, path)  # DeepSpeed's own serialisation (torch.save)
        ck.write_rank_marker(local, self.rank, self.world, step)
        dest = f"{self.experiment_path}/{dir_name}"
        marker = f"rank-{self.rank:05d}.json"
        _upload_dir(local, self.fs, dest, last=marker)
        if self.rank == 0:
            self._wait_for_markers(dest, step)
            ck.write_complete(self.runs_root, self.run_name, step, self.world)
        return ray.train.Checkpoint(path=dest, filesystem=self.fs)

    def _wait_for_markers(self, dest: str, step: int) -> None:
        """Until every rank's marker is in storage: a marker is uploaded after its rank's files."""
        paths = [f"{dest}/rank-{r:05d}.json" for r in range(self.world)]
        deadline = time.monotonic() + MARKER_WAIT_S
        while True:
            missing = [p for p, fi in zip(paths, self.fs.get_file_info(paths)) if fi.type != pafs.FileType.File]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise CheckpointError(
                    f"checkpoint {ck.step_dir_name(step)} left unpublished: after {MARKER_WAIT_S:.0f} s "
                    f"{len(missing)} rank marker(s) are still missing ({missing[0].rsplit('/', 1)[-1]}, ...)"
                )
            time.sleep(0.1)


def _upload_dir(local: str, fs: Any, dest: str, *, last: str) -> None:
    """Copy every file under ``local`` to ``dest`` on ``fs``, the file named ``last`` after all others."""
    root = Path(local)
    files = sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.name == last)
    local_fs = pafs.LocalFileSystem()
    for p in files:
        target = f"{dest}/{p.relative_to(root).as_posix()}"
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(p), target, source_filesystem=local_fs, destination_filesystem=fs)
