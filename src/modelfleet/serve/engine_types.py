"""What both engines (paged: ``serve/engine.py``, slot: ``serve/slot_engine.py``) share with their
callers: the configuration, the overload error and one step's output."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from modelfleet.serve.generation import Step
from modelfleet.serve.scheduler import QueueFull

EngineFull = QueueFull
"""The waiting queue is at ``max_waiting``: the caller answers overload (429/503)."""


@dataclass
class EngineConfig:
    max_num_seqs: int = 8
    """Sequences decoded together (the slot engine: one KV-cache slot each)."""
    max_len: int = 0
    """Most tokens of one sequence (prompt + generated); 0 = the model's context."""
    prefill_chunk: int = 64
    """Most prompt tokens one sequence prefills per step; longer prompts are split across steps."""
    max_waiting: int = 64
    """Requests queued before ``add`` refuses with ``EngineFull``."""
    block_size: int = 16
    """Paged engine: tokens per KV block."""
    num_kv_blocks: int = 0
    """Paged engine: blocks in the KV pool; 0 = as many as ``max_num_seqs`` full-length sequences
    need (the slot engine's memory, now shared by whatever mix of lengths runs)."""
    max_num_batched_tokens: int = 0
    """Paged engine: most tokens computed in one step; 0 = ``prefill_chunk + max_num_seqs`` (one
    prefill chunk beside a decode for every running sequence)."""
    enable_prefix_caching: bool = True
    """Paged engine: share the KV of identical prompt prefixes across requests."""
    max_failed_steps: int = 3
    """Paged engine: consecutive failed steps after which the engine reports itself unhealthy (the
    replica's health check then fails and Serve replaces it); a single failed step fails only the
    sequences in it."""

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "prefill_chunk", "block_size", "max_failed_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} is {getattr(self, name)}; it must be at least 1")
        for name in ("max_len", "max_waiting", "num_kv_blocks", "max_num_batched_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} is {getattr(self, name)}; it must be 0 or more")


@dataclass
class StepOutput:
    """What one engine step produced: ``(sequence, step)`` pairs and the batch sizes."""

    outputs: list[tuple[Any, Step]]
    running: int
    waiting: int
    decoded: int
    """Sequences in this step's forward."""
    preempted: int = 0
    """Sequences preempted this step (their blocks given back; recomputed later)."""


def record_output(seq: Any, token: int, step: Step) -> None:
    """The stream bookkeeping both engines keep on a sequence after it sampled ``token``."""
    seq.produced += step.tokens
    seq.emitted += 1
    seq.next_token = token
    if seq.first_token_at is None:
        seq.first_token_at = time.perf_counter()
