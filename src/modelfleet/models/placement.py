"""Where a loaded model runs: the device a replica or evaluation worker was given and the dtype.

``model.to(device, dtype)`` after loading is the move that counts (loading a state dict "onto" a
device moves nothing when the parameters were built on CPU). ``OnDevice`` lets code that feeds CPU
tensors and reads CPU results (the predict families, batch evaluation) run a model placed on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

DType = Literal["auto", "float32", "bfloat16", "float16"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype
    problem: str | None = None
    """Why the requested GPU cannot be used (the replica's health check reports it)."""

    def describe(self) -> dict[str, str]:
        return {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch.")}


def placement(num_gpus: float, dtype: DType, *, cuda_available: bool, simulated: bool, who: str) -> Placement:
    """The device and dtype for a worker that reserved ``num_gpus``: its GPU when CUDA works; CPU
    with no GPU, or on the simulated cluster (logical GPUs on CPU nodes); otherwise CPU plus the
    ``problem`` that a GPU was reserved but CUDA is unusable. ``auto`` is bf16 on GPU, fp32 on CPU."""
    problem = None
    if num_gpus > 0 and cuda_available:
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        if num_gpus > 0 and not simulated:
            problem = (
                f"{who} reserves num_gpus={num_gpus:g} but CUDA is unusable in its process "
                "(torch.cuda.is_available() is False: no driver, a CPU-only torch build, or an empty "
                "CUDA_VISIBLE_DEVICES); fix the node's GPU setup or set num_gpus: 0"
            )
    if dtype == "auto":
        return Placement(device, torch.bfloat16 if device.type == "cuda" else torch.float32, problem)
    return Placement(device, _DTYPES[dtype], problem)


def place(model: nn.Module, where: Placement) -> nn.Module:
    """``model`` moved to ``where`` (floating-point parameters and buffers cast to its dtype)."""
    return model.to(device=where.device, dtype=where.dtype)


class OnDevice(nn.Module):
    """Calls a placed model with CPU inputs and returns CPU float32 outputs."""

    def __init__(self, model: nn.Module, where: Placement) -> None:
        super().__init__()
        self.model = model
        self.where = where

    def forward(self, *args: Any) -> Any:
        moved = [_to(a, self.where) if isinstance(a, torch.Tensor) else a for a in args]
        out = self.model(*moved)
        if isinstance(out, torch.Tensor):
            return out.float().cpu()
        return type(out)(o.float().cpu() if isinstance(o, torch.Tensor) else o for o in out)


def _to(t: torch.Tensor, where: Placement) -> torch.Tensor:
    # Floating inputs take the weights' dtype; ids and lengths keep theirs.
    return t.to(where.device, where.dtype) if t.is_floating_point() else t.to(where.device)
