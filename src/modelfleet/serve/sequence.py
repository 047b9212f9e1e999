"""One request's state inside the paged engine: its tokens, status and KV block table.

Pure Python (no torch): the scheduler and the block manager are tested without a model. The
shape is vLLM v1's ``Request`` (``RequestStatus``) and nano-vllm's ``Sequence``: a sequence is a
list of token ids (prompt, then generated) of which the first ``num_computed_tokens`` have their
keys/values in the blocks of ``block_table``. Every step computes ``num_tokens -
num_computed_tokens`` of them (capped by the token budget): the whole prompt in chunks, then one
token per decode, or everything again after a preemption -- one rule for prefill, decode and
recompute.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    """Queued, never admitted."""
    RUNNING = "running"
    """Admitted: holds blocks, is scheduled every step until it finishes."""
    PREEMPTED = "preempted"
    """Gave its blocks back when the pool ran out; back in the waiting queue, recomputed on re-admission."""
    FINISHED = "finished"
    """Ended normally (EOS, stop, length) or cancelled by its client."""
    FAILED = "failed"
    """Ended by a fault of its own row or of a whole step."""

    @property
    def done(self) -> bool:
        return self in (SequenceStatus.FINISHED, SequenceStatus.FAILED)


@dataclass(eq=False)
class Sequence:
    """Tokens and KV bookkeeping of one request (identity equality: two requests with the same
    prompt are different sequences)."""

    prompt_ids: list[int]
    max_tokens: int = 16
    """Most tokens it may generate; with the prompt this bounds the blocks it can ever need."""
    adapter_sha: str | None = None
    """sha256 of the adapter weights its rows run with (pools), or None for the base model: part
    of every block hash, so two adapters never share KV."""
    cache_salt: str | None = None
    """Optional per-tenant salt in every block hash: tenants with different salts never hit each
    other's blocks (hit timing would otherwise reveal another tenant's prompt)."""
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    """Block ids holding this sequence's KV, in token order (block i holds tokens i*bs .. i*bs+bs-1)."""
    num_computed_tokens: int = 0
    """Leading tokens whose KV is in ``block_table`` (cached prefix included)."""
    num_cached_tokens: int = -1
    """Prompt tokens served from the prefix cache at first admission (OpenAI's ``cached_tokens``);
    -1 until admitted."""
    num_preemptions: int = 0
    cancelled: bool = False
    block_hashes: list[bytes] = field(default_factory=list)
    """Hash-chain keys of this sequence's full blocks, computed lazily by the block manager."""
    hash_epoch: int = -1
    """The block manager's cache epoch ``block_hashes`` belong to; a
    flush (new weights) starts a new epoch, so stale keys are recomputed."""
    kv_epoch: int = -1
    """The cache epoch in which its blocks' KV was computed: a sequence admitted before a flush
    holds old-weight KV and never publishes it."""

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("prompt_ids is empty; a sequence needs at least one prompt token")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens is {self.max_tokens}; it must be at least 1")

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def max_total_tokens(self) -> int:
        return len(self.prompt_ids) + self.max_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens the next steps must run through the model before it can sample again."""
        return self.num_tokens - self.num_computed_tokens

    def tokens(self, start: int, end: int) -> list[int]:
        """``token_ids[start:end]`` without building the whole list (the runner asks every step)."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.prompt_ids[start:] + self.output_ids[: end - n]

    def append_token(self, token: int) -> None:
        self.output_ids.append(token)
