"""The HTTP front deployments: what every front holds (config, auth state, metrics, model lookup) and the
deployments that serve ``build_openai_app`` (routes: ``serve/routes.py``; the guard before them:
``serve/guard.py``; errors: ``serve/http_errors.py``; what replicas answer: ``serve/protocol.py``).

Two shapes of deployment serve it (``build_openai_app`` builds the same FastAPI app in each):

- **One hop** (single-model apps, the default): the model's own replicas are the ingress
  (``LMIngress`` / ``PredictIngress``). With the cluster's HAProxy ingress on
  (``modelfleet.cluster.haproxy``), a request goes client -> HAProxy -> the replica that decodes.
- **Multi-model** apps: ``Ingress`` (no weights) reads the OpenAI ``model`` field and forwards to one
  deployment per model through deployment handles, whose queue limit (``max_queued_requests``)
  turns overload into a fast 503/429; HAProxy routes by path only, so the ``model`` field needs
  this Python hop.

Route code reaches its deployment through ``serve.get_replica_context().servable_object``; a
one-hop replica answers the same handle-shaped calls in process (``_Local``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import time
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.util import metrics

from modelfleet.config.serve import ServeConfig, parse_serve_config
from modelfleet.serve import auth
from modelfleet.serve.guard import HttpState
from modelfleet.serve.http_errors import APIError
from modelfleet.serve.model import LMReplica
from modelfleet.serve.pool import variant_id
from modelfleet.serve.predict import PredictReplica
from modelfleet.serve.protocol import AuthState
from modelfleet.serve.routes import build_openai_app

__all__ = ["Ingress", "LMIngress", "PredictIngress", "build_openai_app"]

logger = logging.getLogger("ray.serve")


class _Front:
    """The HTTP side every front deployment shares: config, auth state, metrics, model lookup."""

    cfg: ServeConfig
    http: HttpState
    models: dict[str, Any]

    def _init_front(self, cfg: ServeConfig, models: dict[str, Any], lms: set[str], limit: int | None = None) -> None:
        self.cfg = cfg
        self.models = models
        self.lms = lms  # names of the language models (the others answer /predict only)
        first = self.cfg.models[0]
        key = auth.load_api_key(self.cfg)
        auth.check_exposure(self.cfg, key)
        self.http = HttpState(
            api_key=key,
            max_body=self.cfg.max_body_bytes,
            m_requests=metrics.Counter(
                "modelfleet_http_requests", "HTTP requests by route and status.", tag_keys=("route", "status")
            ),
            m_errors=metrics.Counter(
                "modelfleet_http_errors", "HTTP error responses by status.", tag_keys=("route", "status")
            ),
            m_latency=metrics.Histogram(
                "modelfleet_http_latency_seconds",
                "Time to response headers.",
                boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
                tag_keys=("route",),
            ),
            limit=limit,
            overload_status=first.overload_status,
            retry_after_s=first.retry_after_s,
            body_timeout_s=self.cfg.body_timeout_s,
            request_timeout_s=self.cfg.request_timeout_s,
        )
        # Only where the key comes from is logged, never the key.
        logger.info(
            "HTTP front up (pid %d): models %s, auth %s",
            os.getpid(),
            list(models),
            "on" if self.http.api_key else "off",
        )

    _ready_at: float = float("-inf")
    _ready_ok: bool = False
    _ready_lock: asyncio.Lock | None = None
    READY_TTL_S = 2.0
    """How long a readiness answer is reused: 1,000 probes make at most one check per model per TTL."""

    def _always_on(self) -> list[Any]:
        """Handles of the models that keep a replica. One that scales to zero (``min_replicas: 0``)
        is left out: asking it would start a replica (Serve queues the call and scales up), so a
        readiness probe every few seconds would keep a sleeping model awake for ever."""
        asleep = {m.name for m in self.cfg.models if m.autoscaling is not None and m.autoscaling.min_replicas == 0}
        return [h for name, h in self.models.items() if name not in asleep]

    async def ready(self) -> bool:
        """Whether every model that keeps a replica answers ``info`` (has weights), asked at most
        once per TTL however many probes arrive (one check in flight; the others reuse its answer)."""
        if time.monotonic() - self._ready_at < self.READY_TTL_S:
            return self._ready_ok
        if self._ready_lock is None:
            self._ready_lock = asyncio.Lock()
        async with self._ready_lock:
            if time.monotonic() - self._ready_at >= self.READY_TTL_S:
                try:
                    await asyncio.wait_for(asyncio.gather(*(h.info.remote() for h in self._always_on())), 10)
                    self._ready_ok = True
                except Exception:  # noqa: BLE001 - any failure means "not ready"
                    self._ready_ok = False
                self._ready_at = time.monotonic()
        return self._ready_ok

    def auth_state(self) -> AuthState:
        """Whether this front holds an API key, and its fingerprint (never the key): ``deploy``
        checks it against the key the caller has."""
        return AuthState(self.http.api_key is not None, auth.fingerprint(self.http.api_key))

    def serve_config(self) -> dict[str, Any]:
        """The config this application was deployed with (``modelfleet deploy`` edits and redeploys it)."""
        return self.cfg.model_dump()

    def _init_one_hop(self, config: dict[str, Any], storage_path: str, replica: type, *, lm: bool) -> None:
        """A single model's replica that is also the front: it calls itself in process."""
        cfg = parse_serve_config(config)  # once: the replica and the front share the parsed spec
        m = cfg.models[0]
        replica.__init__(self, m, storage_path)
        self._init_front(cfg, {m.name: _Local(self)}, {m.name} if lm else set(), _one_hop_limit(cfg))

    pools: dict[str, dict[str, str]] = {}
    """Pool name -> {variant name: adapter artifact} (the multi-model ``Ingress`` sets it)."""

    def _served(self) -> str:
        return "; ".join(
            f"{n} (variants: {', '.join(sorted(self.pools[n])) or 'none'})" if n in self.pools else n
            for n in self.models
        )

    def _handle(self, model: str | None, *, lm: bool) -> tuple[str, Any]:
        """The model's handle; ``lm`` says which kind the route needs (a mismatch is a 400). A
        pool's variant is its pool's handle with the variant as Serve's multiplexed model id, so
        Serve routes it to a replica that already holds that adapter when one does."""
        name = model or self.cfg.models[0].name
        for pool, variants in self.pools.items():
            if name in variants:
                handle = self.models[pool].options(multiplexed_model_id=variant_id(name, variants[name]))
                if not lm:
                    raise APIError(
                        400,
                        f"model {name!r} is a language model; use /v1/completions",
                        param="model",
                        code="wrong_endpoint",
                    )
                return name, handle
        if name not in self.models:
            raise APIError(
                404,
                f"model {name!r} does not exist; served models: {self._served()}",
                param="model",
                code="model_not_found",
            )
        if lm and name not in self.lms:
            raise APIError(
                400,
                f"model {name!r} is not a language model; use POST /v1/models/{name}/predict",
                param="model",
                code="wrong_endpoint",
            )
        if not lm and name in self.lms:
            raise APIError(
                400, f"model {name!r} is a language model; use /v1/completions", param="model", code="wrong_endpoint"
            )
        return name, self.models[name]


class _LocalMethod:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        out = self.fn(*args)
        if inspect.isawaitable(out) or inspect.isasyncgen(out):
            return out
        done = asyncio.get_running_loop().create_future()  # a plain method: awaitable like a handle call
        done.set_result(out)
        return done


class _Local:
    """The call shape of a ``DeploymentHandle`` (``h.complete.remote(...)``, ``h.options(stream=True)``)
    over this replica's own methods: a one-hop front calls its model in process."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def options(self, **_: Any) -> _Local:
        return self

    def __getattr__(self, name: str) -> _LocalMethod:
        return _LocalMethod(getattr(self._target, name))


def _one_hop_limit(cfg: ServeConfig) -> int | None:
    m = cfg.models[0]
    return None if m.max_queued_requests < 0 else m.max_ongoing_requests + m.max_queued_requests


@serve.deployment(health_check_period_s=10)
@serve.ingress(build_openai_app)
class Ingress(_Front):
    """HTTP front door of a multi-model application: forwards to each model's deployment."""

    def __init__(self, config: dict[str, Any], models: dict[str, DeploymentHandle], lms: list[str]) -> None:
        self._init_front(parse_serve_config(config), models, set(lms))

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apps with pools: a variant was added or removed; route by the new list, no restart."""
        self.pools = {p: dict(v) for p, v in (user_config.get("variants") or {}).items()}
        self.cfg = self.cfg.model_copy(
            update={
                "models": [
                    m.model_copy(update={"variants": dict(self.pools[m.name])}) if m.name in self.pools else m
                    for m in self.cfg.models
                ]
            }
        )
        logger.info("pools: %s", {p: sorted(v) for p, v in self.pools.items()})


@serve.deployment  # every option comes from the ModelSpec, in build_app
@serve.ingress(build_openai_app)
class LMIngress(_Front, LMReplica):
    """A single language model that serves HTTP itself: no hop between the front and the decoder."""

    def __init__(self, config: dict[str, Any], storage_path: str) -> None:
        self._init_one_hop(config, storage_path, LMReplica, lm=True)


@serve.deployment  # every option comes from the ModelSpec, in build_app
@serve.ingress(build_openai_app)
class PredictIngress(_Front, PredictReplica):
    """A single predict model that serves HTTP itself."""

    def __init__(self, config: dict[str, Any], storage_path: str) -> None:
        self._init_one_hop(config, storage_path, PredictReplica, lm=False)
