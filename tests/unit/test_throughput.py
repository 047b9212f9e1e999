"""Model FLOPs per token, MFU and the peak it is measured against (train/throughput.py)."""

from __future__ import annotations

import pytest
import torch

from modelfleet.errors import ConfigError
from modelfleet.families import get_family
from modelfleet.models.gpt import GPT, flops_per_token
from modelfleet.presets import load_config
from modelfleet.train.throughput import (
    Peak,
    device_peak,
    lm_dims,
    measured_cpu_gemm_flops,
    model_flops_per_token,
    step_rates,
)


def test_full_gpt_flops_are_6n_plus_attention_as_palm_counts():
    """The module walk agrees with the closed form from the config (models/gpt.flops_per_token)."""
    cfg = load_config(preset="gpt2-124m")
    with torch.device("meta"):
        model = GPT(cfg.model)
    got = model_flops_per_token(model, *lm_dims(model, cfg), cfg.model.block_size)
    assert got == pytest.approx(flops_per_token(cfg.model), rel=1e-3)  # biases aside (gpt2-124m has none)


def test_a_frozen_lora_base_costs_4n_and_the_adapter_6n():
    cfg = load_config(preset="tiny", overrides=["model.params.lora.base=tiny@v1", "model.params.lora.r=4"])
    family = get_family("gpt")
    model = family.with_lora(GPT(cfg.model), family.lora_params(cfg.model))
    matmul = [p for m in model.modules() if not isinstance(m, torch.nn.Embedding) for p in m.parameters(False)]
    matmul = list({id(p): p for p in matmul if p.dim() == 2}.values())
    frozen = sum(p.numel() for p in matmul if not p.requires_grad)
    adapter = sum(p.numel() for p in matmul if p.requires_grad)
    assert adapter > 0 and frozen > 10 * adapter
    attention = 12 * cfg.model.n_layer * cfg.model.n_embd * cfg.model.block_size
    got = model_flops_per_token(model, *lm_dims(model, cfg), cfg.model.block_size)
    assert got == 4 * frozen + 6 * adapter + attention
    full = model_flops_per_token(GPT(cfg.model), *lm_dims(model, cfg), cfg.model.block_size)
    assert got < full


def test_mfu_is_achieved_model_flops_over_the_peak_of_all_ranks():
    peak = Peak(1e12, "config")
    r = step_rates(
        step_time_s=0.5, samples=8, tokens=1024, flops_per_token=1e6, world=2, peak=peak, device=torch.device("cpu")
    )
    assert r.tokens_per_s == 2048 and r.samples_per_s == 16
    assert r.mfu == pytest.approx(2048 * 1e6 / 2e12) and r.mfu_basis == "config"
    assert r.peak_mem_bytes > 0 and r.peak_mem_basis == "process_max_rss"
    other = step_rates(
        step_time_s=0.5, samples=8, tokens=None, flops_per_token=None, world=2, peak=peak, device=torch.device("cpu")
    )
    assert other.tokens_per_s is None and other.mfu is None and other.samples_per_s == 16


def test_the_peak_comes_from_the_config_else_a_measured_cpu_gemm():
    assert device_peak(100.0, "bf16", on_gpu=False) == Peak(100e12, "config")
    cpu = device_peak(0.0, "fp32", on_gpu=False)
    assert cpu.basis == "cpu_gemm_measured" and 1e8 < cpu.flops < 1e13
    assert measured_cpu_gemm_flops(n=128, reps=2) > 0


def test_peak_tflops_must_not_be_negative():
    with pytest.raises(ConfigError, match=r"train\.peak_tflops: must be >= 0"):
        load_config(preset="tiny", overrides=["train.peak_tflops=-1"])
