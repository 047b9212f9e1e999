"""A pool replica's local copies of its variants' adapter artifacts, and the variants that failed.

Serve's multiplexing calls the replica's loader on every LRU miss. With artifacts on an object
store each call used to download a fresh temporary copy that nothing removed (a pool cycling its
variants filled the disk), and a broken variant was downloaded again for every request naming
it. Here:

* a copy is keyed by the sha256 of the artifact's ``manifest.json`` (which carries the weights'
  sha256, so equal keys hold equal bytes) under one directory per replica, and reused;
* a copy is *pinned* while Serve's LRU holds a variant loaded from it (the engine core may load
  the adapter again from there, after a restart or an eviction it had not finished), and at most
  ``max_copies`` are kept: the least recently used unpinned ones go first. With ``max_copies``
  = the LRU's size + 1 (one load in flight), a pool never holds more;
* a failed fetch or check is remembered for ``failure_window_s``: requests inside the window get
  the same error without another download.

Artifacts on a local (or shared) filesystem are read where they are: no copy, the failure window
still applies. Thread-safe: Serve runs loads concurrently (``asyncio.to_thread``).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from modelfleet.storage import filesystem

FAILURE_WINDOW_S = 30.0
"""How long a variant that failed to fetch or check is answered from memory, not fetched again."""


@dataclass(frozen=True)
class _Failure:
    at: float
    error: Exception


class AdapterCache:
    """See the module docstring. ``acquire`` returns a checked local directory, pinned until ``release``."""

    def __init__(
        self,
        max_copies: int,
        *,
        failure_window_s: float = FAILURE_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_copies < 1:
            raise ValueError(f"an adapter cache needs max_copies >= 1, got {max_copies}")
        self.max_copies, self.failure_window_s, self._clock = max_copies, failure_window_s, clock
        self._root: Path | None = None  # made on the first remote copy
        self._lock = threading.Lock()
        self._copies: OrderedDict[str, Path] = OrderedDict()  # key -> directory, least recent first
        self._pins: Counter[str] = Counter()  # directory -> variants holding it
        self._failures: dict[str, _Failure] = {}
        self.downloads = 0
        """Remote artifacts copied so far (what the failure window and reuse save)."""

    def acquire(self, label: str, uri: Callable[[], str], check: Callable[[str], None]) -> str:
        """A local directory holding the artifact ``label`` (its URI from ``uri()``), ``check``ed.
        Raises what ``uri`` or ``check`` raised, remembered for the failure window."""
        now = self._clock()
        with self._lock:
            failed = self._failures.get(label)
            if failed is not None and now - failed.at < self.failure_window_s:
                raise failed.error.with_traceback(None)  # not a traceback grown by every request
        try:
            local = self._local(uri(), check)
        except Exception as e:
            with self._lock:
                self._failures[label] = _Failure(now, e)
            raise
        with self._lock:
            self._failures.pop(label, None)
        return local

    def release(self, local: str) -> None:
        """A variant loaded from ``local`` left Serve's LRU: its copy may go."""
        with self._lock:
            if self._pins[local] > 0:
                self._pins[local] -= 1
            self._trim()

    def close(self) -> None:
        """Remove every copy (the replica is going away)."""
        with self._lock:
            if self._root is not None:
                shutil.rmtree(self._root, ignore_errors=True)
            self._copies.clear()
            self._pins.clear()

    def _local(self, uri: str, check: Callable[[str], None]) -> str:
        fs, base = filesystem(uri)
        if isinstance(fs, pafs.LocalFileSystem):
            check(base)
            return base
        with fs.open_input_file(f"{base}/manifest.json") as f:
            key = hashlib.sha256(f.read()).hexdigest()
        with self._lock:
            kept = self._copies.get(key)
            if kept is not None:
                self._copies.move_to_end(key)
                self._pins[str(kept)] += 1
                return str(kept)
            root = self._root = self._root or Path(tempfile.mkdtemp(prefix="mf-adapters-"))
        staging = Path(tempfile.mkdtemp(prefix=f".{key[:16]}-", dir=root))
        try:
            pafs.copy_files(base, str(staging), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            self.downloads += 1
            check(str(staging))  # a copy that fails its check is never kept
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        with self._lock:
            kept = self._copies.get(key)  # another load of the same bytes finished first
            if kept is None:
                kept = root / key
                staging.rename(kept)
                self._copies[key] = kept
            else:
                shutil.rmtree(staging, ignore_errors=True)
                self._copies.move_to_end(key)
            self._pins[str(kept)] += 1
            self._trim()
            return str(kept)

    def _trim(self) -> None:
        """Remove least recently used unpinned copies beyond ``max_copies`` (lock held)."""
        for key in list(self._copies):
            if len(self._copies) <= self.max_copies:
                return
            path = self._copies[key]
            if self._pins[str(path)] == 0:
                del self._copies[key]
                self._pins.pop(str(path), None)
                shutil.rmtree(path, ignore_errors=True)
