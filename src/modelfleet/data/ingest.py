"""Resolve ``data.sources`` to files and read documents from text, JSONL or Parquet."""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from modelfleet.errors import DataError

_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def resolve_sources(sources: list[str]) -> list[Path]:
    """Files, directories (every file below), globs, or ``stdlib:<glob>`` (Python's own files)."""
    if not sources:
        raise DataError("data.sources: is empty; list input files, directories or globs")
    found: set[Path] = set()
    for entry in sources:
        pattern = entry
        if entry.startswith("stdlib:"):
            pattern = os.path.join(sysconfig.get_paths()["stdlib"], entry[len("stdlib:") :])
        matches = [Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True)]
        files: list[Path] = []
        for m in matches:
            if m.is_dir():
                files.extend(p for p in m.rglob("*") if p.is_file())
            elif m.is_file():
                files.append(m)
        if not files:
            raise DataError(f"data.sources: {entry!r} matches no files")
        found.update(p.resolve() for p in files)
    return sorted(found)


def format_of(path: Path, fmt: str) -> str:
    return _FORMATS.get(path.suffix.lower(), "text") if fmt == "auto" else fmt


def iter_documents(paths: list[Path], fmt: str, text_column: str) -> Iterator[str]:
    """Yield one document at a time so a large corpus never sits in memory whole."""
    for path in paths:
        kind = format_of(path, fmt)
        if kind == "text":
            yield path.read_text(encoding="utf-8", errors="replace")
        elif kind == "jsonl":
            yield from _iter_jsonl(path, text_column)
        elif kind == "parquet":
            yield from _iter_parquet(path, text_column)
        else:
            raise DataError(f"data.format: {fmt!r} is not one of auto, text, jsonl, parquet")


def _iter_jsonl(path: Path, key: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(key), str):
                raise DataError(f"{path}:{lineno}: no string under data.text_column {key!r}")
            yield obj[key]


def _iter_parquet(path: Path, column: str) -> Iterator[str]:
    try:
        f = pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    names = f.schema_arrow.names
    if column not in names:
        raise DataError(f"{path}: no column data.text_column={column!r}; columns: {', '.join(names)}")
    for batch in f.iter_batches(columns=[column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if value:
                yield value
