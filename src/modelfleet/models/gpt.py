"""A GPT-style decoder-only transformer in plain PyTorch, with a KV cache for serving.

Pre-LayerNorm blocks, learned positions, causal attention through
``F.scaled_dot_product_attention`` and an ``lm_head`` tied to the token embedding (GPT-2 /
nanoGPT). The KV cache supports batched, left-padded prompts: padding slots are masked out of
attention and positions restart at 0 at each row's first real token, so a padded row computes
exactly what the same row would compute alone.

Over 400 lines: the model and its two serving caches (``KVCache`` for batched generation,
``SlotCache`` for the slot engine) with ``generate``. The caches would split off into their own
module; they stay because each is the input format ``CausalSelfAttention.forward`` reads, so a
change to one is a change to the other (the paged engine's ``PagedKVCache`` lives apart, in
models/paged_kv.py, and is read by the same forward).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from modelfleet.config import ModelConfig
from modelfleet.models.paged_kv import PagedKVCache
from modelfleet.models.sampling import sample


class KVCache:
    """Preallocated keys and values for every layer: ``[n_layer, B, n_head, max_len, head_dim]``.

    ``length`` counts the slots already filled (the same for every row; left padding keeps rows
    aligned). ``GPT.forward`` writes new keys/values at ``[length, length + T)`` and then advances
    ``length`` by ``T``.
    """

    def __init__(
        self,
        *,
        n_layer: int,
        batch_size: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k``/``v`` ([B, H, T, D]) after the filled slots; return all keys/values so far."""
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class SlotCache:
    """A pool of per-sequence KV-cache slots for continuous batching:
    ``[n_layer, num_slots, n_head, max_len, head_dim]``.

    Unlike ``KVCache`` every row has its own length: a forward names the slots it runs on and each
    slot's filled length (``prepare``), writes its new keys/values after them, and attends only to
    its own filled prefix. A slot is reused by the next sequence without clearing (the mask hides
    what the previous one left)."""

    def __init__(
        self,
        *,
        n_layer: int,
        num_slots: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (n_layer, num_slots, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._rows: slice | Tensor = slice(0, 0)
        self._index = self._write = torch.zeros(0, dtype=torch.long)
        self._end = 0

    @property
    def num_slots(self) -> int:
        return self.k.size(1)

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def reset(self, slot: int) -> None:
        """Nothing to clear: lengths live with the caller and the mask hides stale entries."""

    def prepare(self, slots: list[int], starts: list[int], T: int, device: torch.device) -> None:
        """Set the rows (``slots``) and their filled lengths (``starts``) of the next forward. Host
        lists, as a scheduler has them: no device-to-host reads, and when the slots are consecutive
        (a full batch usually is) each layer reads its keys as a view instead of a gathered copy."""
        lo = slots[0]
        self._rows: slice | Tensor = (
            slice(lo, lo + len(slots))
            if slots == list(range(lo, lo + len(slots)))
            else torch.tensor(slots, device=device)
        )
        self._index = torch.tensor(slots, device=device)[:, None]
        self._write = torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)  # [B, T]
        self._end = max(starts) + T  # keys up to the longest row

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k``/``v`` ([B, H, T, D]) at each row's positions; return each row's keys/values
        ``[B, H, end, D]`` (positions past a row's own length are masked by the caller)."""
        # Advanced indices around a slice put their [B, T] dims first: the target is [B, T, H, D].
        self.k[layer][self._index, :, self._write] = k.transpose(1, 2)
        self.v[layer][self._index, :, self._write] = v.transpose(1, 2)
        return self.k[layer][self._rows, :, : self._end], self.v[layer][self._rows, :, : self._end]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: Tensor, mask: Tensor | None, cache: KVCache | SlotCache | PagedKVCache | None, layer: int
    ) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if isinstance(cache, PagedKVCache):
            # The step's N tokens come as N one-token rows ([N, 1, C], so per-row adapters apply
            # per token); attention regroups them by sequence (see paged_kv).
            y = cache.attend(layer, *(t.transpose(0, 2) for t in (q, k, v)))  # [1, H, N, D]
            return self.resid_dropout(self.c_proj(y[0].transpose(0, 1).reshape(B, T, C)))
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # mask is None only for a plain causal pass over a fresh sequence: let SDPA pick its
        # fused causal kernel instead of materialising a [T, T] mask.
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        cache: KVCache | SlotCache | PagedKVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer built from a ``ModelConfig``."""

    supports_paged = True
    """Runs through the paged engine (``forward_paged``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.activation_checkpointing: bool = False
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one Parameter, counted and updated once
        self.init_weights()

    def init_weights(self, gather: Callable[[list[nn.Parameter]], AbstractContextManager[Any]] | None = None) -> None:
        """GPT-2's initialisation, in ``nn.Module.apply`` order (so a seed gives the same weights
        however the model was built). ``gather(params)`` wraps each module's write: under ZeRO-3's
        sharded construction the parameters are partitions, and DeepSpeed's
        ``GatheredParameters(params, modifier_rank=0)`` makes one module's full tensors exist for
        the write, then re-partitions them (without it the writes would silently touch nothing)."""
        scope = gather or (lambda params: contextlib.nullcontext())
        for m in _post_order(self):
            with scope(list(m.parameters(recurse=False))):
                self._init_weights(m)
        # GPT-2: scale residual-stream writes so the residual variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                with scope([p]):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def new_cache(
        self, batch_size: int, max_len: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> KVCache:
        """An empty KV cache for ``batch_size`` rows of up to ``max_len`` (<= block_size) tokens."""
        if not 0 < max_len <= self.cfg.block_size:
            raise ValueError(f"KV cache max_len must be in [1, model.block_size={self.cfg.block_size}], got {max_len}")
        return KVCache(
            n_layer=self.cfg.n_layer,
            batch_size=batch_size,
            n_head=self.cfg.n_head,
            max_len=max_len,
            head_dim=self.cfg.n_embd // self.cfg.n_head,
            dtype=dtype or self.wte.weight.dtype,
            device=device or self.wte.weight.device,
        )

    def new_slot_cache(
        self, num_slots: int, max_len: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> SlotCache:
        """A pool of ``num_slots`` sequence slots of up to ``max_len`` (<= block_size) tokens each."""
        if not 0 < max_len <= self.cfg.block_size:
            raise ValueError(f"slot max_len must be in [1, model.block_size={self.cfg.block_size}], got {max_len}")
        return SlotCache(
            n_layer=self.cfg.n_layer,
            num_slots=num_slots,
            n_head=self.cfg.n_head,
            max_len=max_len,
            head_dim=self.cfg.n_embd // self.cfg.n_head,
            dtype=dtype or self.wte.weight.dtype,
            device=device or self.wte.weight.device,
        )

    def new_paged_cache(
        self,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> PagedKVCache:
        """A pool of ``num_blocks`` KV blocks of ``block_size`` tokens (the engine's paged cache)."""
        return PagedKVCache(
            n_layer=self.cfg.n_layer,
            num_blocks=num_blocks,
            block_size=block_size,
            n_head=self.cfg.n_head,
            head_dim=self.cfg.n_embd // self.cfg.n_head,
            dtype=dtype or self.wte.weight.dtype,
            device=device or self.wte.weight.device,
        )

    def forward_paged(
        self, ids: Tensor, cache: PagedKVCache, tables: list[list[int]], starts: list[int], lens: list[int]
    ) -> Tensor:
        """Logits ``[B, vocab]`` at each sequence's last new token. ``ids`` ([N]) are the step's new
        tokens, sequence after sequence (a per-row adapter list, ``adapter_rows``, names one adapter
        per token): ``lens[b]`` of sequence b, at positions ``starts[b] ..``,
        which already has ``starts[b]`` tokens' KV in its blocks ``tables[b]``."""
        if max(s + n for s, n in zip(starts, lens)) > self.cfg.block_size:
            raise ValueError(f"a sequence runs past the model's {self.cfg.block_size}-token context")
        pos = cache.prepare(tables, starts, lens)
        x = self.drop(self.wte(ids) + self.wpe(pos))[:, None]  # [N, 1, C]: one row per token
        for i, block in enumerate(self.blocks):
            x = block(x, None, cache, i)
        return self.lm_head(self.ln_f(x[cache.last_token_index, 0]))

    def forward_slots(self, idx: Tensor, cache: SlotCache, slots: list[int], starts: list[int]) -> Tensor:
        """Logits ``[B, T, vocab]`` of ``idx`` ([B, T]) continuing the sequences in ``slots``, each
        already holding ``starts[b]`` tokens: row b's token t sits at position ``starts[b] + t`` and
        attends to its own slot's first ``starts[b] + t + 1`` entries, exactly as the sequence would
        decode alone (continuous batching: rows of different lengths in one forward)."""
        B, T = idx.shape
        if max(starts) + T > cache.max_len:
            raise ValueError(f"a sequence of {max(starts)} + {T} tokens does not fit a slot of {cache.max_len} tokens")
        cache.prepare(slots, starts, T, idx.device)
        pos = cache._write  # [B, T] positions = the slot entries written
        keys = torch.arange(cache._end, device=idx.device)
        mask = (keys[None, None, :] <= pos[:, :, None])[:, None]  # [B, 1, T, end]
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for i, block in enumerate(self.blocks):
            x = block(x, mask, cache, i)
        return self.lm_head(self.ln_f(x))

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        *,
        cache: KVCache | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Logits ``[B, T, vocab]``, or the mean cross-entropy loss when ``targets`` is given.

        With ``cache``, ``idx`` holds the next ``T`` tokens after the cached ones.
        ``attention_mask`` ([B, cached + T], 1 = real token, 0 = left padding) hides padding
        and sets each row's positions to start at its first real token.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        total = start + T
        if total > self.cfg.block_size:
            where = f"cached length {start} + " if cache is not None else ""
            raise ValueError(
                f"input length {where}{T} tokens exceeds model.block_size="
                f"{self.cfg.block_size}; shorten the input to at most "
                f"{self.cfg.block_size - start} tokens"
            )
        if cache is not None and (total > cache.max_len or B != cache.batch_size):
            raise ValueError(
                f"input of batch {B} and length {start} + {T} does not fit a KV cache "
                f"of batch {cache.batch_size} and max_len {cache.max_len}"
            )
        if attention_mask is not None and tuple(attention_mask.shape) != (B, total):
            raise ValueError(
                f"attention_mask must have shape [{B}, {total}] (batch, cached + new "
                f"tokens), got {list(attention_mask.shape)}"
            )

        pos, mask = self._positions_and_mask(B, T, start, attention_mask, cache is not None, idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for i, block in enumerate(self.blocks):
            if self.activation_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask, cache, i)
        if cache is not None:
            cache.length = total
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)

    @staticmethod
    def _positions_and_mask(
        B: int, T: int, start: int, attention_mask: Tensor | None, cached: bool, device: torch.device
    ) -> tuple[Tensor, Tensor | None]:
        """Position ids [B or 1, T] and a boolean SDPA mask [B or 1, 1, T, start + T] (True =
        attend), or None when a plain causal pass suffices."""
        total = start + T
        if attention_mask is None:
            pos = torch.arange(start, total, device=device).unsqueeze(0)
            if not cached:
                return pos, None
        else:
            # Left padding: positions count real tokens, so row b's first real token is position 0
            # whatever its padding, matching an unpadded forward of that row.
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
        q_slot = torch.arange(start, total, device=device).unsqueeze(1)
        k_slot = torch.arange(total, device=device).unsqueeze(0)
        mask = (k_slot <= q_slot)[None, None]  # causal over cache slots
        if attention_mask is not None:
            real_key = attention_mask.bool()[:, None, None, :]
            # A padding query still sees itself, so its softmax row is never empty (NaN); its
            # output is garbage nobody reads, and real queries never see padding keys.
            mask = mask & (real_key | (k_slot == q_slot)[None, None])
        return pos, mask


def _post_order(module: nn.Module) -> list[nn.Module]:
    """Modules in the order ``nn.Module.apply`` visits them (children first)."""
    return [m for child in module.children() for m in _post_order(child)] + [module]


def num_params(model: nn.Module, *, exclude_embeddings: bool = False) -> int:
    """Parameter count, each shared (tied) tensor once.

    ``exclude_embeddings`` drops lookup-only tables (position embeddings) but keeps a table tied to
    an output projection (GPT's ``wte``/``lm_head``), which does matmul work — nanoGPT's
    "non-embedding" count, the N of the 6N FLOPs estimate.
    """
    params = {id(p): p for p in model.parameters()}
    if exclude_embeddings:
        used_as_weight = {
            id(p) for m in model.modules() if not isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)
        }
        for m in model.modules():
            if isinstance(m, nn.Embedding) and id(m.weight) not in used_as_weight:
                params.pop(id(m.weight), None)
    # Under ZeRO-3 a rank's parameter is an empty placeholder; ds_numel is the full size.
    return sum(getattr(p, "ds_numel", p.numel()) for p in params.values())


def flops_per_token(cfg: ModelConfig) -> int:
    """Training FLOPs per token (forward + backward): ``6*N + 12*n_layer*n_embd*block_size``.

    The PaLM appendix-B / nanoGPT ``estimate_mfu`` formula: N is the non-embedding parameter count
    (as ``num_params(..., exclude_embeddings=True)``, computed here from the config without
    building the model) and the second term is attention's score and value matmuls.
    """
    d, b = cfg.n_embd, int(cfg.bias)
    ln = d * (1 + b)
    per_block = 2 * ln + (3 * d * d + 3 * d * b) + (d * d + d * b) + (4 * d * d + 4 * d * b) + (4 * d * d + d * b)
    n = cfg.n_layer * per_block + ln + cfg.vocab_size * d
    return 6 * n + 12 * cfg.n_layer * d * cfg.block_size


@torch.no_grad()
def generate(
    model: GPT,
    idx: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
) -> Tensor:
    """Reference decoder: extend ``idx`` ([B, T], unpadded) by up to ``max_new_tokens`` tokens.

    One prefill then one token per step through the KV cache, each drawn by
    ``models.sampling.sample`` (``temperature=0`` is greedy, ``top_p < 1`` samples the nucleus).
    Rows that emitted ``eos_id`` keep emitting it, and generation stops early once every row has.
    Returns ``[B, T + generated]``.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    B, T = idx.shape
    if T == 0:
        raise ValueError("generate needs a prompt of at least one token")
    limit = model.cfg.block_size
    if T + max_new_tokens > limit:
        raise ValueError(
            f"prompt of {T} tokens + max_new_tokens={max_new_tokens} exceeds "
            f"model.block_size={limit}; ask for at most {max(limit - T, 0)} new tokens"
        )
    if max_new_tokens <= 0:
        return idx
    was_training = model.training
    model.eval()  # no dropout while sampling
    try:
        cache = model.new_cache(B, T + max_new_tokens, device=idx.device)
        logits = model(idx, cache=cache)[:, -1]
        out = [idx]
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        for step in range(max_new_tokens):
            nxt = sample(logits, temperature, top_p, generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            out.append(nxt[:, None])
            if (eos_id is not None and bool(done.all())) or step == max_new_tokens - 1:
                break
            logits = model(nxt[:, None], cache=cache)[:, -1]
        return torch.cat(out, dim=1)
    finally:
        model.train(was_training)
