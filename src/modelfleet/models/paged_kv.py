"""A paged KV cache: one pool of fixed-size blocks per layer, read through per-sequence block tables.

The engine's ``BlockManager`` hands out block ids; this module owns the tensors and the attention
over them, in plain torch (index, gather, ``scaled_dot_product_attention``) so the same code runs
on CPU and GPU. A step's tokens arrive **flattened** (``[1, N, C]``, no padding: a 64-token prefill
chunk next to fifteen one-token decodes costs 79 token rows in every linear layer, not 16 x 64);
only attention regroups them per sequence:

1. each new token's key/value is written to its slot ``block_table[pos // bs] * bs + pos % bs``;
2. each sequence's keys ``0 .. start + len - 1`` are gathered through its block table into
   ``[B, H, end, D]`` (``end`` = the longest sequence's length this step);
3. its queries are placed in ``[B, H, T, D]`` (``T`` = the most tokens one sequence runs this step)
   and attend with a causal mask over absolute positions; the outputs return to token order.

Positions past a sequence's own length are masked, so a gather index padded with block 0 (or a
block another sequence owns) is never read into a result. Blocks shared by a cached prefix are
read by several sequences and written by none (the engine never recomputes a cached position).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class PagedKVCache:
    """``[n_layer, n_head, num_blocks, block_size, head_dim]`` keys and values (see the module docstring).

    Head-major, so a gather of whole blocks leaves each (sequence, head)'s keys consecutive rows
    of ``head_dim``, the layout the slot engine's views have: SDPA's CPU kernel reads keys strided
    by ``n_head * head_dim`` about 1.5x slower, and copying 16-token blocks beats copying token rows."""

    def __init__(
        self,
        *,
        n_layer: int,
        num_blocks: int,
        block_size: int,
        n_head: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"a paged KV cache needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        shape = (n_layer, n_head, num_blocks, block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.device = self.k.device

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @property
    def bytes_per_block(self) -> int:
        return self.nbytes // self.num_blocks

    def prepare(self, tables: list[list[int]], starts: list[int], lens: list[int]) -> Tensor:
        """Index the next forward: sequence b has ``starts[b]`` tokens in its blocks
        (``tables[b]``) and runs ``lens[b]`` new ones. Returns the absolute positions of the
        flattened tokens (``[N]``, the model's position ids). Built from host lists, as a
        scheduler has them: no device-to-host reads."""
        if not (len(tables) == len(starts) == len(lens)) or not tables or min(lens) < 1:
            raise ValueError(f"prepare needs one table, start and length >= 1 per sequence, got {len(tables)} tables")
        bs, dev = self.block_size, self.device
        B, T = len(lens), max(lens)
        end = max(s + n for s, n in zip(starts, lens))
        for b, (s, n) in enumerate(zip(starts, lens)):
            if -(-(s + n) // bs) > len(tables[b]):
                raise ValueError(f"sequence {b}: {s} + {n} tokens need more than its {len(tables[b])} blocks of {bs}")
        width = -(-end // bs)
        table = torch.tensor([t[:width] + [0] * (width - len(t[:width])) for t in tables], device=dev)  # [B, W]
        start = torch.tensor(starts, device=dev)
        length = torch.tensor(lens, device=dev)
        t = torch.arange(T, device=dev)
        valid = t[None, :] < length[:, None]  # [B, T]
        self._row, self._col = valid.nonzero(as_tuple=True)  # token order: sequence by sequence
        pos = (start[:, None] + t[None, :])[self._row, self._col]  # [N]
        self._slot = table[self._row, pos // bs] * bs + pos % bs  # where each new token's KV goes
        self._blocks = table.view(-1)  # [B * W]: each sequence's blocks in order
        self._end = end
        j = torch.arange(end, device=dev)
        # Padded query rows (t >= len) attend to key 0 only: finite, and never read back.
        q_pos = torch.where(valid, start[:, None] + t[None, :], 0)  # [B, T]
        self._mask = (j[None, None, :] <= q_pos[:, :, None])[:, None]  # [B, 1, T, end]
        self._shape = (B, T)
        self._last = torch.cumsum(length, 0) - 1  # each sequence's last token in the flat order
        return pos

    def _write_and_gather(self, pool: Tensor, new: Tensor, B: int) -> Tensor:
        """Write the step's ``new`` ([H_kv, N, D]) into one layer's ``pool`` ([H_kv, blocks, bs,
        D]); return each sequence's keys (or values) ``[B, H_kv, end, D]``."""
        H, D = pool.size(0), pool.size(3)
        pool.view(H, -1, D).index_copy_(1, self._slot, new.to(pool.dtype))
        # index_select of whole blocks (one dimension: several times faster than advanced indexing).
        return pool.index_select(1, self._blocks).view(H, B, -1, D)[:, :, : self._end].transpose(0, 1)

    @property
    def last_token_index(self) -> Tensor:
        """Flat indices of each sequence's last token this step (the rows whose logits sample)."""
        return self._last

    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, upcast: bool = False
    ) -> Tensor:
        """Write ``k``/``v`` and attend: ``q`` is ``[1, H, N, D]`` for the flattened tokens, ``k``
        and ``v`` ``[1, H_kv, N, D]`` (``H_kv`` < ``H``: grouped-query attention); returns
        ``[1, H, N, D]``. ``scale`` overrides ``1/sqrt(D)``; ``upcast`` attends in float32."""
        B, T = self._shape
        keys, values = (self._write_and_gather(pool[layer], new[0], B) for pool, new in ((self.k, k), (self.v, v)))
        H, D = q.size(1), q.size(3)
        qp = q.new_zeros(B, T, H, D)
        qp[self._row, self._col] = q[0].transpose(0, 1)
        dt = torch.float32 if upcast else q.dtype
        y = F.scaled_dot_product_attention(
            qp.transpose(1, 2).to(dt),
            keys.to(dt),
            values.to(dt),
            attn_mask=self._mask,
            scale=scale,
            enable_gqa=keys.size(1) != H,
        ).to(q.dtype)
        return y.transpose(1, 2)[self._row, self._col].transpose(0, 1)[None]  # [1, H, N, D]
