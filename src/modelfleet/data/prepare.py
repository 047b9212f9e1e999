"""``modelfleet prepare``: documents -> byte tokens -> fixed-length rows in Parquet shards.

Each row holds ``seq_len + 1`` tokens (inputs are row[:-1], targets row[1:]). Rows are shuffled
with ``data.seed`` and split into ``train/`` and ``val/``. Output is written beside the target
and renamed into place, so an existing dataset is never half-overwritten.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from modelfleet import storage
from modelfleet.config import DataConfig
from modelfleet.data.ingest import iter_documents, resolve_sources
from modelfleet.errors import DataError, StorageError


def prepare_dataset(cfg: DataConfig, seq_len: int, tokenizer: Any, *, overwrite: bool = False) -> dict:
    """Tokenize ``cfg.sources`` into ``cfg.path``; returns the dataset's meta.json contents."""

    # Bytes are the byte tokenizer's ids: one vectorised conversion per document.
    def encode(doc: str) -> np.ndarray:
        return np.frombuffer(doc.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    return write_token_rows(cfg, seq_len, encode, tokenizer.eos_id, tokenizer.spec(), overwrite=overwrite)


def write_token_rows(
    cfg: DataConfig, seq_len: int, encode: Any, eos_id: int, tokenizer_spec: dict, *, overwrite: bool = False
) -> dict:
    """Documents -> ``encode`` -> rows of ``seq_len + 1`` token ids in train/val Parquet shards
    (also used by ``hf-causal-lm`` with a Hugging Face tokenizer)."""
    if not cfg.path:
        raise DataError("data.path: is empty; set where the prepared dataset goes")
    out = cfg.path
    check_destination(out, overwrite)
    paths = resolve_sources(cfg.sources)
    chunks, n_docs = [], 0
    for doc in iter_documents(paths, cfg.format, cfg.text_column):
        if not doc:
            continue  # an empty file is not a document (and must not become a lone eos token)
        ids = np.asarray(encode(doc), dtype=np.int32)
        chunks.append(np.append(ids, np.int32(eos_id)))
        n_docs += 1
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
    row = seq_len + 1
    n_rows = len(tokens) // row
    if n_rows < 2:
        raise DataError(
            f"data.sources yielded {len(tokens)} tokens, fewer than the 2*(seq_len+1) = "
            f"{2 * row} needed for one training and one validation sequence"
        )
    rows = tokens[: n_rows * row].reshape(n_rows, row)
    rows = rows[np.random.default_rng(cfg.seed).permutation(n_rows)]
    n_val = min(n_rows - 1, max(1, round(n_rows * cfg.val_fraction)))
    meta = {
        "format_version": 1,
        "seq_len": seq_len,
        "tokenizer": tokenizer_spec,
        "train_rows": n_rows - n_val,
        "val_rows": n_val,
        "train_tokens": (n_rows - n_val) * seq_len,
        "num_documents": n_docs,
        "sources": [str(p) for p in paths],
        "seed": cfg.seed,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    staging = storage.begin_tree(out)
    try:
        _write_split(storage.join(staging, "val"), rows[:n_val], cfg.rows_per_shard)
        _write_split(storage.join(staging, "train"), rows[n_val:], cfg.rows_per_shard)
        storage.write_text(storage.join(staging, "meta.json"), json.dumps(meta, indent=1))  # last: the marker
        storage.commit_tree(staging, out)
    finally:
        storage.abort_tree(staging, out)
    return meta


def check_destination(path: str, overwrite: bool) -> None:
    """Before any work: the destination can be written (object stores: bucket, credentials,
    endpoint) and holds no dataset unless ``overwrite``."""
    try:
        storage.check_writable(path)
    except StorageError as e:
        raise StorageError(f"data.path: {e}") from None
    if storage.has_files(path) and not overwrite:
        raise DataError(f"data.path '{path}' already holds data; pass --overwrite to replace it")


def _write_split(d: str, rows: np.ndarray, per_shard: int) -> None:
    storage.makedirs(d)
    width = rows.shape[1]
    for i, start in enumerate(range(0, len(rows), per_shard)):
        part = rows[start : start + per_shard]
        # fixed_size_list keeps rows rectangular: Ray Data hands each batch over as one 2-D array.
        col = pa.FixedSizeListArray.from_arrays(pa.array(part.reshape(-1), pa.int32()), width)
        pq.write_table(pa.table({"tokens": col}), storage.join(d, f"part-{i:05d}.parquet"))


def read_meta(path: str) -> dict:
    """The meta of a prepared dataset (a local path or a URI), or a DataError saying what is missing."""
    if not storage.exists(path):
        raise DataError(f"data.path '{path}' does not exist; run `modelfleet prepare CONFIG` first")
    if not storage.exists(storage.join(path, "meta.json")):
        raise DataError(
            f"data.path '{path}' holds no prepared dataset (no meta.json); run `modelfleet prepare CONFIG` first"
        )
    meta = storage.read_json(path, "meta.json")
    if meta.get("train_rows", 0) == 0:
        raise DataError(f"data.path '{path}' is an empty dataset (0 training sequences)")
    return meta


def check_seq_len(meta: dict, block_size: int) -> None:
    if meta["seq_len"] != block_size:
        raise DataError(
            f"data.path holds sequences of {meta['seq_len']} tokens but model.block_size is "
            f"{block_size}; re-run `modelfleet prepare` with this config"
        )
