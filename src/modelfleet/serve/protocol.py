"""The typed contract between model replicas and the HTTP fronts that call them.

A front (the multi-model ``Ingress`` through a deployment handle, or a one-hop replica calling
itself) sends ``Sampling`` and gets back one of the result types below, or a ``ReplicaError``. They
are frozen dataclasses of plain data (numbers, strings, lists, nested dataclasses): Ray pickles
them between processes today, and the same shapes encode with msgpack when the engine core moves
to its own process. The front maps a ``ReplicaError`` to OpenAI's error envelope in one place
(``serve/http_errors.py``); nothing here knows HTTP.

This module imports nothing of the project's, so ``mypy --strict`` checks it alone (``make test``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Sampling:
    """How to sample one completion (validated by the OpenAI request schema before it gets here)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    """None: the model's ``default_max_tokens``, capped by its context."""
    seed: int | None = None
    stop: tuple[str, ...] = ()
    cache_salt: str | None = None
    """Only requests with the same salt share prefix-cache blocks (None: the unsalted space)."""


@dataclass(frozen=True, slots=True)
class ReplicaError:
    """A request the replica refused or could not finish, answered with ``status``."""

    status: int
    message: str
    param: str
    """The request field at fault (OpenAI's ``param``)."""
    code: str
    """OpenAI's ``code``: ``context_length_exceeded``, ``invalid_value``, ``model_not_found``, ``overloaded``."""
    pid: int
    retry_after_s: float | None = None
    """Set when the refusal is overload: retryable, answered with ``Retry-After``."""


@dataclass(frozen=True, slots=True)
class VariantUse:
    """Pools: which variant answered, and whether this request waited for its adapter to load."""

    name: str
    cold: bool
    load_s: float
    """Seconds this request waited for the load (0 when the replica already held it)."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """What one engine step produced for one request."""

    text: str
    tokens: int
    """Tokens this step added (0 for a step that only ended the request)."""
    finish_reason: str | None
    completion_tokens: int
    """Tokens generated so far."""
    cached_tokens: int
    """Prompt tokens served from the prefix cache."""
    batch_size: int
    """Sequences in the step that produced it."""
    artifact: str = ""


@dataclass(frozen=True, slots=True)
class StreamStart:
    """A stream's first item: who answers, before any token."""

    pid: int
    prompt_tokens: int
    variant: VariantUse | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole (non-streaming) completion."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    batch_size: int
    """The largest batch any of its steps ran in."""
    artifact: str
    pid: int
    variant: VariantUse | None = None
    tensor_bytes: int | None = None
    """Pools: bytes of the base plus its loaded adapters."""


@dataclass(frozen=True, slots=True)
class Prediction:
    """A non-LM model's predictions for one request's instances."""

    model: str
    artifact: str
    predictions: list[Any]
    batch_size: int
    pid: int


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    """What ``/v1/models`` and readiness read of one replica."""

    name: str
    artifact: str
    context_length: int
    """Language models: most tokens per request; 0 for the other families."""
    pid: int
    device: str
    dtype: str
    family: str = ""
    task: str = ""
    schema: dict[str, Any] = field(default_factory=dict)
    """Predict models: one instance's JSON schema."""
    variants: tuple[str, ...] = ()
    adapters_loaded: int = 0
    tensor_bytes: int = 0
    running_sequences: int = 0
    """LMs: sequences in the engine's batch as of its last step."""
    cancelled_requests: int = 0
    """LMs: requests whose client went away before the end, freed in the engine since start."""


@dataclass(frozen=True, slots=True)
class AuthState:
    """Whether an application's HTTP front holds an API key, and the key's fingerprint (never the key)."""

    auth: bool
    fingerprint: str | None
