"""The language-model deployment: continuous batching (``serve.engine``) behind the
OpenAI-compatible ingress (``complete`` / ``stream``); loading, health and ``info`` come from
``ReplicaBase``.

Each loaded artifact gets one ``Engine`` on one decoding thread (``EngineLoop``): requests join the
running batch between decode steps and leave it when they finish. The thread hands every step's
tokens to the event loop with one ``call_soon_threadsafe``; each request reads its own queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from ray import serve
from ray.util import metrics

from modelfleet.serve.engine import Engine, EngineConfig, EngineFull, EngineLoop, Sequence, StepOutput
from modelfleet.serve.generation import Job
from modelfleet.serve.replica import Loaded, ReplicaBase

# Serve's replica logger adds the request id to every record it formats.
logger = logging.getLogger("ray.serve")

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
GAUGE_PERIOD_S = 0.1
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class PromptError(ValueError):
    """A request that cannot run on this model; becomes an HTTP 400 naming ``param``."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class _LMLoaded(Loaded):
    loop: EngineLoop
    """The decoding thread of this artifact's engine (a reconfigure drains the old one)."""


class LMReplica(ReplicaBase):
    """Serves one language-model artifact; the front calls ``complete``/``stream``/``info``."""

    def __init__(self, spec: dict[str, Any], storage_path: str) -> None:
        self._queues: dict[int, asyncio.Queue[Any]] = {}  # id(job) -> that request's steps
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._gauges_at = float("-inf")
        super().__init__(spec, storage_path)
        self.m_tokens = self.counter("modelfleet_tokens_generated", "Tokens generated.")
        self.m_prompt = self.counter("modelfleet_prompt_tokens", "Prompt tokens processed.")
        self.m_ttft = self.histogram("modelfleet_time_to_first_token_seconds",
                                     "Arrival at the replica to the first generated token.", TTFT_BUCKETS)
        self.m_tpot = self.histogram("modelfleet_time_per_output_token_seconds",
                                     "Mean time between a request's tokens after the first.", TPOT_BUCKETS)
        self.m_running = self.gauge("modelfleet_running_sequences", "Sequences holding a KV-cache slot.")
        self.m_waiting = self.gauge("modelfleet_waiting_sequences", "Requests waiting for a KV-cache slot.")
        self.m_cache = self.gauge("modelfleet_kv_cache_usage", "Fraction of KV-cache slots in use.")

    def _prepare(self, model: Any, preprocessor: Any, manifest: dict[str, Any], artifact: str) -> _LMLoaded:
        b = self.spec.batching
        # Serve (or a one-hop front's guard) bounds what reaches the replica; the engine's own
        # bound is the same number, a backstop.
        waiting = self.spec.max_ongoing_requests + (self.spec.max_queued_requests
                                                    if self.spec.max_queued_requests >= 0 else 4096)
        engine = Engine(model, eos_id=preprocessor.eos_id, decode=preprocessor.decode,
                        config=EngineConfig(max_num_seqs=b.max_batch_size, prefill_chunk=b.prefill_chunk_tokens,
                                            max_waiting=waiting))
        old = self.loaded
        if isinstance(old, _LMLoaded):
            old.loop.stop()  # finishes the requests it holds, then its thread ends
        logger.info("engine: %d sequence slots x %d tokens, KV cache %.1f MiB, prefill chunk %d", b.max_batch_size,
                    engine.max_len, engine.cache.nbytes / 2**20, b.prefill_chunk_tokens)
        return _LMLoaded(model, preprocessor, artifact, EngineLoop(engine, self._deliver, name=f"engine-{self.spec.name}"))

    def check_health(self) -> None:
        super().check_health()
        lo = self.loaded
        if isinstance(lo, _LMLoaded) and lo.loop.error is not None:
            # The decoding thread ended on an error: Serve replaces a replica whose check fails.
            raise RuntimeError(f"model {self.spec.name}: decoding thread failed: {lo.loop.error!r}")

    def _describe(self, lo: Loaded) -> dict[str, Any]:
        return {"context_length": lo.model.cfg.block_size}

    def _job(self, prompt: str, sampling: dict[str, Any]) -> Job:
        lo = self._require()
        tokenizer, limit = lo.preprocessor, lo.model.cfg.block_size
        special = getattr(tokenizer, "eos_token", None)
        if special and special in prompt:
            # Like tiktoken's default: special tokens sent as text are refused, not silently
            # encoded as plain bytes a caller may believe ended the document.
            raise PromptError(f"prompt contains the special token {special!r}; special tokens cannot be "
                              "sent as text (remove it, or end the prompt where it stands)", "prompt")
        ids = tokenizer.encode(prompt) or [tokenizer.eos_id]  # empty prompt = start of a document
        n = len(ids)
        if n >= limit:
            raise PromptError(f"prompt is {n} tokens but model {self.spec.name!r} has a context of {limit} "
                              f"tokens; send at most {limit - 1} prompt tokens", "prompt")
        max_tokens = sampling.get("max_tokens")
        if max_tokens is None:
            max_tokens = min(self.spec.default_max_tokens, limit - n)
        elif n + max_tokens > limit:
            raise PromptError(f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds model "
                              f"{self.spec.name!r}'s context of {limit} tokens; ask for at most "
                              f"{limit - n} tokens", "max_tokens")
        return Job(prompt_ids=ids, max_tokens=max_tokens, temperature=sampling["temperature"],
                   top_p=sampling["top_p"], seed=sampling.get("seed"), stop=list(sampling.get("stop") or []))

    def _start(self, prompt: str, sampling: dict[str, Any]) -> tuple[Job, _LMLoaded] | dict[str, Any]:
        """The request's job on the current engine, or the error to answer instead."""
        try:
            job = self._job(prompt, sampling)
        except PromptError as e:
            return self._error(400, str(e), e.param)
        return job, self._require()

    async def complete(self, prompt: str, sampling: dict[str, Any]) -> dict[str, Any]:
        """The whole completion as one result (non-streaming requests)."""
        started = self._start(prompt, sampling)
        if isinstance(started, dict):
            return started
        job, lo = started
        parts: list[str] = []
        out: dict[str, Any] = {}
        async for step in self._generate(job, lo):
            if "error" in step:
                return step
            parts.append(step["text"])
            out = {**step, "batch_size": max(step["batch_size"], out.get("batch_size", 1))}
        return {**out, "text": "".join(parts), "prompt_tokens": len(job.prompt_ids), "pid": self.pid}

    async def stream(self, prompt: str, sampling: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """A first ``meta`` item (or an ``error``), then one item per generated token."""
        started = self._start(prompt, sampling)
        if isinstance(started, dict):
            yield started
            return
        job, lo = started
        steps = self._generate(job, lo)
        first = await anext(steps, None)
        if first is not None and "error" in first:
            yield first  # overload: answered before any header is sent
            return
        yield {"meta": {"pid": self.pid, "prompt_tokens": len(job.prompt_ids)}}
        if first is not None:
            yield first
        async for step in steps:
            yield step

    async def _generate(self, job: Job, lo: _LMLoaded) -> AsyncIterator[dict[str, Any]]:
        """This request's steps as the engine thread produces them; leaving early cancels it."""
        self._aloop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._queues[id(job)] = queue  # before submit: the engine thread may answer at once
        seq: Sequence | None = None
        try:
            try:
                seq = lo.loop.submit(job)
            except EngineFull as e:
                yield {**self._error(self.spec.overload_status, f"server overloaded ({e}); retry later", "model"),
                       "retry_after": self.spec.retry_after_s}
                return
            self.m_prompt.inc(len(job.prompt_ids))
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise RuntimeError(f"model {self.spec.name} decoding failed: {item!r}") from item
                item["artifact"] = lo.artifact
                yield item
                if item["finish_reason"]:
                    return
        finally:
            self._queues.pop(id(job), None)
            if seq is not None and not seq.finished:
                lo.loop.cancel(seq)  # the client went away: free the slot

    def _deliver(self, result: StepOutput, loop: EngineLoop) -> None:
        """Called on the engine thread once per step: reads the sequences there (the thread moves
        them on), then wakes the event loop once."""
        aloop = self._aloop
        if aloop is None or aloop.is_closed():
            return
        now, items, ttft, tpot = time.perf_counter(), [], [], []
        for seq, step in result.outputs:
            if seq.emitted == 1 and seq.first_token_at is not None:  # its first step (even a lone EOS)
                ttft.append(seq.first_token_at - seq.arrived)
            if step.finish_reason and seq.produced > 1 and seq.first_token_at is not None:
                tpot.append((now - seq.first_token_at) / (seq.produced - 1))
            items.append((id(seq.job), {"text": step.text, "tokens": step.tokens, "finish_reason": step.finish_reason,
                                        "completion_tokens": seq.produced, "batch_size": len(result.outputs)}))
        # The loop that stepped, not self.loaded's: after a reconfigure the old one drains.
        error, use = loop.error, loop.engine.cache_use
        aloop.call_soon_threadsafe(self._dispatch, items, error, (result, ttft, tpot, use))

    def _dispatch(self, items: list[tuple[int, dict[str, Any]]], error: BaseException | None,
                  stats: tuple[StepOutput, list[float], list[float], float]) -> None:
        """On the event loop: each request's step into its queue, then the step's metrics."""
        if error is not None:
            for q in self._queues.values():
                q.put_nowait(error)
            return
        for key, item in items:
            q = self._queues.get(key)
            if q is not None:
                q.put_nowait(item)
        result, ttft, tpot, use = stats
        new_tokens = sum(item["tokens"] for _, item in items)
        if new_tokens:
            self.m_tokens.inc(new_tokens)
        for v in ttft:
            self.m_ttft.observe(v)
        for v in tpot:
            self.m_tpot.observe(v)
        if result.decoded:
            self.m_batch.observe(result.decoded)
        now = time.monotonic()
        if now - self._gauges_at >= GAUGE_PERIOD_S or not result.running:
            # Gauges are scraped every few seconds: setting them every decode step only costs
            # (ray.util.metrics took 15% of the front's event-loop time in the c16 profile).
            self._gauges_at = now
            self.m_running.set(result.running)
            self.m_waiting.set(result.waiting)
            self.m_cache.set(use)


LMServer = serve.deployment(LMReplica)  # every option comes from the ModelSpec, in build_app
"""The model deployment behind the multi-model ``Ingress`` (single-model apps use ``LMIngress``)."""
