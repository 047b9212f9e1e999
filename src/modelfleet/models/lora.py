"""LoRA adapters through Hugging Face ``peft``: the settings (``model.params.lora``), wrapping a
model for adapter-only training, and per-row adapter selection for serving.

Training wraps the model (our ``GPT``, or the ``transformers`` model inside ``HFCausalLM``) with
``peft.get_peft_model``: the base is frozen and only the low-rank ``lora_A``/``lora_B`` matrices
train. Serving keeps one base and many adapters in one ``PeftModel`` (``load_adapter`` /
``delete_adapter``); ``adapter_rows`` makes each row of a batched forward use its own adapter
(peft's mixed-batch forward: rows are grouped per adapter inside every LoRA layer), so requests
for different adapters of one base share a decode step.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modelfleet.errors import ConfigError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
"""peft's file of the adapter's tensors (``save_pretrained``)."""
ADAPTER_CONFIG = "adapter_config.json"
BASE_ROW = "__base__"
"""peft's name for "no adapter" in a mixed batch: the row runs on the base weights alone."""


def peft() -> Any:
    try:
        import peft as _peft
    except ImportError:
        raise ConfigError(
            "model.params.lora: LoRA needs peft; install the extra with `pip install 'modelfleet[hf]'`"
        ) from None
    return _peft


@dataclass(kw_only=True)
class LoraParams:
    base: str = ""
    """The artifact the adapter trains over (registry ``name``, ``name@vN``, or a path/URI); its
    weights stay frozen. Resolved to a fixed version when training starts."""
    r: int = 8
    """Rank of the low-rank update."""
    alpha: float = 16.0
    """Scale of the update (peft's ``lora_alpha``; the update is multiplied by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter's input while training."""
    target_modules: list[str] = field(default_factory=list)
    """Names of the Linear layers that get an adapter; empty = the family's default."""
    base_ref: str = ""
    """Filled when training starts: ``name@vN`` of ``base`` (``base`` becomes its URI)."""
    base_sha256: str = ""
    """Filled when training starts: the base's weights sha256 (a pool refuses other bases)."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"model.params.lora.r: must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"model.params.lora.alpha: must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.params.lora.dropout: must be in [0, 1), got {self.dropout}")
        if not self.base:
            raise ConfigError(
                "model.params.lora.base: is empty; name the artifact the adapter trains over (e.g. base: tiny@v1)"
            )


def lora_config(p: LoraParams, default_targets: list[str] | None) -> Any:
    targets = p.target_modules or default_targets
    return peft().LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules=targets, bias="none")


def wrap(model: nn.Module, p: LoraParams, default_targets: list[str] | None) -> Any:
    """``model`` as a ``PeftModel`` whose only trainable parameters are the adapter's."""
    try:
        return peft().get_peft_model(model, lora_config(p, default_targets))
    except ValueError as e:  # peft names the target modules it could not find
        raise ConfigError(f"model.params.lora.target_modules: {e}") from None


def trainable_state(model: nn.Module) -> dict[str, Any]:
    """The parameters that train (the adapter's), by name: what an adapter checkpoint holds."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- serving: one adapter per row
_rows = threading.local()


def _inject(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    names = getattr(_rows, "names", None)
    if names is not None:
        kwargs["adapter_names"] = names
    return args, kwargs


def install_row_hooks(model: nn.Module) -> None:
    """A forward pre-hook on every LoRA layer that passes the rows' adapter names (set by
    ``adapter_rows``) to peft's mixed-batch forward. Idempotent; call after loading an adapter
    (an adapter that targets new layers adds LoRA layers)."""
    from peft.tuners.lora import LoraLayer

    for m in model.modules():
        if isinstance(m, LoraLayer) and not getattr(m, "_mf_rows_hook", False):
            m.register_forward_pre_hook(_inject, with_kwargs=True)
            m._mf_rows_hook = True


@contextlib.contextmanager
def adapter_rows(names: list[str] | None) -> Iterator[None]:
    """Within this block (on this thread), row ``i`` of every forward uses adapter ``names[i]``
    (``BASE_ROW``: none). ``None`` leaves peft's active adapter in charge."""
    old = getattr(_rows, "names", None)
    _rows.names = names
    try:
        yield
    finally:
        _rows.names = old


def current_rows() -> list[str] | None:
    """The adapter names ``adapter_rows`` set on this thread (a per-row forward slices them)."""
    return getattr(_rows, "names", None)


# ---------------------------------------------------------------- serving: what an adapter may be
MAX_RANK = 256
"""The largest ``r`` a served adapter may have (memory per adapter grows with it)."""
MAX_ALPHA = 4096.0
_FLOAT_DTYPES = {"F32", "F16", "BF16"}
_CHECKED = {"peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias", "fan_in_fan_out"}
_INERT: dict[str, tuple[Any, ...]] = {
    # Keys peft writes whose only admitted values leave the base and the rank bound alone;
    # any other value rewrites tensors every row shares (bias, modules_to_save, DoRA, layer
    # replication, trainable tokens), escapes the rank bound (rank/alpha patterns) or changes
    # the base at load (PiSSA/OLoRA/CorDA/EVA/LoftQ initialisation).
    "alora_invocation_tokens": (None,),
    "alpha_pattern": ({},),
    "rank_pattern": ({},),
    "arrow_config": (None,),
    "corda_config": (None,),
    "eva_config": (None,),
    "kasa_config": (None,),
    "lora_ga_config": (None,),
    "monteclora_config": (None,),
    "velora_config": (None,),
    "loftq_config": ({}, None),
    "megatron_config": (None,),
    "ensure_weight_tying": (False,),
    "exclude_modules": (None,),
    "init_lora_weights": (True, False),
    "layer_replication": (None,),
    "layers_pattern": (None,),
    "layers_to_transform": (None,),
    "lora_bias": (False,),
    "modules_to_save": (None, []),
    "target_parameters": (None,),
    "trainable_token_indices": (None,),
    "use_bdlora": (None, False),
    "use_dora": (False,),
    "use_qalora": (False,),
    "use_rslora": (False,),
    "task_type": (None, "CAUSAL_LM"),
    "inference_mode": (True, False),
}
_FREE = {"auto_mapping", "base_model_name_or_path", "revision", "peft_version", "megatron_core", "qalora_group_size"}
"""Metadata peft writes that does not change what loading does (``qalora_group_size`` only
matters with ``use_qalora``, which must be false; ``megatron_core`` only with a megatron_config)."""


def check_adapter_config(conf: dict[str, Any], targets: list[str] | None, source: str) -> None:
    """An adapter's ``adapter_config.json`` admits only plain LoRA on the family's target layers
    (an allowlist: an unknown key is refused too)."""

    def bad(key: str, valid: str) -> ConfigError:
        return ConfigError(f"adapter {source!r}: adapter_config.json {key}={str(conf.get(key))[:80]!r}; {valid}")

    for key in conf:
        if key not in _CHECKED and key not in _INERT and key not in _FREE:
            raise ConfigError(f"adapter {source!r}: adapter_config.json key {key[:80]!r} is not allowed")
    for key, allowed in _INERT.items():
        if key in conf and not any(conf[key] == a and type(conf[key]) is type(a) for a in allowed):
            raise bad(key, f"valid: {' or '.join(repr(a) for a in allowed)}")
    if conf.get("peft_type") != "LORA":
        raise bad("peft_type", "only 'LORA' adapters are served")
    r = conf.get("r")
    if type(r) is not int or not 1 <= r <= MAX_RANK:
        raise bad("r", f"valid: an integer in [1, {MAX_RANK}]")
    alpha = conf.get("lora_alpha")
    if type(alpha) not in (int, float) or not 0 < alpha <= MAX_ALPHA:
        raise bad("lora_alpha", f"valid: a number in (0, {MAX_ALPHA:g}]")
    dropout = conf.get("lora_dropout", 0.0)
    if type(dropout) not in (int, float) or not 0 <= dropout < 1:
        raise bad("lora_dropout", "valid: a number in [0, 1)")
    if conf.get("bias", "none") != "none":
        raise bad("bias", "valid: 'none' (a bias is shared by every row)")
    if type(conf.get("fan_in_fan_out", False)) is not bool:
        raise bad("fan_in_fan_out", "valid: true or false")
    mods = conf.get("target_modules")
    if not isinstance(mods, list) or not mods or not all(isinstance(m, str) for m in mods):
        raise bad("target_modules", "valid: a non-empty list of layer names")
    if targets is not None and not set(mods) <= set(targets):
        raise bad("target_modules", f"valid: names among the family's LoRA layers {sorted(targets)}")


def check_adapter_tensors(weights: str, root: nn.Module, conf: dict[str, Any], source: str) -> None:
    """Every tensor of ``weights`` is a ``lora_A``/``lora_B`` matrix of rank ``r`` on a target
    layer that exists in ``root`` (the peft root of the base), with the layer's shape, a float
    dtype and finite values; checked before anything is put on the model."""
    from safetensors import safe_open

    r, targets = conf["r"], set(conf["target_modules"])
    plain = root.base_model.model if isinstance(root, peft().PeftModel) else root
    seen = 0
    with safe_open(weights, framework="pt") as f:
        for key in f.keys():
            where = f"adapter {source!r}: tensor {key[:120]!r}"
            m = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A|lora_B)\.weight", key)
            if not m or m.group(1).rsplit(".", 1)[-1] not in targets:
                raise ConfigError(f"{where} is not a lora_A/lora_B weight of a target layer {sorted(targets)}")
            try:
                layer = plain.get_submodule(m.group(1))
            except AttributeError:
                raise ConfigError(f"{where} names a layer the base does not have") from None
            base_layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
            w = getattr(base_layer, "weight", None)
            if w is None or w.dim() != 2:
                raise ConfigError(f"{where}: the base layer {m.group(1)!r} has no 2-D weight")
            out_f, in_f = (w.shape[1], w.shape[0]) if conf.get("fan_in_fan_out") else tuple(w.shape)
            want = (r, in_f) if m.group(2) == "lora_A" else (out_f, r)
            sl = f.get_slice(key)
            if tuple(sl.get_shape()) != want or sl.get_dtype() not in _FLOAT_DTYPES:
                raise ConfigError(
                    f"{where}: shape {tuple(sl.get_shape())} {sl.get_dtype()}; valid: {want} in {sorted(_FLOAT_DTYPES)}"
                )
            if not bool(torch.isfinite(f.get_tensor(key)).all()):
                raise ConfigError(f"{where} has non-finite values")
            seen += 1
    if seen == 0:
        raise ConfigError(f"adapter {source!r}: {ADAPTER_WEIGHTS} holds no tensors")


def uninject(root: nn.Module) -> None:
    """Put every LoRA-wrapped layer of ``root`` back to its base layer: what a first adapter load
    that failed half-way (``PeftModel.from_pretrained`` wraps the base in place) leaves behind."""
    from peft.tuners.lora import LoraLayer

    for name, m in list(root.named_modules()):
        if isinstance(m, LoraLayer) and name:
            parent, _, child = name.rpartition(".")
            setattr(root.get_submodule(parent) if parent else root, child, m.get_base_layer())
