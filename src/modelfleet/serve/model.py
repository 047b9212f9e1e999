"""The language-model deployment: continuous batching (``serve.engine``) behind the
OpenAI-compatible ingress (``complete`` / ``stream``); loading, health and ``info`` come from
``ReplicaBase``.

Each loaded artifact gets one ``Engine`` on one decoding thread (``EngineLoop``): requests join the
running batch between decode steps and leave it when they finish. The thread hands every step's
tokens to the event loop with one ``call_soon_threadsafe``; each request reads its own queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray import serve

from modelfleet import registry
from modelfleet.errors import ArtifactError, ConfigError
from modelfleet.families import get_family
from modelfleet.families.lora import check_adapter, check_variant
from modelfleet.models import lora
from modelfleet.serve.engine import EngineConfig, EngineFull, EngineLoop, Request, StepOutput, new_engine
from modelfleet.serve.generation import Job
from modelfleet.serve.pool import AdapterPool, Variant, adapter_key, parse_variant_id
from modelfleet.serve.protocol import Chunk, Completion, ReplicaError, Sampling, StreamStart, VariantUse
from modelfleet.serve.replica import Loaded, ReplicaBase
from modelfleet.storage import read_json

# Serve's replica logger adds the request id to every record it formats.
logger = logging.getLogger("ray.serve")

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
GAUGE_PERIOD_S = 0.1
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class PromptError(ValueError):
    """A request that cannot run on this model; becomes an HTTP 400 naming ``param``."""

    def __init__(self, message: str, param: str, code: str = "context_length_exceeded") -> None:
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True)
class _LMLoaded(Loaded):
    loop: EngineLoop
    """The decoding thread of this artifact's engine (a reconfigure drains the old one)."""
    pool: AdapterPool | None = None
    """Pools: the adapters loaded into this base (changed only on the decoding thread)."""


TOKENIZE_INLINE_CHARS = 4096
"""Prompts at least this long are tokenized off the event loop."""


class LMReplica(ReplicaBase):
    """Serves one language-model artifact; the front calls ``complete``/``stream``/``info``."""

    def __init__(self, spec: dict[str, Any], storage_path: str) -> None:
        self._queues: dict[int, asyncio.Queue[Any]] = {}  # id(job) -> that request's steps
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._gauges_at = float("-inf")
        super().__init__(spec, storage_path)
        self.m_tokens = self.counter("modelfleet_tokens_generated", "Tokens generated.")
        self.m_prompt = self.counter("modelfleet_prompt_tokens", "Prompt tokens processed.")
        self.m_ttft = self.histogram(
            "modelfleet_time_to_first_token_seconds",
            "Arrival at the replica to the first generated token.",
            TTFT_BUCKETS,
        )
        self.m_tpot = self.histogram(
            "modelfleet_time_per_output_token_seconds",
            "Mean time between a request's tokens after the first.",
            TPOT_BUCKETS,
        )
        self.m_running = self.gauge("modelfleet_running_sequences", "Sequences holding a KV-cache slot.")
        self.m_waiting = self.gauge("modelfleet_waiting_sequences", "Requests waiting for a KV-cache slot.")
        self.m_cache = self.gauge("modelfleet_kv_cache_usage", "Fraction of KV-cache blocks (or slots) in use.")
        self.m_prefix_queried = self.counter(
            "modelfleet_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache."
        )
        self.m_prefix_hit = self.counter(
            "modelfleet_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache (prefill skipped)."
        )
        self.m_preemptions = self.counter(
            "modelfleet_preemptions", "Sequences that gave their KV blocks back and were recomputed later."
        )
        self.variants: dict[str, str] = {}
        self._variant_lru: Any = None
        if self.spec.variants is not None:
            # A pool: Serve's multiplexing keeps an LRU of variants per replica and routes a
            # request to a replica holding its variant; wired here because the size is per model.
            async def load_variant(model_id: str) -> Variant:
                return await self._load_variant(model_id)

            self._variant_lru = serve.multiplexed(max_num_models_per_replica=self.spec.max_models_per_replica)(
                load_variant
            )
            self.m_variant_loads = self.counter("modelfleet_variant_loads", "Adapters loaded into a pool replica.")
            lora.peft()  # imported now (seconds), not inside the first variant's cold load

    def _prepare(self, model: Any, preprocessor: Any, manifest: dict[str, Any], artifact: str) -> _LMLoaded:
        b = self.spec.batching
        # Serve (or a one-hop front's guard) bounds what reaches the replica; the engine's own
        # bound is the same number, a backstop.
        waiting = self.spec.max_ongoing_requests + (
            self.spec.max_queued_requests if self.spec.max_queued_requests >= 0 else 4096
        )
        pool = None
        if self.spec.variants is not None:
            pool = AdapterPool(model, get_family(manifest["family"]), next(model.parameters()).device)
        engine = new_engine(
            model,
            eos_id=preprocessor.eos_id,
            decode=preprocessor.decode,
            config=EngineConfig(
                max_num_seqs=b.max_batch_size,
                prefill_chunk=b.prefill_chunk_tokens,
                max_waiting=waiting,
                max_len=self._max_model_len(model),
                block_size=b.kv_block_size,
                num_kv_blocks=-(-b.kv_cache_tokens // b.kv_block_size),
                enable_prefix_caching=b.prefix_caching,
            ),
            adapters=pool,
            # In every prefix-cache key: KV computed with other weights is never matched.
            base_sha=str(manifest.get("weights_sha256", "")),
        )
        old = self.loaded
        if isinstance(old, _LMLoaded):
            old.loop.stop()  # finishes the requests it holds, then its thread ends
        logger.info(
            "engine: %s, %d sequences of up to %d tokens, KV cache %.1f MiB, prefill chunk %d",
            f"paged ({engine.blocks.num_blocks} blocks of {engine.blocks.block_size} tokens, prefix caching "
            f"{'on' if engine.blocks.enable_prefix_caching else 'off'})"
            if hasattr(engine, "blocks")
            else "slots (one forward per row: this model has no paged forward)",
            b.max_batch_size,
            engine.max_len,
            engine.cache.nbytes / 2**20,
            b.prefill_chunk_tokens,
        )
        return _LMLoaded(
            model, preprocessor, artifact, EngineLoop(engine, self._deliver, name=f"engine-{self.spec.name}"), pool
        )

    # ---------------------------------------------------------------- pools
    def _configure(self, user_config: dict[str, Any]) -> None:
        """A pool's variant list; adapters of removed (or re-pointed) variants leave once unused."""
        if self.spec.variants is None:
            return
        self.variants = dict(user_config.get("variants") or {})
        lo = self.loaded
        if isinstance(lo, _LMLoaded) and lo.pool is not None:
            keep = {adapter_key(f"{n}={a}") for n, a in self.variants.items()}
            for key in [k for k in lo.pool.loaded if k not in keep]:
                lo.loop.call(lambda key=key: lo.pool.evict(key))

    def _fetch_adapter(self, artifact: str) -> str:
        """A local copy of a variant's adapter artifact, checked: an adapter trained over exactly this
        pool's base weights, its file matching its sha256."""
        ref = registry.resolve(self.storage_path, artifact)
        local = registry.fetch(ref.uri)
        manifest = read_json(local, "manifest.json")
        check_variant(manifest, self.base_manifest, artifact)
        check_adapter(local, artifact, manifest)
        return local

    async def _load_variant(self, model_id: str) -> Variant:
        """Serve's multiplexed loader (called on an LRU miss): fetch, check, load into the pool."""
        t0 = time.perf_counter()
        name, artifact = parse_variant_id(model_id)
        local = await asyncio.to_thread(self._fetch_adapter, artifact)
        key, lo = adapter_key(model_id), self._require()
        await asyncio.wrap_future(lo.loop.call(lambda: lo.pool.load(key, local)))
        self.m_variant_loads.inc()
        now = time.perf_counter()
        logger.info("variant %s (%s) loaded in %.3f s", name, artifact, now - t0)
        return Variant(name, key, local, loaded_at=now, load_s=now - t0, release=self._release_variant)

    def _release_variant(self, key: str) -> None:
        lo = self.loaded
        if isinstance(lo, _LMLoaded) and lo.pool is not None:
            lo.loop.call(lambda: lo.pool.evict(key))

    async def _variant(self) -> Variant | ReplicaError | None:
        """The request's variant (``multiplexed_model_id``), None for the base, or the error."""
        model_id = serve.get_multiplexed_model_id()
        if not model_id:
            return None
        if self._variant_lru is None:
            return self._error(400, f"model {self.spec.name!r} is not a pool of variants", "model", "model_not_found")
        try:
            return await self._variant_lru(model_id)
        except (ArtifactError, ValueError, FileNotFoundError) as e:
            return self._error(
                404, f"variant of pool {self.spec.name!r} cannot be loaded: {e}", "model", "model_not_found"
            )

    def check_health(self) -> None:
        super().check_health()
        lo = self.loaded
        if isinstance(lo, _LMLoaded) and lo.loop.error is not None:
            # The decoding thread ended on an error: Serve replaces a replica whose check fails.
            raise RuntimeError(f"model {self.spec.name}: decoding thread failed: {lo.loop.error!r}")
        if isinstance(lo, _LMLoaded) and not getattr(lo.loop.engine, "healthy", True):
            raise RuntimeError(
                f"model {self.spec.name}: {lo.loop.engine.failed_steps_in_a_row} decoding steps failed in a row"
            )

    def _describe(self, lo: Loaded) -> dict[str, Any]:
        context = lo.loop.engine.max_len if isinstance(lo, _LMLoaded) else lo.model.cfg.block_size
        out: dict[str, Any] = {"context_length": context}
        if isinstance(lo, _LMLoaded) and lo.pool is not None:
            out.update(variants=tuple(sorted(self.variants)), **lo.pool.stats())
        return out

    def _max_model_len(self, model: Any) -> int:
        """``max_model_len``, checked against the model's context and the KV pool."""
        context, want = int(model.cfg.block_size), self.spec.max_model_len
        if want > context:
            raise ConfigError(
                f"serve model {self.spec.name!r}: max_model_len {want} exceeds the model's context of {context} tokens"
            )
        pool = self.spec.batching.kv_cache_tokens
        if pool and pool < (want or context):
            if want:
                raise ConfigError(
                    f"serve model {self.spec.name!r}: max_model_len {want} exceeds batching.kv_cache_tokens "
                    f"({pool}): one request could never fit the KV pool"
                )
            want = pool  # a pool smaller than the context caps what one request may use
        return want or context

    def _job(self, prompt: str, sampling: Sampling) -> Job:
        lo = self._require()
        tokenizer, limit = lo.preprocessor, lo.loop.engine.max_len
        special = getattr(tokenizer, "eos_token", None)
        if special and special in prompt:
            # Like tiktoken's default: special tokens sent as text are refused, not silently
            # encoded as plain bytes a caller may believe ended the document.
            raise PromptError(
                f"prompt contains the special token {special!r}; special tokens cannot be "
                "sent as text (remove it, or end the prompt where it stands)",
                "prompt",
                "invalid_value",
            )
        ids = tokenizer.encode(prompt) or [tokenizer.eos_id]  # empty prompt = start of a document
        n = len(ids)
        if n >= limit:
            raise PromptError(
                f"prompt is {n} tokens but model {self.spec.name!r} serves at most {limit} tokens per "
                f"request (max_model_len); send at most {limit - 1} prompt tokens",
                "prompt",
            )
        max_tokens = sampling.max_tokens
        if max_tokens is None:
            max_tokens = min(self.spec.default_max_tokens, limit - n)
        elif n + max_tokens > limit:
            raise PromptError(
                f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds model "
                f"{self.spec.name!r}'s max_model_len of {limit} tokens; ask for at most "
                f"{limit - n} tokens",
                "max_tokens",
            )
        return Job(
            prompt_ids=ids,
            max_tokens=max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            stop=list(sampling.stop),
        )

    async def _start(
        self, prompt: str, sampling: Sampling
    ) -> tuple[Job, _LMLoaded, Variant | None, VariantUse | None] | ReplicaError:
        """The request's job on the current engine (and its variant, in a pool, with how it was
        found: ``cold`` when this request waited for the adapter to load), or the error."""
        t0 = time.perf_counter()
        variant = await self._variant()
        if isinstance(variant, ReplicaError):
            return variant
        try:
            # A long prompt is tokenized on a worker thread: the event loop keeps streaming other
            # requests' tokens meanwhile (Hugging Face's Rust tokenizers release the GIL). Short
            # ones stay here, where a thread hop would cost more than the encode.
            job = (
                self._job(prompt, sampling)
                if len(prompt) < TOKENIZE_INLINE_CHARS
                else await asyncio.to_thread(self._job, prompt, sampling)
            )
        except PromptError as e:
            return self._error(400, str(e), e.param, e.code)
        use = None
        if variant is not None:
            job.adapter = variant.key
            cold = variant.loaded_at >= t0
            use = VariantUse(variant.name, cold, variant.load_s if cold else 0.0)
        return job, self._require(), variant, use

    async def complete(self, prompt: str, sampling: Sampling) -> Completion | ReplicaError:
        """The whole completion as one result (non-streaming requests)."""
        started = await self._start(prompt, sampling)
        if isinstance(started, ReplicaError):
            return started
        job, lo, variant, use = started
        parts: list[str] = []
        last: Chunk | None = None
        batch = 1
        async for step in self._generate(job, lo, variant):
            if isinstance(step, ReplicaError):
                return step
            parts.append(step.text)
            last, batch = step, max(batch, step.batch_size)
        assert last is not None  # _generate ends on a chunk with a finish_reason
        return Completion(
            text="".join(parts),
            finish_reason=last.finish_reason,
            prompt_tokens=len(job.prompt_ids),
            completion_tokens=last.completion_tokens,
            cached_tokens=last.cached_tokens,
            batch_size=batch,
            artifact=lo.artifact,
            pid=self.pid,
            variant=use,
            tensor_bytes=lo.pool.nbytes if lo.pool is not None else None,
        )

    async def stream(self, prompt: str, sampling: Sampling) -> AsyncIterator[StreamStart | Chunk | ReplicaError]:
        """A first ``StreamStart`` (or a ``ReplicaError``), then one ``Chunk`` per engine step."""
        started = await self._start(prompt, sampling)
        if isinstance(started, ReplicaError):
            yield started
            return
        job, lo, variant, use = started
        steps = self._generate(job, lo, variant)
        first = await anext(steps, None)
        if isinstance(first, ReplicaError):
            yield first  # overload: answered before any header is sent
            return
        yield StreamStart(self.pid, len(job.prompt_ids), use)
        if first is not None:
            yield first
        async for step in steps:
            yield step

    async def _generate(
        self, job: Job, lo: _LMLoaded, variant: Variant | None = None
    ) -> AsyncIterator[Chunk | ReplicaError]:
        """This request's steps as the engine thread produces them; leaving early cancels it."""
        self._aloop = asyncio.get_running_loop()
        queue: asyncio.Queue[Chunk | BaseException] = asyncio.Queue()
        self._queues[id(job)] = queue  # before submit: the engine thread may answer at once
        seq: Request | None = None
        try:
            try:
                if variant is None:
                    seq = lo.loop.submit(job)
                else:
                    # On the decoding thread: the adapter is (re)loaded if an eviction or a new base
                    # dropped it, and the job queued in the same call, so no eviction falls between.
                    def admit() -> Request:
                        lo.pool.load(variant.key, variant.local_dir)
                        return lo.loop.engine.add(job)

                    seq = await asyncio.wrap_future(lo.loop.call(admit))
            except EngineFull as e:
                yield self._error(
                    self.spec.overload_status,
                    f"server overloaded ({e}); retry later",
                    "model",
                    "overloaded",
                    retry_after_s=self.spec.retry_after_s,
                )
                return
            self.m_prompt.inc(len(job.prompt_ids))
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise RuntimeError(f"model {self.spec.name} decoding failed: {item!r}") from item
                yield dataclasses.replace(item, artifact=lo.artifact)
                if item.finish_reason:
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
        queried = hit = 0
        for seq, step in result.outputs:
            cached = max(getattr(seq, "num_cached_tokens", 0), 0)  # the slot engine caches nothing
            if seq.emitted == 1 and seq.first_token_at is not None:  # its first step (even a lone EOS)
                ttft.append(seq.first_token_at - seq.arrived)
                queried, hit = queried + len(seq.job.prompt_ids), hit + cached
            if step.finish_reason == "error":  # this request alone failed; the engine goes on
                items.append((id(seq.job), RuntimeError(seq.error)))
                continue
            if step.finish_reason and seq.produced > 1 and seq.first_token_at is not None:
                tpot.append((now - seq.first_token_at) / (seq.produced - 1))
            items.append(
                (
                    id(seq.job),
                    Chunk(step.text, step.tokens, step.finish_reason, seq.produced, cached, len(result.outputs)),
                )
            )
        # The loop that stepped, not self.loaded's: after a reconfigure the old one drains.
        error, use = loop.error, loop.engine.cache_use
        aloop.call_soon_threadsafe(self._dispatch, items, error, (result, ttft, tpot, use, queried, hit))

    def _dispatch(
        self,
        items: list[tuple[int, Chunk | BaseException]],
        error: BaseException | None,
        stats: tuple[StepOutput, list[float], list[float], float, int, int],
    ) -> None:
        """On the event loop: each request's step into its queue, then the step's metrics."""
        if error is not None:
            for q in self._queues.values():
                q.put_nowait(error)
            return
        for key, item in items:
            q = self._queues.get(key)
            if q is not None:
                q.put_nowait(item)
        result, ttft, tpot, use, queried, hit = stats
        if queried:
            self.m_prefix_queried.inc(queried)
            if hit:
                self.m_prefix_hit.inc(hit)
        if result.preempted:
            self.m_preemptions.inc(result.preempted)
        new_tokens = sum(item.tokens for _, item in items if isinstance(item, Chunk))
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
