"""Throughput, model FLOPs utilisation and memory of training steps, and their Prometheus gauges.

Model FLOPs per token follow the PaLM appendix-B accounting (what nanoGPT's ``estimate_mfu``
and torchtitan report): ``6*N`` for a matmul weight that trains (forward 2, input gradient 2,
weight gradient 2), ``4*N`` for a frozen one (no weight gradient: a LoRA base), plus attention's
score and value matmuls, ``12 * n_layer * hidden * seq`` (both passes; they have no weights).
N counts the matmul weights (2-D parameters outside embeddings; a tied LM head counts once, as
the matmul it is), so position and token lookups add nothing.

MFU is achieved model FLOP/s over the device's peak: ``train.peak_tflops`` when set, else the
GPU's dense peak for the run's precision from ``PEAK_TFLOPS``; on CPU it is measured (a GEMM
timed on this worker at start) and the record says so in ``mfu_basis``.

Prometheus: the driver exports the gauges (``TrainingGauges``), not the workers. Rank 0's records
already reach the driver's progress sink; the driver lives for the whole run while workers are
restarted on failures and resizes (each restart would start new series under another worker
id, and a dead worker's last value would linger until Ray drops it), and one process gives one
series per run without per-rank duplicates.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

from modelfleet.train.progress import Step, StepRates, numbers

# Dense (no sparsity) peak TFLOP/s per GPU by a substring of torch.cuda.get_device_name(), for
# 16-bit and for fp32 (TF32 tensor cores, which PyTorch's default matmul precision does not use
# for fp32, so fp32 MFU against this is a lower bound). From the vendors' data sheets (SXM parts).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"half": 989.4, "fp32": 494.7},
    "H100": {"half": 989.4, "fp32": 494.7},
    "A100": {"half": 312.0, "fp32": 156.0},
    "L40S": {"half": 362.1, "fp32": 183.0},
    "L4": {"half": 121.0, "fp32": 60.0},
    "A10G": {"half": 70.0, "fp32": 35.0},
    "B200": {"half": 2250.0, "fp32": 1100.0},
}


@dataclass(frozen=True)
class Peak:
    flops: float | None
    """Peak FLOP/s of one device MFU is measured against (None: unknown, no MFU)."""
    basis: str
    """Where ``flops`` comes from: ``config``, ``gpu:<name>``, ``cpu_gemm_measured`` or ``unknown``."""


def model_flops_per_token(model: Any, n_layer: int, hidden: int, seq: int) -> float:
    """Training FLOPs per token of ``model`` (see the module docstring); ZeRO-3 partitions count whole."""
    from torch import nn

    seen: set[int] = set()
    flops = 0.0
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            continue
        for p in m.parameters(recurse=False):
            if id(p) in seen or len(getattr(p, "ds_shape", p.shape)) < 2:  # ZeRO-3 empties p itself
                continue
            seen.add(id(p))
            n = getattr(p, "ds_numel", p.numel())
            flops += (6.0 if p.requires_grad else 4.0) * n
    return flops + 12.0 * n_layer * hidden * seq


def lm_dims(model: Any, cfg: Any) -> tuple[int, int]:
    """(layers, hidden) of a language model: a Hugging Face model's own config, else ``model.*``."""
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and hasattr(c, "num_hidden_layers") and hasattr(c, "hidden_size"):
            return c.num_hidden_layers, c.hidden_size
    return cfg.model.n_layer, cfg.model.n_embd


def measured_cpu_gemm_flops(n: int = 512, reps: int = 4, trials: int = 5) -> float:
    """FLOP/s of an fp32 ``n x n`` matmul on this process's threads (the CPU's attainable peak):
    the best of ``trials`` timings, since a CPU shared with other processes only ever slows one."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: thread pool and caches
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 * reps / best


def device_peak(peak_tflops: float, precision: str, on_gpu: bool) -> Peak:
    """The peak MFU is measured against (see the module docstring)."""
    if peak_tflops:
        return Peak(peak_tflops * 1e12, "config")
    if not on_gpu:
        return Peak(measured_cpu_gemm_flops(), "cpu_gemm_measured")
    import torch

    name = torch.cuda.get_device_name()
    for key, rates in PEAK_TFLOPS.items():
        if key in name:
            return Peak(rates["half" if precision in ("bf16", "fp16") else "fp32"] * 1e12, f"gpu:{key}")
    print(f"train: no known peak for GPU {name!r}; set train.peak_tflops to report MFU", file=sys.stderr)
    return Peak(None, "unknown")


def peak_memory(device: Any) -> tuple[int, str]:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    # Linux reports ru_maxrss in KiB.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_max_rss"


def step_rates(
    *,
    step_time_s: float,
    samples: int,
    tokens: int | None,
    flops_per_token: float | None,
    world: int,
    peak: Peak,
    device: Any,
) -> StepRates:
    """Rates of one optimizer step of ``samples`` (``tokens``) across ``world`` ranks."""
    tok_s = tokens / step_time_s if tokens is not None else None
    mfu = None
    if tok_s is not None and flops_per_token is not None and peak.flops:
        mfu = tok_s * flops_per_token / (world * peak.flops)
    mem, basis = peak_memory(device)
    return StepRates(
        step_time_s=step_time_s,
        samples_per_s=samples / step_time_s,
        tokens_per_s=tok_s,
        model_flops_per_token=flops_per_token,
        mfu=mfu,
        mfu_basis=peak.basis,
        peak_flops=peak.flops,
        peak_mem_bytes=mem,
        peak_mem_basis=basis,
    )


class TrainingGauges:
    """The driver's Prometheus gauges of a run (``ray_modelfleet_train_*`` once Ray prefixes them).

    Get them with ``for_run``: they stay registered in the driver until it exits, but Ray's
    metrics agent serves a gauge series only for about two export intervals after its last
    ``set`` (measured 2026-12-07: a run's gauges were gone from the metrics port a minute after it
    ended), so a scraper sees a run's values while it trains and for ~20 s after."""

    NAMES = {
        "step_time_s": ("modelfleet_train_step_time_seconds", "Wall time of the last logged optimizer step."),
        "tokens_per_s": ("modelfleet_train_tokens_per_second", "Training tokens per second, all ranks."),
        "samples_per_s": ("modelfleet_train_samples_per_second", "Training samples per second, all ranks."),
        "loss": ("modelfleet_train_loss", "Training loss of the last logged step."),
        "mfu": ("modelfleet_train_mfu", "Model FLOPs utilisation of the last logged step (0-1)."),
        "step": ("modelfleet_train_step", "Last logged optimizer step."),
    }

    def __init__(self, run_name: str) -> None:
        from ray.util import metrics

        self._gauges = {}
        for key, (name, doc) in self.NAMES.items():
            g = metrics.Gauge(name, doc, tag_keys=("run",))
            g.set_default_tags({"run": run_name})
            self._gauges[key] = g

    @classmethod
    def for_run(cls, run_name: str) -> TrainingGauges:
        if run_name not in _LIVE:
            _LIVE[run_name] = cls(run_name)
        return _LIVE[run_name]

    def record(self, step: Step) -> None:
        """Set every gauge the step record has a value for."""
        values = numbers(step)
        for key, gauge in self._gauges.items():
            if key in values:
                gauge.set(values[key])


_LIVE: dict[str, TrainingGauges] = {}
