"""API-key authentication for the ingress.

The key comes from a file (a mounted Kubernetes Secret) or an environment variable, is read once
in the ingress replica, and is never logged or echoed: configs and errors only ever name where
the key comes from, not the key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from modelfleet.config.serve import ServeConfig
from modelfleet.errors import ConfigError

# Routes that answer without a key: load balancers and Kubernetes probes carry no credentials.
PUBLIC_PATHS = frozenset({"/healthz"})


def load_api_key(cfg: ServeConfig) -> str | None:
    """The configured API key, or None when none is configured (authentication off)."""
    key: str | None = None
    if cfg.api_key_file:
        path = Path(cfg.api_key_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"serve.api_key_file: {str(path)!r} does not exist or is not a file")
        key = path.read_text().strip()
        if not key:
            raise ConfigError(f"serve.api_key_file: {str(path)!r} is empty; put the API key in it")
    elif cfg.api_key_env:
        key = os.environ.get(cfg.api_key_env, "").strip() or None
    if key is None and cfg.require_api_key:
        where = f"file {cfg.api_key_file!r}" if cfg.api_key_file else f"env var {cfg.api_key_env!r}"
        raise ConfigError(f"serve.require_api_key: true but no API key was found in {where}")
    return key


def authorized(authorization: str | None, key: str | None) -> bool:
    """Whether an ``Authorization: Bearer <key>`` header matches (constant-time compare)."""
    if key is None:
        return True
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), key.encode())


LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def fingerprint(key: str | None) -> str | None:
    """A short digest that tells two keys apart without revealing either (safe to log and compare)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16] if key else None


def check_exposure(cfg: ServeConfig, key: str | None) -> None:
    """Fail closed: no API key on an address other than loopback is refused unless
    ``insecure_no_auth`` says it is meant."""
    if key is None and cfg.host not in LOOPBACK and not cfg.insecure_no_auth:
        raise ConfigError(
            f"serve.host: {cfg.host} is reachable from other machines but no API key is configured "
            f"(env {cfg.api_key_env!r} or serve.api_key_file, read where the cluster runs); set one, "
            "or pass --insecure-no-auth (serve.insecure_no_auth: true) to serve without authentication"
        )
