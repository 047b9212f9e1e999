"""The typed root config: dataclass sections, presets, YAML loading and ``--set`` overrides.

One ``Config`` flows unchanged from the CLI to the Ray job, the trainer and every worker
(as a plain dict via ``to_dict`` / ``from_dict``). Unknown keys and invalid values fail at load
time with a ``ConfigError`` that names the key and what would be valid.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import yaml


class ConfigError(ValueError):
    """A config key or value is invalid; the message names the key and what would be valid."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


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
        if self.family != "gpt" or self.params:
            # Families other than gpt own their settings; importing the registry costs torch.
            from modelfleet.models import get_family

            get_family(self.family).parse_params(self.params)
        for k in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
            _check(getattr(self, k) > 0, f"model.{k}", f"must be > 0, got {getattr(self, k)}")
        _check(self.n_embd % self.n_head == 0, "model.n_head",
               f"must divide model.n_embd={self.n_embd}, got {self.n_head}")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass(kw_only=True)
class DataConfig:
    sources: list[str] = field(default_factory=list)
    """Input files, directories or globs for ``modelfleet prepare``; ``stdlib:<glob>`` means
    files shipped with the Python installation (an offline corpus)."""
    path: str = ""
    """Prepared dataset directory (tokenized Parquet shards + meta.json) that training reads."""
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
        _check(0.0 < self.test_fraction < 0.5, "data.test_fraction",
               f"must be in (0, 0.5), got {self.test_fraction}")
        _check(0.0 < self.val_fraction < 0.5, "data.val_fraction",
               f"must be in (0, 0.5), got {self.val_fraction}")
        _check(self.rows_per_shard > 0, "data.rows_per_shard", f"must be > 0, got {self.rows_per_shard}")


@dataclass(kw_only=True)
class TrainConfig:
    num_workers: int = 2
    """Ray Train workers (one DeepSpeed rank each)."""
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
    max_failures: int = 0
    """Worker-group restarts Ray Train may do from the last complete checkpoint."""

    def __post_init__(self) -> None:
        for k in ("num_workers", "micro_batch_size", "grad_accum", "max_steps", "eval_batches",
                  "log_every", "keep_checkpoints"):
            _check(getattr(self, k) > 0, f"train.{k}", f"must be > 0, got {getattr(self, k)}")
        for k in ("warmup_steps", "eval_every", "checkpoint_every", "max_failures", "grad_clip",
                  "weight_decay"):
            _check(getattr(self, k) >= 0, f"train.{k}", f"must be >= 0, got {getattr(self, k)}")
        _check(self.cpus_per_worker > 0, "train.cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        _check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio",
               f"must be in [0, 1], got {self.min_lr_ratio}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas",
               f"must be two numbers in [0, 1), got {self.betas}")
        _check(self.precision == "fp32" or self.use_gpu, "train.precision",
               f"{self.precision} needs GPUs (train.use_gpu=true); on CPU use fp32")


@dataclass(kw_only=True)
class DeepSpeedConfig:
    zero_stage: int = 3
    """ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+gradients), 3 (+parameters)."""
    offload_optimizer: bool = False
    """Keep optimizer states on CPU (ZeRO 1-3; uses DeepSpeed's CPU Adam)."""
    offload_params: bool = False
    """Keep parameters on CPU (ZeRO-3 only)."""

    def __post_init__(self) -> None:
        _check(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage",
               f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        _check(not self.offload_optimizer or self.zero_stage >= 1, "deepspeed.offload_optimizer",
               "needs deepspeed.zero_stage >= 1 (ZeRO-0 has no optimizer partition to offload)")
        _check(not self.offload_params or self.zero_stage == 3, "deepspeed.offload_params",
               f"needs deepspeed.zero_stage=3, got zero_stage={self.zero_stage}")


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
        _check(bool(self.path), "storage.path", "must not be empty")
        _check("/" not in self.run_name and ".." not in self.run_name, "storage.run_name",
               f"must be a plain name without '/' or '..', got {self.run_name!r}")


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
    serve: dict[str, Any] = field(default_factory=dict)
    """Serving: a ``modelfleet.serve.ServeConfig`` mapping (models, autoscaling, HTTP, API key),
    validated by pydantic; empty when this config only trains."""

    def __post_init__(self) -> None:
        if self.serve:
            # Pydantic owns this section (a trust boundary); its errors name serve.<key path>.
            from modelfleet.serve.config import parse_serve_config

            parse_serve_config(self.serve)
        # Cross-section checks: settings that are each valid but cannot run together.
        for k in ("offload_optimizer", "offload_params"):
            _check(not getattr(self.deepspeed, k) or self.train.use_gpu, f"deepspeed.{k}",
                   "offloading to CPU needs GPU workers (train.use_gpu=true); on CPU workers the "
                   "states already live in CPU memory, so set it to false")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Config":
        return _build(cls, d, "")


# ---------------------------------------------------------------- presets
# Presets build on one another; each returns a fresh Config.

def tiny() -> Config:
    """Seconds on CPU: a 2-layer byte-level GPT on a slice of the Python stdlib."""
    return Config(
        preset="tiny",
        data=DataConfig(sources=["stdlib:json/*.py", "stdlib:email/*.py"], path="storage/data/tiny"),
    )


def small() -> Config:
    """Minutes on CPU: wider and deeper, more of the stdlib."""
    c = tiny()
    c.preset = "small"
    c.model = ModelConfig(n_layer=4, n_head=4, n_embd=256, block_size=256)
    c.data.sources = ["stdlib:*.py"]
    c.data.path = "storage/data/small"
    c.train.max_steps = 300
    c.train.eval_every = 50
    c.train.checkpoint_every = 100
    c.train.lr = 6e-4
    return c


def gpt2_124m() -> Config:
    """GPT-2 small (124M) for GPU clusters: bf16, ZeRO-2, one GPU per worker."""
    c = small()
    c.preset = "gpt2-124m"
    c.model = ModelConfig(vocab_size=264, n_layer=12, n_head=12, n_embd=768, block_size=1024)
    c.data.path = "storage/data/gpt2-124m"
    c.train = TrainConfig(num_workers=8, use_gpu=True, precision="bf16", micro_batch_size=16,
                          grad_accum=4, max_steps=5000, lr=6e-4, warmup_steps=200,
                          eval_every=250, checkpoint_every=500, activation_checkpointing=False)
    c.deepspeed = DeepSpeedConfig(zero_stage=2)
    return c


def gpt_1b() -> Config:
    """A ~1.3B-parameter GPT for multi-GPU nodes: bf16, ZeRO-3, activation checkpointing."""
    c = gpt2_124m()
    c.preset = "gpt-1b"
    c.model = ModelConfig(vocab_size=264, n_layer=24, n_head=16, n_embd=2048, block_size=2048)
    c.data.path = "storage/data/gpt-1b"
    c.train.micro_batch_size = 4
    c.train.grad_accum = 8
    c.train.lr = 2e-4
    c.train.activation_checkpointing = True
    c.deepspeed = DeepSpeedConfig(zero_stage=3)
    return c


def _family(preset: str, family: str, source: str, *, max_steps: int, lr: float,
            micro_batch_size: int = 32) -> Config:
    """A small-data family preset: ZeRO-3 on 2 CPU workers, one evaluation every 25 steps, a
    checkpoint only at the end (a run takes seconds; export needs just the last one)."""
    from modelfleet.models import get_family

    return Config(
        preset=preset,
        model=ModelConfig(family=family, params=get_family(family).default_params()),
        data=DataConfig(sources=[source], path=f"storage/data/{preset}", val_fraction=0.1),
        train=TrainConfig(micro_batch_size=micro_batch_size, max_steps=max_steps, lr=lr, warmup_steps=5,
                          weight_decay=0.0, eval_every=25, checkpoint_every=0, eval_batches=8),
        deepspeed=DeepSpeedConfig(zero_stage=3),
    )


def digits_cnn() -> Config:
    """28x28 digit images (scikit-learn's digits, resized) -> a small CNN classifier."""
    return _family("digits-cnn", "cnn", "sklearn:digits", max_steps=160, lr=3e-3)


def diabetes_linear() -> Config:
    """scikit-learn's diabetes table (missing values injected) -> linear regression."""
    c = _family("diabetes-linear", "linear", "sklearn:diabetes", max_steps=150, lr=0.03, micro_batch_size=16)
    c.model.params["minmax_columns"] = ["s1", "s2", "s3", "s4", "s5", "s6"]  # blood serum readings
    return c


def breast_cancer_linear() -> Config:
    """scikit-learn's breast-cancer table (missing values injected) -> logistic regression."""
    return _family("breast-cancer-linear", "linear", "sklearn:breast_cancer", max_steps=100, lr=0.03,
                   micro_batch_size=16)


def topics_lstm() -> Config:
    """Seeded topic sentences (a generator with learnable structure) -> an LSTM text classifier."""
    return _family("topics-lstm", "lstm", "synthetic:topics", max_steps=120, lr=5e-3)


def interactions_mf() -> Config:
    """Seeded user-item interactions from latent tastes -> a matrix-factorization recommender."""
    return _family("interactions-mf", "mf", "synthetic:interactions", max_steps=150, lr=2e-2, micro_batch_size=64)


PRESETS: dict[str, Callable[[], Config]] = {
    "tiny": tiny, "small": small, "gpt2-124m": gpt2_124m, "gpt-1b": gpt_1b,
    "digits-cnn": digits_cnn, "diabetes-linear": diabetes_linear,
    "breast-cancer-linear": breast_cancer_linear, "topics-lstm": topics_lstm,
    "interactions-mf": interactions_mf,
}


# ---------------------------------------------------------------- loading

def load_config(path: str | os.PathLike | None = None, *, preset: str | None = None,
                overrides: Sequence[str] = ()) -> Config:
    """Build a Config: preset (from ``--preset``, the YAML's ``preset:`` key, or ``tiny``), then
    the YAML file's sections, then ``key=value`` overrides; then validate everything."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping, got {type(loaded).__name__}")
        raw = loaded
    name = preset or raw.get("preset") or "tiny"
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    merged = _deep_merge(PRESETS[name]().to_dict(), {**raw, "preset": name}, "")
    for ov in overrides:
        key, sep, value = ov.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {ov!r} must look like section.key=value")
        _set_path(merged, key.strip(), yaml.safe_load(value) if value else "")
    cfg = Config.from_dict(merged)
    return resolve_paths(cfg, Path(path).parent if path is not None else Path.cwd())


def resolve_paths(cfg: Config, base: Path) -> Config:
    """Make local storage and data paths absolute (Ray needs an absolute storage_path).

    Relative paths resolve against the current directory, not the YAML's folder, so that
    ``storage/...`` in a preset means the same thing from the CLI and from a job.
    """
    del base  # kept in the signature: a YAML-relative mode may come later
    if "://" not in cfg.storage.path:
        cfg.storage.path = str(Path(cfg.storage.path).expanduser().resolve())
    if cfg.data.path and "://" not in cfg.data.path:
        cfg.data.path = str(Path(cfg.data.path).expanduser().resolve())
    return cfg


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        key = f"{prefix}{k}"
        if k not in base:
            raise ConfigError(f"{key}: unknown key; valid keys here: {', '.join(sorted(base))}")
        if isinstance(base[k], dict) and base[k] and isinstance(v, Mapping):
            out[k] = _deep_merge(base[k], v, f"{key}.")
        else:
            out[k] = v
    return out


def _set_path(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = d
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        if not isinstance(cur, dict) or part not in cur:
            valid = ", ".join(sorted(cur)) if isinstance(cur, dict) else "(none)"
            raise ConfigError(f"{here}: unknown key; valid keys here: {valid}")
        if i == len(parts) - 1:
            cur[part] = value
        else:
            cur = cur[part]


def _build(cls: type, d: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        k = sorted(unknown)[0]
        raise ConfigError(f"{prefix}{k}: unknown key; valid keys here: {', '.join(sorted(fields))}")
    kwargs = {k: _coerce(hints[k], v, f"{prefix}{k}") for k, v in d.items()}
    return cls(**kwargs)


def _coerce(tp: Any, v: Any, key: str) -> Any:
    """Check (and gently convert) a YAML value against a dataclass field's type hint."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, v, f"{key}.")
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        _check(v in choices, key, f"must be one of {', '.join(map(repr, choices))}, got {v!r}")
        return v
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if v is None:
            return None
        return _coerce(args[0], v, key)
    if origin is list:
        (item,) = typing.get_args(tp)
        _check(isinstance(v, (list, tuple)), key, f"must be a list, got {v!r}")
        return [_coerce(item, x, f"{key}[{i}]") for i, x in enumerate(v)]
    if origin is dict:
        _check(isinstance(v, Mapping), key, f"must be a mapping, got {v!r}")
        return dict(v)
    if tp is bool:
        _check(isinstance(v, bool), key, f"must be true or false, got {v!r}")
        return v
    if tp is int:
        _check(isinstance(v, int) and not isinstance(v, bool), key, f"must be an integer, got {v!r}")
        return v
    if tp is float:
        _check(isinstance(v, (int, float)) and not isinstance(v, bool), key, f"must be a number, got {v!r}")
        return float(v)
    if tp is str:
        _check(isinstance(v, str), key, f"must be a string, got {v!r}")
        return v
    return v
