"""`modelfleet plan`: ZeRO model-state accounting and refusal of configs that cannot fit."""

from __future__ import annotations

import pytest

from modelfleet.cli import main
from modelfleet.presets import load_config
from modelfleet.train.memory import GIB, model_state_bytes, plan


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_states_shrink_with_workers_as_zero_says(stage):
    one = sum(model_state_bytes(10**9, stage, 1, "bf16"))
    eight = sum(model_state_bytes(10**9, stage, 8, "bf16"))
    assert one == 16e9  # 2 + 2 + 12 bytes per parameter
    expected = {1: 4 + 12 / 8, 2: 2 + 14 / 8, 3: 16 / 8}[stage] * 1e9
    assert eight == pytest.approx(expected)


def test_plan_counts_the_real_model_and_grows_with_the_batch():
    cfg = load_config(preset="gpt2-124m", overrides=["train.num_workers=1"])
    p = plan(cfg, gpu_memory_gib=80)
    assert 80e6 < p.params < 130e6 and p.fits
    big = load_config(preset="gpt2-124m", overrides=["train.num_workers=1", "train.micro_batch_size=64"])
    assert plan(big, gpu_memory_gib=80).activations == pytest.approx(4 * p.activations, rel=0.01)


def test_plan_command_refuses_a_config_that_cannot_fit(capsys):
    argv = [
        "plan",
        "--preset",
        "gpt-1b",
        "--set",
        "train.num_workers=1",
        "--set",
        "train.micro_batch_size=32",
        "--set",
        "train.activation_checkpointing=false",
        "--gpu-memory-gib",
        "80",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "needs about" in err and "GiB per GPU but a GPU has 80.0 GiB" in err
    assert main(["plan", "--preset", "gpt-1b", "--gpu-memory-gib", "80"]) == 0
    assert "fits:" in capsys.readouterr().out


def test_checkpointing_and_more_workers_lower_the_plan():
    base = load_config(preset="gpt-1b", overrides=["train.num_workers=1", "train.activation_checkpointing=false"])
    ckpt = load_config(preset="gpt-1b", overrides=["train.num_workers=1"])
    wide = load_config(preset="gpt-1b", overrides=["train.num_workers=8", "train.activation_checkpointing=false"])
    p, q, r = (plan(c, gpu_memory_gib=80) for c in (base, ckpt, wide))
    assert q.activations < p.activations / 5
    assert r.weights + r.grads + r.optimizer == pytest.approx((p.weights + p.grads + p.optimizer) / 8)
    assert p.total > 30 * GIB


def test_train_refuses_a_plan_that_cannot_fit_naming_the_cheapest_fix():
    """What `modelfleet train` checks before it launches GPU workers (train.gpu_memory_gib)."""
    from modelfleet.errors import ConfigError
    from modelfleet.train.memory import check_fits
    from modelfleet.train.trainer import worker_gpu_gib

    big = load_config(
        preset="gpt-1b",
        overrides=[
            "train.num_workers=1",
            "train.micro_batch_size=32",
            "train.activation_checkpointing=false",
            "train.gpu_memory_gib=80",
        ],
    )
    assert worker_gpu_gib(big) == 80.0  # the config's value wins; no cluster is asked
    with pytest.raises(
        ConfigError,
        match=r"needs about \d+\.\d GiB per GPU but a GPU has 80\.0 GiB; the cheapest "
        r"change that fits: --set train\.activation_checkpointing=true",
    ):
        check_fits(big, 80)
    fixed = load_config(
        preset="gpt-1b",
        overrides=["train.num_workers=1", "train.micro_batch_size=32", "train.activation_checkpointing=true"],
    )
    assert check_fits(fixed, 80).fits
    # When recompute is already on, the next cheapest change is named (the same global batch).
    tight = load_config(preset="gpt-1b", overrides=["train.num_workers=1", "train.micro_batch_size=32"])
    with pytest.raises(
        ConfigError,
        match=r"--set (deepspeed\.zero_stage=\d|train\.micro_batch_size=\d+ "
        r"train\.grad_accum=\d+|train\.num_workers=2)",
    ):
        check_fits(tight, 30)
    with pytest.raises(ConfigError, match=r"no single change fits; combine"):
        check_fits(tight, 4)


def test_gpu_memory_gib_must_not_be_negative():
    from modelfleet.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train\.gpu_memory_gib: must be >= 0"):
        load_config(preset="tiny", overrides=["train.gpu_memory_gib=-1"])


def test_an_elastic_run_is_planned_at_its_minimum():
    """The fewest ranks hold the largest ZeRO shards: [min, max] is planned (and refused) at min."""
    elastic = load_config(preset="gpt-1b", overrides=["train.num_workers=[2, 8]"])
    at_min = load_config(preset="gpt-1b", overrides=["train.num_workers=2"])
    assert plan(elastic, gpu_memory_gib=80).total == plan(at_min, gpu_memory_gib=80).total
