"""The prediction deployment for families that are not language models (``cnn``, ``lstm``,
``linear``, ``mf``): ``POST /v1/models/{name}/predict`` with ``{"instances": [...]}``.

Each instance is validated against the family's typed schema (built from the artifact's
transform, e.g. a tabular record's columns); a bad field answers 422 naming
``instances.<i>.<field>``. Valid instances from concurrent requests share one forward pass
(``@serve.batch``) and go through the same fitted transform the model was trained with.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from ray import serve

from modelfleet import registry
from modelfleet.config.serve import ModelSpec
from modelfleet.families import get_family
from modelfleet.families.artifact import load_artifact

logger = logging.getLogger("ray.serve")
MAX_INSTANCES = 256
"""Most instances one request may carry (bigger jobs belong to ``modelfleet evaluate``)."""


@dataclass(frozen=True)
class _Loaded:
    """One artifact's model, transform and schema; swapped as a whole on reconfigure."""

    model: Any
    transform: Any
    family: Any
    schema: type[BaseModel]
    artifact: str


def _invalid(message: str, param: str) -> dict[str, Any]:
    return {"error": {"status": 422, "message": message, "param": param}}


@serve.deployment(health_check_period_s=5, health_check_timeout_s=30, graceful_shutdown_timeout_s=30)
class Predictor:
    """Serves one artifact of a non-LM family; the ingress calls ``predict`` and ``info``."""

    def __init__(self, spec: dict[str, Any], storage_path: str) -> None:
        self.spec = ModelSpec.model_validate(spec)
        self.storage_path = storage_path
        self.pid = os.getpid()
        self.loaded: _Loaded | None = None
        self._batched.set_max_batch_size(self.spec.batching.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.spec.batching.batch_wait_timeout_s)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        import torch


        torch.set_num_threads(max(1, int(self.spec.ray_actor_options.num_cpus or 1)))
        ref = registry.resolve(self.storage_path, str(user_config["artifact"]))
        model, transform, manifest = load_artifact(ref.uri)
        family = get_family(manifest["family"])
        label = f"{ref.name}@{ref.version}" if ref.name else ref.uri
        self.loaded = _Loaded(model, transform, family, family.request_model(transform), label)
        logger.info("model %s loaded %s artifact %s", self.spec.name, family.name, label)

    def check_health(self) -> None:
        if self.loaded is None:
            raise RuntimeError(f"model {self.spec.name} has no weights loaded")

    def info(self) -> dict[str, Any]:
        lo = self._require()
        return {"name": self.spec.name, "artifact": lo.artifact, "context_length": 0, "pid": self.pid,
                "family": lo.family.name, "task": lo.family.task_of(lo.transform),
                "schema": lo.schema.model_json_schema()}

    def _require(self) -> _Loaded:
        if self.loaded is None:
            raise RuntimeError(f"model {self.spec.name} is still loading")
        return self.loaded

    async def predict(self, body: Any) -> dict[str, Any]:
        """``{"instances": [...]}`` -> ``{"predictions": [...]}``, or an ``error`` naming the field."""
        lo = self._require()
        instances = body.get("instances") if isinstance(body, dict) else None
        if not isinstance(body, dict) or set(body) != {"instances"}:
            extra = sorted(set(body) - {"instances"}) if isinstance(body, dict) else []
            return {**_invalid(f"{extra[0]}: unknown field; the body is {{\"instances\": [...]}}" if extra else
                               "instances: field required; the body is {\"instances\": [...]}",
                               extra[0] if extra else "instances"), "pid": self.pid}
        if not isinstance(instances, list) or not 1 <= len(instances) <= MAX_INSTANCES:
            return {**_invalid(f"instances: must be a list of 1 to {MAX_INSTANCES} objects", "instances"),
                    "pid": self.pid}
        valid = []
        for i, inst in enumerate(instances):
            try:
                valid.append(lo.schema.model_validate(inst))
            except ValidationError as e:
                err = e.errors()[0]
                field = ".".join(["instances", str(i), *(str(p) for p in err["loc"])])
                msg = f"{field}: {err['msg']}"
                if err.get("type") != "missing" and "input" in err:
                    msg += f" (got {repr(err['input'])[:60]})"
                return {**_invalid(msg, field), "pid": self.pid}
        outs = await asyncio.gather(*(self._batched(v) for v in valid))
        return {"model": self.spec.name, "artifact": lo.artifact, "predictions": [o for o, _ in outs],
                "batch_size": max(n for _, n in outs), "pid": self.pid}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, instances: list[BaseModel]) -> list[tuple[dict[str, Any], int]]:
        lo = self._require()  # captured once: a reconfigure mid-batch does not mix weights
        out = await asyncio.to_thread(lo.family.predict, lo.model, lo.transform, instances)
        return [(o, len(instances)) for o in out]
