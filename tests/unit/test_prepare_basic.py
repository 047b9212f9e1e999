"""modelfleet prepare: text, JSONL and Parquet in; fixed-length token rows out; nothing clobbered."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from modelfleet.config import DataConfig
from modelfleet.data.ingest import resolve_sources
from modelfleet.data.prepare import check_seq_len, prepare_dataset, read_meta
from modelfleet.data.tokenizer import ByteTokenizer
from modelfleet.errors import DataError

SEQ = 16


@pytest.fixture
def corpus(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 20)
    (src / "b.jsonl").write_text("\n".join(json.dumps({"text": f"jsonl line {i} é"}) for i in range(30)))
    pq.write_table(pa.table({"text": [f"parquet row {i}" for i in range(30)]}), src / "c.parquet")
    return src


def _rows(path) -> np.ndarray:
    t = pq.read_table(path)
    return np.asarray(t.column("tokens").combine_chunks().flatten()).reshape(t.num_rows, -1)


def test_prepare_mixed_formats(tmp_path, corpus):
    cfg = DataConfig(sources=[str(corpus)], path=str(tmp_path / "out"), val_fraction=0.1, rows_per_shard=20)
    meta = prepare_dataset(cfg, SEQ, ByteTokenizer())
    assert meta["num_documents"] == 1 + 30 + 30
    train, val = _rows(tmp_path / "out" / "train"), _rows(tmp_path / "out" / "val")
    assert train.shape[1] == val.shape[1] == SEQ + 1
    assert (len(train), len(val)) == (meta["train_rows"], meta["val_rows"])
    assert len(list((tmp_path / "out" / "train").glob("part-*.parquet"))) == -(-len(train) // 20)
    text = "".join(ByteTokenizer().decode(r.tolist()) for r in train)
    assert "quick brown" in text or "parquet row" in text or "jsonl line" in text
    assert read_meta(str(tmp_path / "out")) == meta
    with pytest.raises(DataError, match="sequences of 16 tokens but model.block_size is 128"):
        check_seq_len(meta, 128)


def test_deterministic_by_seed(tmp_path, corpus):
    outs = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        prepare_dataset(DataConfig(sources=[str(corpus)], path=str(tmp_path / name), seed=seed), SEQ, ByteTokenizer())
        outs.append(_rows(tmp_path / name / "train"))
    assert np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2])


def test_stdlib_sources_resolve():
    files = resolve_sources(["stdlib:json/*.py"])
    assert any(f.name == "decoder.py" for f in files)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: [str(d / "nothing-*.txt")], "matches no files"),
        (
            lambda d: (d / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n') and [str(d / "bad.jsonl")],
            "bad.jsonl:2: not valid JSON",
        ),
        (
            lambda d: (d / "k.jsonl").write_text('{"body": "x"}\n') and [str(d / "k.jsonl")],
            "k.jsonl:1: no string under data.text_column 'text'",
        ),
        (
            lambda d: pq.write_table(pa.table({"body": ["x"]}), d / "p.parquet") or [str(d / "p.parquet")],
            "no column data.text_column='text'; columns: body",
        ),
        (lambda d: (d / "tiny.txt").write_text("hi") and [str(d / "tiny.txt")], "yielded 3 tokens, fewer than"),
    ],
)
def test_bad_sources(tmp_path, setup, message):
    sources = setup(tmp_path)
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        prepare_dataset(DataConfig(sources=sources, path=str(tmp_path / "out")), SEQ, ByteTokenizer())
    assert not (tmp_path / "out").exists()


def test_existing_output_is_kept_unless_overwrite(tmp_path, corpus):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    cfg = DataConfig(sources=[str(corpus)], path=str(out))
    with pytest.raises(DataError, match="already holds data; pass --overwrite"):
        prepare_dataset(cfg, SEQ, ByteTokenizer())
    assert (out / "precious.txt").read_text() == "keep me"
    prepare_dataset(cfg, SEQ, ByteTokenizer(), overwrite=True)
    assert not (out / "precious.txt").exists() and (out / "meta.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name] == []


def test_read_meta_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist; run `modelfleet prepare CONFIG` first"):
        read_meta(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="holds no prepared dataset"):
        read_meta(str(tmp_path))
