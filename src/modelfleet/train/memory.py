"""Per-GPU memory plan for a training config, before anything launches (``modelfleet plan``).

Model states follow the ZeRO paper's accounting (Rajbhandari et al. 2020, section 3): with Adam
and mixed precision a parameter costs 2 bytes (16-bit weight) + 2 (16-bit gradient) + 12 (fp32
master, momentum, variance); stage 1 shards the 12, stage 2 also the gradient, stage 3 all 16.
In fp32 the weight and gradient cost 4 each and DeepSpeed keeps a separate fp32 master partition.
Two DeepSpeed buffers the paper leaves out are added: bf16's fp32 gradient accumulator and the
ZeRO-2 reduce bucket. Activations follow Korthikanti et al. 2022 (``34*s*b*h`` bytes per layer in
16-bit, SDPA's fused kernels keep no ``s*s`` scores); with activation checkpointing only each
block's input (``2*s*b*h``) stays, plus one block's full activations during its recompute.
``docs/benchmarks.md`` compares these predictions with peaks measured on an H100.

What is counted is the model the run trains (``ModelShape``): a LoRA run's frozen base holds its
16-bit weights (sharded at ZeRO-3) but no gradients, fp32 master or Adam moments (DeepSpeed gets
only the adapter's parameters), and ``hf-causal-lm`` is sized from the checkpoint's own
``config.json`` (hidden size, layers, vocabulary), not ``model.*``'s GPT defaults.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from modelfleet.config import Config
from modelfleet.errors import ConfigError
from modelfleet.families import build_model, get_family
from modelfleet.models.gpt import GPT
from modelfleet.models.hf import HFCausalLM, _transformers

GIB = 2**30
# DeepSpeed's default ZeRO-2 reduce bucket (elements) when the config does not set one.
REDUCE_BUCKET = 500_000_000
# CUDA context, allocator fragmentation and NCCL buffers: a fixed allowance per GPU.
RUNTIME_OVERHEAD = 1.5 * GIB
# Memory of one GPU by Ray's accelerator type (``accelerator_type:<T>`` node resources), for the
# pre-launch check when the driver cannot see the workers' GPUs. The smaller variant where a type
# comes in two sizes is not guessed: A100 is left out (set train.gpu_memory_gib).
ACCELERATOR_GIB = {"H100": 80.0, "H200": 141.0, "B200": 180.0, "L40S": 48.0, "L4": 24.0, "A10G": 24.0, "T4": 16.0}


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know of the model a run trains."""

    params: int
    """Parameters the ranks hold (each tied tensor once), frozen ones included."""
    trainable: int
    """Parameters with gradients and optimizer state (all of them unless LoRA freezes a base)."""
    n_layer: int
    hidden: int
    vocab: int
    seq: int
    """Training sequence length in tokens."""


def _architecture(cfg: Config) -> tuple[Any, int, int, int, int]:
    """The run's model built on the meta device (no memory, no weights read) and its (layers,
    hidden, vocab, seq). A LoRA run's base is this architecture: ``gpt`` checks at preflight
    that ``model.*`` equals the base artifact's, and ``hf-causal-lm``'s ``params.path`` is the
    checkpoint the base was trained from."""
    m = cfg.model
    family = get_family(m.family)
    lora_p = family.lora_params(m) if hasattr(family, "lora_params") else None
    if m.family == "hf-causal-lm":
        p = family.parse_params(m.params)
        hf_cfg = _transformers().AutoConfig.from_pretrained(p.path)
        model = HFCausalLM(_transformers().AutoModelForCausalLM.from_config(hf_cfg), p.block_size)
        dims = (hf_cfg.num_hidden_layers, hf_cfg.hidden_size, hf_cfg.vocab_size, p.block_size)
    else:
        model = GPT(m) if lora_p is not None else build_model(m)
        dims = (m.n_layer, m.n_embd, m.vocab_size, m.block_size)
    if lora_p is not None:
        model = family.with_lora(model, lora_p)
    return (model, *dims)


def model_shape(cfg: Config) -> ModelShape:
    """Counts of the model ``cfg`` trains, built on the meta device (gpt-1b would need 5 GB)."""
    import torch

    with torch.device("meta"):
        model, n_layer, hidden, vocab, seq = _architecture(cfg)
    unique = {id(p): p for p in model.parameters()}.values()
    return ModelShape(
        params=sum(p.numel() for p in unique),
        trainable=sum(p.numel() for p in unique if p.requires_grad),
        n_layer=n_layer,
        hidden=hidden,
        vocab=vocab,
        seq=seq,
    )


@dataclass
class MemoryPlan:
    params: int
    """Parameter count (each tied tensor once)."""
    trainable: int
    """Parameters with gradients and optimizer state (fewer than ``params`` for LoRA)."""
    world: int
    """Data-parallel ranks the states are sharded over."""
    weights: float
    grads: float
    optimizer: float
    buffers: float
    activations: float
    overhead: float
    capacity: float
    """Bytes of memory per GPU the plan is checked against."""

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.buffers + self.activations + self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total, "fits": self.fits}


def model_state_bytes(params: int, stage: int, world: int, precision: str) -> tuple[float, float, float]:
    """(weights, gradients, optimizer states) in bytes per rank, ZeRO-paper accounting."""
    half = precision in ("bf16", "fp16")
    w, g = (2.0, 2.0) if half else (4.0, 4.0)
    opt = 12.0  # fp32 master + Adam m + v (DeepSpeed keeps the fp32 master in fp32 training too)
    if stage == 0:
        opt -= 0 if half else 4.0  # plain data parallel in fp32: the weights are the master copy
    per = {
        0: (w, g, opt),
        1: (w, g, opt / world),
        2: (w, g / world, opt / world),
        3: (w / world, g / world, opt / world),
    }[stage]
    return tuple(params * b for b in per)  # type: ignore[return-value]


def activation_bytes(cfg: Config, shape: ModelShape) -> float:
    """Activation memory of one micro-batch per rank (forward kept for backward). A frozen base
    keeps the same activations: the adapters' gradients flow back through every block."""
    t = cfg.train
    s, b, h, L = shape.seq, t.micro_batch_size, shape.hidden, shape.n_layer
    elem = 2 if t.precision in ("bf16", "fp16") else 4
    per_layer = 34 * s * b * h * elem / 2  # Korthikanti's 34 counts 16-bit elements
    # Logits in the compute dtype plus the fp32 copy cross-entropy makes, and its gradient.
    logits = s * b * shape.vocab * (elem + 8)
    if t.activation_checkpointing:
        return L * s * b * h * elem + per_layer + logits
    return L * per_layer + logits


def plan(cfg: Config, *, gpu_memory_gib: float, shape: ModelShape | None = None) -> MemoryPlan:
    """Predict per-GPU memory for ``cfg`` on ``cfg.train.num_workers`` GPUs of ``gpu_memory_gib``
    (an elastic run at its minimum: the fewest ranks hold the largest shards)."""

    shape = shape or model_shape(cfg)
    params, trainable = shape.params, shape.trainable
    world, stage, prec = cfg.train.min_workers, cfg.deepspeed.zero_stage, cfg.train.precision
    weights, _, _ = model_state_bytes(params, stage, world, prec)
    # Frozen parameters: weights only (fp32 training keeps no separate master for them either).
    _, grads, opt = model_state_bytes(trainable, stage, world, prec)
    if cfg.deepspeed.offload_optimizer:
        opt = 0.0
    if cfg.deepspeed.offload_params:
        weights = 0.0
    buffers = 0.0
    if prec == "bf16":
        buffers += 4.0 * trainable / (world if stage >= 1 else 1)  # fp32 gradient accumulator
    if stage >= 2:
        buffers += min(REDUCE_BUCKET, trainable) * (2 if prec != "fp32" else 4)
    return MemoryPlan(
        params=params,
        trainable=trainable,
        world=world,
        weights=weights,
        grads=grads,
        optimizer=opt,
        buffers=buffers,
        activations=activation_bytes(cfg, shape),
        overhead=RUNTIME_OVERHEAD,
        capacity=gpu_memory_gib * GIB,
    )


def format_plan(p: MemoryPlan, cfg: Config) -> str:
    rows = [
        ("weights", p.weights),
        ("gradients", p.grads),
        ("optimizer states", p.optimizer),
        ("DeepSpeed buffers", p.buffers),
        ("activations", p.activations),
        ("runtime overhead", p.overhead),
        ("total per GPU", p.total),
        ("GPU memory", p.capacity),
    ]
    head = (
        f"{cfg.preset}: {p.params / 1e6:,.1f} M params"
        + (f" ({p.trainable / 1e6:,.2f} M trainable)" if p.trainable != p.params else "")
        + f", ZeRO-{cfg.deepspeed.zero_stage}, "
        f"{cfg.train.precision}, {p.world} GPUs, micro-batch {cfg.train.micro_batch_size} x "
        f"{cfg.model.block_size}, activation checkpointing "
        f"{'on' if cfg.train.activation_checkpointing else 'off'}"
    )
    return "\n".join([head, *(f"  {k:<18} {v / GIB:8.2f} GiB" for k, v in rows)])


def refusal(p: MemoryPlan, fix: str | None = None) -> str:
    """One sentence saying why a plan does not fit and what would make it fit."""
    levers = (
        "turn on train.activation_checkpointing, raise deepspeed.zero_stage or train.num_workers, lower "
        "train.micro_batch_size, or offload with deepspeed.offload_optimizer"
    )
    advice = (
        f"the cheapest change that fits: --set {fix} (or: {levers})"
        if fix
        else f"no single change fits; combine: {levers}"
    )
    return (
        f"train: the config needs about {p.total / GIB:.1f} GiB per GPU but a GPU has "
        f"{p.capacity / GIB:.1f} GiB; {advice}"
    )


def _changes(cfg: Config) -> list[tuple[str, Callable[[Config], None]]]:
    """Single-setting changes in order of what they cost a run (recompute < communication <
    smaller steps < more GPUs)."""
    t, out = cfg.train, []
    if not t.activation_checkpointing:
        out.append(
            ("train.activation_checkpointing=true", lambda c: setattr(c.train, "activation_checkpointing", True))
        )
    for stage in range(cfg.deepspeed.zero_stage + 1, 4):
        out.append((f"deepspeed.zero_stage={stage}", lambda c, s=stage: setattr(c.deepspeed, "zero_stage", s)))
    mbs = t.micro_batch_size // 2
    while mbs >= 1:  # the same global batch: accumulate more micro-steps
        out.append(
            (
                f"train.micro_batch_size={mbs} train.grad_accum={t.grad_accum * t.micro_batch_size // mbs}",
                lambda c, m=mbs: (
                    setattr(c.train, "grad_accum", c.train.grad_accum * c.train.micro_batch_size // m),
                    setattr(c.train, "micro_batch_size", m),
                ),
            )
        )
        mbs //= 2
    out.append((f"train.num_workers={2 * t.min_workers}", lambda c: setattr(c.train, "num_workers", 2 * t.min_workers)))
    return out


def cheapest_fix(cfg: Config, gpu_memory_gib: float, shape: ModelShape | None = None) -> str | None:
    """The first single change (in ``_changes`` order) whose plan fits, or None."""
    shape = shape or model_shape(cfg)
    for text, change in _changes(cfg):
        c = copy.deepcopy(cfg)
        change(c)
        if plan(c, gpu_memory_gib=gpu_memory_gib, shape=shape).fits:
            return text
    return None


def check_fits(cfg: Config, gpu_memory_gib: float) -> MemoryPlan:
    """The plan, or a ConfigError with its numbers and the cheapest change that would fit."""
    shape = model_shape(cfg)
    p = plan(cfg, gpu_memory_gib=gpu_memory_gib, shape=shape)
    if not p.fits:
        raise ConfigError(refusal(p, cheapest_fix(cfg, gpu_memory_gib, shape)))
    return p
