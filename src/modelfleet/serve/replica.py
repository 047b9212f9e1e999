"""What every model replica shares: the validated spec, the artifact loaded through
``reconfigure``, the health check, ``info``, torch's thread count and metrics tagged with the model name.

The artifact arrives as ``user_config`` (``{"artifact": "name@v2"}``), so that a ``serve deploy``
config or a RayService can move replicas to new weights in place through ``reconfigure``;
``modelfleet deploy`` instead does a surge rolling update (see ``app.py``). Either way a replica
holds one ``Loaded`` at a time, built whole and swapped whole.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from ray.util import metrics

from modelfleet import registry
from modelfleet.cluster.local import gpus_are_simulated
from modelfleet.config.serve import ModelSpec
from modelfleet.families.artifact import load_artifact
from modelfleet.models.placement import Placement, place, placement
from modelfleet.serve.protocol import ReplicaError, ReplicaInfo

# Serve's replica logger adds the request id to every record it formats.
logger = logging.getLogger("ray.serve")

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class Loaded:
    """One artifact's weights; a batch reads ``self.loaded`` once, so it never mixes versions."""

    model: Any
    preprocessor: Any
    """The tokenizer of a language model, the fitted ``Transform`` of the other families."""
    artifact: str
    """``name@vN`` for a registry artifact, else its path or URI (the ``x-modelfleet-artifact`` header)."""


class ReplicaBase:
    """Base of the LM and predict deployments (``LMServer``, ``Predictor``).

    A subclass may extend ``_prepare`` (what to derive once per artifact) and
    ``_describe`` (fields ``info`` adds)."""

    def __init__(self, spec: dict[str, Any] | ModelSpec, storage_path: str) -> None:
        # A dict from Serve (init args cross processes as plain data); a one-hop front passes its
        # already-parsed spec.
        self.spec = spec if isinstance(spec, ModelSpec) else ModelSpec.model_validate(spec)
        self.storage_path = storage_path
        self.pid = os.getpid()
        self.loaded: Loaded | None = None
        gpus = self.spec.ray_actor_options.num_gpus
        self.placement: Placement = placement(
            gpus,
            self.spec.dtype,
            cuda_available=torch.cuda.is_available(),
            simulated=gpus > 0 and gpus_are_simulated(),
            who=f"model {self.spec.name}'s replica",
        )
        # One intra-op thread per reserved CPU: more would contend with the replicas beside it.
        torch.set_num_threads(max(1, int(self.spec.ray_actor_options.num_cpus or 1)))
        self.m_batch = self.histogram(
            "modelfleet_batch_size", "Requests handled together per batch.", BATCH_SIZE_BUCKETS
        )

    def counter(self, name: str, description: str) -> metrics.Counter:
        """A counter tagged with this model's name."""
        m = metrics.Counter(name, description, tag_keys=("model",))
        m.set_default_tags({"model": self.spec.name})
        return m

    def gauge(self, name: str, description: str) -> metrics.Gauge:
        """A gauge tagged with this model's name."""
        m = metrics.Gauge(name, description, tag_keys=("model",))
        m.set_default_tags({"model": self.spec.name})
        return m

    def histogram(self, name: str, description: str, boundaries: Sequence[float]) -> metrics.Histogram:
        """A histogram tagged with this model's name."""
        m = metrics.Histogram(name, description, boundaries=list(boundaries), tag_keys=("model",))
        m.set_default_tags({"model": self.spec.name})
        return m

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load ``user_config["artifact"]`` and swap it in; requests in flight finish on the old one.
        The same artifact again (a pool's variant list changed) keeps the weights loaded."""
        if self.loaded is None or user_config["artifact"] != self._configured_artifact:
            self._load(str(user_config["artifact"]))
        self._configured_artifact = user_config["artifact"]
        self._configure(user_config)

    _configured_artifact: Any = None

    def _configure(self, user_config: dict[str, Any]) -> None:
        """What a subclass reads from ``user_config`` besides the artifact (a pool's variants)."""

    def _load(self, artifact: str) -> None:
        ref = registry.resolve(self.storage_path, artifact)
        model, preprocessor, manifest = load_artifact(ref.uri)
        model = place(model, self.placement)
        label = f"{ref.name}@{ref.version}" if ref.name else ref.uri
        self.base_manifest = manifest
        self.loaded = self._prepare(model, preprocessor, manifest, label)
        self._log_loaded(manifest, label)

    def _log_loaded(self, manifest: dict[str, Any], label: str, where: str = "") -> None:
        logger.info(
            "model %s loaded %s artifact %s (sha256 %s) on %s as %s%s",
            self.spec.name,
            manifest.get("family", "?"),
            label,
            str(manifest.get("weights_sha256", ""))[:12],
            self.placement.device,
            self.placement.dtype,
            where,
        )

    def _prepare(self, model: Any, preprocessor: Any, manifest: dict[str, Any], artifact: str) -> Loaded:
        return Loaded(model, preprocessor, artifact)

    def check_health(self) -> None:
        # Serve restarts a replica whose check fails; a replica without weights cannot answer.
        if self.placement.problem:
            raise RuntimeError(self.placement.problem)
        if self.loaded is None:
            raise RuntimeError(f"model {self.spec.name} has no weights loaded")

    def info(self) -> ReplicaInfo:
        """What ``/v1/models`` and ``/healthz`` report for this replica."""
        lo = self._require()
        fields: dict[str, Any] = {"context_length": 0, **self.placement.describe(), **self._describe(lo)}
        return ReplicaInfo(name=self.spec.name, artifact=lo.artifact, pid=self.pid, **fields)

    def _describe(self, lo: Any) -> dict[str, Any]:
        """``ReplicaInfo`` fields a subclass fills in."""
        return {}

    def _require(self) -> Any:
        if self.loaded is None:
            raise RuntimeError(f"model {self.spec.name} is still loading")
        return self.loaded

    def _error(
        self, status: int, message: str, param: str, code: str, retry_after_s: float | None = None
    ) -> ReplicaError:
        """A refused request, as the front turns it into an HTTP error naming ``param``."""
        logger.info("rejected request: %s", message)
        return ReplicaError(status, message, param, code, self.pid, retry_after_s)
