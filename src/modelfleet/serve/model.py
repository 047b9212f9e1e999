"""The language-model deployment: batched KV-cache generation behind the OpenAI-compatible
ingress (``complete`` / ``stream``); loading, health and ``info`` come from ``ReplicaBase``."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict
from typing import Any, AsyncIterator

from ray import serve

from modelfleet.serve.generation import Job, Step, generate_steps
from modelfleet.serve.replica import Loaded, ReplicaBase

# Serve's replica logger adds the request id to every record it formats.
logger = logging.getLogger("ray.serve")


class PromptError(ValueError):
    """A request that cannot run on this model; becomes an HTTP 400 naming ``param``."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@serve.deployment  # every option comes from the ModelSpec, in build_app
class LMServer(ReplicaBase):
    """Serves one language-model artifact; the ingress calls ``complete``/``stream``/``info``."""

    def __init__(self, spec: dict[str, Any], storage_path: str) -> None:
        super().__init__(spec, storage_path)
        self._active = 0  # requests decoding or waiting to decode on this replica
        self.m_tokens = self.counter("modelfleet_tokens_generated", "Tokens generated.")
        self.m_prompt = self.counter("modelfleet_prompt_tokens", "Prompt tokens processed.")
        self.m_gen = self.histogram("modelfleet_generation_seconds", "Wall time of one batch's generation.",
                                    [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30])

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

    async def complete(self, prompt: str, sampling: dict[str, Any]) -> dict[str, Any]:
        """The whole completion as one result (non-streaming requests)."""
        try:
            job = self._job(prompt, sampling)
        except PromptError as e:
            return self._error(400, str(e), e.param)
        parts: list[str] = []
        out: dict[str, Any] = {}
        async for step in self._generate(job):
            parts.append(step["text"])
            out = step
        return {**out, "text": "".join(parts), "prompt_tokens": len(job.prompt_ids), "pid": self.pid}

    async def stream(self, prompt: str, sampling: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """A first ``meta`` item (or an ``error``), then one item per generated token."""
        try:
            job = self._job(prompt, sampling)
        except PromptError as e:
            yield self._error(400, str(e), e.param)
            return
        yield {"meta": {"pid": self.pid, "prompt_tokens": len(job.prompt_ids)}}
        async for step in self._generate(job):
            yield step

    async def _generate(self, job: Job) -> AsyncIterator[dict[str, Any]]:
        """A request alone on the replica decodes at once; one with company joins a batch.

        ``@serve.batch`` holds the first request of a batch for ``batch_wait_timeout_s`` in case
        others come; at low load none do, and every request would pay that wait (5-10 ms at
        concurrency 1). Under load requests overlap, so they still batch."""
        self._active += 1
        try:
            if self._active == 1:
                async for out in self._decode([job]):
                    if out[0] is not StopIteration:
                        yield out[0]
            else:
                async for step in self._batched(job):
                    yield step
        finally:
            self._active -= 1

    # Sized from spec.batching in ReplicaBase.__init__. Called, not bare: bare @serve.batch
    # refuses an async generator.
    @serve.batch()
    async def _batched(self, jobs: list[Job]) -> AsyncIterator[list[Any]]:
        async for result in self._decode(jobs):
            yield result

    async def _decode(self, jobs: list[Job]) -> AsyncIterator[list[Any]]:
        lo = self._require()  # captured once: a reconfigure mid-batch does not mix weights
        t0, n = time.perf_counter(), len(jobs)
        self.m_batch.observe(n)
        self.m_prompt.inc(sum(len(j.prompt_ids) for j in jobs))
        steps = generate_steps(lo.model, jobs, eos_id=lo.preprocessor.eos_id, decode=lo.preprocessor.decode)
        produced = [0] * n
        while True:
            # Each step runs off the event loop so new requests can queue for the next batch
            # and health checks stay responsive while this batch decodes.
            out: list[Step | None] | None = await asyncio.to_thread(next, steps, None)
            if out is None:
                break
            result: list[Any] = []
            for i, s in enumerate(out):
                if s is None:
                    result.append(StopIteration)  # this request has finished (Serve's sentinel)
                    continue
                produced[i] += s.tokens
                result.append({**asdict(s), "completion_tokens": produced[i], "batch_size": n,
                               "artifact": lo.artifact})
            new_tokens = sum(s.tokens for s in out if s is not None)
            if new_tokens:
                self.m_tokens.inc(new_tokens)
            yield result
        self.m_gen.observe(time.perf_counter() - t0)
        logger.info("batch of %d finished: %d tokens in %.3fs", n, sum(produced), time.perf_counter() - t0)
