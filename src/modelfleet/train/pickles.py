"""Refuse checkpoint pickles that would run code when loaded.

DeepSpeed saves its shards with ``torch.save`` and loads them with torch's unrestricted unpickler
(its checkpoint engine and ``zero_to_fp32`` both do), so whoever can write the storage could make a
restore or an export run any code: the sha256 markers do not help, an attacker rewrites them too.
Before a checkpoint is used, every pickle in it is therefore read with torch's restricted
``weights_only`` unpickler, which allows tensors and plain containers, plus the few DeepSpeed types a
checkpoint legitimately holds (``ALLOWED``). Any other global (``os.system``, ``builtins.eval``, ...)
stops the read before it is called and the checkpoint is reported as unsafe.

The scan alone leaves a window: a writer can swap a file between the scan and DeepSpeed's load.
So every process that loads a checkpoint (the training workers on resume, export's
``zero_to_fp32``) does it inside ``weights_only_loads()``, which forces the same restricted
unpickler on DeepSpeed's own ``torch.load`` calls (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, which
overrides their explicit ``weights_only=False``) with the same allowlist registered.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow.fs as pafs

# Files DeepSpeed unpickles; everything else in a checkpoint is JSON or safetensors.
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


def _allowed() -> list[Any]:
    """Types DeepSpeed checkpoints pickle besides tensors and containers (ZeRO 0-3, fp32/bf16/fp16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class UnsafePickleError(ValueError):
    """A pickle names a global outside the allowlist; the message names the file and the global."""


def _refused(e: pickle.UnpicklingError, name: str) -> UnsafePickleError:
    # torch names the global ("GLOBAL posix.system ...") or the instruction it refused.
    m = re.search(r"GLOBAL ([\w.]+)", str(e))
    detail = re.search(r"WeightsUnpickler error: \s*(.+)", str(e))
    what = (
        f"global {m.group(1)} is not an allowed type"
        if m
        else detail.group(1).strip()[:120]
        if detail
        else "it holds more than tensors and plain data"
    )
    return UnsafePickleError(f"{name} could run code when loaded ({what}); refusing to load it")


@contextlib.contextmanager
def weights_only_loads(what: str = "a checkpoint file") -> Iterator[None]:
    """Every ``torch.load`` inside runs the restricted unpickler with ``ALLOWED`` registered, even
    where the caller (DeepSpeed) asks for ``weights_only=False``; a refused pickle raises
    ``UnsafePickleError`` naming ``what``. Not for concurrent use with other loads in the process
    (the switch is an environment variable, read by each ``torch.load``)."""
    import torch

    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_allowed()):
            yield
    except pickle.UnpicklingError as e:
        raise _refused(e, what) from None
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def check_pickle(read: Callable[[], Any], name: str) -> None:
    """Unpickle ``read()`` (a path or a binary file object) with the restricted unpickler; raise
    ``UnsafePickleError`` naming ``name`` and the offending global if it would run code."""
    import torch

    src = read()
    try:
        with torch.serialization.safe_globals(_allowed()):
            # mmap: tensors of a local file stay on disk; only the pickle itself is interpreted.
            torch.load(
                src, map_location="cpu", weights_only=True, mmap=isinstance(src, str) and zipfile.is_zipfile(src)
            )
    except pickle.UnpicklingError as e:
        raise _refused(e, name) from None
    except Exception as e:  # noqa: BLE001 - not a torch.save file we can read safely (legacy, truncated)
        raise UnsafePickleError(
            f"{name} is not a checkpoint file that can be read safely "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
        ) from None


def check_dir(fs: pafs.FileSystem, root: str) -> int:
    """Check every pickle file below ``root`` on ``fs``; returns how many were checked."""
    n = 0
    for fi in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if fi.type != pafs.FileType.File or not fi.base_name.endswith(PICKLE_SUFFIXES):
            continue
        rel = fi.path[len(root.rstrip("/")) + 1 :]
        if isinstance(fs, pafs.LocalFileSystem):
            check_pickle(lambda path=fi.path: path, rel)
        else:  # object stores: read it whole (what the sha256 check does anyway)
            with fs.open_input_stream(fi.path) as f:
                data = f.read()
            check_pickle(lambda blob=data: io.BytesIO(blob), rel)
        n += 1
    return n
