"""Artifact store: ``<storage>/models/<name>/<version>/`` plus a ``LATEST`` pointer per name.

An artifact directory holds ``model.safetensors``, ``config.json`` (the model config),
``tokenizer.json`` (the tokenizer spec) and ``manifest.json`` (run, step, metrics, full config,
sha256 of the weights). Versions are ``v1``, ``v2``...; a version directory appears only once all
its files are written (written aside, then renamed), so a reader never sees half an artifact.
Loading never unpickles: weights are safetensors, checked against the manifest's sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

WEIGHTS = "model.safetensors"
_VERSION = re.compile(r"^v(\d+)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class ArtifactError(ValueError):
    """An artifact reference or directory is invalid; the message names it."""


@dataclass(frozen=True)
class ArtifactRef:
    name: str
    version: str
    uri: str
    """Directory of the artifact: a local path or a pyarrow URI."""


def models_root(storage_path: str) -> str:
    return f"{storage_path.rstrip('/')}/models"


def _fs(uri: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(uri if "://" in uri else os.path.abspath(uri))


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ArtifactError(f"model name {name!r} is invalid: use 1-63 letters, digits, '.', '_' or '-' "
                            "starting with a letter or digit")
    return name


def versions(storage_path: str, name: str) -> list[str]:
    fs, base = _fs(_join(models_root(storage_path), name))
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return []
    found = [fi.base_name for fi in fs.get_file_info(pafs.FileSelector(base))
             if fi.type == pafs.FileType.Directory and _VERSION.match(fi.base_name)]
    return sorted(found, key=lambda v: int(v[1:]))


def publish(storage_path: str, name: str, local_dir: str) -> ArtifactRef:
    """Copy a finished local artifact directory in as the next version and move LATEST to it."""
    check_name(name)
    root = _join(models_root(storage_path), name)
    fs, base = _fs(root)
    fs.create_dir(base, recursive=True)
    existing = versions(storage_path, name)
    version = f"v{int(existing[-1][1:]) + 1 if existing else 1}"
    dest = _join(base, version)
    manifest_path = Path(local_dir, "manifest.json")
    manifest = json.loads(manifest_path.read_text())
    manifest.update(name=name, version=version)
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    if isinstance(fs, pafs.LocalFileSystem):
        staging = _join(base, f".staging-{uuid.uuid4().hex[:8]}")
        shutil.copytree(local_dir, staging)
        os.rename(staging, dest)  # atomic on one filesystem; fails if the version appeared meanwhile
    else:  # object stores have no rename: the manifest is copied last and readers require it
        for p in sorted(Path(local_dir).iterdir(), key=lambda p: p.name == "manifest.json"):
            pafs.copy_files(str(p), _join(dest, p.name), source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=fs)
    _write_text(fs, _join(base, "LATEST"), version)
    return ArtifactRef(name, version, _join(root, version))


def _write_text(fs: pafs.FileSystem, path: str, text: str) -> None:
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        Path(tmp).write_text(text)
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(text.encode())


def resolve(storage_path: str, ref: str) -> ArtifactRef:
    """``name``, ``name@vN`` or ``name@latest`` in the registry, or a path/URI to an artifact dir."""
    if "/" in ref or ref.startswith("."):
        fs, base = _fs(ref)
        if fs.get_file_info(_join(base, "manifest.json")).type != pafs.FileType.File:
            raise ArtifactError(f"artifact {ref!r} has no manifest.json; point at a directory written "
                                "by `modelfleet export`")
        m = read_json(ref, "manifest.json")
        return ArtifactRef(m.get("name", ""), m.get("version", ""), ref)
    name, _, version = ref.partition("@")
    check_name(name)
    known = versions(storage_path, name)
    if not known:
        raise ArtifactError(f"model {name!r} is not in the registry at {models_root(storage_path)}")
    if version in ("", "latest"):
        fs, base = _fs(_join(models_root(storage_path), name, "LATEST"))
        try:
            with fs.open_input_stream(base) as f:
                version = f.read().decode().strip()
        except FileNotFoundError:
            version = known[-1]
    if version not in known:
        raise ArtifactError(f"model {name!r} has no version {version!r}; versions: {', '.join(known)}")
    return ArtifactRef(name, version, _join(models_root(storage_path), name, version))


def read_json(uri: str, filename: str) -> Any:
    fs, base = _fs(uri)
    with fs.open_input_stream(_join(base, filename)) as f:
        return json.loads(f.read().decode())


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(uri: str) -> str:
    """A local directory holding the artifact (downloaded once for remote URIs)."""
    fs, base = _fs(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return base
    local = tempfile.mkdtemp(prefix="mf-artifact-")
    pafs.copy_files(base, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


def load_artifact(uri: str, *, device: str = "cpu") -> tuple[Any, Any, dict[str, Any]]:
    """(model in eval mode, preprocessor, manifest) from an artifact dir; checks the weights'
    sha256. The preprocessor is what the family turns raw input with: the tokenizer of a
    language model, the fitted ``Transform`` of the other families."""
    from safetensors.torch import load_model

    from modelfleet.config import ModelConfig
    from modelfleet.models import get_family

    local = fetch(uri)
    manifest = read_json(local, "manifest.json")
    weights = os.path.join(local, WEIGHTS)
    if not os.path.isfile(weights):
        raise ArtifactError(f"artifact {uri!r} has no {WEIGHTS}")
    if sha256_file(weights) != manifest.get("weights_sha256"):
        raise ArtifactError(f"artifact {uri!r}: {WEIGHTS} does not match the sha256 in manifest.json")
    mcfg = ModelConfig(**read_json(local, "config.json"))
    family = get_family(mcfg.family)
    model = family.build_for_artifact(mcfg, local)
    load_model(model, weights, device=device)
    return model.eval(), family.load_preprocessor(local, manifest), manifest
