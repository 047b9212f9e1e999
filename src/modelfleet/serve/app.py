"""The Serve application builder (the driver-side operations on a running application are
serve/operations.py's).

``modelfleet.serve.app:build_app`` is the one import path that ``serve run``, a ``serve deploy``
config (deploy/serve_config.yaml) and a KubeRay RayService point at. Its ``args`` are a
``ServeConfig`` mapping, or ``{"config": "modelfleet.yaml"}`` to read the ``serve:`` section of
a root config file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import ray
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from modelfleet import registry
from modelfleet.config.serve import ModelSpec, ServeConfig, parse_serve_config
from modelfleet.errors import ConfigError
from modelfleet.families import get_family
from modelfleet.presets import load_config
from modelfleet.raycompat import pinned_version_options, serve_builds_for_haproxy, with_ingress_request_router
from modelfleet.serve.cache_router import CacheAwareRouter
from modelfleet.serve.ingress import Ingress, LMIngress, PredictIngress
from modelfleet.serve.model import LMServer
from modelfleet.serve.predict import Predictor
from modelfleet.serve.route_front import IngressRouter
from modelfleet.serve.routing import VariantRouter
from modelfleet.storage import is_remote

logger = logging.getLogger(__name__)


def _is_lm(artifact: str, storage_path: str) -> bool:
    """Whether the artifact's family serves the OpenAI text API (else: the predict route)."""
    manifest = registry.read_json(registry.resolve(storage_path, artifact).uri, "manifest.json")
    return bool(get_family(manifest.get("family", "gpt")).serves_openai)


def config_from_args(args: Mapping[str, Any] | ServeConfig) -> ServeConfig:
    """A validated ServeConfig with an absolute ``storage_path`` (replicas do not share our cwd)."""
    if isinstance(args, Mapping) and set(args) == {"config"}:
        root = load_config(args["config"])
        if root.serve is None:
            raise ConfigError(f"config file {args['config']!r} has no serve section")
        cfg = root.serve
        storage = cfg.storage_path or root.storage.path
    else:
        cfg = parse_serve_config(args)
        storage = cfg.storage_path or "storage"
    return cfg.model_copy(update={"storage_path": resolve_storage_path(storage)})


def resolve_storage_path(path: str) -> str:
    """``storage_path`` as this process sees it: ``$VAR``/``${VAR}`` expanded (in a Serve config,
    from the application's ``runtime_env.env_vars``, which the build task runs with), then ``~``,
    then a local path made absolute against the cwd (the application's ``runtime_env.working_dir``
    when it has one): replicas get the result and do not share our cwd."""
    expanded = os.path.expandvars(path)
    unset = re.search(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expanded)
    if unset:
        raise ConfigError(
            f"serve.storage_path {path!r}: environment variable {unset.group(1)} is not set "
            "where the application is built; set it in the application's runtime_env.env_vars "
            "(or the cluster's environment), or give a path or URI"
        )
    if is_remote(expanded):
        return expanded
    return os.path.abspath(os.path.expanduser(expanded))


def _logging(cfg: ServeConfig) -> dict[str, Any]:
    return cfg.logging.model_dump(exclude_none=True)


@lru_cache(maxsize=1)
def _code_fingerprint() -> str:
    """This installation's code (our package and Ray's version): a new release is a new version."""
    h = hashlib.sha256(ray.__version__.encode())
    for f in sorted(Path(__file__).resolve().parents[1].rglob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()


def stable_version(*parts: Any) -> str:
    """A deployment version that changes only with the code and ``parts`` (init args, resources).

    ``serve.run`` gives a deployment without one a random version, so every redeploy restarts its
    replicas; with this one, a redeploy that changes only ``user_config`` (a pool's variant list)
    reconfigures the running replicas in place, as a ``serve deploy`` config does."""
    h = hashlib.sha256(_code_fingerprint().encode())
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def _routed(cfg: ServeConfig) -> bool:
    """Cache-aware routing needs HAProxy's ingress (Ray refuses an ingress request router
    without it). The process that builds the app knows the cluster's mode from its environment:
    the controller (a `serve deploy` config, KubeRay) has the cluster's own; a driver has what
    ``cluster.connect`` set (a cluster it or ``modelfleet cluster up`` started) or the user did."""
    if not cfg.router.enabled:
        return False
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1" and not serve_builds_for_haproxy():
        logger.warning(
            "serve.router: this cluster's Serve ingress is not HAProxy (RAY_SERVE_ENABLE_HA_PROXY unset "
            "here): requests are routed by load, not by prefix cache"
        )
        return False
    serve_builds_for_haproxy(True)  # Serve may have been imported before the variable was set
    return True


def _init_spec(m: ModelSpec) -> dict[str, Any]:
    """A model's constructor argument: a pool's variants travel in user_config, not here."""
    return m.model_dump() if m.variants is None else m.model_copy(update={"variants": {}}).model_dump()


def _model_options(cfg: ServeConfig, m: ModelSpec) -> dict[str, Any]:
    opts: dict[str, Any] = dict(
        name=f"model-{m.name}",
        max_ongoing_requests=m.max_ongoing_requests,
        max_queued_requests=m.max_queued_requests,
        backpressure_config={"status_code": m.overload_status, "retry_after_s": m.retry_after_s},
        ray_actor_options=m.ray_actor_options.to_serve(),
        # The artifact travels as user_config: changing only it in a `serve deploy` config
        # reloads weights in place (reconfigure) without restarting replicas.
        user_config={"artifact": m.artifact},
        max_surge_percent=m.max_surge_percent,
        health_check_period_s=m.health_check_period_s,
        health_check_timeout_s=m.health_check_timeout_s,
        graceful_shutdown_timeout_s=m.graceful_shutdown_timeout_s,
        logging_config=_logging(cfg),
    )
    if m.autoscaling is not None:
        opts["autoscaling_config"] = m.autoscaling.to_serve()
    else:
        opts["num_replicas"] = m.num_replicas
    if m.variants is not None:
        opts["user_config"] = {"artifact": m.artifact, "variants": dict(m.variants)}
        opts["request_router_config"] = RequestRouterConfig(
            request_router_class=VariantRouter, request_router_kwargs={"max_models": m.max_models_per_replica}
        )
        opts.update(
            pinned_version_options(
                stable_version("pool", _init_spec(m), cfg.storage_path, m.ray_actor_options.to_serve())
            )
        )
    return opts


def build_app(args: Mapping[str, Any] | ServeConfig) -> Application:
    """The Serve application. One model (``one_hop``, the default): its replicas are the HTTP
    ingress themselves (``LMIngress`` / ``PredictIngress``). Several models: a FastAPI ``Ingress``
    that routes by the OpenAI ``model`` field to one deployment per model (``LMServer`` for
    language models, ``Predictor`` for the other families)."""
    cfg = config_from_args(args)
    if len(cfg.models) == 1 and cfg.one_hop and not cfg.has_pools:
        m = cfg.models[0]
        opts = _model_options(cfg, m)
        if m.max_queued_requests >= 0:
            # Overload is answered by the front's guard in OpenAI's error envelope (Serve's own
            # direct-ingress refusal is plain text): Serve admits more than the limit, so the
            # request past it reaches the guard at once instead of queueing unseen.
            opts.update(
                max_ongoing_requests=m.max_ongoing_requests + m.max_queued_requests + 64, max_queued_requests=-1
            )
        lm = _is_lm(m.artifact, cfg.storage_path)
        if lm and _routed(cfg):
            opts["request_router_config"] = RequestRouterConfig(
                request_router_class=CacheAwareRouter,
                request_router_kwargs={
                    "ttft_ceiling_s": cfg.router.ttft_ceiling_s,
                    # A live replica publishes every period; three missed ones mark it silent.
                    "stale_after_s": max(1.0, 3 * cfg.router.stats_period_s),
                },
                request_routing_stats_period_s=cfg.router.stats_period_s,
                request_routing_stats_timeout_s=max(5.0, 4 * cfg.router.stats_period_s),
            )
        app = (LMIngress if lm else PredictIngress).options(**opts).bind(cfg.model_dump(), cfg.storage_path)
        if lm and _routed(cfg):
            router = IngressRouter.options(
                name=f"router-{m.name}",
                ray_actor_options={"num_cpus": cfg.router.num_cpus},
                max_ongoing_requests=1024,  # a pick is ~1 ms; HAProxy's timeout bounds the wait
                logging_config=_logging(cfg),
            ).bind(app, m.name, m.artifact, cfg.storage_path, m.default_max_tokens)
            app = with_ingress_request_router(app, router)
        return app
    handles, lms = {}, []
    for m in cfg.models:
        lm = _is_lm(m.artifact, cfg.storage_path)
        if m.variants is not None and not lm:
            raise ConfigError(
                f"serve.models: {m.name!r} has variants, but its artifact {m.artifact!r} is not a "
                "language model; pools serve LoRA adapters of gpt and hf-causal-lm bases"
            )
        lms += [m.name] if lm else []
        server = LMServer if lm else Predictor
        handles[m.name] = server.options(**_model_options(cfg, m)).bind(_init_spec(m), cfg.storage_path)
    # The ingress learns the pools' variants from user_config too: adding one reconfigures it in place.
    front = cfg.model_copy(update={"models": [ModelSpec.model_validate(_init_spec(m)) for m in cfg.models]})
    opts: dict[str, Any] = {}
    if cfg.has_pools:
        opts = dict(
            user_config={"variants": {m.name: dict(m.variants) for m in cfg.models if m.variants is not None}},
            **pinned_version_options(stable_version("ingress", front.model_dump(), sorted(handles), lms)),
        )
    return Ingress.options(
        name="ingress",
        num_replicas=cfg.ingress.num_replicas,
        max_ongoing_requests=cfg.ingress.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.ingress.num_cpus},
        max_surge_percent=100,  # a redeploy starts the new ingress before the old one stops
        logging_config=_logging(cfg),
        **opts,
    ).bind(front.model_dump(), handles, lms)
