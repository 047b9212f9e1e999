"""`modelfleet plan`: ZeRO model-state accounting and refusal of configs that cannot fit."""

from __future__ import annotations

import pytest
import torch
import transformers  # the dev extra installs it: a broken install must fail, not skip

from helpers import tiny_config
from modelfleet.cli import main
from modelfleet.errors import ConfigError
from modelfleet.families import get_family
from modelfleet.models.gpt import GPT
from modelfleet.models.hf import HFCausalLM
from modelfleet.presets import load_config
from modelfleet.train import train
from modelfleet.train.capacity import worker_gpu_gib
from modelfleet.train.memory import GIB, activation_bytes, check_fits, model_shape, model_state_bytes, plan


def _counts(model: torch.nn.Module) -> tuple[int, int]:
    """(all, requires_grad) parameters of a built model, each tied tensor once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique), sum(p.numel() for p in unique if p.requires_grad)


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


def test_train_refuses_a_plan_that_cannot_fit_naming_the_cheapest_fix(tiny_data, tmp_path):
    """What `modelfleet train` checks before it launches GPU workers (train.gpu_memory_gib)."""
    # Through train() itself: a set gpu_memory_gib is checked on logical GPUs too, before Ray starts.
    small = tiny_config(tmp_path, tiny_data, ["train.use_gpu=true", "train.gpu_memory_gib=1"])
    with pytest.raises(ConfigError, match=r"needs about 1\.\d GiB per GPU but a GPU has 1\.0 GiB; no single change"):
        train(small, export=False, show_progress=False)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing launched
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
    with pytest.raises(ConfigError, match=r"train\.gpu_memory_gib: must be >= 0"):
        load_config(preset="tiny", overrides=["train.gpu_memory_gib=-1"])


def test_an_elastic_run_is_planned_at_its_minimum():
    """The fewest ranks hold the largest ZeRO shards: [min, max] is planned (and refused) at min."""
    elastic = load_config(preset="gpt-1b", overrides=["train.num_workers=[2, 8]"])
    at_min = load_config(preset="gpt-1b", overrides=["train.num_workers=2"])
    assert plan(elastic, gpu_memory_gib=80).total == plan(at_min, gpu_memory_gib=80).total


def test_a_lora_run_is_planned_with_a_frozen_base():
    """Gradients, Adam states and DeepSpeed's buffers only for the adapter; the base keeps weights."""
    lora = ["model.params.lora.base=tiny@v1", "model.params.lora.r=4"]
    full_cfg = load_config(preset="gpt2-124m", overrides=["train.num_workers=1", "deepspeed.zero_stage=2"])
    lora_cfg = load_config(preset="gpt2-124m", overrides=["train.num_workers=1", "deepspeed.zero_stage=2", *lora])
    family = get_family("gpt")
    model = family.with_lora(GPT(lora_cfg.model), family.lora_params(lora_cfg.model))
    total, trainable = _counts(model)  # the real model, built and wrapped by peft
    assert trainable < total / 100
    full, p = plan(full_cfg, gpu_memory_gib=80), plan(lora_cfg, gpu_memory_gib=80)
    assert (p.params, p.trainable) == (total, trainable)
    assert p.weights == pytest.approx(full.weights * total / full.params)  # the frozen base is held
    w, g, o = model_state_bytes(trainable, 2, 1, lora_cfg.train.precision)
    assert (p.grads, p.optimizer) == (pytest.approx(g), pytest.approx(o))
    assert p.grads < full.grads / 100 and p.optimizer < full.optimizer / 100
    assert p.activations == full.activations  # backward still runs through every frozen block


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("hf") / "gpt2"
    cfg = transformers.GPT2Config(vocab_size=400, n_positions=128, n_embd=96, n_layer=3, n_head=4)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(path))
    return str(path)


def test_hf_causal_lm_is_planned_from_the_checkpoints_own_dimensions(hf_dir):
    hf = ["model.family=hf-causal-lm", f"model.params.path={hf_dir}", "model.params.block_size=64"]
    cfg = load_config(preset="tiny", overrides=["train.num_workers=1", *hf])
    real = HFCausalLM(transformers.AutoModelForCausalLM.from_pretrained(hf_dir), 64)
    total, trainable = _counts(real)
    p = plan(cfg, gpu_memory_gib=80)
    assert (p.params, p.trainable) == (total, total)
    # Activations of 3 blocks of width 96 over 64 tokens and a 400-row vocabulary (not model.*'s GPT).
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.vocab_size) != (3, 96, 400)
    s, b, elem = 64, cfg.train.micro_batch_size, 4
    assert p.activations == pytest.approx(3 * 34 * s * b * 96 * elem / 2 + s * b * 400 * (elem + 8))
    assert activation_bytes(cfg, plan_shape := model_shape(cfg)) == p.activations and plan_shape.hidden == 96
    lora = load_config(
        preset="tiny", overrides=["train.num_workers=1", *hf, "model.params.lora.base=x@v1", "model.params.lora.r=2"]
    )
    family = get_family("hf-causal-lm")
    wrapped = family.with_lora(
        HFCausalLM(transformers.AutoModelForCausalLM.from_pretrained(hf_dir), 64), family.lora_params(lora.model)
    )
    q = plan(lora, gpu_memory_gib=80)
    assert (q.params, q.trainable) == _counts(wrapped) and q.trainable < q.params / 10
