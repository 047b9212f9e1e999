"""The typed root config: one dataclass per section, a docstring under every field.

One ``Config`` flows unchanged from the CLI to the Ray job, the trainer and every worker
(as a plain dict via ``to_dict`` / ``from_dict``). Unknown keys and invalid values fail at load
time with a ``ConfigError`` that names the key and what would be valid.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from modelfleet.config.coerce import build, check
from modelfleet.config.serve import ServeConfig, parse_serve_config


@dataclass(kw_only=True)
class ModelConfig:
    family: str = "gpt"
    """Model family from the registry in ``modelfleet.models`` (``gpt``, ``hf-causal-lm``, ``cnn``,
    ``lstm``, ``linear``, ``mf``). The fields below up to ``bias`` describe ``gpt``; other
    families read ``params``."""
    vocab_size: int = 264
    """Embedding rows; must be >= the tokenizer's vocabulary (byte tokenizer: 257, padded to 264)."""
    n_layer: int = 2
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads per block; must divide ``n_embd``."""
    n_embd: int = 128
    """Hidden width."""
    block_size: int = 128
    """Context length in tokens (training sequence length and serving limit)."""
    dropout: float = 0.0
    """Dropout probability in attention and MLP (0 for exact export checks)."""
    bias: bool = False
    """Use bias in Linear and LayerNorm layers."""
    params: dict[str, Any] = field(default_factory=dict)
    """Family-specific settings, checked by the family's own config dataclass (e.g. for ``cnn``:
    ``channels``, ``hidden``); empty for ``gpt``."""

    def __post_init__(self) -> None:
        for k in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
            check(getattr(self, k) > 0, f"model.{k}", f"must be > 0, got {getattr(self, k)}")
        check(
            self.n_embd % self.n_head == 0, "model.n_head", f"must divide model.n_embd={self.n_embd}, got {self.n_head}"
        )
        check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass(kw_only=True)
class DataConfig:
    sources: list[str] = field(default_factory=list)
    """Input files, directories or globs for ``modelfleet prepare``; ``stdlib:<glob>`` means
    files shipped with the Python installation (an offline corpus)."""
    path: str = ""
    """Prepared dataset directory (tokenized Parquet shards + meta.json) that training reads; empty
    means ``<storage.path>/data/<preset>``."""
    format: Literal["auto", "text", "jsonl", "parquet"] = "auto"
    """Input format; ``auto`` decides by file extension."""
    text_column: str = "text"
    """Column (Parquet) or key (JSONL) holding the text."""
    val_fraction: float = 0.05
    """Fraction of sequences held out for validation."""
    rows_per_shard: int = 4096
    """Sequences per Parquet shard."""
    seed: int = 0
    """Seed for the deterministic shuffle and split at prepare time."""
    test_fraction: float = 0.2
    """Fraction held out as the test split (datasets of families other than gpt); evaluation
    and quality gates read it, training never does."""

    def __post_init__(self) -> None:
        check(0.0 < self.test_fraction < 0.5, "data.test_fraction", f"must be in (0, 0.5), got {self.test_fraction}")
        check(0.0 < self.val_fraction < 0.5, "data.val_fraction", f"must be in (0, 0.5), got {self.val_fraction}")
        check(self.rows_per_shard > 0, "data.rows_per_shard", f"must be > 0, got {self.rows_per_shard}")


CHECKPOINT_MODES = ("async", "sync")


@dataclass(kw_only=True)
class TrainConfig:
    num_workers: int | list[int] = 2
    """Ray Train workers (one DeepSpeed rank each); ``[min, max]`` trains elastically: it starts
    with what the cluster has between min and max, continues from the last complete checkpoint
    with fewer workers when a node is lost and grows back when capacity returns (each resize
    is a ``resize`` record in metrics.jsonl; a checkpoint of another number of ranks is
    re-partitioned, a ``reshard`` record)."""
    elastic_batch: Literal["keep", "scale"] = "keep"
    """Elastic runs: ``keep`` the global batch of ``max`` workers (``micro_batch_size x grad_accum x
    max``) by recomputing grad_accum as ceil(global / (micro_batch_size x workers)), so with
    workers that do not divide it the batch rounds up (4 -> 3 workers, grad_accum 1: 2 micro-steps,
    6/4 of the batch); ``scale``: grad_accum stays and the global batch follows the workers."""
    elastic_resize_interval_s: float = 60.0
    """Elastic runs: how often Ray Train looks for capacity to grow back into."""
    use_gpu: bool = False
    """Give each worker a GPU (logical GPUs on a simulated cluster)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision; bf16/fp16 need GPUs."""
    micro_batch_size: int = 8
    """Sequences per worker per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    max_steps: int = 60
    """Optimizer steps to run."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor as a fraction of ``lr``."""
    warmup_steps: int = 5
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    grad_clip: float = 1.0
    """Gradient norm clipping (0 disables)."""
    activation_checkpointing: bool = False
    """Recompute block activations in backward to save memory."""
    seed: int = 1234
    """Seed for initialisation and dropout (same on every rank)."""
    eval_every: int = 20
    """Run validation every N steps (and at the end)."""
    eval_batches: int = 4
    """Validation micro-batches per worker per evaluation."""
    log_every: int = 1
    """Send step metrics to the driver every N steps."""
    checkpoint_every: int = 20
    """Save a checkpoint every N steps (and at the end); 0 saves only at the end."""
    keep_checkpoints: int = 3
    """Complete checkpoints to keep (older ones are deleted by Ray Train)."""
    checkpoint_mode: str = "async"
    """``async``: a save stops the step loop only to copy each rank's state to host memory; the
    files are written, uploaded and published (``COMPLETE``) in the background, and the next save
    waits only if that one is still in flight. ``sync``: every rank writes and uploads before the
    next step (train/checkpoint.py)."""
    max_failures: int = 0
    """Worker-group restarts Ray Train may do from the last complete checkpoint."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one worker's device that ``mfu`` in metrics.jsonl is measured against;
    0 takes the GPU's data-sheet peak for train.precision (H100, H200, A100, ...), and on CPU a
    matmul rate measured on the worker (the record's ``mfu_basis`` says which)."""
    gpu_memory_gib: float = 0.0
    """Memory of one worker GPU for the memory plan ``modelfleet train`` checks before launching GPU
    workers; 0 takes it from the cluster's accelerator type (H100, H200, L4, ...). Simulated GPUs
    skip the check; ``--no-plan`` skips it too."""

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, list)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, list) else self.num_workers

    def grad_accum_at(self, world: int) -> int:
        """Micro-steps per optimizer step with ``world`` workers (see ``elastic_batch``)."""
        if not self.elastic or self.elastic_batch == "scale":
            return self.grad_accum
        return -(-self.grad_accum * self.max_workers // world)  # ceil: the batch rounds up, never down

    def __post_init__(self) -> None:
        if isinstance(self.num_workers, list):
            check(
                len(self.num_workers) == 2 and 1 <= self.num_workers[0] <= self.num_workers[1],
                "train.num_workers",
                f"must be a worker count or [min, max] with 1 <= min <= max, got {self.num_workers}",
            )
        check(
            self.elastic_resize_interval_s > 0,
            "train.elastic_resize_interval_s",
            f"must be > 0, got {self.elastic_resize_interval_s}",
        )
        for k in ("micro_batch_size", "grad_accum", "max_steps", "eval_batches", "log_every", "keep_checkpoints"):
            check(getattr(self, k) > 0, f"train.{k}", f"must be > 0, got {getattr(self, k)}")
        check(self.min_workers > 0, "train.num_workers", f"must be > 0, got {self.num_workers}")
        for k in ("warmup_steps", "eval_every", "checkpoint_every", "max_failures", "grad_clip", "weight_decay"):
            check(getattr(self, k) >= 0, f"train.{k}", f"must be >= 0, got {getattr(self, k)}")
        check(
            self.checkpoint_mode in CHECKPOINT_MODES,
            "train.checkpoint_mode",
            f"must be one of {', '.join(CHECKPOINT_MODES)}, got {self.checkpoint_mode!r}",
        )
        check(self.cpus_per_worker > 0, "train.cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        check(self.peak_tflops >= 0, "train.peak_tflops", f"must be >= 0 (0 = from the device), got {self.peak_tflops}")
        check(
            self.gpu_memory_gib >= 0,
            "train.gpu_memory_gib",
            f"must be >= 0 (0 = from the accelerator type), got {self.gpu_memory_gib}",
        )
        check(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "train.betas",
            f"must be two numbers in [0, 1), got {self.betas}",
        )
        check(
            self.precision == "fp32" or self.use_gpu,
            "train.precision",
            f"{self.precision} needs GPUs (train.use_gpu=true); on CPU use fp32",
        )


@dataclass(kw_only=True)
class DeepSpeedConfig:
    zero_stage: int = 3
    """ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+gradients), 3 (+parameters)."""
    offload_optimizer: bool = False
    """Keep optimizer states on CPU (ZeRO 1-3; uses DeepSpeed's CPU Adam)."""
    offload_params: bool = False
    """Keep parameters on CPU (ZeRO-3 only)."""

    def __post_init__(self) -> None:
        check(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        check(
            not self.offload_optimizer or self.zero_stage >= 1,
            "deepspeed.offload_optimizer",
            "needs deepspeed.zero_stage >= 1 (ZeRO-0 has no optimizer partition to offload)",
        )
        check(
            not self.offload_params or self.zero_stage == 3,
            "deepspeed.offload_params",
            f"needs deepspeed.zero_stage=3, got zero_stage={self.zero_stage}",
        )


@dataclass(kw_only=True)
class StorageConfig:
    path: str = "storage"
    """Root for runs (checkpoints, metrics) and the model registry: a local dir, NFS/PVC mount,
    or a pyarrow.fs URI such as s3://bucket/prefix. Relative local paths resolve against the
    current directory at load time."""
    run_name: str = ""
    """Run id under ``<path>/runs/``; empty picks ``<preset>-<timestamp>``."""
    model_name: str = ""
    """Registry name for the exported artifact; empty uses the preset name."""

    def __post_init__(self) -> None:
        check(bool(self.path), "storage.path", "must not be empty")
        check(
            "/" not in self.run_name and ".." not in self.run_name,
            "storage.run_name",
            f"must be a plain name without '/' or '..', got {self.run_name!r}",
        )


def _tracking_default() -> bool:
    # Read once, where the config is built (the driver); workers get the resolved value in the dict.
    return os.environ.get("MODELFLEET_TRACKING", "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass(kw_only=True)
class TrackingConfig:
    enabled: bool = field(default_factory=_tracking_default)
    """Experiment tracking from the driver (TensorBoard event files and an MLflow run) when the
    ``tracking`` extra is installed; the default is true unless ``MODELFLEET_TRACKING=0`` is set
    (the test suite sets it). Without the extra it is off, saying so in one line."""
    tensorboard: bool = True
    """Write TensorBoard event files under ``<run dir>/tensorboard``."""
    mlflow: bool = True
    """Log the run to MLflow: params (the config), per-step metrics, the artifact's URI and sha256."""
    mlflow_uri: str = ""
    """MLflow tracking URI (``http://host:5000``, ``sqlite:///path.db``, ``databricks``); empty takes
    ``MLFLOW_TRACKING_URI`` as MLflow reads it, else a SQLite store ``<run dir>/mlflow/mlflow.db``
    (on object storage: written locally and uploaded with the run's files)."""
    experiment: str = "modelfleet"
    """MLflow experiment the runs go to (created when missing)."""

    def __post_init__(self) -> None:
        check(bool(self.experiment.strip()), "tracking.experiment", "must not be empty")
        check(
            not self.mlflow_uri or ":" in self.mlflow_uri or self.mlflow_uri == "databricks",
            "tracking.mlflow_uri",
            f"must be a URI such as http://127.0.0.1:5000 or sqlite:///mlflow.db, got {self.mlflow_uri!r}",
        )


@dataclass(kw_only=True)
class Config:
    preset: str = "tiny"
    """Preset the config was built from (informational; set by ``load_config``)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model architecture."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where the corpus comes from and where prepared shards live."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimisation loop and its workers."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """ZeRO sharding and offload."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Checkpoints, metrics and the artifact registry."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment tracking (TensorBoard, MLflow) from the driver."""
    serve: ServeConfig | None = None
    """Serving: models, autoscaling, HTTP and API key (``config/serve.py``), validated by pydantic
    at load time; None when this config only trains."""

    def __post_init__(self) -> None:
        if self.serve is not None and not isinstance(self.serve, ServeConfig):
            # Pydantic owns this section (a trust boundary); its errors name serve.<key path>.
            self.serve = parse_serve_config(self.serve)
        # Cross-section checks: settings that are each valid but cannot run together.
        for k in ("offload_optimizer", "offload_params"):
            check(
                not getattr(self.deepspeed, k) or self.train.use_gpu,
                f"deepspeed.{k}",
                "offloading to CPU needs GPU workers (train.use_gpu=true); on CPU workers the "
                "states already live in CPU memory, so set it to false",
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML/JSON-able): what travels to jobs, workers and manifests."""
        d = dataclasses.asdict(dataclasses.replace(self, serve=None))
        d["serve"] = self.serve.model_dump(exclude_unset=True) if self.serve is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Config:
        return build(cls, d, "")
