"""The paged engine: continuous batching over a paged KV cache with automatic prefix caching, for
the language-model families, with no Ray or HTTP in it (the replica drives it from one thread,
benchmarks and tests drive it in process).

``step()`` is schedule -> run -> update, in roles after nano-vllm and vLLM v1:

- the ``Scheduler`` (``serve/scheduler.py``) picks the step's sequences and how many tokens each
  computes: running sequences first (one token each once decoding, prompt chunks of at most
  ``prefill_chunk`` before), then waiting ones while the token budget, a sequence slot and KV
  blocks allow; when blocks run out the newest running sequence is preempted and recomputed later;
- the ``BlockManager`` (``serve/blocks.py``) hands out KV blocks and publishes full ones under a
  hash chain, so a prompt that starts like an earlier one skips that prefix's prefill;
- the ``ModelRunner`` (``serve/model_runner.py``) runs one forward over all scheduled tokens;
- the update samples a token for every sequence whose step reached its last token, streams it,
  and finishes the sequence at EOS, a stop string or ``max_tokens`` (its blocks return at once,
  its cached prefix stays for the next request).

Sampling is per request with a private generator, so a seeded request produces the same tokens
whatever shares its batch, and a preempted one continues without repeating or changing a token
(recomputing restores the KV; the sampled tokens and the generator's state were kept).

Models whose paged forward is not tested (``supports_paged`` false: ``hf-causal-lm``
architectures other than GPT-2 and Llama) run on the slot engine (``serve/slot_engine.py``):
``new_engine`` picks. ``EngineLoop`` runs either on its own thread.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from modelfleet.models.sampling import sample
from modelfleet.serve.blocks import BlockManager
from modelfleet.serve.engine_types import EngineConfig, EngineFull, StepOutput, record_output
from modelfleet.serve.generation import Job, Step, _Row
from modelfleet.serve.model_runner import ModelRunner
from modelfleet.serve.scheduler import Scheduler, SchedulerConfig
from modelfleet.serve.sequence import Sequence as _SchedSeq
from modelfleet.serve.sequence import SequenceStatus
from modelfleet.serve.slot_engine import SlotEngine

logger = logging.getLogger(__name__)

__all__ = ["Engine", "EngineConfig", "EngineFull", "EngineLoop", "Request", "SlotEngine", "StepOutput", "new_engine"]


@dataclass(eq=False)
class Request(_SchedSeq):
    """One request in the paged engine: the scheduler's sequence plus its sampling and stream state."""

    job: Job | None = None
    row: _Row | None = None
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    produced: int = 0
    """Tokens generated (EOS not counted)."""
    emitted: int = 0
    """Steps that produced output for this request."""
    next_token: int | None = None
    """The last sampled token (EOS included)."""
    error: str | None = None
    """Why it failed (``status`` FAILED; its last output has finish_reason ``"error"``)."""

    @property
    def finished(self) -> bool:
        return self.status.done or (self.row is not None and self.row.finish_reason is not None)


class Engine:
    """The paged continuous-batching decoder over one model (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        *,
        eos_id: int,
        decode: Callable[[list[int]], str],
        config: EngineConfig | None = None,
        adapters: Any = None,
        base_sha: str = "",
    ) -> None:
        self.model = model
        self.adapters = adapters
        """Pools: the ``AdapterPool`` whose adapters rows select (``Job.adapter``)."""
        self.eos_id, self.decode = eos_id, decode
        self.cfg = cfg = config or EngineConfig()
        limit = int(model.cfg.block_size)
        self.max_len = min(cfg.max_len or limit, limit)
        per_seq = -(-self.max_len // cfg.block_size)
        num_blocks = cfg.num_kv_blocks or cfg.max_num_seqs * per_seq
        self.blocks = BlockManager(
            num_blocks, cfg.block_size, base_sha=base_sha, enable_prefix_caching=cfg.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.blocks,
            SchedulerConfig(
                max_num_seqs=cfg.max_num_seqs,
                max_num_batched_tokens=cfg.max_num_batched_tokens or cfg.prefill_chunk + cfg.max_num_seqs,
                prefill_chunk=cfg.prefill_chunk,
                max_waiting=cfg.max_waiting,
            ),
        )
        self.runner = ModelRunner(model, num_blocks=num_blocks, block_size=cfg.block_size, pooled=adapters is not None)
        self.failed_steps_in_a_row = 0
        self.cache = self.runner.cache
        self.prefill_tokens_per_s = 0.0
        """Forward rate over steps that prefilled (an EMA): the router's saturation threshold."""

    # ------------------------------------------------------------------ requests
    def add(self, job: Job) -> Request:
        """Queue ``job``; thread-safe. Raises ``ValueError`` for a request the engine can never
        hold and ``EngineFull`` when ``max_waiting`` requests already wait."""
        if not job.prompt_ids:
            raise ValueError("a request needs at least one prompt token")
        if len(job.prompt_ids) + job.max_tokens > self.max_len:
            raise ValueError(
                f"prompt ({len(job.prompt_ids)} tokens) + max_tokens ({job.max_tokens}) exceeds "
                f"the engine's {self.max_len}-token context"
            )
        req = Request(
            list(job.prompt_ids),
            job.max_tokens,
            adapter_sha=job.adapter,
            cache_salt=job.cache_salt,
            job=job,
            row=_Row(job, self.eos_id, self.decode),
        )
        self.scheduler.add(req)
        return req

    def cancel(self, req: Request) -> None:
        """Stop ``req`` (its client went away); its blocks free on the next step. Thread-safe."""
        self.scheduler.cancel(req)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @property
    def cache_use(self) -> float:
        """KV blocks in use / blocks."""
        return self.blocks.usage

    def adapters_in_use(self) -> set[str]:
        """Adapters that a waiting or running request needs."""
        return {s.job.adapter for s in self.scheduler.sequences() if s.job.adapter}

    # ------------------------------------------------------------------ the loop body
    @torch.inference_mode()
    def step(self) -> StepOutput:
        """Schedule, run one forward over every scheduled token, sample and stream."""
        sched = self.scheduler.schedule()
        batch = sched.scheduled
        out: list[tuple[Request, Step]] = []
        if batch:
            t0 = time.perf_counter()
            try:
                logits = self.runner.run(batch, [s.seq.job.adapter for s in batch])
            except Exception as e:  # noqa: BLE001 - a fault of the whole step fails its sequences only
                self.failed_steps_in_a_row += 1
                logger.warning("engine step failed (%d in a row): %r", self.failed_steps_in_a_row, e)
                for req in self.scheduler.fail_step(sched):  # blocks back, nothing half-written published
                    self._fail(req, f"the decoding step failed: {e!r}", out)
                return self._output(out, sched)
            self.failed_steps_in_a_row = 0
            self._measure(batch, time.perf_counter() - t0)
            self.scheduler.commit(sched)  # before the sampled tokens are appended (their KV is next step's)
            finite = torch.isfinite(logits).all(dim=-1).tolist()  # one check per step, not per row
            for i, s in enumerate(batch):
                if s.samples:
                    self._emit(s.seq, logits[i], finite[i], out)
        if self.adapters is not None and self.adapters.evicted:  # evicted ones go once no sequence uses them
            self.adapters.collect(self.adapters_in_use())
        return self._output(out, sched)

    def _measure(self, batch: list[Any], seconds: float) -> None:
        tokens = sum(s.num_tokens for s in batch)
        if tokens <= len(batch) or seconds <= 0:
            return  # a pure decode step says little about the prefill rate
        rate = tokens / seconds
        self.prefill_tokens_per_s = (
            rate if not self.prefill_tokens_per_s else 0.8 * self.prefill_tokens_per_s + 0.2 * rate
        )

    def routing_view(self, key_bytes: int) -> tuple[list[bytes], int, int]:
        """Published block keys, queued prefill tokens and decode tokens left (on the step thread)."""
        queued = decode = 0
        for seq in self.scheduler.sequences():
            left = seq.num_prompt_tokens - seq.num_computed_tokens
            if left > 0:
                queued += left
            else:
                decode += max(0, seq.max_tokens - len(seq.output_ids))
        return self.blocks.published_keys(key_bytes), queued, decode

    @property
    def healthy(self) -> bool:
        """False after ``max_failed_steps`` failed steps in a row (the model or device is broken,
        not one request): the replica's health check fails and Serve replaces it."""
        return self.failed_steps_in_a_row < self.cfg.max_failed_steps

    def _output(self, out: list[tuple[Request, Step]], sched: Any) -> StepOutput:
        return StepOutput(
            out,
            len(self.scheduler.running),
            len(self.scheduler.waiting),
            len(sched.scheduled),
            len(sched.preempted),
        )

    def _fail(self, req: Request, why: str, out: list[tuple[Request, Step]]) -> None:
        if not req.status.done:
            self.scheduler.finish(req, SequenceStatus.FAILED)
        req.error = why
        out.append((req, Step("", 0, "error")))

    def _emit(self, req: Request, logits: torch.Tensor, finite: bool, out: list[tuple[Request, Step]]) -> None:
        job = req.job
        try:
            if not finite:
                raise FloatingPointError("non-finite logits in its row")
            tok = int(sample(logits, job.temperature, job.top_p, req.row.gen))
            step = req.row.push(tok)
        except Exception as e:  # noqa: BLE001 - a fault of one row fails that request alone
            logger.warning("request %d failed: %r", req.seq_id, e)
            self._fail(req, f"decoding this request failed: {e!r}", out)
            return
        record_output(req, tok, step)
        out.append((req, step))
        if step.finish_reason:
            self.scheduler.finish(req, SequenceStatus.FINISHED)
        else:
            req.append_token(tok)


def new_engine(model: Any, **kw: Any) -> Engine | SlotEngine:
    """The paged engine for models with a tested paged forward (``gpt``; ``hf-causal-lm`` for GPT-2
    and Llama architectures), else the slot engine."""
    if getattr(model, "supports_paged", False):
        return Engine(model, **kw)
    kw.pop("base_sha", None)
    return SlotEngine(model, **kw)


class EngineLoop:
    """Runs an ``Engine`` on one daemon thread while it has work, sleeping on a condition otherwise.

    ``deliver(step_output, loop)`` is called from that thread once per step: it is the only cross-thread
    wake-up per decode step. Requests enter with ``submit`` from any thread."""

    def __init__(
        self, engine: Engine | SlotEngine, deliver: Callable[[StepOutput, EngineLoop], None], *, name: str = "engine"
    ) -> None:
        self.engine = engine
        self.deliver = deliver
        self._wake = threading.Condition()
        self._stopped = False
        self._calls: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = collections.deque()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Request | Any:
        if self.error is not None or self._stopped:
            raise EngineFull(f"the decoding thread is {'down' if self.error else 'stopping'}; retry on another replica")
        seq = self.engine.add(job)
        with self._wake:
            self._wake.notify()
        return seq

    def cancel(self, seq: Request | Any) -> None:
        self.engine.cancel(seq)

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the decoding thread between two steps (changing the model's modules, as
        loading an adapter does, must not race a forward); the future holds its result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            if not self._thread.is_alive():
                fut.set_exception(RuntimeError("the decoding thread has ended"))
                return fut
            self._calls.append((fn, fut))
            self._wake.notify()
        return fut

    def _run_calls(self) -> None:
        while self._calls:
            fn, fut = self._calls.popleft()
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)

    def stop(self) -> None:
        """Finish the requests already submitted, then end the thread (does not wait for it)."""
        with self._wake:
            self._stopped = True
            self._wake.notify()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread to end (after ``stop``: once the submitted requests finished)."""
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self.engine.has_work and not self._calls:
                    self._wake.wait()
                if not self.engine.has_work and not self._calls:
                    return  # stopped and drained
            self._run_calls()
            if not self.engine.has_work:
                continue
            try:
                result = self.engine.step()
            except BaseException as e:  # noqa: BLE001 - reported to every waiting request, then the loop ends
                self.error = e
                self.deliver(StepOutput([], 0, 0, 0), self)
                return
            self.deliver(result, self)
