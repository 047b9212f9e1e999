"""The ``hf-causal-lm`` family: a Hugging Face causal LM (GPT-2, Llama, ... anything
``AutoModelForCausalLM`` loads) from a local directory, fine-tuned through the same Ray Train +
DeepSpeed loop, exported in our artifact layout *and* in Hugging Face format (``hf/``:
safetensors + config + tokenizer), served through the OpenAI-compatible API with its own
tokenizer. Needs the ``hf`` extra (``pip install 'modelfleet[hf]'``); nothing is downloaded.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modelfleet.errors import ConfigError
from modelfleet.models.lora import LoraParams, adapter_rows, current_rows
from modelfleet.models.paged_kv import PagedKVCache

HF_DIR = "hf"
"""Artifact subdirectory holding the Hugging Face copy (``from_pretrained`` loads it)."""


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "model.family: hf-causal-lm needs transformers; install the extra with `pip install 'modelfleet[hf]'`"
        ) from None
    transformers.logging.set_verbosity_error()
    if PAGED_ATTENTION not in transformers.AttentionInterface._global_mapping:
        transformers.AttentionInterface.register(PAGED_ATTENTION, _paged_attention)
    return transformers


@dataclass(kw_only=True)
class HFParams:
    path: str = ""
    """Local directory with a Hugging Face causal LM and its tokenizer (``save_pretrained`` layout)."""
    block_size: int = 64
    """Training sequence length in tokens (at most the model's maximum positions)."""
    lora: LoraParams | None = None
    """LoRA fine-tuning over a base artifact of this family instead of training every weight
    (``path`` then only names the tokenizer's origin; the weights come from ``lora.base``)."""


class _Cache:
    """The serving KV cache: Hugging Face's ``past_key_values`` plus the filled length."""

    def __init__(self) -> None:
        self.pkv: Any = None
        self.length = 0


class _SlotCache:
    """Continuous-batching slots for a Hugging Face model: one ``past_key_values`` per slot.

    Hugging Face caches hold one length per batch, so rows of different lengths cannot share one;
    ``forward_slots`` runs each row against its own cache (a forward per row per step). Batching
    those forwards needs a paged-attention kernel, which this family does not ship."""

    def __init__(self, num_slots: int, max_len: int) -> None:
        self.pkv: list[Any] = [None] * num_slots
        self.max_len = max_len
        self.nbytes = 0  # grows per sequence; not preallocated

    @property
    def num_slots(self) -> int:
        return len(self.pkv)

    def reset(self, slot: int) -> None:
        self.pkv[slot] = None


PAGED_ATTENTION = "modelfleet_paged"
"""The attention function registered with transformers' ``AttentionInterface`` for paged serving."""
PAGED_MODEL_TYPES = ("gpt2", "llama")
"""Architectures whose attention modules the paged path is tested against (tests/unit/test_hf_paged.py);
other models keep the per-row path."""
_paged = threading.local()  # the cache of the paged forward running on this thread


def _paged_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, **kwargs: Any
) -> tuple[Tensor, None]:
    """transformers' attention-function contract over our paged cache: the step's N tokens come as
    N one-token rows (``[N, H, 1, D]``, keys after RoPE where the model has it); returns
    ``[N, 1, H, D]``. The model's own modules keep every projection, norm, RoPE variant and
    peft's LoRA wrappers; only softmax(QK^T)V is ours. ``attention_mask`` is ignored: the cache's
    per-sequence causal mask replaces it."""
    cache: PagedKVCache = _paged.cache
    q, k, v = (t.transpose(0, 2) for t in (query, key, value))  # [1, H, N, D]
    y = cache.attend(
        module.layer_idx,
        q,
        k,
        v,
        scale=kwargs.get("scaling"),
        upcast=bool(getattr(module, "reorder_and_upcast_attn", False)),
    )
    return y[0].transpose(0, 1)[:, None], None


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM behind the interface of our GPT (logits, loss, KV-cache decoding),
    so the training loop, export and the batched generator use it unchanged."""

    def __init__(self, hf: nn.Module, block_size: int) -> None:
        super().__init__()
        self.hf = hf
        limit = getattr(hf.config, "max_position_embeddings", None) or getattr(hf.config, "n_positions", block_size)
        self.cfg = SimpleNamespace(block_size=int(limit), train_block_size=block_size)

    def new_cache(self, batch_size: int, max_len: int, dtype: Any = None, device: Any = None) -> _Cache:
        return _Cache()

    @property
    def supports_paged(self) -> bool:
        """This architecture runs through the paged engine (one forward for all rows per step)."""
        return getattr(self.hf.config, "model_type", "") in PAGED_MODEL_TYPES

    def new_paged_cache(self, num_blocks: int, block_size: int, dtype: Any = None, device: Any = None) -> PagedKVCache:
        c = self.hf.config
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        param = next(self.hf.parameters())
        return PagedKVCache(
            n_layer=c.num_hidden_layers,
            num_blocks=num_blocks,
            block_size=block_size,
            n_head=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            dtype=dtype or param.dtype,
            device=device or param.device,
        )

    def forward_paged(
        self, ids: Tensor, cache: PagedKVCache, tables: list[list[int]], starts: list[int], lens: list[int]
    ) -> Tensor:
        """Logits ``[B, vocab]`` at each sequence's last new token (the contract of ``GPT.forward_paged``)."""
        _transformers()  # registers the attention function once
        if max(s + n for s, n in zip(starts, lens)) > self.cfg.block_size:
            raise ValueError(f"a sequence runs past the model's {self.cfg.block_size}-token context")
        pos = cache.prepare(tables, starts, lens)
        config, before = self.hf.config, self.hf.config._attn_implementation
        _paged.cache, config._attn_implementation = cache, PAGED_ATTENTION
        try:
            out = self.hf(input_ids=ids[:, None], position_ids=pos[:, None], use_cache=False)
        finally:
            _paged.cache, config._attn_implementation = None, before
        return out.logits[cache.last_token_index, 0]

    def new_slot_cache(self, num_slots: int, max_len: int, dtype: Any = None, device: Any = None) -> _SlotCache:
        return _SlotCache(num_slots, max_len)

    def forward_slots(self, idx: Tensor, cache: _SlotCache, slots: list[int], starts: list[int]) -> Tensor:
        """Logits ``[B, T, vocab]``, each row continuing its own slot's sequence (see ``_SlotCache``)."""
        out, rows = [], current_rows()
        for b in range(idx.size(0)):
            slot, start = slots[b], starts[b]
            pos = torch.arange(start, start + idx.size(1), device=idx.device)[None]
            with adapter_rows(None if rows is None else [rows[b]]):  # this row's adapter (pools)
                o = self.hf(input_ids=idx[b : b + 1], past_key_values=cache.pkv[slot], position_ids=pos, use_cache=True)
            cache.pkv[slot] = o.past_key_values
            out.append(o.logits)
        return torch.cat(out)

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        *,
        cache: _Cache | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        kw: dict[str, Any] = {}
        if attention_mask is not None:
            # Left padding: positions count real tokens, as in our GPT's batched decoding.
            start = cache.length if cache is not None else 0
            kw["attention_mask"] = attention_mask.long()
            kw["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
        if cache is not None:
            out = self.hf(input_ids=idx, past_key_values=cache.pkv, use_cache=True, **kw)
            cache.pkv, cache.length = out.past_key_values, cache.length + idx.size(1)
        else:
            out = self.hf(input_ids=idx, use_cache=False, **kw)
        logits = out.logits
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
