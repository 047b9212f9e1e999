"""What the CLI (and the demo) do to Serve applications on a running cluster, from the driver:
deploy one and check that its front holds this shell's key, read back a running application's
config, move a model or a pool's variant to another artifact with a rolling update, list
deployments, and wait for a condition. The application itself is built by serve/app.py."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

from ray import serve

from modelfleet import registry
from modelfleet import storage as storage_io
from modelfleet.config.serve import ModelSpec, ServeConfig, parse_serve_config
from modelfleet.errors import ArtifactError, ConfigError, StorageError
from modelfleet.families.lora import check_variant
from modelfleet.serve import auth
from modelfleet.serve.app import build_app, config_from_args
from modelfleet.serve.protocol import AuthState


def deploy(cfg: ServeConfig | Mapping[str, Any]) -> ServeConfig:
    """Start Serve's HTTP proxy on ``host:port`` if needed and (re)deploy the application; returns
    once it is RUNNING. The caller must already be a Ray driver (``cluster.connect()``)."""
    cfg = config_from_args(cfg)
    try:  # an object store the replicas could not read fails here, not in every replica
        storage_io.check_readable(cfg.storage_path)
    except StorageError as e:
        raise StorageError(f"serve.storage_path: {e}") from None
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    try:
        serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
    except RuntimeError as e:  # Serve says only "failed to update"; the replicas' errors say why
        raise ConfigError(f"{e} {_failure_detail(cfg.app_name)}".strip()) from None
    verify_auth(cfg)
    return cfg


def _failure_detail(app_name: str) -> str:
    app = serve.status().applications.get(app_name)
    if app is None:
        return ""
    # A failed constructor's message is a traceback; its last line is the error itself.
    messages = [
        f"{name}: {dep.message.strip().splitlines()[-1]}"
        for name, dep in app.deployments.items()
        if dep.message and dep.message.strip()
    ]
    return "; ".join(messages)[:2000]


def verify_auth(cfg: ServeConfig) -> AuthState:
    """The front reads its key where the cluster runs; a key exported only in this shell never
    reaches it. If this shell has a key (``api_key_env``/``api_key_file``) and the running front
    holds none or another, raise instead of reporting the app as running."""
    state = serve.get_app_handle(cfg.app_name).auth_state.remote().result(timeout_s=60)
    try:
        here = auth.load_api_key(cfg.model_copy(update={"require_api_key": False}))
    except ConfigError:
        here = None  # e.g. an api_key_file that only exists on the cluster's nodes
    if here is not None and auth.fingerprint(here) != state.fingerprint:
        what = "no API key" if not state.auth else "a different API key"
        raise ConfigError(
            f"app {cfg.app_name!r} is running but its HTTP front holds {what} than "
            f"{cfg.api_key_env!r} in this shell: the key is read where the cluster runs (its "
            "environment, a Kubernetes Secret, or serve.api_key_file on its nodes), not here; set "
            "it there and restart the cluster, or run `modelfleet serve` on a cluster this shell starts"
        )
    return state


def running_config(app_name: str) -> ServeConfig:
    """The config a running application was deployed with (asked of its ingress)."""
    if app_name not in serve.status().applications:
        raise ConfigError(
            f"no Serve application named {app_name!r} is running; start one with `modelfleet serve CONFIG`"
        )
    return parse_serve_config(serve.get_app_handle(app_name).serve_config.remote().result(timeout_s=60))


def update_model(app_name: str, model: str, artifact: str) -> str:
    """Move one model of a running application to another artifact with no failed requests.

    ``artifact`` is ``vN``/``latest`` (same registry name), ``name@vN``, or a path/URI. The new
    weights are checked before anything changes; the redeploy is a rolling update with surge:
    new replicas load and pass health checks before old ones drain and stop."""
    cfg = running_config(app_name)
    spec = cfg.model(model)
    if re.fullmatch(r"v\d+|latest", artifact):
        base = spec.artifact.partition("@")[0]
        if "/" in base:
            raise ConfigError(
                f"--artifact {artifact!r}: model {model!r} serves a path ({spec.artifact}), "
                "so give a full name@version or another path"
            )
        artifact = f"{base}@{artifact}"
    ref = registry.resolve(cfg.storage_path, artifact)  # fails fast on a bad reference
    models = [m.model_copy(update={"artifact": artifact}) if m.name == model else m for m in cfg.models]
    if spec.variants:  # a pool's adapters only fit the base weights they were trained over
        moved = cfg.model_copy(update={"models": models})
        stale = []
        for name, variant in sorted(spec.variants.items()):
            try:
                _check_variant(moved, moved.model(model), registry.resolve(cfg.storage_path, variant).uri, variant)
            except ConfigError:
                stale.append(name)
        if stale:
            raise ConfigError(
                f"--artifact {artifact!r}: pool {model!r}'s variants {', '.join(stale)} were trained "
                f"over its current base, not over {artifact!r}; remove them first "
                f"(modelfleet deploy {model} --remove NAME) or serve the new base as another pool"
            )
    serve.run(build_app(cfg.model_copy(update={"models": models})), name=app_name, route_prefix=cfg.route_prefix)
    return f"{ref.name}@{ref.version}" if ref.name else ref.uri


def update_pool(app_name: str, pool: str, *, add: tuple[str, str] | None = None, remove: str | None = None) -> str:
    """Add (``add=(name, artifact)``) or remove a variant of a running pool. The adapter is checked
    first (an adapter of the pool's base weights); then only the pool's and the ingress's
    ``user_config`` change, so their replicas reconfigure in place: no restart, no failed request."""
    cfg = running_config(app_name)
    spec = cfg.model(pool)
    if spec.variants is None:
        raise ConfigError(f"model {pool!r} is not a pool; give it `variants: {{}}` in the serve config to make it one")
    variants = dict(spec.variants)
    if add is not None:
        name, artifact = add
        if name in variants or any(name == m.name or name in (m.variants or {}) for m in cfg.models):
            raise ConfigError(
                f"--add {name!r}: the application already serves a model or variant of that name; "
                "--remove it first, or pick another name"
            )
        ref = registry.resolve(cfg.storage_path, artifact)  # fails fast on a bad reference
        _check_variant(cfg, spec, ref.uri, artifact)
        variants[name] = f"{ref.name}@{ref.version}" if ref.name else ref.uri
        what = f"added variant {name} ({variants[name]})"
    elif remove is not None:
        if remove not in variants:
            raise ConfigError(
                f"--remove {remove!r}: pool {pool!r} has no such variant; its variants: "
                f"{', '.join(sorted(variants)) or 'none'}"
            )
        del variants[remove]
        what = f"removed variant {remove}"
    else:
        raise ConfigError("give --add NAME --artifact ARTIFACT or --remove NAME")
    models = [m.model_copy(update={"variants": variants}) if m.name == pool else m for m in cfg.models]
    new = parse_serve_config(cfg.model_copy(update={"models": models}).model_dump())
    serve.run(build_app(new), name=app_name, route_prefix=cfg.route_prefix)
    return what


def _check_variant(cfg: ServeConfig, pool: ModelSpec, uri: str, artifact: str) -> None:
    """A variant must be a LoRA adapter trained over exactly the pool's base weights."""
    base = registry.read_json(registry.resolve(cfg.storage_path, pool.artifact).uri, "manifest.json")
    try:
        check_variant(registry.read_json(uri, "manifest.json"), base, artifact)
    except ArtifactError as e:
        raise ConfigError(f"--artifact: {e}; pool {pool.name!r} serves {pool.artifact!r}") from None


def status() -> list[dict[str, Any]]:
    """One row per deployment: app, deployment, status, replicas by state, message."""
    rows = []
    for app_name, app in serve.status().applications.items():
        for dep_name, dep in app.deployments.items():
            states = {str(getattr(k, "value", k)): v for k, v in dep.replica_states.items()}
            rows.append(
                {
                    "app": app_name,
                    "app_status": str(getattr(app.status, "value", app.status)),
                    "deployment": dep_name,
                    "status": str(getattr(dep.status, "value", dep.status)),
                    "replicas": states,
                    "running": states.get("RUNNING", 0),
                    "message": dep.message,
                }
            )
    return rows


def wait_for(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.25) -> Any:
    """Poll ``predicate()`` until it returns something truthy or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)
