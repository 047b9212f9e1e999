"""The prediction deployment for families that are not language models (``cnn``, ``lstm``,
``linear``, ``mf``): ``POST /v1/models/{name}/predict`` with ``{"instances": [...]}``.

Each instance is validated against the family's typed schema (built from the artifact's
transform, e.g. a tabular record's columns); a bad field answers 422 naming
``instances.<i>.<field>``. Valid instances from concurrent requests share one forward pass
(``@serve.batch``) and go through the same fitted transform the model was trained with.
Loading, health and ``info`` come from ``ReplicaBase``.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ValidationError
from ray import serve

from modelfleet.config.serve import ModelSpec
from modelfleet.families import Family, get_family
from modelfleet.models.placement import OnDevice
from modelfleet.serve.protocol import Prediction, ReplicaError
from modelfleet.serve.replica import Loaded, ReplicaBase

MAX_INSTANCES = 256
"""Most instances one request may carry (bigger jobs belong to ``modelfleet evaluate``)."""


@dataclass(frozen=True)
class _Loaded(Loaded):
    family: Family
    schema: type[BaseModel]
    """One instance's request model, built from the artifact's transform."""


def _finite(obj: Any) -> bool:
    """Every float in a JSON-able prediction is finite (JSON has no inf or NaN)."""
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_finite(v) for v in obj)
    return True


class PredictReplica(ReplicaBase):
    """Serves one artifact of a non-LM family; the front calls ``predict`` and ``info``."""

    def __init__(self, spec: dict[str, Any] | ModelSpec, storage_path: str) -> None:
        super().__init__(spec, storage_path)
        # Serve builds the batch queue on first use, so these hold from the first request on.
        self._batched.set_max_batch_size(self.spec.batching.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.spec.batching.batch_wait_timeout_s)

    def _prepare(self, model: Any, preprocessor: Any, manifest: dict[str, Any], artifact: str) -> _Loaded:
        family = get_family(manifest["family"])
        if self.placement.device.type != "cpu" or self.placement.dtype != torch.float32:
            model = OnDevice(model, self.placement)  # the families feed CPU tensors and read CPU results
        return _Loaded(model, preprocessor, artifact, family, family.request_model(preprocessor))

    def _describe(self, lo: _Loaded) -> dict[str, Any]:
        return {
            "family": lo.family.name,
            "task": lo.family.task_of(lo.preprocessor),
            "schema": lo.schema.model_json_schema(),
        }

    async def predict(self, body: Any) -> Prediction | ReplicaError:
        """``{"instances": [...]}`` -> its predictions, or the error naming the field at fault."""
        lo: _Loaded = self._require()
        if not isinstance(body, dict) or set(body) != {"instances"}:
            extra = sorted(set(body) - {"instances"}) if isinstance(body, dict) else []
            if extra:
                return self._invalid(f'{extra[0]}: unknown field; the body is {{"instances": [...]}}', extra[0])
            return self._invalid('instances: field required; the body is {"instances": [...]}', "instances")
        instances = body["instances"]
        if not isinstance(instances, list) or not 1 <= len(instances) <= MAX_INSTANCES:
            return self._invalid(f"instances: must be a list of 1 to {MAX_INSTANCES} objects", "instances")
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
                return self._invalid(msg, field)
        outs = await asyncio.gather(*(self._batched(v) for v in valid))
        for i, (o, _) in enumerate(outs):
            if not _finite(o):
                return self._invalid(
                    f"instances.{i}: the model's output for this input is not a finite number "
                    "(a value far outside what the model was trained on)",
                    f"instances.{i}",
                )
        return Prediction(self.spec.name, lo.artifact, [o for o, _ in outs], max(n for _, n in outs), self.pid)

    def _invalid(self, message: str, param: str) -> ReplicaError:
        return self._error(422, message, param, "invalid_value")

    @serve.batch()  # sized from spec.batching in __init__
    async def _batched(self, instances: list[BaseModel]) -> list[tuple[dict[str, Any], int]]:
        lo: _Loaded = self._require()  # captured once: a reconfigure mid-batch does not mix weights
        self.m_batch.observe(len(instances))
        out = await asyncio.to_thread(lo.family.predict, lo.model, lo.preprocessor, instances)
        return [(o, len(instances)) for o in out]


Predictor = serve.deployment(PredictReplica)  # every option comes from the ModelSpec, in build_app
"""The model deployment behind the multi-model ``Ingress`` (single-model apps use ``PredictIngress``)."""
