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
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

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
