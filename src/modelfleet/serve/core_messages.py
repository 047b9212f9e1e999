"""The messages between an LM replica and its engine core process (``serve/engine_core.py``).

msgpack through msgspec: typed on both ends, decoded without running code (unlike pickle, a
message cannot name a class to construct), and ~4x cheaper than pickle for a step's output (7 µs
against 28 µs for one message with 16 sequences, send + receive on a pipe, measured on 2 cores
under load). The replica sends ``Start`` once, then ``Submit``, ``Cancel``, ``LoadAdapter``,
``Retain``, ``Evict``, ``Digest`` and ``Shutdown``; the core answers ``Started`` once, then **one ``StepReport``
per engine step** carrying every sequence's new tokens, ``Done`` or ``CacheDigest`` for each numbered call and
``Refused`` for a request the engine did not queue.

Imports nothing of the project's (``mypy --strict`` checks it with ``serve/protocol.py``).
"""

from __future__ import annotations

import msgspec

KEY_BYTES = 8
"""Bytes of each block key a ``CacheDigest`` carries (``BlockManager.published_keys``)."""


class Start(msgspec.Struct, tag=True):
    """The first message: what to load and how to run it."""

    artifact_uri: str
    device: str
    dtype: str
    num_threads: int
    max_num_seqs: int
    prefill_chunk: int
    max_waiting: int
    max_model_len: int
    """0: the model's context (capped by ``kv_cache_tokens``); checked against both in the core."""
    kv_cache_tokens: int
    block_size: int
    num_kv_blocks: int
    prefix_caching: bool
    pool: bool
    """Pools: the base gets an ``AdapterPool``; requests name an adapter."""
    name: str = ""
    """The model's name, in the core's log lines."""


class Started(msgspec.Struct, tag=True):
    pid: int
    max_len: int
    """Most tokens per sequence the engine holds (the replica validates prompts against it)."""
    summary: str
    """The engine's one-line description for the replica's log."""


class Submit(msgspec.Struct, tag=True):
    rid: int
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    adapter: str | None = None
    """Pools: the adapter key; loaded (again) from ``adapter_dir`` first when the pool lacks it."""
    adapter_dir: str | None = None
    cache_salt: str | None = None


class Cancel(msgspec.Struct, tag=True):
    rid: int


class LoadAdapter(msgspec.Struct, tag=True):
    cid: int
    key: str
    local_dir: str


class Retain(msgspec.Struct, tag=True):
    """Pools: evict every adapter whose key is not listed (once no sequence uses it)."""

    keys: list[str]


class Evict(msgspec.Struct, tag=True):
    """Pools: evict these adapters (once no sequence uses them)."""

    keys: list[str]


class Digest(msgspec.Struct, tag=True):
    """Ask for the core's ``CacheDigest`` (the replica's routing stats, every stats period)."""

    cid: int


class Shutdown(msgspec.Struct, tag=True):
    """Finish the requests already submitted, then exit."""


class SeqStep(msgspec.Struct, array_like=True):
    """One sequence's output in one step."""

    rid: int
    text: str
    tokens: int
    finish_reason: str | None
    produced: int
    cached: int
    prompt_tokens: int
    ttft: float | None = None
    """Seconds from arrival in the core to the first token (its first step only)."""
    tpot: float | None = None
    """Mean seconds per token after the first (its last step only)."""
    error: str | None = None


class StepReport(msgspec.Struct, tag=True):
    """Everything one engine step produced, and the engine's state after it."""

    seqs: list[SeqStep]
    running: int
    waiting: int
    decoded: int
    preempted: int
    cache_use: float
    healthy: bool
    failed_steps_in_a_row: int
    adapters_loaded: int = 0
    tensor_bytes: int = 0
    fatal: str | None = None
    """The step loop ended on this error: every request fails, the replica's health check too."""


class Done(msgspec.Struct, tag=True):
    """The answer to a numbered call (``LoadAdapter``); ``cid`` -1: the core could not start."""

    cid: int
    error: str | None = None
    error_type: str = ""
    """The exception's class name (``ConfigError``, ``ArtifactError``: raised again as that type)."""
    adapters_loaded: int = 0
    tensor_bytes: int = 0


class CacheDigest(msgspec.Struct, tag=True):
    """What the cache-aware router needs of this engine (``serve/prefix_route.py``): the prefix
    cache's published block keys and the work the engine has queued, in tokens."""

    cid: int
    keys: list[bytes]
    """The leading ``KEY_BYTES`` of every published block key (empty: no paged prefix cache)."""
    base_sha: str
    block_size: int
    queued_prefill_tokens: int
    """Prompt tokens waiting or mid-prefill whose KV is not computed yet."""
    decode_tokens: int
    """Tokens the decoding sequences may still produce (their max_tokens left)."""
    prefill_tokens_per_s: float
    """Measured forward rate over prefill steps (0: nothing measured yet)."""


class Refused(msgspec.Struct, tag=True):
    """A ``Submit`` the engine did not queue."""

    rid: int
    error: str
    overloaded: bool
    """The engine's waiting queue is full: retryable (429/503 with Retry-After)."""


ToCore = Start | Submit | Cancel | LoadAdapter | Retain | Evict | Digest | Shutdown
FromCore = Started | StepReport | Done | Refused | CacheDigest
