"""One forward of the paged engine: the scheduled sequences' new tokens, flattened, through the
model's ``forward_paged`` against the paged KV cache; each sequence's last-token logits back on
the host in float32 (one device-to-host copy per step: sampling, stop strings and streaming need
the tokens there anyway)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from modelfleet.models.lora import BASE_ROW, adapter_rows
from modelfleet.serve.scheduler import ScheduledSeq


class ModelRunner:
    def __init__(self, model: Any, *, num_blocks: int, block_size: int, pooled: bool = False) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.cache = model.new_paged_cache(num_blocks, block_size, device=self.device)
        self.pooled = pooled
        """A pool's forward names each token's adapter (peft's mixed batch: variants share steps)."""
        self.forwards = 0

    def run(self, batch: list[ScheduledSeq], adapters: list[str | None]) -> torch.Tensor:
        """Logits ``[len(batch), vocab]`` at each scheduled sequence's last computed token."""
        ids: list[int] = []
        for s in batch:
            ids += s.seq.tokens(s.start, s.start + s.num_tokens)
        lens = [s.num_tokens for s in batch]
        rows = (
            adapter_rows([a or BASE_ROW for a, n in zip(adapters, lens) for _ in range(n)])
            if self.pooled
            else contextlib.nullcontext()
        )
        with rows:
            logits = self.model.forward_paged(
                torch.tensor(ids, device=self.device),
                self.cache,
                [s.seq.block_table for s in batch],
                [s.start for s in batch],
                lens,
            )
        self.forwards += 1
        return logits.float().cpu()
