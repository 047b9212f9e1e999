"""What the worker loop does with its DeepSpeed engine: a micro-step, the validation loss, the
export probe and, after a resize, the restored logits checked against it; and the parameter
storage a rank holds. Every tensor that crosses a collective is on ``engine.device``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from modelfleet.config import Config
from modelfleet.train import checkpoint as ck
from modelfleet.train.collectives import LossMeter, all_reduce, to_host


def to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device) for k, v in batch.items()}


def grad_norm(engine: Any) -> float | None:
    """The global gradient norm of the last optimizer step (before clipping), as DeepSpeed computed
    it; None where DeepSpeed keeps none (ZeRO-0 without gradient clipping)."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def param_storage(model: Any) -> dict[str, int]:
    """Bytes of parameter storage this rank holds (ZeRO-3 partitions count their shard), of the
    whole model, and of the largest single module's own full tensors (the transient peak of a
    sharded build, which gathers one module at a time)."""

    def full(p: Any) -> int:
        return getattr(p, "ds_numel", p.numel()) * p.element_size()

    unique = {id(p): p for p in model.parameters()}.values()
    local = sum((p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()) * p.element_size() for p in unique)
    transient = max((sum(full(p) for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return {"local_bytes": local, "full_bytes": sum(full(p) for p in unique), "transient_bytes": transient}


def micro_step(engine: Any, family: Any, batch: dict[str, Any], meter: LossMeter) -> None:
    """Forward, backward and (every grad_accum micro-steps, inside DeepSpeed) the optimizer step on
    one micro-batch; the loss joins ``meter`` on the device."""
    loss = family.loss(engine, to_device(family.collate(batch), engine.device))
    engine.backward(loss)
    engine.step()
    meter.add(loss)


def eval_batches(shard: Any, cfg: Config, family: Any) -> Iterator[Any]:
    it = shard.iter_batches(batch_size=cfg.train.micro_batch_size, drop_last=True, batch_format="numpy")
    for i, b in enumerate(it):
        if i >= cfg.train.eval_batches:
            break
        yield family.collate(b)


def validation_loss(engine: Any, batches: list[Any], family: Any) -> float:
    """Mean validation loss over every rank's first ``eval_batches`` micro-batches."""
    import torch
    import torch.distributed as dist

    # Every rank must run the same number of forwards: ZeRO-3 gathers parameters collectively.
    n = all_reduce(torch.tensor([len(batches)], device=engine.device), engine.device, dist.ReduceOp.MIN)
    engine.eval()
    total = torch.zeros(2, dtype=torch.float32, device=engine.device)
    with torch.no_grad():
        for b in batches[: int(to_host(n)[0])]:
            total[0] += family.loss(engine, to_device(b, engine.device)).detach().float()
            total[1] += 1
    engine.train()
    loss_sum, count = to_host(all_reduce(total, engine.device))
    if count == 0:
        raise RuntimeError(
            "data: the validation split has fewer rows than train.micro_batch_size "
            "x train.num_workers; raise data.val_fraction"
        )
    return loss_sum / count


def probe(engine: Any, val_batches: list[Any], family: Any) -> dict[str, Any]:
    """Outputs of the live engine on a fixed input: export checks the artifact reproduces them."""
    import torch

    inputs = family.probe(val_batches[0])
    engine.eval()
    with torch.no_grad():
        logits = family.forward(engine, to_device(inputs, engine.device)).float().cpu()
    engine.train()
    return {**inputs, "logits": logits.contiguous()}


def restored_logit_diff(engine: Any, family: Any, local: str) -> float | None:
    """After a resize: the restored engine's logits on the probe the checkpoint saved against the
    logits saved with it; None when the checkpoint has no probe (one written before every
    checkpoint carried one)."""
    import torch
    from safetensors.torch import load_file

    path = os.path.join(local, ck.VERIFY_FILE)
    if not os.path.isfile(path):
        return None
    saved = load_file(path)
    logits = saved.pop("logits")
    engine.eval()
    with torch.no_grad():
        now = family.forward(engine, to_device(saved, engine.device)).float().cpu()
    engine.train()
    return float((now - logits).abs().max())
