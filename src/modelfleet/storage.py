"""The storage layout and the file primitives every layer uses (a leaf: imports nothing of ours).

Everything modelfleet writes lives under one root, ``storage.path`` (a local directory, an
NFS/PVC mount, or a pyarrow URI such as ``s3://bucket/prefix``)::

    <root>/runs/<run>/step_<8 digits>/...    Ray Train's storage_path: checkpoints, metrics
    <root>/models/<name>/<vN>/ + LATEST      the artifact registry
    <root>/evaluations/<name>-<version>/     evaluation reports (JSON + PNG)
    <root>/kfold/...                         K-fold runs and their reports
    <root>/data/<preset>/                    prepared datasets (the default data.path)

``StorageLayout`` is the only code that spells these names.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs


def is_remote(uri: str) -> bool:
    """True for a pyarrow URI (``s3://...``, ``gs://...``); False for a local path."""
    return "://" in uri


def join(root: str, *parts: str) -> str:
    """``root/part/...`` for local paths and URIs alike (no os.path on URIs)."""
    return "/".join([root.rstrip("/"), *parts])


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    return pafs.FileSystem.from_uri(uri if is_remote(uri) else os.path.abspath(uri))


@dataclass(frozen=True)
class StorageLayout:
    """Every path under one storage root."""

    root: str

    def runs(self) -> str:
        """Ray Train's ``storage_path``: each run is a directory below it."""
        return join(self.root, "runs")

    def run(self, run_name: str) -> str:
        return join(self.runs(), run_name)

    def models(self) -> str:
        """The artifact registry."""
        return join(self.root, "models")

    def model(self, name: str, version: str | None = None) -> str:
        return join(self.models(), name, *([version] if version else []))

    def latest(self, name: str) -> str:
        """The file naming a model's newest published version."""
        return join(self.models(), name, "LATEST")

    def evaluations(self) -> str:
        return join(self.root, "evaluations")

    def evaluation(self, label: str) -> str:
        return join(self.evaluations(), label)

    def kfold(self) -> str:
        return join(self.root, "kfold")

    def data(self, preset: str) -> str:
        """The default ``data.path`` of a preset."""
        return join(self.root, "data", preset)


def sha256_stream(f: Any) -> str:
    """Hex sha256 of a binary stream (a local file or a pyarrow input stream), 1 MiB at a time."""
    h = hashlib.sha256()
    while chunk := f.read(1 << 20):
        h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a local file."""
    with open(path, "rb") as f:
        return sha256_stream(f)


def write_text(uri: str, text: str) -> None:
    """Write a whole small file atomically: readers see the old or the new text, never a part.
    Local files go through a temp file and ``os.replace``; object-store PUTs are atomic already."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        Path(tmp).write_text(text)
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(text.encode())


def read_text(uri: str) -> str:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def dump_json(directory: str, name: str, obj: Any) -> None:
    """``directory/name`` as indented, key-sorted JSON, written atomically."""
    write_text(join(directory, name), json.dumps(obj, indent=1, sort_keys=True))


def read_json(directory: str, name: str) -> Any:
    return json.loads(read_text(join(directory, name)))
