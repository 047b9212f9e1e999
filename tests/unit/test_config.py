"""Config: presets, YAML + --set layering, and one clear error per bad key or value."""

from __future__ import annotations

import pytest

from modelfleet.config import Config
from modelfleet.errors import ConfigError
from modelfleet.presets import PRESETS, load_config


def test_presets_build_on_each_other_and_round_trip():
    tiny, small = load_config(preset="tiny"), load_config(preset="small")
    assert small.model.n_layer > tiny.model.n_layer
    assert small.deepspeed == tiny.deepspeed  # inherited, not redefined
    for name in PRESETS:
        cfg = load_config(preset=name)
        assert cfg.preset == name
        assert Config.from_dict(cfg.to_dict()) == cfg


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("preset: small\ntrain:\n  max_steps: 7\ndeepspeed:\n  zero_stage: 2\n")
    cfg = load_config(p, overrides=["train.max_steps=9", "train.lr=0.01", "model.bias=true"])
    assert (cfg.preset, cfg.train.max_steps, cfg.train.lr, cfg.deepspeed.zero_stage) == ("small", 9, 0.01, 2)
    assert cfg.model.bias is True and cfg.model.n_layer == 4
    assert cfg.storage.path.startswith("/")  # Ray needs an absolute storage path


@pytest.mark.parametrize(
    "yaml_text, overrides, message",
    [
        ("train:\n  max_step: 3\n", [], "train.max_step: unknown key; valid keys here: activation_checkpointing"),
        ("", ["deepspeed.stage=3"], "deepspeed.stage: unknown key"),
        ("", ["deepspeed.zero_stage=4"], "deepspeed.zero_stage: must be 0, 1, 2 or 3, got 4"),
        ("", ["train.micro_batch_size=0"], "train.micro_batch_size: must be > 0, got 0"),
        ("", ["train.lr=fast"], "train.lr: must be a number, got 'fast'"),
        ("", ["model.n_head=5"], "model.n_head: must divide model.n_embd=128, got 5"),
        ("", ["train.precision=bf16"], "train.precision: bf16 needs GPUs"),
        (
            "",
            ["deepspeed.zero_stage=2", "deepspeed.offload_params=true"],
            "deepspeed.offload_params: needs deepspeed.zero_stage=3",
        ),
        ("", ["deepspeed.offload_optimizer=true"], "deepspeed.offload_optimizer: offloading to CPU needs GPU workers"),
        ("", ["train.use_gpu=yes please"], "train.use_gpu: must be true or false"),
        ("preset: huge\n", [], "preset: unknown preset 'huge'; valid presets: tiny, small, gpt2-124m, gpt-1b"),
        ("- a\n- b\n", [], "must hold a mapping"),
        ("", ["novalue"], "override 'novalue' must look like section.key=value"),
        (
            "",
            ["train.num_workers=[3, 2]"],
            "train.num_workers: must be a worker count or [min, max] with 1 <= min <= max",
        ),
        ("", ["train.num_workers=[2]"], "train.num_workers: must be a worker count or [min, max]"),
        ("", ["train.num_workers=many"], "train.num_workers: must be an integer, got 'many' or must be a list"),
        ("", ["train.elastic_batch=grow"], "train.elastic_batch: must be one of 'keep', 'scale'"),
        # Keys the model's family would ignore are errors (the preset's own gpt fields are not the user's).
        (
            "model:\n  family: hf-causal-lm\n  block_size: 512\n  params: {path: /x}\n",
            [],
            "model.block_size: not used by family 'hf-causal-lm', which reads its settings from model.params",
        ),
        ("preset: digits-cnn\n", ["model.n_layer=3"], "model.n_layer: not used by family 'cnn'"),
    ],
)
def test_bad_config_names_the_key(tmp_path, yaml_text, overrides, message):
    p = tmp_path / "c.yaml"
    p.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(p, overrides=overrides)
    assert message in str(e.value)


def test_a_family_other_than_gpt_takes_the_presets_gpt_fields_without_complaint(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("preset: tiny\nmodel:\n  family: cnn\n")
    assert load_config(p).model.family == "cnn"
    assert load_config(preset="digits-cnn", overrides=["model.params.hidden=32"]).model.params["hidden"] == 32


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_data_path_follows_storage_path_unless_set(tmp_path, monkeypatch):
    """README's `ray job submit ... --set storage.path=$PWD/storage` finds the shards `prepare`
    wrote: an unset data.path is <storage.path>/data/<preset>, from any working directory."""
    from modelfleet.presets import load_config
    from modelfleet.storage import StorageLayout

    monkeypatch.chdir(tmp_path)
    local = load_config(preset="tiny")
    assert local.data.path == StorageLayout(str(tmp_path / "storage")).data("tiny")
    elsewhere = tmp_path / "uploaded-copy"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    job = load_config(preset="tiny", overrides=[f"storage.path={tmp_path / 'storage'}"])
    assert job.data.path == local.data.path
    assert (
        load_config(preset="digits-cnn", overrides=["storage.path=s3://bucket/mf"]).data.path
        == "s3://bucket/mf/data/digits-cnn"
    )
    assert load_config(preset="tiny", overrides=["data.path=mine"]).data.path == str(elsewhere / "mine")


def test_elastic_workers_keep_the_global_batch_rounding_up():
    """[min, max]: the global batch of max workers is kept by recomputing grad_accum (ceil, so a
    count that does not divide rounds the batch up, never down); ``scale`` keeps grad_accum."""
    from modelfleet.train.deepspeed import build_ds_config

    cfg = load_config(preset="tiny", overrides=["train.num_workers=[2, 4]", "train.grad_accum=1"])
    t = cfg.train
    assert (t.elastic, t.min_workers, t.max_workers) == (True, 2, 4)
    assert [t.grad_accum_at(w) for w in (2, 3, 4)] == [2, 2, 1]  # 3 workers: 6 micro-batches for 4
    assert build_ds_config(cfg, 3)["gradient_accumulation_steps"] == 2
    scaled = load_config(preset="tiny", overrides=["train.num_workers=[2, 4]", "train.elastic_batch=scale"])
    assert [scaled.train.grad_accum_at(w) for w in (2, 3, 4)] == [1, 1, 1]
    fixed = load_config(preset="tiny", overrides=["train.num_workers=3", "train.grad_accum=2"])
    assert (fixed.train.elastic, fixed.train.grad_accum_at(3)) == (False, 2)
    assert Config.from_dict(cfg.to_dict()) == cfg
