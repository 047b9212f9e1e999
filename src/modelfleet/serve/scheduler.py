"""Which sequences run in the next step and on how many tokens: waiting and running queues,
admission against free KV blocks, a per-step token budget (chunked prefill), preemption.

Pure Python over ``Sequence`` and ``BlockManager`` (tested without a model), after vLLM v1's
``Scheduler.schedule`` and nano-vllm's scheduler:

- Each step every sequence is given ``min(num_uncomputed_tokens, prefill_chunk, budget left)``
  tokens: a decode is 1, a prompt is computed in chunks of at most ``prefill_chunk``, and the
  step's total stays within ``max_num_batched_tokens`` -- so a long prompt never stalls the
  running streams for more than one chunk.
- Running sequences go first, in admission order. When one needs a block and the pool is empty,
  the most recently admitted running sequence is **preempted**: it gives its blocks back, goes to
  the front of the waiting queue, and is recomputed (prompt + tokens so far) on re-admission, so
  its stream continues where it was.
- Waiting sequences are admitted first-come first-served while a sequence slot, budget and blocks
  (after their cached prefix) are available; none are admitted in a step that had to preempt.
- ``add`` refuses with ``QueueFull`` once ``max_waiting`` sequences wait (the replica answers
  429/503 with Retry-After), and with ``ValueError`` a sequence the whole pool could never hold.

Thread safety: ``add`` and ``cancel`` may come from any thread; everything else runs on the
engine's thread.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field

from modelfleet.serve.blocks import BlockManager
from modelfleet.serve.sequence import Sequence, SequenceStatus


class QueueFull(RuntimeError):
    """``max_waiting`` sequences already wait: the caller answers overload (429/503 + Retry-After)."""


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 8
    """Most sequences running (holding blocks) at once."""
    max_num_batched_tokens: int = 256
    """Most tokens computed in one step, decodes and prefill chunks together."""
    prefill_chunk: int = 64
    """Most tokens one sequence computes in one step."""
    max_waiting: int = 64
    """Sequences queued before ``add`` refuses with ``QueueFull``."""

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} is {getattr(self, name)}; it must be at least 1")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting is {self.max_waiting}; it must be 0 or more")


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int
    """Tokens of ``seq`` computed this step, from ``start`` on."""
    start: int = 0
    """``seq.num_computed_tokens`` when scheduled (the positions of this step's tokens)."""
    samples: bool = False
    """This step reaches the sequence's last token: its logits give the next token."""

    @classmethod
    def of(cls, seq: Sequence, num_tokens: int) -> ScheduledSeq:
        start = seq.num_computed_tokens
        return cls(seq, num_tokens, start, start + num_tokens == seq.num_tokens)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)
    """Sequences removed this step before running (cancelled by their clients)."""

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, blocks: BlockManager, config: SchedulerConfig | None = None) -> None:
        self.blocks = blocks
        self.cfg = config or SchedulerConfig()
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        """In admission order: the last one is preempted first."""
        self.num_preemptions = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ requests
    def add(self, seq: Sequence) -> None:
        need = self.blocks.blocks_for(seq.max_total_tokens)
        if need > self.blocks.num_blocks:
            raise ValueError(
                f"prompt ({seq.num_prompt_tokens} tokens) + max_tokens ({seq.max_tokens}) needs {need} KV "
                f"blocks of {self.blocks.block_size} tokens; the pool holds {self.blocks.num_blocks}"
            )
        with self._lock:
            if len(self.waiting) >= self.cfg.max_waiting:
                raise QueueFull(
                    f"{len(self.waiting)} requests already wait for one of {self.cfg.max_num_seqs} sequence slots"
                )
            seq.status = SequenceStatus.WAITING
            self.waiting.append(seq)

    def cancel(self, seq: Sequence) -> None:
        """Mark ``seq`` cancelled; the next ``schedule`` removes it and frees its blocks."""
        seq.cancelled = True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def sequences(self) -> list[Sequence]:
        """Every waiting and running sequence (a snapshot; safe from any thread)."""
        with self._lock:
            waiting = list(self.waiting)
        return [*waiting, *self.running]

    # ------------------------------------------------------------------ one step
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._drop_cancelled(out)
        budget = self.cfg.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, self.cfg.prefill_chunk, budget)
            if n <= 0:  # nothing to compute (its token is sampled but not yet appended): skip
                i += 1
                continue
            while not self.blocks.allocate(seq, n):
                victim = self.running.pop()  # the most recently admitted gives its blocks back
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq.of(seq, n))
                budget -= n
                i += 1
        if out.preempted:
            return out
        with self._lock:
            while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
                seq = self.waiting[0]
                cached = self.blocks.match_prefix(seq)
                n = min(seq.num_tokens - len(cached) * self.blocks.block_size, self.cfg.prefill_chunk, budget)
                if not self.blocks.allocate(seq, n, cached):
                    break  # first come first served: nobody overtakes the head for want of blocks
                self.waiting.popleft()
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                out.scheduled.append(ScheduledSeq.of(seq, n))
                budget -= n
        return out

    # ------------------------------------------------------------------ after the step
    def commit(self, out: SchedulerOutput) -> None:
        """The step ran: record its computed tokens (publishes newly full blocks). Call before
        appending the sampled tokens, whose KV the next step computes."""
        for s in out.scheduled:
            if not s.seq.status.done:
                self.blocks.commit(s.seq, s.num_tokens)

    def finish(self, seq: Sequence, status: SequenceStatus = SequenceStatus.FINISHED) -> None:
        """``seq`` ended (``FINISHED``) or failed (``FAILED``): it leaves and its blocks return."""
        if not status.done:
            raise ValueError(f"status is {status.name}; a sequence finishes as FINISHED or FAILED")
        if seq in self.running:
            self.running.remove(seq)
        with self._lock:
            if seq in self.waiting:
                self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = status

    def fail_step(self, out: SchedulerOutput) -> list[Sequence]:
        """The whole step failed: its sequences fail, and their blocks go back unpublished (no
        ``commit`` ran for it, so nothing it half-wrote is ever matched)."""
        failed = [s.seq for s in out.scheduled if not s.seq.status.done]
        for seq in failed:
            self.finish(seq, SequenceStatus.FAILED)
        return failed

    # ------------------------------------------------------------------ internals
    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.blocks.free(seq)
        seq.status = SequenceStatus.PREEMPTED
        seq.num_preemptions += 1
        self.num_preemptions += 1
        out.scheduled = [s for s in out.scheduled if s.seq is not seq]
        out.preempted.append(seq)
        with self._lock:
            self.waiting.appendleft(seq)

    def _drop_cancelled(self, out: SchedulerOutput) -> None:
        with self._lock:
            gone = [s for s in self.waiting if s.cancelled]
        gone += [s for s in self.running if s.cancelled]
        for seq in gone:
            self.finish(seq, SequenceStatus.FINISHED)
            out.finished.append(seq)
