"""Next-token sampling from logits: temperature and nucleus (top-p), greedy at temperature 0.

The one sampler of the package: ``models.gpt.generate`` (the reference decoder) and the batched
serving engine (``serve.generation``) both draw through it, so a seeded request samples the same
tokens wherever it runs.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sample(logits: Tensor, temperature: float, top_p: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """Token ids ``[...]`` drawn from ``logits`` ``[..., vocab]``; ``temperature=0`` is greedy.

    ``top_p < 1`` keeps the smallest set of most likely tokens whose mass reaches ``top_p`` (the
    most likely token always stays). One ``generator`` draws for every row, in row order.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    # Shift by the max and divide in float64: a tiny valid temperature (1e-45, 5e-324) would
    # otherwise make inf - inf or 0/0 = NaN, and one such request would fail its whole batch.
    x = logits.double()
    probs = torch.softmax((x - x.amax(dim=-1, keepdim=True)) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens before it already reach top_p.
        sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    flat = probs.reshape(-1, probs.size(-1))
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
