"""Named presets: Python functions that build on one another (``tiny`` -> ``small`` ->
``gpt2-124m`` -> ``gpt-1b``; one per task family), and ``load_config``, which starts from one.

Presets sit above the config schema and the families (a family preset asks its family for
default params), so ``config/`` stays a leaf. An empty ``data.path`` means the storage layout's
``data/<preset>`` (see ``config.load.resolve_paths``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from modelfleet.config import Config, DataConfig, DeepSpeedConfig, ModelConfig, TrainConfig
from modelfleet.config import load as _load
from modelfleet.families import check_config, get_family


def tiny() -> Config:
    """Seconds on CPU: a 2-layer byte-level GPT on a slice of the Python stdlib."""
    return Config(
        preset="tiny",
        data=DataConfig(sources=["stdlib:json/*.py", "stdlib:email/*.py"]),
    )


def small() -> Config:
    """Minutes on CPU: wider and deeper, more of the stdlib."""
    c = tiny()
    c.preset = "small"
    c.model = ModelConfig(n_layer=4, n_head=4, n_embd=256, block_size=256)
    c.data.sources = ["stdlib:*.py"]
    c.train.max_steps = 300
    c.train.eval_every = 50
    c.train.checkpoint_every = 100
    c.train.lr = 6e-4
    return c


def bench_lm() -> Config:
    """The serving benchmarks' language model: ``small``'s 4 layers x 256 width with a 1,024-token
    context (long enough for shared system prompts and 512-token decodes)."""
    c = small()
    c.preset = "bench-lm"
    c.model = ModelConfig(n_layer=4, n_head=4, n_embd=256, block_size=1024)
    return c


def gpt2_124m() -> Config:
    """GPT-2 small (124M) for GPU clusters: bf16, ZeRO-2, one GPU per worker."""
    c = small()
    c.preset = "gpt2-124m"
    c.model = ModelConfig(vocab_size=264, n_layer=12, n_head=12, n_embd=768, block_size=1024)
    c.train = TrainConfig(
        num_workers=8,
        use_gpu=True,
        precision="bf16",
        micro_batch_size=16,
        grad_accum=4,
        max_steps=5000,
        lr=6e-4,
        warmup_steps=200,
        eval_every=250,
        checkpoint_every=500,
        activation_checkpointing=False,
    )
    c.deepspeed = DeepSpeedConfig(zero_stage=2)
    return c


def gpt_1b() -> Config:
    """A ~1.3B-parameter GPT for multi-GPU nodes: bf16, ZeRO-3, activation checkpointing."""
    c = gpt2_124m()
    c.preset = "gpt-1b"
    c.model = ModelConfig(vocab_size=264, n_layer=24, n_head=16, n_embd=2048, block_size=2048)
    c.train.micro_batch_size = 4
    c.train.grad_accum = 8
    c.train.lr = 2e-4
    c.train.activation_checkpointing = True
    c.deepspeed = DeepSpeedConfig(zero_stage=3)
    return c


def _family(preset: str, family: str, source: str, *, max_steps: int, lr: float, micro_batch_size: int = 32) -> Config:
    """A small-data family preset: ZeRO-3 on 2 CPU workers, one evaluation every 25 steps, a
    checkpoint only at the end (a run takes seconds; export needs just the last one)."""
    return Config(
        preset=preset,
        model=ModelConfig(family=family, params=get_family(family).default_params()),
        data=DataConfig(sources=[source], val_fraction=0.1),
        train=TrainConfig(
            micro_batch_size=micro_batch_size,
            max_steps=max_steps,
            lr=lr,
            warmup_steps=5,
            weight_decay=0.0,
            eval_every=25,
            checkpoint_every=0,
            eval_batches=8,
        ),
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
    return _family(
        "breast-cancer-linear", "linear", "sklearn:breast_cancer", max_steps=100, lr=0.03, micro_batch_size=16
    )


def topics_lstm() -> Config:
    """Seeded topic sentences (a generator with learnable structure) -> an LSTM text classifier."""
    return _family("topics-lstm", "lstm", "synthetic:topics", max_steps=120, lr=5e-3)


def interactions_mf() -> Config:
    """Seeded user-item interactions from latent tastes -> a matrix-factorization recommender."""
    return _family("interactions-mf", "mf", "synthetic:interactions", max_steps=150, lr=2e-2, micro_batch_size=64)


PRESETS: dict[str, Callable[[], Config]] = {
    "tiny": tiny,
    "small": small,
    "gpt2-124m": gpt2_124m,
    "gpt-1b": gpt_1b,
    "digits-cnn": digits_cnn,
    "diabetes-linear": diabetes_linear,
    "breast-cancer-linear": breast_cancer_linear,
    "topics-lstm": topics_lstm,
    "interactions-mf": interactions_mf,
    "bench-lm": bench_lm,
}


def load_config(
    path: str | os.PathLike | None = None, *, preset: str | None = None, overrides: Sequence[str] = ()
) -> Config:
    """Build a Config: preset (from ``--preset``, the YAML's ``preset:`` key, or ``tiny``), then
    the YAML file's sections, then ``key=value`` overrides; then validate everything, the
    family's own ``model.params`` included."""
    return check_config(_load.load_config(path, presets=PRESETS, preset=preset, overrides=overrides))
