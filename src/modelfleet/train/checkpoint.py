"""Checkpoint protocol: each rank saves its DeepSpeed shard plus a rank marker, every rank reports
its directory to Ray Train (which merges them into one storage directory), then rank 0 writes the
``COMPLETE`` marker last. A checkpoint is restorable only when COMPLETE and every rank's marker
exist and every file a marker lists is present with the recorded size and sha256.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from modelfleet.errors import CheckpointError
from modelfleet.storage import sha256_file, sha256_stream
from modelfleet.train import pickles

DS_TAG = "state"
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
VERIFY_FILE = "verify.safetensors"
ZERO0_WEIGHTS = "module.safetensors"
"""Whole weights of a ZeRO-0 run (no partitions for zero_to_fp32 to consolidate)."""
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def write_rank_marker(local_dir: str, rank: int, world_size: int, step: int) -> None:
    """Record every file this rank wrote (size + sha256); written after the shard itself."""
    root = Path(local_dir)
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith("rank-"):
            files[p.relative_to(root).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    marker = {"rank": rank, "world_size": world_size, "step": step, "files": files}
    (root / f"rank-{rank:05d}.json").write_text(json.dumps(marker, indent=1))


def write_complete(storage_path: str, run_name: str, step: int, world_size: int) -> None:
    """Rank 0, after every rank's report returned: the marker that makes the checkpoint count."""
    fs, base = pafs.FileSystem.from_uri(storage_path)
    path = f"{base}/{run_name}/{step_dir_name(step)}/{COMPLETE}"
    with fs.open_output_stream(path) as f:
        f.write(json.dumps({"step": step, "world_size": world_size}).encode())


def remove_stale(storage_path: str, run_name: str, step: int) -> None:
    """Delete a leftover directory for ``step`` (from an attempt that died mid-save) before
    saving it again, so stale markers can never vouch for new, half-written files."""
    fs, base = pafs.FileSystem.from_uri(storage_path)
    path = f"{base}/{run_name}/{step_dir_name(step)}"
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


@dataclass
class CheckpointInfo:
    step: int
    uri: str
    """pyarrow path of the checkpoint dir on its filesystem."""
    fs: pafs.FileSystem


def _read_json(fs: pafs.FileSystem, path: str) -> Any:
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def validate(fs: pafs.FileSystem, ckpt: str, *, verify_hashes: bool = True) -> dict[str, Any]:
    """Raise CheckpointError unless the checkpoint at ``ckpt`` is complete; return its COMPLETE info."""
    name = ckpt.rstrip("/").rsplit("/", 1)[-1]
    if fs.get_file_info(f"{ckpt}/{COMPLETE}").type != pafs.FileType.File:
        raise CheckpointError(f"checkpoint {name} is partial: its {COMPLETE} marker is missing")
    info = _read_json(fs, f"{ckpt}/{COMPLETE}")
    for rank in range(int(info["world_size"])):
        marker_path = f"{ckpt}/rank-{rank:05d}.json"
        if fs.get_file_info(marker_path).type != pafs.FileType.File:
            raise CheckpointError(f"checkpoint {name} is partial: rank {rank}'s shard marker is missing")
        marker = _read_json(fs, marker_path)
        for rel, meta in marker["files"].items():
            fi = fs.get_file_info(f"{ckpt}/{rel}")
            if fi.type != pafs.FileType.File or fi.size != meta["size"]:
                raise CheckpointError(
                    f"checkpoint {name} is corrupt: rank {rank}'s file {rel} is missing or has the wrong size"
                )
            if verify_hashes:
                with fs.open_input_stream(f"{ckpt}/{rel}") as f:
                    digest = sha256_stream(f)
                if digest != meta["sha256"]:
                    raise CheckpointError(
                        f"checkpoint {name} is corrupt: rank {rank}'s file {rel} does not match its recorded sha256"
                    )
    # Markers cannot vouch for content (whoever writes the storage can rewrite them): DeepSpeed
    # unpickles its shards, so each pickle must hold only data before anything loads it.
    try:
        pickles.check_dir(fs, ckpt)
    except pickles.UnsafePickleError as e:
        raise CheckpointError(f"checkpoint {name} is unsafe: {e}") from None
    return info


def list_checkpoints(storage_path: str, run_name: str) -> list[CheckpointInfo]:
    """All step_* directories of a run, newest first (complete or not)."""
    fs, base = pafs.FileSystem.from_uri(storage_path)
    run_dir = f"{base}/{run_name}"
    if fs.get_file_info(run_dir).type != pafs.FileType.Directory:
        return []
    out = []
    for fi in fs.get_file_info(pafs.FileSelector(run_dir)):
        m = _STEP_DIR.match(fi.base_name)
        if m and fi.type == pafs.FileType.Directory:
            out.append(CheckpointInfo(step=int(m.group(1)), uri=fi.path, fs=fs))
    return sorted(out, key=lambda c: -c.step)


def latest_complete(storage_path: str, run_name: str) -> tuple[CheckpointInfo | None, list[str]]:
    """The newest checkpoint that validates, and one reason per newer one that was skipped."""
    skipped = []
    for c in list_checkpoints(storage_path, run_name):
        try:
            validate(c.fs, c.uri)
            return c, skipped
        except CheckpointError as e:
            skipped.append(str(e))
    return None, skipped


def download(c: CheckpointInfo, local_dir: str) -> str:
    """Copy a checkpoint to a local directory (a no-op path for local storage)."""
    if isinstance(c.fs, pafs.LocalFileSystem):
        return c.uri
    os.makedirs(local_dir, exist_ok=True)
    pafs.copy_files(c.uri, local_dir, source_filesystem=c.fs, destination_filesystem=pafs.LocalFileSystem())
    return local_dir


def saved_world(c: CheckpointInfo) -> int:
    """How many ranks wrote the checkpoint (its trainer_state.json)."""
    with c.fs.open_input_stream(f"{c.uri}/{TRAINER_STATE}") as f:
        return int(json.loads(f.read())["world_size"])


UNIVERSAL_TAG = "universal"


def to_universal(local_ckpt: str, out_dir: str) -> str:
    """Convert a local ZeRO (1-3) checkpoint to DeepSpeed's universal format under ``out_dir``
    (tag ``UNIVERSAL_TAG``), which loads on any number of ranks with the optimizer state
    re-partitioned (``"checkpoint": {"load_universal": true}``); returns ``out_dir``. Run it inside
    ``pickles.weights_only_loads``: it unpickles the shards."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    os.makedirs(out_dir, exist_ok=True)
    args = argparse.Namespace(
        input_folder=os.path.join(local_ckpt, DS_TAG),
        output_folder=os.path.join(out_dir, UNIVERSAL_TAG),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        # ZeRO-1/2 checkpoints lack the version record the converter wants; we have no
        # tensor or pipeline parallelism to declare in it.
        inject_missing_state=True,
    )
    ds_to_universal.main(args)
    return out_dir
