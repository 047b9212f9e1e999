"""The model deployment: one artifact, batched KV-cache generation, metrics, health.

The artifact to load arrives as ``user_config`` (``{"artifact": "name@v2"}``), so that a
``serve deploy`` config or a RayService can move replicas to new weights in place through
``reconfigure``; ``modelfleet deploy`` instead does a surge rolling update (see ``app.py``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, AsyncIterator

from ray import serve
from ray.util import metrics

from modelfleet import registry
from modelfleet.config.serve import ModelSpec
from modelfleet.families.artifact import load_artifact
from modelfleet.serve.generation import Job, Step, generate_steps

# Serve's replica logger adds the request id to every record it formats.
logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class _Loaded:
    """Everything one set of weights needs; swapped as a whole so a batch never mixes versions."""

    model: Any
    tokenizer: Any
    artifact: str
    block_size: int


class PromptError(ValueError):
    """A request that cannot run on this model; becomes an HTTP 400 naming ``param``."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@serve.deployment(health_check_period_s=5, health_check_timeout_s=30, graceful_shutdown_timeout_s=60)
class LMServer:
    """Serves one language-model artifact; the ingress calls ``complete``/``stream``/``info``."""

    def __init__(self, spec: dict[str, Any], storage_path: str) -> None:
        self.spec = ModelSpec.model_validate(spec)
        self.storage_path = storage_path
        self.pid = os.getpid()
        self.loaded: _Loaded | None = None
        self._active = 0  # requests decoding or waiting to decode on this replica
        self._batched.set_max_batch_size(self.spec.batching.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.spec.batching.batch_wait_timeout_s)
        tags = {"model": self.spec.name}
        self.m_tokens = metrics.Counter("modelfleet_tokens_generated", "Tokens generated.", tag_keys=("model",))
        self.m_prompt = metrics.Counter("modelfleet_prompt_tokens", "Prompt tokens processed.", tag_keys=("model",))
        self.m_batch = metrics.Histogram("modelfleet_batch_size", "Requests decoded together per batch.",
                                         boundaries=[1, 2, 4, 8, 16, 32, 64, 128], tag_keys=("model",))
        self.m_gen = metrics.Histogram("modelfleet_generation_seconds", "Wall time of one batch's generation.",
                                       boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
                                       tag_keys=("model",))
        for m in (self.m_tokens, self.m_prompt, self.m_batch, self.m_gen):
            m.set_default_tags(tags)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        ref = registry.resolve(self.storage_path, str(user_config["artifact"]))
        model, tokenizer, manifest = load_artifact(ref.uri)
        label = f"{ref.name}@{ref.version}" if ref.name else ref.uri
        self.loaded = _Loaded(model, tokenizer, label, model.cfg.block_size)
        logger.info("model %s loaded artifact %s (sha256 %s)", self.spec.name, label,
                    str(manifest.get("weights_sha256", ""))[:12])

    def check_health(self) -> None:
        # Serve restarts a replica whose check fails; a replica without weights cannot answer.
        if self.loaded is None:
            raise RuntimeError(f"model {self.spec.name} has no weights loaded")

    def info(self) -> dict[str, Any]:
        lo = self._require()
        return {"name": self.spec.name, "artifact": lo.artifact, "context_length": lo.block_size,
                "pid": self.pid}

    def _require(self) -> _Loaded:
        if self.loaded is None:
            raise RuntimeError(f"model {self.spec.name} is still loading")
        return self.loaded

    def _job(self, prompt: str, sampling: dict[str, Any]) -> Job:
        lo = self._require()
        special = getattr(lo.tokenizer, "eos_token", None)
        if special and special in prompt:
            # Like tiktoken's default: special tokens sent as text are refused, not silently
            # encoded as plain bytes a caller may believe ended the document.
            raise PromptError(f"prompt contains the special token {special!r}; special tokens cannot be "
                              "sent as text (remove it, or end the prompt where it stands)", "prompt")
        ids = lo.tokenizer.encode(prompt) or [lo.tokenizer.eos_id]  # empty prompt = start of a document
        limit, n = lo.block_size, len(ids)
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

    def _error(self, e: PromptError) -> dict[str, Any]:
        logger.info("rejected request: %s", e)
        return {"error": {"status": 400, "message": str(e), "param": e.param}, "pid": self.pid}

    async def complete(self, prompt: str, sampling: dict[str, Any]) -> dict[str, Any]:
        """The whole completion as one result (non-streaming requests)."""
        try:
            job = self._job(prompt, sampling)
        except PromptError as e:
            return self._error(e)
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
            yield self._error(e)
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

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, jobs: list[Job]) -> AsyncIterator[list[Any]]:
        async for result in self._decode(jobs):
            yield result

    async def _decode(self, jobs: list[Job]) -> AsyncIterator[list[Any]]:
        lo = self._require()  # captured once: a reconfigure mid-batch does not mix weights
        t0, n = time.perf_counter(), len(jobs)
        self.m_batch.observe(n)
        self.m_prompt.inc(sum(len(j.prompt_ids) for j in jobs))
        steps = generate_steps(lo.model, jobs, eos_id=lo.tokenizer.eos_id, decode=lo.tokenizer.decode)
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
