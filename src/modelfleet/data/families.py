"""Datasets for the model families: offline sources, deterministic splits, the on-disk layout.

Sources need no network: scikit-learn's bundled tables (``sklearn:digits`` resized to 28x28,
``sklearn:diabetes`` and ``sklearn:breast_cancer`` with injected missing values) and seeded
generators with learnable structure (``synthetic:topics`` sentences, ``synthetic:interactions``
from latent user tastes). A prepared family dataset is::
    <data.path>/raw/{train,val,test}/   raw rows (what a client would send), Parquet
    <data.path>/{train,val}/            model-ready rows (the fitted transform applied by Ray Data)
    <data.path>/transform.json          the transform's state, fitted on raw/train only
    <data.path>/meta.json               family, row counts, sizes the model takes from the data
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from modelfleet import storage
from modelfleet.config import DataConfig
from modelfleet.data.prepare import check_destination
from modelfleet.data.raydata import configure_context
from modelfleet.errors import DataError

SPLITS = ("train", "val", "test")
TRANSFORM_FILE = "transform.json"
"""The fitted transform's state, in a dataset, a checkpoint and an artifact alike."""
MISSING_FRACTION = 0.1
"""Share of values blanked in the tabular sets' ``missing`` columns (imputation has work to do)."""


# ---------------------------------------------------------------- sources


def load_source(source: str, seed: int) -> pd.DataFrame:
    """The raw table for one ``data.sources`` entry; DataError naming it when unknown."""
    loaders = {
        "sklearn:digits": _digits,
        "sklearn:diabetes": _diabetes,
        "sklearn:breast_cancer": _breast_cancer,
        "synthetic:topics": _topics,
        "synthetic:interactions": _interactions,
    }
    if source not in loaders:
        raise DataError(f"data.sources: unknown source {source!r} for this family; valid sources: {', '.join(loaders)}")
    return loaders[source](np.random.default_rng(seed))


def _digits(rng: np.random.Generator) -> pd.DataFrame:
    """8x8 digits (0..16) upsampled bilinearly to 28x28 on MNIST's 0..255 scale."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) * (255.0 / 16.0))[:, None]
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 255)
    return pd.DataFrame({"image": list(x.reshape(len(x), 784).numpy()), "label": d.target.astype(np.int64)})


def _blank(df: pd.DataFrame, columns: list[str], rng: np.random.Generator) -> pd.DataFrame:
    for c in columns:
        df.loc[rng.random(len(df)) < MISSING_FRACTION, c] = np.nan
    return df


def _diabetes(rng: np.random.Generator) -> pd.DataFrame:
    from sklearn.datasets import load_diabetes

    df = load_diabetes(as_frame=True, scaled=False).frame
    df["sex"] = df["sex"].map({1.0: "female", 2.0: "male"})  # a categorical column to encode
    return _blank(df, ["bmi", "bp", "s5"], rng)


def _breast_cancer(rng: np.random.Generator) -> pd.DataFrame:
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer(as_frame=True)
    df = d.frame.rename(columns=lambda c: c.replace(" ", "_"))
    df["target"] = df["target"].astype(np.int64)
    return _blank(df, ["mean_radius", "mean_texture", "worst_area", "mean_smoothness"], rng)


TOPICS = {
    "sports": "goal match team score coach league player season stadium referee tournament champion",
    "science": "atom energy cell theory experiment molecule physics gene planet telescope lab data",
    "politics": "vote election senate policy minister party law debate campaign parliament tax court",
    "food": "recipe bread cheese soup flavor kitchen bake spice dinner fruit sauce chef",
}
FILLER = (
    "the a of and to in is was for on that with as it at by this from they we say her she he "
    "will one all would there their what so up out if about who get which go me when make "
    "can like time no just him know take people into year your good some could them see"
).split()


def _topics(rng: np.random.Generator, n: int = 2400) -> pd.DataFrame:
    """Sentences of filler words where about a third of the words come from the label's topic
    and some from other topics (noise): learnable, but not from a single word."""
    names = list(TOPICS)
    words = {k: v.split() for k, v in TOPICS.items()}
    texts, labels = [], []
    for _ in range(n):
        label = int(rng.integers(len(names)))
        out = []
        for _ in range(int(rng.integers(8, 17))):
            r = rng.random()
            if r < 0.3:
                out.append(str(rng.choice(words[names[label]])))
            elif r < 0.4:
                out.append(str(rng.choice(words[names[int(rng.integers(len(names)))]])))
            else:
                out.append(str(rng.choice(FILLER)))
        texts.append(" ".join(out))
        labels.append(label)
    return pd.DataFrame({"text": texts, "label": np.array(labels, np.int64)})


def _interactions(
    rng: np.random.Generator, users: int = 300, items: int = 120, groups: int = 4, per_user: int = 20
) -> pd.DataFrame:
    """Users like one item group best: 80% of their interactions fall in it, weighted by item
    popularity; the rest are random. A recommender must learn each user's group."""
    item_group = rng.integers(groups, size=items)
    popularity = rng.pareto(1.5, size=items) + 1.0
    rows = []
    for u in range(users):
        fav = int(rng.integers(groups))
        inside = np.flatnonzero(item_group == fav)
        p_in = popularity[inside] / popularity[inside].sum()
        n_in = min(len(inside), int(round(per_user * 0.8)))
        chosen = set(rng.choice(inside, size=n_in, replace=False, p=p_in).tolist())
        while len(chosen) < per_user:
            chosen.add(int(rng.integers(items)))
        rows += [(u, i) for i in sorted(chosen)]
    return pd.DataFrame(rows, columns=["user", "item"]).astype(np.int64)


# ---------------------------------------------------------------- splits


def split_rows(df: pd.DataFrame, data: DataConfig, *, group: str | None = None) -> dict[str, pd.DataFrame]:
    """Deterministic train/val/test split from ``data.seed``; with ``group``, every group (e.g.
    each user) is split on its own, so every user has training and held-out rows."""
    rng = np.random.default_rng(data.seed)
    parts: dict[str, list[pd.DataFrame]] = {s: [] for s in SPLITS}
    groups = [df] if group is None else [g for _, g in df.groupby(group, sort=True)]
    for g in groups:
        idx = rng.permutation(len(g))
        n_test = max(1, round(len(g) * data.test_fraction))
        n_val = max(1, round(len(g) * data.val_fraction))
        parts["test"].append(g.iloc[idx[:n_test]])
        parts["val"].append(g.iloc[idx[n_test : n_test + n_val]])
        parts["train"].append(g.iloc[idx[n_test + n_val :]])
    return {s: pd.concat(p).reset_index(drop=True) for s, p in parts.items()}


# ---------------------------------------------------------------- writing


def _to_table(df: pd.DataFrame) -> pa.Table:
    cols = {}
    for c in df.columns:
        v = df[c]
        if v.dtype == object and len(v) and isinstance(v.iloc[0], np.ndarray):
            arr = np.stack(v.to_numpy())
            cols[c] = pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), arr.shape[1])
        else:
            cols[c] = pa.array(v.to_numpy(), from_pandas=True)
    return pa.table(cols)


def read_raw(path: str, split: str) -> pd.DataFrame:
    """A raw split as pandas (vector columns as one array per row)."""
    return read_rows(f"{path}/raw/{split}")


def read_rows(directory: str) -> pd.DataFrame:
    """A directory of Parquet files as pandas (fixed-size list columns as one array per row)."""
    t = pq.read_table(directory)
    return pd.DataFrame(
        {
            c: (
                list(t[c].combine_chunks().flatten().to_numpy().reshape(len(t), -1))
                if pa.types.is_fixed_size_list(t[c].type)
                else t[c].to_numpy(zero_copy_only=False)
            )
            for c in t.column_names
        }
    )


def write_splits(
    family: Any,
    model: Any,
    splits: dict[str, pd.DataFrame],
    out: str,
    extra_meta: dict[str, Any],
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Fit the transform on ``splits['train']``, write raw and model-ready splits (the transform
    applied with Ray Data ``map_batches``), transform.json and meta.json; renamed into place."""
    import ray

    check_destination(out, overwrite)
    transform = family.fit_transform(splits["train"], model)
    staging = storage.begin_tree(out)
    configure_context()
    try:
        for s, df in splits.items():
            storage.makedirs(storage.join(staging, "raw", s))
            pq.write_table(_to_table(df), storage.join(staging, "raw", s, "part-00000.parquet"))
        for s in ("train", "val"):
            (
                ray.data.read_parquet(storage.join(staging, "raw", s))
                .map_batches(transform.apply, batch_format="numpy", batch_size=1024)
                .write_parquet(storage.join(staging, s))
            )
        meta = {
            "format_version": 1,
            "family": family.name,
            **{f"{s}_rows": len(df) for s, df in splits.items()},
            **transform.meta(),
            **extra_meta,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        storage.write_text(storage.join(staging, TRANSFORM_FILE), json.dumps(transform.state, indent=1))
        storage.write_text(storage.join(staging, "meta.json"), json.dumps(meta, indent=1))  # last: the marker
        storage.commit_tree(staging, out)
    finally:
        storage.abort_tree(staging, out)
    return meta


def prepare_family_dataset(family: Any, cfg: Any, *, overwrite: bool = False) -> dict[str, Any]:
    """``modelfleet prepare`` for every family but gpt: sources -> splits -> ``data.path``."""
    data = cfg.data
    if not data.path:
        raise DataError("data.path: is empty; set where the prepared dataset goes")
    if len(data.sources) != 1:
        raise DataError(f"data.sources: family {family.name!r} reads exactly one source, got {data.sources}")
    raw = family.load_raw(data.sources[0], data.seed)
    splits = family.split(raw, data)
    return write_splits(
        family, cfg.model, splits, data.path, {"sources": list(data.sources), "seed": data.seed}, overwrite=overwrite
    )
