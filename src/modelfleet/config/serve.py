"""The Serve config: pydantic models validated at the trust boundary (YAML, CLI, Serve args).

One ``ServeConfig`` describes a whole Serve application: the HTTP side (bind address, API key,
body limit) and one ``ModelSpec`` per served artifact (autoscaling, queue limits, actor
resources, batching). It is the ``serve:`` section of the root config and also the ``args`` of
``modelfleet.serve.app:build_app``, so ``serve run``, ``serve deploy`` and a KubeRay RayService
read the same schema. Errors name the key path, e.g. ``serve.models[0].autoscaling.min_replicas``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from modelfleet.errors import ConfigError


class _FieldError(ValueError):
    """A cross-field check that knows which field to blame, so the error's key path ends there."""

    def __init__(self, field: str, msg: str) -> None:
        super().__init__(msg)
        self.field = field


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class _Strict(BaseModel):
    # Unknown keys are errors everywhere in modelfleet configs (a typo must not be ignored).
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AutoscalingSpec(_Strict):
    """Ray Serve autoscaling for one model deployment (request-based policy)."""

    min_replicas: int = Field(
        1, ge=0, description="Fewest replicas; 0 scales to zero (requests wait for a cold start)."
    )
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at deploy time; defaults to min_replicas.")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="Ongoing requests per replica the autoscaler aims for."
    )
    upscale_delay_s: float = Field(30.0, ge=0, description="Load must stay high this long before scaling up.")
    downscale_delay_s: float = Field(600.0, ge=0, description="Load must stay low this long before scaling down.")
    downscale_to_zero_delay_s: float | None = Field(
        None, ge=0, description="Delay for the 1 -> 0 step; defaults to downscale_delay_s."
    )
    metrics_interval_s: float = Field(10.0, gt=0, description="How often replicas and handles report load.")
    look_back_period_s: float = Field(30.0, gt=0, description="Window the load is averaged over; > metrics_interval_s.")

    @model_validator(mode="after")
    def _replica_bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise _FieldError("min_replicas", f"must be <= max_replicas ({self.max_replicas}), got {self.min_replicas}")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise _FieldError(
                "initial_replicas",
                f"must be in [min_replicas={self.min_replicas}, "
                f"max_replicas={self.max_replicas}], got {self.initial_replicas}",
            )
        if self.look_back_period_s <= self.metrics_interval_s:
            raise _FieldError(
                "look_back_period_s",
                f"must be > metrics_interval_s ({self.metrics_interval_s}), got {self.look_back_period_s}",
            )
        return self

    def to_serve(self) -> dict[str, Any]:
        """Ray Serve's ``autoscaling_config`` dict (unset optionals left to Serve's defaults)."""
        return self.model_dump(exclude_none=True)


class ActorResources(_Strict):
    """Resources each replica reserves (Ray ``ray_actor_options``)."""

    num_cpus: float = Field(1.0, ge=0, description="Logical CPUs per replica; also caps torch's thread count.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica; fractions (0.25) pack replicas onto one GPU.")
    memory: int | None = Field(None, gt=0, description="Bytes of memory to reserve per replica.")

    @model_validator(mode="after")
    def _whole_or_fraction(self) -> ActorResources:
        if self.num_gpus > 1 and self.num_gpus != int(self.num_gpus):
            raise _FieldError("num_gpus", f"must be a fraction <= 1 or a whole number, got {self.num_gpus}")
        return self

    def to_serve(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class BatchingSpec(_Strict):
    """How concurrent requests share forward passes. Language models: continuous batching (requests
    join and leave the running batch between decode steps). Other families: ``@serve.batch``."""

    max_batch_size: int = Field(
        8,
        ge=1,
        le=256,
        description="Most requests decoded together; for language models the KV-cache slots (sequences) per replica.",
    )
    batch_wait_timeout_s: float = Field(
        0.01,
        ge=0,
        le=10,
        description="Predict families (@serve.batch): how long the first request waits for others; "
        "language models ignore it (continuous batching never waits: a request joins the next decode step).",
    )
    prefill_chunk_tokens: int = Field(
        64,
        ge=1,
        le=8192,
        description="Language models: most prompt tokens prefilled "
        "per decode step (long prompts take several "
        "steps, so running streams keep flowing).",
    )
    kv_block_size: int = Field(
        16, ge=1, le=256, description="Language models (paged engine): tokens per KV-cache block."
    )
    kv_cache_tokens: int = Field(
        0,
        ge=0,
        le=16_777_216,
        description="Language models (paged engine): tokens the KV-cache pool holds, shared by all running "
        "sequences; 0 = max_batch_size full-length sequences. When it runs out the newest sequence is "
        "preempted and recomputed later.",
    )
    prefix_caching: bool = Field(
        True,
        description="Language models (paged engine): reuse the KV of a prompt prefix an earlier request computed "
        "(cached tokens are reported in usage.prompt_tokens_details.cached_tokens).",
    )


class ModelSpec(_Strict):
    """One served artifact = one Serve deployment."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
        description="Model id clients send as `model` (also names the deployment).",
    )
    artifact: str = Field(
        min_length=1, description="Registry `name`, `name@vN`, a local artifact dir or a pyarrow URI."
    )
    num_replicas: int = Field(1, ge=1, description="Fixed replica count when `autoscaling` is not set.")
    max_model_len: int = Field(
        0,
        ge=0,
        description="Language models: most tokens of one request (prompt + max_tokens); 0 = the model's "
        "context. Reported as context_length in /v1/models; more than the model's context or the KV pool is refused.",
    )
    autoscaling: AutoscalingSpec | None = Field(None, description="Autoscaling; replaces num_replicas.")
    max_ongoing_requests: int = Field(
        16, ge=1, description="Requests one replica works on at once (>= max_batch_size)."
    )
    max_queued_requests: int = Field(
        64, ge=-1, description="Requests waiting per caller before overload errors; -1 = no limit."
    )
    overload_status: Literal[503, 429] = Field(503, description="HTTP status for requests rejected by the queue limit.")
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After seconds sent with overload errors.")
    ray_actor_options: ActorResources = Field(default_factory=ActorResources, description="Per-replica resources.")
    batching: BatchingSpec = Field(default_factory=BatchingSpec, description="Request batching.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights' dtype on the replica: auto = bfloat16 on a GPU, float32 on CPU."
    )
    default_max_tokens: int = Field(64, ge=1, description="max_tokens when a request gives none.")
    max_surge_percent: int = Field(
        100,
        ge=0,
        le=100,
        description="Extra replicas during a rolling update; > 0 starts new replicas "
        "before old ones stop (no gap in capacity).",
    )
    health_check_period_s: float = Field(5.0, gt=0, description="How often Serve calls each replica's health check.")
    health_check_timeout_s: float = Field(
        30.0, gt=0, description="A check that fails or takes longer marks the replica unhealthy: Serve replaces it."
    )
    graceful_shutdown_timeout_s: float = Field(
        60.0, ge=0, description="How long a stopping replica (scale-down, update) may finish in-flight requests."
    )
    variants: dict[str, str] | None = Field(
        None,
        description="Makes this model a pool: variant name -> LoRA adapter artifact trained over `artifact` "
        "(the base). A request's `model` picks a variant; replicas hold the base once and an LRU "
        "of variants, and Serve routes each request to a replica holding its variant. Set {} for "
        "a pool with no variants yet (`modelfleet deploy POOL --add`).",
    )
    max_models_per_replica: int = Field(
        8,
        ge=1,
        le=1024,
        description="Pools: most variants one replica holds at once; the least recently used leaves first.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        for v in self.variants or {}:
            if not _NAME.fullmatch(v):
                raise _FieldError(
                    "variants",
                    f"name {v!r} is invalid: use 1-63 letters, digits, '.', '_' or '-' starting with a letter or digit",
                )
        if self.autoscaling is not None and self.num_replicas != 1:
            raise _FieldError(
                "num_replicas",
                "cannot be set together with autoscaling; use autoscaling.min_replicas/max_replicas instead",
            )
        if self.batching.max_batch_size > self.max_ongoing_requests:
            raise _FieldError(
                "max_ongoing_requests",
                f"must be >= batching.max_batch_size "
                f"({self.batching.max_batch_size}) or batches never fill, got {self.max_ongoing_requests}",
            )
        return self


class IngressSpec(_Strict):
    """The FastAPI ingress deployment (cheap: it parses, authenticates and forwards)."""

    num_replicas: int = Field(1, ge=1, description="Ingress replicas.")
    max_ongoing_requests: int = Field(256, ge=1, description="Concurrent HTTP requests per ingress replica.")
    num_cpus: float = Field(0.1, ge=0, description="Logical CPUs per ingress replica.")


class RouterSpec(_Strict):
    """Cache-aware routing of a one-hop language-model app (HAProxy's ingress request router):
    prefix cache, token load and session in one score (``serve/prefix_route.py``). How many router
    replicas run is a cluster property, not an app's: Serve pins
    ``RAY_SERVE_INGRESS_ROUTER_REPLICAS_PER_NODE`` of them beside each node's HAProxy (2, set
    where clusters are made: ``cluster/haproxy.py``, the Helm pod env)."""

    # Off by default until the router reads each replica's open connections from HAProxy: it
    # knows what it sent, not what finished, so a frozen replica (SIGSTOP drill) keeps its share
    # of picks until HAProxy's health check fails it, where leastconn sends nothing more there.
    enabled: bool = Field(False, description="Route by prefix cache and token load; false: HAProxy's leastconn.")
    num_cpus: float = Field(0.05, ge=0, description="Logical CPUs per router replica (it tokenizes and hashes).")
    ttft_ceiling_s: float = Field(
        1.0, gt=0, description="A warm replica whose queued prefill would take longer than this is skipped."
    )
    stats_period_s: float = Field(
        0.5, gt=0, le=60, description="How often replicas publish their prefix cache and load to the router."
    )


class LoggingSpec(_Strict):
    """Serve's per-deployment logging (request ids are added to every record by Serve)."""

    encoding: Literal["TEXT", "JSON"] = Field("TEXT", description="Log line format.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Minimum level.")
    logs_dir: str | None = Field(None, description="Directory for replica logs; default is Ray's session logs.")
    enable_access_log: bool = Field(True, description="Log one line per request.")


class ServeConfig(_Strict):
    """A Serve application: HTTP settings, security limits, and the models it serves."""

    # Both land verbatim in HAProxy's rendered config (backend names, path ACLs): a newline or a
    # space there would add config lines, so only URL-safe characters are accepted.
    app_name: str = Field(
        "modelfleet", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$", description="Serve application name."
    )
    route_prefix: str = Field("/", pattern=r"^/[A-Za-z0-9._~/-]*$", description="HTTP path prefix of the application.")
    host: str = Field("127.0.0.1", description="Address Serve's HTTP proxy binds (loopback by default).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of Serve's proxy.")
    storage_path: str = Field("", description="Registry root for `name`/`name@vN` artifacts; empty = storage.path.")
    models: list[ModelSpec] = Field(min_length=1, description="The artifacts to serve, one deployment each.")
    api_key_env: str | None = Field(
        "MODELFLEET_API_KEY", description="Env var holding the API key (read by the ingress)."
    )
    api_key_file: str | None = Field(None, description="File holding the API key; wins over api_key_env.")
    require_api_key: bool = Field(False, description="Refuse to start when no API key is configured.")
    insecure_no_auth: bool = Field(
        False, description="Allow serving without an API key on a non-loopback host (refused otherwise)."
    )
    max_body_bytes: int = Field(1 << 20, ge=64, description="Largest request body; bigger ones get 413.")
    body_timeout_s: float = Field(
        10.0, gt=0, le=600, description="A request body not received within this gets 408 (slow or stalled clients)."
    )
    request_timeout_s: float = Field(
        300.0,
        gt=0,
        le=3600,
        description="Time to response headers before a 504; "
        "a client header cannot lift it. Streams "
        "are bounded by idle time instead.",
    )
    one_hop: bool = Field(
        True,
        description="A single-model app's replicas serve HTTP themselves (no ingress "
        "deployment between); several models always go through the ingress.",
    )
    ingress: IngressSpec = Field(
        default_factory=IngressSpec, description="Ingress deployment settings (multi-model apps, or one_hop: false)."
    )
    router: RouterSpec = Field(
        default_factory=RouterSpec, description="Cache-aware routing (single-model one-hop language-model apps)."
    )
    logging: LoggingSpec = Field(default_factory=LoggingSpec, description="Replica logging.")

    @model_validator(mode="after")
    def _unique_names(self) -> ServeConfig:
        seen: set[str] = set()
        for i, m in enumerate(self.models):
            if m.name in seen:
                raise _FieldError("models", f"[{i}].name {m.name!r} is used twice; model names must be unique")
            seen.add(m.name)
        for i, m in enumerate(self.models):  # a request's `model` must name one thing
            for v in m.variants or {}:
                if v in seen:
                    raise _FieldError(
                        "models",
                        f"[{i}].variants: {v!r} is already the name of a model or of "
                        "another variant; names must be unique across the application",
                    )
                seen.add(v)
        return self

    @property
    def has_pools(self) -> bool:
        return any(m.variants is not None for m in self.models)

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise ConfigError(
            f"serve.models: no model named {name!r}; served models: {', '.join(m.name for m in self.models)}"
        )


def _key_path(loc: tuple[Any, ...], prefix: str) -> str:
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f"{'.' if out else ''}{part}"
    return out


def parse_serve_config(data: Mapping[str, Any] | ServeConfig, *, prefix: str = "serve") -> ServeConfig:
    """Validate a ``serve`` mapping; a bad value raises ``ConfigError`` naming its key path."""
    if isinstance(data, ServeConfig):
        return data
    try:
        return ServeConfig.model_validate(dict(data))
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(err["loc"])
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, _FieldError):
            loc, msg = (*loc, cause.field), str(cause)
        else:
            msg = f"{err['msg'][:1].lower()}{err['msg'][1:]}"
            if err["type"] != "missing":
                msg += f", got {err['input']!r}"
        more = f" (and {len(e.errors()) - 1} more errors)" if len(e.errors()) > 1 else ""
        raise ConfigError(f"{_key_path(loc, prefix)}: {msg}{more}") from None
