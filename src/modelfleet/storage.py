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
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from modelfleet.errors import StorageError


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
    write_bytes(uri, text.encode())


def write_bytes(uri: str, data: bytes) -> None:
    """``write_text`` for bytes (atomic the same way)."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        Path(tmp).write_bytes(data)
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def read_text(uri: str) -> str:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def dump_json(directory: str, name: str, obj: Any) -> None:
    """``directory/name`` as indented, key-sorted JSON, written atomically."""
    write_text(join(directory, name), json.dumps(obj, indent=1, sort_keys=True))


def read_json(directory: str, name: str) -> Any:
    return json.loads(read_text(join(directory, name)))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def has_files(uri: str) -> bool:
    """True when ``uri`` is a directory (or object-store prefix) holding at least one file."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return False
    return any(
        fi.type == pafs.FileType.File
        for fi in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    )


def delete_dir(uri: str) -> None:
    """Remove a directory (or every object under a prefix); nothing when it does not exist."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def download_file(uri: str, local: str) -> str:
    fs, path = filesystem(uri)
    os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
    with fs.open_input_stream(path) as src, open(local, "wb") as dst:
        while chunk := src.read(8 << 20):
            dst.write(chunk)
    return local


def check_writable(uri: str) -> None:
    """Write and delete a probe object under ``uri``, so a missing bucket, refused credentials or
    an unreachable endpoint fail here, naming the URI and the cause, instead of in every worker.
    Credentials and endpoint come from the environment (AWS_*, GOOGLE_*) as pyarrow reads them;
    nothing of them is in the message."""
    if not is_remote(uri):
        return
    probe = join(uri, f".modelfleet-probe-{uuid.uuid4().hex[:8]}")
    try:
        fs, path = _probing_filesystem(probe)
        with fs.open_output_stream(path) as f:
            f.write(b"ok")
        fs.delete_file(path)
    except (OSError, ValueError) as e:
        raise StorageError(f"storage {uri} cannot be written: {describe_error(str(e))}") from None


def check_readable(uri: str) -> None:
    """List ``uri`` (an object-store prefix) with short timeouts: for a reader (Serve replicas
    loading artifacts), the same fail-fast causes as ``check_writable`` without needing write access."""
    if not is_remote(uri):
        return
    try:
        fs, path = _probing_filesystem(uri)
        fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
        missing = fs.get_file_info(path.split("/")[0]).type == pafs.FileType.NotFound  # listing it says nothing
    except (OSError, ValueError) as e:
        raise StorageError(f"storage {uri} cannot be read: {describe_error(str(e))}") from None
    if missing:
        raise StorageError(f"storage {uri} cannot be read: the bucket does not exist")


def _probing_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """Like ``filesystem`` but with short timeouts and few retries for S3 (pyarrow's defaults
    retry an unreachable endpoint for minutes)."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.S3FileSystem):
        # from_uri reads the endpoint from AWS_ENDPOINT_URL(_S3); the constructor does not.
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        fs = pafs.S3FileSystem(
            region=fs.region,
            endpoint_override=endpoint,
            connect_timeout=3,
            request_timeout=10,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2),
        )
    return fs, path


def describe_error(msg: str) -> str:
    """An object-store error message with its cause first (bucket, credentials, endpoint)."""
    low = msg.lower()
    if "nosuchbucket" in low or "bucket" in low and ("not found" in low or "does not exist" in low):
        return f"the bucket does not exist ({msg.splitlines()[0][:200]})"
    if any(
        s in low
        for s in (
            "accessdenied",
            "access denied",
            "access_denied",
            "invalidaccesskeyid",
            "invalid_access_key",
            "signaturedoesnotmatch",
            "signature_does_not_match",
            "forbidden",
        )
    ):
        return f"the credentials were refused ({msg.splitlines()[0][:200]})"
    if any(s in low for s in ("curl", "connect", "timed out", "timeout", "resolve host", "unreachable")):
        return f"the endpoint cannot be reached ({msg.splitlines()[0][:200]})"
    return msg.splitlines()[0][:300]


def makedirs(uri: str) -> None:
    """Create a directory and its parents (a no-op for object-store prefixes)."""
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)


def begin_tree(dest: str) -> str:
    """Where to write a new directory tree that replaces ``dest`` (a prepared dataset): beside it
    for a local path (``commit_tree`` renames it into place, so readers never see half of it);
    ``dest`` itself on an object store, which has no rename: the old tree is removed first and
    the writer puts its marker file (``meta.json``) last, so a reader sees no dataset until
    the whole new one is there. The caller has checked ``dest`` may be replaced
    (``data.prepare.check_destination``)."""
    if is_remote(dest):
        delete_dir(dest)
        return dest
    staging = f"{os.path.abspath(dest)}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    return staging


def commit_tree(staging: str, dest: str) -> None:
    if is_remote(dest):
        return
    old = f"{os.path.abspath(dest)}.old-{os.getpid()}"
    if os.path.exists(dest):
        os.rename(dest, old)
    os.rename(staging, dest)
    shutil.rmtree(old, ignore_errors=True)  # only once the new tree is in place


def abort_tree(staging: str, dest: str) -> None:
    """Drop a tree that failed half-way (local staging only: on an object store it lacks its marker)."""
    if not is_remote(dest):
        shutil.rmtree(staging, ignore_errors=True)
