"""The model-family interface: everything the trainer, exporter, evaluator and Serve app ask of a
family, split by concern into ``DataHooks``, ``TrainHooks`` and ``ServeHooks``. A family is one
module with one ``Family`` subclass, plus one line in ``modelfleet.families.FAMILIES``.

The data flow a family plugs into: ``prepare`` writes raw and model-ready splits and a fitted
``transform.json`` (fitted on the training split only); workers ``collate`` Ray Data batches and
ask the family for the ``loss``; export checks ``forward`` against the live engine; serving and
evaluation load the same transform and call ``predict`` / ``predict_batch``, so a served request
goes through exactly the preprocessing the model was trained with.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel

from modelfleet import metrics
from modelfleet.config import Config, ModelConfig
from modelfleet.config.coerce import build
from modelfleet.data import families as family_data
from modelfleet.data.transform import Transform
from modelfleet.errors import ConfigError
from modelfleet.storage import dump_json


@dataclasses.dataclass(kw_only=True)
class NoParams:
    """A family without settings of its own."""


class DataHooks:
    """Preparing a dataset: sources, splits, the fitted transform, data-derived params."""

    # data
    def prepare(self, cfg: Config, *, overwrite: bool = False) -> dict[str, Any]:
        """Write the dataset (raw + model-ready splits, transform.json, meta.json) to data.path."""
        return family_data.prepare_family_dataset(self, cfg, overwrite=overwrite)

    def load_raw(self, source: str, seed: int) -> Any:
        """The whole raw table (pandas) for a ``data.sources`` entry."""
        return family_data.load_source(source, seed)

    def split(self, raw: Any, data: Any) -> dict[str, Any]:
        """Deterministic train/val/test split of the raw table (from ``data.seed``)."""
        return family_data.split_rows(raw, data)

    def fit_transform(self, train_raw: Any, cfg: ModelConfig) -> Transform:
        """Fit the preprocessing on the raw training split only."""
        raise NotImplementedError

    def task_of(self, transform: Transform) -> str:
        """The task this artifact solves (``linear`` does regression or classification)."""
        return self.task

    def eval_rows(self, raw: Any) -> Any:
        """Raw held-out rows -> the rows evaluation maps over (recommenders group by user)."""
        return raw

    def load_transform(self, state: dict[str, Any]) -> Transform:
        raise NotImplementedError

    def preflight(self, cfg: Config, meta: dict[str, Any]) -> None:
        """Fill data-derived params (``from_data``) and refuse ones that contradict the dataset."""
        if meta.get("family") != self.name:
            raise ConfigError(
                f"data.path: {cfg.data.path} was prepared for family {meta.get('family')!r}, "
                f"not model.family={self.name!r}; run `modelfleet prepare` with this config"
            )
        for key in self.from_data:
            have, want = cfg.model.params.get(key, 0), meta[key]
            if have not in (0, want):
                raise ConfigError(
                    f"model.params.{key}: {have} does not match the dataset's {want}; "
                    "set it to 0 to take it from the data"
                )
            cfg.model.params[key] = want

    # artifacts
    def write_preprocessor(self, out_dir: str, cfg: Config, transform: dict[str, Any] | None) -> dict[str, Any]:
        """Save what turns raw input into model input beside the weights; returns manifest keys."""
        if transform is None:
            raise ConfigError(f"model.family {self.name!r}: an artifact needs the fitted transform.json of its dataset")
        dump_json(out_dir, "transform.json", transform)
        return {"transform": "transform.json"}

    def load_preprocessor(self, local_dir: str, manifest: dict[str, Any]) -> Any:
        """The inverse of ``write_preprocessor`` (a tokenizer or a fitted ``Transform``)."""
        with open(os.path.join(local_dir, "transform.json")) as f:
            return self.load_transform(json.load(f))

    def write_extra(self, model: Any, cfg: Config, out_dir: str) -> None:
        """Extra artifact files (``hf-causal-lm`` writes a Hugging Face copy); none by default."""


class TrainHooks:
    """The worker loop's side: batches to tensors, the loss, the export probe."""

    # training
    def collate(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Ray Data numpy batch -> tensors for ``loss`` / ``forward``."""
        import torch

        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}

    def loss(self, model: Any, batch: dict[str, Any]) -> Any:
        raise NotImplementedError

    def forward(self, model: Any, batch: dict[str, Any]) -> Any:
        """The outputs export compares between the live engine and the consolidated artifact."""
        raise NotImplementedError

    def build_sharded(self, cfg: ModelConfig, ds_config: dict[str, Any]) -> Any:
        """ZeRO-3: the model built under ``deepspeed.zero.Init``, so each rank materialises only its
        partition of every parameter (the largest trainable model is bounded by the cluster, not by
        one worker). Families whose initialisation writes whole tensors after construction
        override this to run those writes gathered."""
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            return self.build(cfg)

    def probe(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A fixed small input (2 rows) for the export check; targets are not needed."""
        return {k: v[:2].contiguous() for k, v in batch.items() if k != "y"}

    def units_per_sample(self, cfg: Config) -> int:
        """What the progress line counts per sample (tokens for LMs, 1 otherwise)."""
        return 1

    def lora_params(self, cfg: ModelConfig) -> Any:
        """``model.params.lora`` when the run trains a LoRA adapter only (LM families)."""
        return None


class ServeHooks:
    """Serving and evaluation: request schemas, predictions, metrics."""

    # serving and evaluation
    def request_model(self, transform: Transform) -> type[BaseModel]:
        """The pydantic schema of one instance in ``POST /v1/models/{name}/predict``."""
        raise NotImplementedError

    def predict(self, model: Any, transform: Transform, instances: list[BaseModel]) -> list[dict[str, Any]]:
        """Validated instances -> one JSON-able prediction each (one batched forward)."""
        raise NotImplementedError

    def predict_batch(self, model: Any, transform: Transform, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Raw evaluation rows -> prediction columns (the evaluation's map_batches UDF)."""
        raise NotImplementedError

    def metrics(self, results: dict[str, np.ndarray], transform: Transform) -> dict[str, Any]:
        """Metrics from the collected ``predict_batch`` columns."""
        return metrics.metrics_for(self.task_of(transform), results, transform)


class Family(DataHooks, TrainHooks, ServeHooks):
    """Base class: the defaults fit a family whose batches are dicts of equal-length arrays."""

    name: ClassVar[str]
    task: ClassVar[str]
    """``lm``, ``classification``, ``regression`` or ``recommendation`` (picks the metrics)."""
    Params: ClassVar[type] = NoParams
    """The kw_only dataclass that ``model.params`` must fit (a docstring under every field)."""
    primary_metric: ClassVar[str] = "loss"
    """The metric k-fold reports first and ``--if-better`` defaults to."""
    serves_openai: ClassVar[bool] = False
    """True for language models: served by the OpenAI-compatible LMServer, not by Predictor."""
    needs_ray_to_prepare: ClassVar[bool] = True
    """``prepare`` applies the fitted transform with Ray Data (the caller connects first)."""
    cache_epochs: ClassVar[bool] = True
    """Keep each worker's training shard in memory after the first pass (small tables that
    train for many epochs); language-model corpora stream every epoch."""
    from_data: ClassVar[tuple[str, ...]] = ()
    """``params`` keys filled from the prepared dataset's meta when 0 (sizes the data decides)."""

    # config
    def default_params(self) -> dict[str, Any]:
        return dataclasses.asdict(self.Params())

    def parse_params(self, params: dict[str, Any]) -> Any:
        """The typed params; unknown keys and bad values raise ConfigError naming model.params.<key>."""
        return build(self.Params, params, "model.params.")

    def build(self, cfg: ModelConfig) -> Any:
        raise NotImplementedError

    def build_for_artifact(self, cfg: ModelConfig, local_dir: str) -> Any:
        """The model an artifact's weights load into (``hf-causal-lm`` reads its own config)."""
        return self.build(cfg)


def classify(logits: Any, classes: list[str]) -> list[dict[str, Any]]:
    """Classifier outputs -> ``{label, class_id, probabilities}`` per row."""
    import torch

    probs = torch.softmax(logits.float(), dim=-1)
    return [
        {
            "label": classes[int(p.argmax())],
            "class_id": int(p.argmax()),
            "probabilities": {c: round(float(v), 6) for c, v in zip(classes, p)},
        }
        for p in probs
    ]


def instances_frame(instances: list[BaseModel]) -> dict[str, np.ndarray]:
    """Validated request instances -> raw columns, as evaluation reads them from Parquet."""
    rows = [i.model_dump() for i in instances]
    return {
        k: np.array([r[k] for r in rows], dtype=object if isinstance(rows[0][k], (str, type(None))) else None)
        for k in rows[0]
    }
