"""The family registry, family configs, splits, folds, transforms, request schemas and metrics
(no Ray: the parts that run on one process)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from modelfleet.config import Config, DataConfig, ModelConfig
from modelfleet.errors import ConfigError
from modelfleet.families import FAMILIES, Family, build_model, check_config, get_family
from modelfleet.presets import load_config


def test_registry_names_every_family_and_refuses_unknown_ones():
    assert set(FAMILIES) == {"gpt", "hf-causal-lm", "cnn", "lstm", "linear", "mf"}
    for name in FAMILIES:
        fam = get_family(name)
        assert isinstance(fam, Family) and fam.name == name
        assert fam.task in ("lm", "classification", "regression", "recommendation")
        assert dataclasses.is_dataclass(fam.Params)
    with pytest.raises(ConfigError, match=r"model\.family: unknown family 'rnn'; valid families: cnn, gpt"):
        get_family("rnn")


def test_family_params_are_checked_naming_the_key():
    """The schema cannot know a family's params: the family checks them (load_config calls it)."""

    def check(family, params):
        check_config(Config(model=ModelConfig(family=family, params=params)))

    with pytest.raises(ConfigError, match=r"model\.params\.chanels: unknown key; valid keys here: channels"):
        check("cnn", {"chanels": 8})
    with pytest.raises(ConfigError, match=r"model\.params\.hidden: must be an integer, got 'big'"):
        check("lstm", {"hidden": "big"})
    with pytest.raises(ConfigError, match=r"model\.params\.path: is empty"):
        check("hf-causal-lm", {})
    with pytest.raises(ConfigError, match=r"model\.params\.chanels: unknown key"):
        load_config(preset="digits-cnn", overrides=["model.params={chanels: 8}"])


def test_family_presets_load_and_accept_overrides():
    cfg = load_config(preset="digits-cnn", overrides=["model.params.channels=8"])
    assert cfg.model.family == "cnn" and cfg.model.params["channels"] == 8
    assert cfg.deepspeed.zero_stage == 3 and cfg.data.sources == ["sklearn:digits"]
    lin = load_config(preset="diabetes-linear")
    assert "s1" in lin.model.params["minmax_columns"]
    for preset in ("topics-lstm", "interactions-mf", "breast-cancer-linear"):
        assert load_config(preset=preset).model.family in FAMILIES


def test_models_build_and_produce_the_right_shapes():
    torch.manual_seed(0)
    cnn = build_model(ModelConfig(family="cnn", params={"num_classes": 10}))
    assert cnn(torch.zeros(3, 784)).shape == (3, 10)
    lstm = build_model(ModelConfig(family="lstm", params={"vocab_size": 50, "num_classes": 4}))
    assert lstm(torch.randint(2, 50, (3, 7)), torch.tensor([7, 3, 1])).shape == (3, 4)
    mf = build_model(ModelConfig(family="mf", params={"num_users": 5, "num_items": 9}))
    assert mf(torch.tensor([0, 4])).shape == (2, 9)
    lin = build_model(ModelConfig(family="linear", params={"in_features": 11, "num_outputs": 1}))
    assert lin(torch.zeros(2, 11)).shape == (2, 1)


def test_splits_are_deterministic_disjoint_and_grouped_for_recommenders():
    df = pd.DataFrame({"user": np.repeat(np.arange(20), 10), "item": np.tile(np.arange(10), 20)})
    data = DataConfig(val_fraction=0.1, test_fraction=0.2, seed=3)
    a, b = get_family("mf").split(df, data), get_family("mf").split(df, data)
    assert all(a[s].equals(b[s]) for s in a)
    keys = [set(map(tuple, a[s].to_numpy())) for s in ("train", "val", "test")]
    assert sum(len(k) for k in keys) == len(df) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    assert set(a["test"]["user"]) == set(a["train"]["user"]) == set(range(20))  # every user, both sides
    other = get_family("linear").split(df, DataConfig(val_fraction=0.1, test_fraction=0.2, seed=4))
    assert not other["test"].equals(a["test"])


def test_kfold_assigns_every_row_to_exactly_one_fold():
    from modelfleet.evaluate.kfold import fold_ids

    rows = pd.DataFrame({"user": np.repeat(np.arange(6), 9)})
    ids = fold_ids(rows, 3, seed=0, group="user")
    assert sorted(np.unique(ids)) == [0, 1, 2] and len(ids) == len(rows)
    for u in range(6):  # each user's rows are spread over all folds
        assert sorted(np.bincount(ids[rows["user"].to_numpy() == u])) == [3, 3, 3]
    assert np.array_equal(ids, fold_ids(rows, 3, seed=0, group="user"))


def test_text_and_image_transforms_and_schemas():
    lstm = get_family("lstm")
    cfg = ModelConfig(family="lstm", params={"max_len": 4, "min_count": 2})
    raw = pd.DataFrame({"text": ["goal goal team", "team bread", "bread zzz"], "label": [0, 0, 1]})
    t = lstm.fit_transform(raw, cfg)
    out = t.apply({"text": np.array(["Goal, TEAM unknown goal goal", ""], dtype=object)})
    idx = {w: i + 2 for i, w in enumerate(t.state["vocab"])}
    assert t.state["vocab"] == ["bread", "goal", "team"]  # 'zzz' appears once: below min_count
    assert out["tokens"][0].tolist() == [idx["goal"], idx["team"], 1, idx["goal"]] and out["length"].tolist() == [4, 1]
    with pytest.raises(ValidationError, match="text"):
        lstm.request_model(t).model_validate({"text": ""})

    cnn = get_family("cnn")
    imgs = pd.DataFrame({"image": [np.full(784, 10.0, np.float32), np.full(784, 30.0, np.float32)], "label": [0, 1]})
    ti = cnn.fit_transform(imgs, ModelConfig(family="cnn"))
    assert ti.state["mean"] == 20.0 and ti.state["std"] == 10.0
    np.testing.assert_allclose(ti.apply({"image": np.stack(imgs["image"])})["x"][:, 0], [-1.0, 1.0])
    schema = cnn.request_model(ti)
    with pytest.raises(ValidationError, match="must be 28 rows of 28 numbers, got 27 rows"):
        schema.model_validate({"image": [[0.0] * 28] * 27})
    with pytest.raises(ValidationError, match=r"\[0, 255\]"):
        schema.model_validate({"image": [[300.0] * 28] * 28})


def test_metrics_match_hand_computed_values():
    from modelfleet.families.base import Transform
    from modelfleet.metrics import metrics_for

    t = Transform()
    t.state = {"classes": ["a", "b"]}
    m = metrics_for("classification", {"y_true": np.array([0, 0, 1, 1]), "y_pred": np.array([0, 1, 1, 1])}, t)
    assert m["accuracy"] == 0.75 and m["confusion_matrix"] == [[1, 1], [0, 2]]
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert m["f1_macro"] == pytest.approx((2 / 3 + 0.8) / 2)
    r = metrics_for("regression", {"y_true": np.array([1.0, 2.0, 3.0]), "y_pred": np.array([1.0, 2.0, 4.0])}, t)
    assert r["mse"] == pytest.approx(1 / 3) and r["mae"] == pytest.approx(1 / 3) and r["r2"] == pytest.approx(0.5)
    lm = metrics_for("lm", {"nll": np.array([2.0, 4.0]), "tokens": np.array([2, 2])}, t)
    assert lm["perplexity"] == pytest.approx(np.exp(1.5))
