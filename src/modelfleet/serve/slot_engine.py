"""The slot engine: continuous batching over contiguous per-sequence KV slots, for models without
a paged forward (``hf-causal-lm``: Hugging Face caches keep one length per batch, so each row runs
against its own cache). ``gpt`` runs on the paged engine (``serve/engine.py``); this one stays as
its fallback and as the reference the paged engine is checked against.

The shape of vLLM's v1 scheduler (and nano-vllm's compact copy of it), at this project's scale:

- a **waiting** queue (bounded: ``max_waiting``) and a **running** set of at most
  ``max_num_seqs`` sequences, each owning one slot of a preallocated KV-cache pool
  (``model.new_slot_cache``: ``max_num_seqs`` slots x ``max_len`` tokens);
- every ``step()`` first admits waiting requests into free slots, prefills at most
  ``prefill_chunk`` prompt tokens (a long prompt takes several steps, so running streams keep
  flowing between its chunks), then decodes one token for every running sequence in one forward;
- a sequence leaves the moment it finishes (EOS, a stop string, ``max_tokens``) and its slot
  takes the next waiting request on the next step: nobody waits for a batch-mate.

Sampling is per request through ``models.sampling.sample`` with a private generator per
sequence, so a seeded request produces the same tokens whatever shares its batch; greedy decoding
in a batch matches decoding alone (fp32: logits equal up to matmul rounding).

``serve/engine.py``'s ``EngineLoop`` runs either engine on its own thread.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from modelfleet.models.lora import BASE_ROW, adapter_rows
from modelfleet.models.sampling import sample
from modelfleet.serve.engine_types import EngineConfig, EngineFull, StepOutput, record_output
from modelfleet.serve.generation import Job, Step, _Row


@dataclass(eq=False)
class Sequence:
    """One request inside the engine."""

    id: int
    job: Job
    row: _Row
    arrived: float = field(default_factory=time.perf_counter)
    slot: int = -1
    filled: int = 0
    """Tokens written to the slot (prompt tokens prefilled, then one per decode)."""
    next_token: int | None = None
    """The last sampled token, fed on the next decode step."""
    produced: int = 0
    """Tokens generated (EOS not counted)."""
    emitted: int = 0
    """Steps that produced output for this sequence."""
    first_token_at: float | None = None
    cancelled: bool = False

    @property
    def finished(self) -> bool:
        return self.row.finish_reason is not None


class SlotEngine:
    """A continuous-batching decoder over one model with contiguous KV slots (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        *,
        eos_id: int,
        decode: Callable[[list[int]], str],
        config: EngineConfig | None = None,
        adapters: Any = None,
    ) -> None:
        self.model = model
        self.adapters = adapters
        """Pools: the ``AdapterPool`` whose adapters rows select (``Job.adapter``); each forward
        runs every row with its own adapter (peft's mixed batch), so variants share steps."""
        self.eos_id, self.decode = eos_id, decode
        self.cfg = config or EngineConfig()
        limit = int(model.cfg.block_size)
        self.max_len = min(self.cfg.max_len or limit, limit)
        param = next(model.parameters())
        self.device = param.device
        self.cache = model.new_slot_cache(self.cfg.max_num_seqs, self.max_len, device=param.device)
        self.free = list(range(self.cfg.max_num_seqs))[::-1]  # pop() hands out low slots first
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.prefilling: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self._ids = itertools.count()
        self._lock = threading.Lock()  # add/cancel come from other threads than step

    # ------------------------------------------------------------------ requests
    def add(self, job: Job) -> Sequence:
        """Queue ``job``; thread-safe. Raises ``ValueError`` for a request no slot can hold and
        ``EngineFull`` when ``max_waiting`` requests already wait."""
        if not job.prompt_ids:
            raise ValueError("a request needs at least one prompt token")
        if len(job.prompt_ids) + job.max_tokens > self.max_len:
            raise ValueError(
                f"prompt ({len(job.prompt_ids)} tokens) + max_tokens ({job.max_tokens}) exceeds "
                f"the engine's {self.max_len}-token sequence slots"
            )
        seq = Sequence(next(self._ids), job, _Row(job, self.eos_id, self.decode))
        with self._lock:
            if len(self.waiting) >= self.cfg.max_waiting:
                raise EngineFull(
                    f"{len(self.waiting)} requests already wait for one of {self.cfg.max_num_seqs} sequence slots"
                )
            self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop ``seq`` (its client went away); its slot frees on the next step. Thread-safe."""
        seq.cancelled = True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    @property
    def cache_use(self) -> float:
        """Fraction of KV-cache slots held by a sequence."""
        return 1 - len(self.free) / self.cfg.max_num_seqs

    # ------------------------------------------------------------------ the loop body
    @torch.inference_mode()
    def step(self) -> StepOutput:
        """Admit, prefill up to ``prefill_chunk`` prompt tokens, decode one token per running sequence."""
        out: list[tuple[Sequence, Step]] = []
        self._drop_cancelled()
        self._admit()
        self._prefill(out)
        decoded = self._decode(out)
        for s in [s for s, _ in out if s.finished]:
            self._release(s)
        if self.adapters is not None and self.adapters.evicted:  # evicted ones go once no sequence uses them
            self.adapters.collect(self.adapters_in_use())
        return StepOutput(out, len(self.running) + len(self.prefilling), len(self.waiting), decoded)

    def _admit(self) -> None:
        with self._lock:
            while self.free and self.waiting:
                seq = self.waiting.popleft()
                seq.slot = self.free.pop()
                self.cache.reset(seq.slot)
                self.prefilling.append(seq)

    def _prefill(self, out: list[tuple[Sequence, Step]]) -> None:
        """Up to ``prefill_chunk`` prompt tokens: sequences whose next chunks have the same length
        share one forward (a burst of equal prompts prefills together); a prompt longer than the
        budget takes one chunk per step, so the running batch keeps decoding in between."""
        budget = self.cfg.prefill_chunk
        while budget > 0 and self.prefilling:
            head = self.prefilling[0]
            n = min(len(head.job.prompt_ids) - head.filled, budget)
            group = [
                s
                for s in self.prefilling
                if len(s.job.prompt_ids) - s.filled >= n and (s is head or len(s.job.prompt_ids) - s.filled == n)
            ][: max(1, budget // n)]
            group.sort(key=lambda s: s.slot)
            ids = torch.tensor([s.job.prompt_ids[s.filled : s.filled + n] for s in group], device=self.device)
            logits = self._forward(group, ids)[:, -1]
            budget -= n * len(group)
            for i, seq in enumerate(group):
                seq.filled += n
                if seq.filled < len(seq.job.prompt_ids):
                    continue  # more chunks next step; decoding of the running batch goes on meanwhile
                self.prefilling.remove(seq)
                self.running.append(seq)
                self._emit(seq, logits[i], out)
            if head.filled < len(head.job.prompt_ids):
                break

    def _decode(self, out: list[tuple[Sequence, Step]]) -> int:
        just_prefilled = _emitted(out)  # their first token came from the prefill: they decode next step
        # In slot order: consecutive slots let the cache hand out views instead of copies.
        batch = sorted(
            (s for s in self.running if not s.finished and id(s) not in just_prefilled), key=lambda s: s.slot
        )
        if not batch:
            return 0
        tokens = torch.tensor([[s.next_token] for s in batch], device=self.device)
        logits = self._forward(batch, tokens)[:, -1]
        for i, s in enumerate(batch):
            s.filled += 1
            self._emit(s, logits[i], out)
        return len(batch)

    def _forward(self, seqs: list[Sequence], idx: torch.Tensor) -> torch.Tensor:
        """Last-position logits of each row, on the host in float32: one device-to-host copy per
        forward (sampling, stop strings and streaming need the tokens there anyway)."""
        rows = (
            adapter_rows([s.job.adapter or BASE_ROW for s in seqs])
            if self.adapters is not None
            else contextlib.nullcontext()
        )
        with rows:
            return (
                self.model.forward_slots(idx, self.cache, [s.slot for s in seqs], [s.filled for s in seqs])[:, -1:]
                .float()
                .cpu()
            )

    def adapters_in_use(self) -> set[str]:
        """Adapters that a waiting, prefilling or running sequence needs."""
        with self._lock:
            waiting = list(self.waiting)
        return {s.job.adapter for s in (*waiting, *self.prefilling, *self.running) if s.job.adapter}

    def _emit(self, seq: Sequence, logits: torch.Tensor, out: list[tuple[Sequence, Step]]) -> None:
        job = seq.job
        tok = int(sample(logits, job.temperature, job.top_p, seq.row.gen))
        step = seq.row.push(tok)
        record_output(seq, tok, step)
        out.append((seq, step))

    def _release(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        if seq.slot >= 0:
            self.free.append(seq.slot)
            seq.slot = -1

    def _drop_cancelled(self) -> None:
        with self._lock:
            self.waiting = collections.deque(s for s in self.waiting if not s.cancelled)
        for s in [s for s in (*self.prefilling, *self.running) if s.cancelled]:
            if s in self.prefilling:
                self.prefilling.remove(s)
            self._release(s)


def _emitted(out: list[tuple[Sequence, Step]]) -> set[int]:
    """Ids of the sequences that already produced a token this step."""
    return {id(s) for s, _ in out}
