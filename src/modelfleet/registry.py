"""Artifact store: ``<storage>/models/<name>/<version>/`` plus a ``LATEST`` pointer per name.

An artifact directory holds ``model.safetensors``, ``config.json`` (the model config),
``tokenizer.json`` (the tokenizer spec) and ``manifest.json`` (run, step, metrics, full config,
sha256 of the weights). An adapter artifact (``manifest.json`` ``kind: adapter``, written by a
LoRA run) holds peft's ``adapter_model.safetensors`` + ``adapter_config.json`` instead of
``model.safetensors``, and its manifest names the base artifact and the base weights' sha256. Versions are ``v1``, ``v2``...; a version directory appears only once all
its files are written (written aside, then renamed), so a reader never sees half an artifact.
Loading never unpickles: weights are safetensors, checked against the manifest's sha256.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from modelfleet.errors import ArtifactError
from modelfleet.storage import StorageLayout, filesystem, join, read_json, read_text, write_text

WEIGHTS = "model.safetensors"
_VERSION = re.compile(r"^v(\d+)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class ArtifactRef:
    name: str
    version: str
    uri: str
    """Directory of the artifact: a local path or a pyarrow URI."""


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ArtifactError(
            f"model name {name!r} is invalid: use 1-63 letters, digits, '.', '_' or '-' starting with a letter or digit"
        )
    return name


def versions(storage_path: str, name: str) -> list[str]:
    fs, base = filesystem(StorageLayout(storage_path).model(name))
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return []
    found = [
        fi.base_name
        for fi in fs.get_file_info(pafs.FileSelector(base))
        if fi.type == pafs.FileType.Directory and _VERSION.match(fi.base_name)
    ]
    return sorted(found, key=lambda v: int(v[1:]))


def publish(storage_path: str, name: str, local_dir: str, *, consume: bool = False) -> ArtifactRef:
    """Copy a finished local artifact directory in as the next version and move LATEST to it.
    ``consume``: ``local_dir`` is a scratch directory (``write_artifact_dir``'s): removed afterwards,
    published or not, so no caller leaves a model-sized copy in the temp directory."""
    try:
        return _publish(storage_path, name, local_dir)
    finally:
        if consume:
            shutil.rmtree(local_dir, ignore_errors=True)


def _publish(storage_path: str, name: str, local_dir: str) -> ArtifactRef:
    check_name(name)
    root = StorageLayout(storage_path).model(name)
    fs, base = filesystem(root)
    fs.create_dir(base, recursive=True)
    existing = versions(storage_path, name)
    version = f"v{int(existing[-1][1:]) + 1 if existing else 1}"
    dest = join(base, version)
    manifest_path = Path(local_dir, "manifest.json")
    manifest = json.loads(manifest_path.read_text())
    manifest.update(name=name, version=version)
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    if isinstance(fs, pafs.LocalFileSystem):
        staging = join(base, f".staging-{uuid.uuid4().hex[:8]}")
        shutil.copytree(local_dir, staging)
        os.rename(staging, dest)  # atomic on one filesystem; fails if the version appeared meanwhile
    else:  # object stores have no rename: the manifest is copied last and readers require it
        for p in sorted(Path(local_dir).iterdir(), key=lambda p: p.name == "manifest.json"):
            pafs.copy_files(
                str(p), join(dest, p.name), source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
            )
    write_text(StorageLayout(storage_path).latest(name), version)
    return ArtifactRef(name, version, join(root, version))


def resolve(storage_path: str, ref: str) -> ArtifactRef:
    """``name``, ``name@vN`` or ``name@latest`` in the registry, or a path/URI to an artifact dir."""
    if "/" in ref or ref.startswith("."):
        fs, base = filesystem(ref)
        if fs.get_file_info(join(base, "manifest.json")).type != pafs.FileType.File:
            raise ArtifactError(
                f"artifact {ref!r} has no manifest.json; point at a directory written by `modelfleet export`"
            )
        m = read_json(ref, "manifest.json")
        return ArtifactRef(m.get("name", ""), m.get("version", ""), ref)
    name, _, version = ref.partition("@")
    check_name(name)
    known = versions(storage_path, name)
    if not known:
        raise ArtifactError(f"model {name!r} is not in the registry at {StorageLayout(storage_path).models()}")
    if version in ("", "latest"):
        try:
            version = read_text(StorageLayout(storage_path).latest(name)).strip()
        except FileNotFoundError:
            version = known[-1]
    if version not in known:
        raise ArtifactError(f"model {name!r} has no version {version!r}; versions: {', '.join(known)}")
    return ArtifactRef(name, version, StorageLayout(storage_path).model(name, version))


def fetch(uri: str) -> str:
    """A local directory holding the artifact (downloaded once for remote URIs)."""
    fs, base = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return base
    local = tempfile.mkdtemp(prefix="mf-artifact-")
    pafs.copy_files(base, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local
