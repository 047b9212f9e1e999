"""The language-model deployment: continuous batching (``serve.engine``) behind the
OpenAI-compatible ingress (``complete`` / ``stream``); loading, health and ``info`` come from
``ReplicaBase``.

Each loaded artifact gets one engine core process (``serve/engine_core.py``, driven through
``CoreClient``): the model, the KV pool, the scheduler and the step loop live there, out of this
process's GIL, and requests join its running batch between steps. This replica tokenizes and
validates prompts, keeps each request's asyncio queue, and exports the metrics the core's step
reports carry; the client's reader thread hands every step's report to the event loop with one
``call_soon_threadsafe``.

Over 400 lines: one class, the LM replica, holding request validation and tokenization, each
request's queue and stream, and the Prometheus metrics its engine core's step reports feed. The
metrics export would split off; it stays because every metric is set from the same report
callback that resolves the request queues, and a split would pass the replica's per-request state
across a module boundary.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray import serve

from modelfleet import registry
from modelfleet.config.serve import ModelSpec
from modelfleet.errors import ArtifactError
from modelfleet.families.artifact import load_preprocessor
from modelfleet.families.lora import check_adapter, check_variant
from modelfleet.serve import core_messages as cm
from modelfleet.serve.adapter_cache import AdapterCache
from modelfleet.serve.core_client import CoreClient
from modelfleet.serve.generation import Job
from modelfleet.serve.pool import Variant, adapter_key, parse_variant_id, variant_id
from modelfleet.serve.prefix_route import VIEW_KEY, ReplicaView
from modelfleet.serve.protocol import Chunk, Completion, ReplicaError, Sampling, StreamStart, VariantUse
from modelfleet.serve.replica import Loaded, ReplicaBase
from modelfleet.storage import read_json

# Serve's replica logger adds the request id to every record it formats.
logger = logging.getLogger("ray.serve")

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
GAUGE_PERIOD_S = 0.1
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
SPLIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class PromptError(ValueError):
    """A request that cannot run on this model; becomes an HTTP 400 naming ``param``."""

    def __init__(self, message: str, param: str, code: str = "context_length_exceeded") -> None:
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True)
class _LMLoaded(Loaded):
    core: CoreClient
    """This artifact's engine core process (a reconfigure drains the old one)."""
    max_len: int
    """Most tokens per request (prompt + generated)."""
    pool: bool = False
    """Pools: the core holds an ``AdapterPool`` over the base."""


ROUTING_STATS_TIMEOUT_S = 5.0
"""A core busy past this on one step publishes nothing this period (the router keeps the last)."""
TOKENIZE_INLINE_CHARS = 4096
"""Prompts at least this long are tokenized off the event loop."""


class LMReplica(ReplicaBase):
    """Serves one language-model artifact; the front calls ``complete``/``stream``/``info``."""

    def __init__(self, spec: dict[str, Any] | ModelSpec, storage_path: str) -> None:
        self._queues: dict[int, asyncio.Queue[Any]] = {}  # request id -> that request's steps
        self._rids = itertools.count(1)  # request ids, unique across this replica's cores
        self._pool_stats = (0, 0)  # pools: adapters loaded, tensor bytes (as the core last said)
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
        # Framework time apart from engine time (what ray-project/ray#63585 asks of Ray Serve LLM).
        self.m_front = self.histogram(
            "modelfleet_front_seconds",
            "Per request, time in the replica's front: arrival to submission to the engine core, and "
            "the last token's arrival from the core to the response done.",
            SPLIT_BUCKETS,
        )
        self.m_engine = self.histogram(
            "modelfleet_engine_seconds",
            "Per request, submission to the engine core to its last token back in the replica.",
            SPLIT_BUCKETS,
        )
        self.cancelled = 0
        self.m_cancelled = self.counter(
            "modelfleet_cancelled_requests", "Requests whose client went away before the end (freed in the engine)."
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
        # Local copies of remote adapters: one per variant in Serve's LRU, plus one loading.
        self.adapters = AdapterCache(self.spec.max_models_per_replica + 1)
        if self.spec.variants is not None:
            # A pool: Serve's multiplexing keeps an LRU of variants per replica and routes a
            # request to a replica holding its variant; wired here because the size is per model.
            async def load_variant(model_id: str) -> Variant:
                return await self._load_variant(model_id)

            self._variant_lru = serve.multiplexed(max_num_models_per_replica=self.spec.max_models_per_replica)(
                load_variant
            )
            self.m_variant_loads = self.counter("modelfleet_variant_loads", "Adapters loaded into a pool replica.")

    def _load(self, artifact: str) -> None:
        """The tokenizer here; the weights in a new engine core process (see the module docstring)."""
        ref = registry.resolve(self.storage_path, artifact)
        tokenizer, manifest = load_preprocessor(ref.uri)
        label = f"{ref.name}@{ref.version}" if ref.name else ref.uri
        b = self.spec.batching
        # Serve (or a one-hop front's guard) bounds what reaches the replica; the engine's own
        # bound is the same number, a backstop.
        waiting = self.spec.max_ongoing_requests + (
            self.spec.max_queued_requests if self.spec.max_queued_requests >= 0 else 4096
        )
        start = cm.Start(
            artifact_uri=ref.uri,
            device=str(self.placement.device),
            dtype=str(self.placement.dtype).removeprefix("torch."),
            num_threads=max(1, int(self.spec.ray_actor_options.num_cpus or 1)),
            max_num_seqs=b.max_batch_size,
            prefill_chunk=b.prefill_chunk_tokens,
            max_waiting=waiting,
            max_model_len=self.spec.max_model_len,
            kv_cache_tokens=b.kv_cache_tokens,
            block_size=b.kv_block_size,
            num_kv_blocks=-(-b.kv_cache_tokens // b.kv_block_size),
            prefix_caching=b.prefix_caching,
            pool=self.spec.variants is not None,
            name=self.spec.name,
        )
        core = CoreClient(start, self._deliver, self._refused)
        self.base_manifest = manifest
        old, self.loaded = (
            self.loaded,
            _LMLoaded(None, tokenizer, label, core, core.started.max_len, self.spec.variants is not None),
        )
        if isinstance(old, _LMLoaded):
            old.core.stop()  # finishes the requests it holds, then the process ends
        self._log_loaded(manifest, label, f"; engine core pid {core.pid}: {core.started.summary}")

    # ---------------------------------------------------------------- pools
    def _configure(self, user_config: dict[str, Any]) -> None:
        """A pool's variant list; adapters of removed (or re-pointed) variants leave once unused."""
        if self.spec.variants is None:
            return
        self.variants = dict(user_config.get("variants") or {})
        lo = self.loaded
        if isinstance(lo, _LMLoaded) and lo.pool:
            lo.core.retain(sorted(adapter_key(f"{n}={a}") for n, a in self.variants.items()))

    def _fetch_adapter(self, artifact: str) -> str:
        """A local copy of a variant's adapter artifact (``AdapterCache``: kept while the variant
        is loaded, a failure remembered for a while), checked: an adapter trained over exactly
        this pool's base weights, its file matching its sha256."""

        def check(local: str) -> None:
            manifest = read_json(local, "manifest.json")
            check_variant(manifest, self.base_manifest, artifact)
            check_adapter(local, artifact, manifest)

        return self.adapters.acquire(artifact, lambda: registry.resolve(self.storage_path, artifact).uri, check)

    async def _load_variant(self, model_id: str) -> Variant:
        """Serve's multiplexed loader (called on an LRU miss): fetch, check, load into the pool."""
        t0 = time.perf_counter()
        name, artifact = parse_variant_id(model_id)
        local = await asyncio.to_thread(self._fetch_adapter, artifact)
        key, lo = adapter_key(model_id), self._require()
        done = await asyncio.wrap_future(lo.core.load_adapter(key, local))
        if done.error is not None:
            self.adapters.release(local)
            raise RuntimeError(f"variant {name}: the engine core could not load its adapter: {done.error}")
        self._pool_stats = (done.adapters_loaded, done.tensor_bytes)
        self.m_variant_loads.inc()
        now = time.perf_counter()
        logger.info("variant %s (%s) loaded in %.3f s", name, artifact, now - t0)
        return Variant(name, key, local, loaded_at=now, load_s=now - t0, release=self._release_variant)

    def _release_variant(self, variant: Variant) -> None:
        lo = self.loaded
        if isinstance(lo, _LMLoaded) and lo.pool:
            lo.core.evict(variant.key)
        self.adapters.release(variant.local_dir)

    async def _variant(self) -> Variant | ReplicaError | None:
        """The request's variant (``multiplexed_model_id``), None for the base, or the error."""
        model_id = serve.get_multiplexed_model_id()
        if not model_id:
            return None
        if self._variant_lru is None:
            return self._error(400, f"model {self.spec.name!r} is not a pool of variants", "model", "model_not_found")
        if model_id not in {variant_id(n, a) for n, a in self.variants.items()}:
            # Only a configured variant is ever fetched: not an id from a client header, nor one
            # removed since (Serve's LRU may still name it).
            return self._error(
                404,
                f"{model_id[:80]!r} is not a configured variant of pool {self.spec.name!r}; its variants: "
                f"{', '.join(sorted(self.variants)) or 'none'}",
                "model",
                "model_not_found",
            )
        try:
            return await self._variant_lru(model_id)
        except (ArtifactError, ValueError, FileNotFoundError) as e:
            return self._error(
                404, f"variant of pool {self.spec.name!r} cannot be loaded: {e}", "model", "model_not_found"
            )

    def __del__(self) -> None:
        # Serve calls this on a graceful shutdown: the replica's adapter copies go with it.
        adapters = getattr(self, "adapters", None)
        if adapters is not None:
            adapters.close()

    def check_health(self) -> None:
        super().check_health()
        lo = self.loaded
        problem = lo.core.problem if isinstance(lo, _LMLoaded) else None
        if problem is not None:
            # The core died, hangs or fails every step: Serve replaces a replica whose check fails.
            raise RuntimeError(f"model {self.spec.name}: {problem}")

    async def record_routing_stats(self) -> dict[str, Any]:
        """Serve's routing-stats hook (every ``stats_period_s``): the core's prefix-cache keys and
        queued work, for the app's cache-aware router (``serve/prefix_route.py``)."""
        lo = self.loaded
        if not isinstance(lo, _LMLoaded) or lo.core.error is not None:
            return {}
        d = await asyncio.wait_for(asyncio.wrap_future(lo.core.digest()), ROUTING_STATS_TIMEOUT_S)
        view = ReplicaView(
            frozenset(d.keys),
            d.base_sha,
            d.block_size,
            d.queued_prefill_tokens,
            d.decode_tokens,
            d.prefill_tokens_per_s,
            time.time(),
        )
        return {VIEW_KEY: view}

    def _describe(self, lo: Loaded) -> dict[str, Any]:
        last = lo.core.last
        out: dict[str, Any] = {
            "context_length": lo.max_len,
            "running_sequences": last.running if last is not None else 0,
            "cancelled_requests": self.cancelled,
        }
        if lo.pool:
            loaded, nbytes = self._pool_stats
            out.update(variants=tuple(sorted(self.variants)), adapters_loaded=loaded, tensor_bytes=nbytes)
        return out

    def _job(self, prompt: str, sampling: Sampling) -> Job:
        lo = self._require()
        tokenizer, limit = lo.preprocessor, lo.max_len
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
            cache_salt=sampling.cache_salt,
        )

    async def _start(
        self, prompt: str, sampling: Sampling
    ) -> tuple[Job, _LMLoaded, Variant | None, VariantUse | None, float] | ReplicaError:
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
        return job, self._require(), variant, use, t0

    async def complete(self, prompt: str, sampling: Sampling) -> Completion | ReplicaError:
        """The whole completion as one result (non-streaming requests)."""
        started = await self._start(prompt, sampling)
        if isinstance(started, ReplicaError):
            return started
        job, lo, variant, use, t0 = started
        parts: list[str] = []
        last: Chunk | None = None
        batch = 1
        async for step in self._generate(job, lo, variant, t0):
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
            tensor_bytes=self._pool_stats[1] if lo.pool else None,
        )

    async def stream(self, prompt: str, sampling: Sampling) -> AsyncIterator[StreamStart | Chunk | ReplicaError]:
        """A first ``StreamStart`` (or a ``ReplicaError``), then one ``Chunk`` per engine step."""
        started = await self._start(prompt, sampling)
        if isinstance(started, ReplicaError):
            yield started
            return
        job, lo, variant, use, t0 = started
        steps = self._generate(job, lo, variant, t0)
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
        self, job: Job, lo: _LMLoaded, variant: Variant | None, arrived: float
    ) -> AsyncIterator[Chunk | ReplicaError]:
        """This request's steps as the core produces them; leaving early cancels it there. A
        request that ends normally records its front and engine time (``arrived``: it reached
        this replica)."""
        self._aloop = asyncio.get_running_loop()
        queue: asyncio.Queue[Chunk | ReplicaError | BaseException] = asyncio.Queue()
        rid = next(self._rids)
        self._queues[rid] = queue  # before submit: the reader thread may answer at once
        finished = False
        try:
            # Pools: the core (re)loads the adapter first if an eviction dropped it, in the same
            # call that queues the job, so no eviction falls between.
            lo.core.submit(rid, job, adapter_dir=variant.local_dir if variant is not None else None)
            submitted = time.perf_counter()
            while True:
                item = await queue.get()
                if isinstance(item, ReplicaError):  # refused: the engine's queue is full
                    finished = True
                    yield item
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise RuntimeError(f"model {self.spec.name} decoding failed: {item!r}") from item
                if item.finish_reason:
                    finished, last = True, time.perf_counter()
                    yield dataclasses.replace(item, artifact=lo.artifact)
                    self.m_engine.observe(last - submitted)
                    self.m_front.observe(submitted - arrived + time.perf_counter() - last)
                    return
                yield dataclasses.replace(item, artifact=lo.artifact)
        finally:
            self._queues.pop(rid, None)
            if not finished:
                lo.core.cancel(rid)  # the client went away: free its sequence and KV blocks
                self.cancelled += 1
                self.m_cancelled.inc()

    def _refused(self, r: cm.Refused) -> None:
        """The core's reader thread: a request the engine did not queue."""
        aloop = self._aloop
        if aloop is None or aloop.is_closed():
            return
        if r.overloaded:
            err: ReplicaError | BaseException = self._error(
                self.spec.overload_status,
                f"server overloaded ({r.error}); retry later",
                "model",
                "overloaded",
                retry_after_s=self.spec.retry_after_s,
            )
        else:
            err = RuntimeError(r.error)
        aloop.call_soon_threadsafe(self._put, r.rid, err)

    def _put(self, rid: int, item: Any) -> None:
        q = self._queues.get(rid)
        if q is not None:
            q.put_nowait(item)

    def _deliver(self, report: cm.StepReport) -> None:
        """The core's reader thread, once per engine step: wakes the event loop once."""
        aloop = self._aloop
        if aloop is not None and not aloop.is_closed():
            aloop.call_soon_threadsafe(self._dispatch, report)

    def _dispatch(self, report: cm.StepReport) -> None:
        """On the event loop: each request's step into its queue, then the step's metrics."""
        queried = hit = new_tokens = 0
        for s in report.seqs:
            if s.ttft is not None:  # its first step (even a lone EOS)
                self.m_ttft.observe(s.ttft)
                queried, hit = queried + s.prompt_tokens, hit + s.cached
                self.m_prompt.inc(s.prompt_tokens)
            if s.tpot is not None:
                self.m_tpot.observe(s.tpot)
            if s.finish_reason == "error":  # this request alone failed; the engine goes on
                self._put(s.rid, RuntimeError(s.error))
                continue
            new_tokens += s.tokens
            self._put(s.rid, Chunk(s.text, s.tokens, s.finish_reason, s.produced, s.cached, len(report.seqs)))
        if report.fatal is not None:
            return
        if report.tensor_bytes:
            self._pool_stats = (report.adapters_loaded, report.tensor_bytes)
        if queried:
            self.m_prefix_queried.inc(queried)
            if hit:
                self.m_prefix_hit.inc(hit)
        if report.preempted:
            self.m_preemptions.inc(report.preempted)
        if new_tokens:
            self.m_tokens.inc(new_tokens)
        if report.decoded:
            self.m_batch.observe(report.decoded)
        now = time.monotonic()
        if now - self._gauges_at >= GAUGE_PERIOD_S or not report.running:
            # Gauges are scraped every few seconds: setting them every decode step only costs
            # (ray.util.metrics took 15% of the front's event-loop time in the c16 profile).
            self._gauges_at = now
            self.m_running.set(report.running)
            self.m_waiting.set(report.waiting)
            self.m_cache.set(report.cache_use)


LMServer = serve.deployment(LMReplica)  # every option comes from the ModelSpec, in build_app
"""The model deployment behind the multi-model ``Ingress`` (single-model apps use ``LMIngress``)."""
