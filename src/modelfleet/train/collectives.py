"""The worker loop's collectives and host transfers, each in one place so the device rule holds.

The rule: every tensor that crosses a collective lives on the engine's device (NCCL has no CPU
backend: a CPU tensor in an all-reduce fails the first optimizer step on GPUs, while gloo on CPU
would hide it), and losses reach the host only when someone reads them (logging, evaluation,
checkpoints), never per micro-step: each ``.item()`` on a GPU stalls the stream.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

HOST_READS = {"count": 0}
"""Host transfers made through ``to_host`` in this process (a test reads it per optimizer step)."""


def all_reduce(tensor: torch.Tensor, device: Any, op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
    """``dist.all_reduce`` in place, refusing a tensor that is not on the engine's ``device``."""
    if tensor.device != torch.device(device):
        raise RuntimeError(
            f"collective on a {tensor.device} tensor while the engine computes on {device}: "
            "create it on engine.device (NCCL cannot reduce CPU tensors)"
        )
    dist.all_reduce(tensor, op=op)
    return tensor


def to_host(tensor: torch.Tensor) -> list[float] | float:
    """The one way the loop reads a tensor on the host (a device sync): a float or a list."""
    HOST_READS["count"] += 1
    return tensor.detach().double().cpu().tolist()


class LossMeter:
    """Sums micro-step losses on the engine's device; ``reduce`` averages them over micro-steps and
    ranks with one all-reduce on the device and starts the next sum. Nothing here syncs the host."""

    def __init__(self, device: Any, world_size: int) -> None:
        self.device, self.world = device, world_size
        self.total = torch.zeros((), dtype=torch.float32, device=device)
        self.count = 0
        self.votes = torch.zeros((), dtype=torch.float32, device=device)

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss.detach().float()
        self.count += 1

    def reduce(self, vote: float = 0.0) -> torch.Tensor:
        """The step's mean loss; ``vote`` (rank 0's stop request, train/stopping.py) rides in the
        same all-reduce, and ``votes`` holds its sum over ranks (read on the host at log steps)."""
        both = torch.stack([self.total / max(self.count, 1), torch.tensor(vote, device=self.device)])
        both = all_reduce(both, self.device)
        self.votes = both[1]
        self.total = torch.zeros((), dtype=torch.float32, device=self.device)
        self.count = 0
        return both[0] / self.world
