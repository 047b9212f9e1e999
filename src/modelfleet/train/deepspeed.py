"""DeepSpeed config and learning-rate schedule, derived from our Config (never hand-written JSON)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from modelfleet.config import Config


def build_ds_config(cfg: Config, world: int | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON config for ``deepspeed.initialize`` (one source of truth: our Config);
    ``world``: the workers this attempt has (an elastic run recomputes grad_accum for it)."""
    t, ds = cfg.train, cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    # 16-bit precision is for real GPUs: there, overlap gradient
    # reduction with backward. On CPU (gloo) overlapping only adds copies on the same cores.
    on_gpus = t.precision in ("bf16", "fp16")
    if ds.zero_stage >= 2:
        zero.update(overlap_comm=on_gpus, contiguous_gradients=True)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if ds.zero_stage == 3:
        # Export consolidates from the fp32 shards with DeepSpeed's zero_to_fp32, so no
        # 16-bit gather on save (that would cost a full-model all-gather per checkpoint).
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_at(world) if world else t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": list(t.betas),
                "eps": 1e-8,
                "weight_decay": t.weight_decay,
                # Without offload, plain torch AdamW: it runs on every accelerator, CPU included,
                # and needs no compiled op. With offload DeepSpeed picks its CPU Adam.
                **({} if ds.offload_optimizer else {"torch_adam": True}),
            },
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16":
        conf["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        conf["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return conf


def lr_lambda(cfg: Config) -> Callable[[int], float]:
    """Linear warmup then cosine decay to ``min_lr_ratio``, as a multiplier of ``train.lr``."""
    t = cfg.train
    warm, total, floor = t.warmup_steps, t.max_steps, t.min_lr_ratio

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


SHM_COMM_OP = "deepspeed_shm_comm"


def skip_cpu_inference_comm_op() -> None:
    """Keep DeepSpeed's CPU backend from JIT-compiling its shared-memory all-reduce.

    ``deepspeed.comm`` builds ``deepspeed_shm_comm`` (g++, 60-90 s on 2 cores, once per venv path
    and torch-extensions cache, with a compiler required) when the process group starts, but only
    ``inference_all_reduce`` uses it: training's collectives are torch.distributed's (gloo here).
    Marked incompatible in DeepSpeed's op table, it is never built and the backend uses the
    process group for everything. Call after ``import deepspeed``, before the process group starts;
    CPU workers only (on CUDA, DeepSpeed's accelerator has no such op)."""
    import deepspeed.ops  # function-local: the driver never imports DeepSpeed

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


class _NoMuon:
    """Stands in for DeepSpeed's ``MuonWithAuxAdam``: no optimizer is ever an instance of it."""


def skip_muon_import() -> None:
    """Keep ``deepspeed.initialize`` from importing DeepSpeed's Muon optimizer, which we never use.

    DeepSpeed's ZeRO code imports that module on every ``initialize`` only to ask whether the
    optimizer is a ``MuonWithAuxAdam``, and the import builds ``torch.compile`` wrappers for its
    kernels (dynamo and inductor): 1-2 s of CPU per rank per run on the 2-core machine (py-spy),
    for an optimizer our config cannot select (always AdamW, ``build_ds_config``). A stand-in
    module whose ``MuonWithAuxAdam`` nothing is an instance of answers that question the same
    way. Call after ``import deepspeed``, before ``deepspeed.initialize``; a Muon module already
    imported in this process is left as it is."""
    import sys
    import types

    if MUON_MODULE not in sys.modules:
        stub = types.ModuleType(MUON_MODULE, "modelfleet: DeepSpeed's Muon optimizer, not imported (never used)")
        stub.MuonWithAuxAdam = _NoMuon  # type: ignore[attr-defined]
        sys.modules[MUON_MODULE] = stub
