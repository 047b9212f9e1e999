"""Batched incremental decoding over left-padded prompts with the GPT KV cache.

Each request keeps its own sampling parameters (temperature, top_p, seed, stop strings,
max_tokens). Rows whose prompt + max_tokens cannot share one cache within the model's context
are put in separate groups that are stepped in lockstep, so a batch never fails because two
individually valid requests do not fit together.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from modelfleet.models.sampling import sample


@dataclass
class Job:
    """One request's prompt and sampling parameters (plain data: crosses process boundaries)."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    adapter: str | None = None
    """Pools: the LoRA adapter this request's rows run with (None: the base alone)."""
    cache_salt: str | None = None
    """Part of every prefix-cache key of this request (``Sequence.cache_salt``)."""


@dataclass
class Step:
    """What one row produced in one decoding step. ``text`` is new text safe to show (never
    half a character, never the start of a stop string); ``finish_reason`` is set on the last."""

    text: str
    tokens: int
    finish_reason: str | None = None


class _Row:
    def __init__(self, job: Job, eos_id: int, decode: Callable[[list[int]], str]) -> None:
        self.job = job
        self.eos_id = eos_id
        self.decode = decode
        self.ids: list[int] = []
        self.shown = 0  # characters of decoded text already emitted
        self.finish_reason: str | None = None
        # A private generator per row: a seeded request samples the same tokens whatever else
        # shares its batch.
        self.gen = torch.Generator().manual_seed(job.seed if job.seed is not None else random.getrandbits(63))

    def push(self, token: int) -> Step:
        if token == self.eos_id:
            self.finish_reason = "stop"
        else:
            self.ids.append(token)
        text = self.decode(self.ids)
        cut = min((i for i in (text.find(s, max(0, self.shown - len(s))) for s in self.job.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, self.finish_reason = text[:cut], "stop"
        elif self.finish_reason is None and len(self.ids) >= self.job.max_tokens:
            self.finish_reason = "length"
        end = len(text) if self.finish_reason else _safe_end(text, self.job.stop)
        delta, self.shown = text[self.shown : end], max(self.shown, end)
        return Step(delta, int(token != self.eos_id), self.finish_reason)


def _safe_end(text: str, stops: Sequence[str]) -> int:
    """Length of ``text`` that can be shown now: hold back one trailing replacement character (a
    multi-byte character may still be completing) and any suffix that could begin a stop string.
    One, not every trailing one: decoding with ``errors="replace"`` turns an incomplete character
    at the end into a single U+FFFD, so any before it stand for bytes no later byte can mend.
    (Holding them all back held a model's whole output until its end while it emitted invalid
    bytes: a 600-token stream arrived as one event.)"""
    end = len(text)
    if end and text[end - 1] == "\ufffd":
        end -= 1
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end -= k
                break
    return end


class _Group:
    """Rows sharing one KV cache: left-padded to the longest prompt, decoded one token a step."""

    def __init__(self, model: torch.nn.Module, rows: list[tuple[int, _Row]]) -> None:
        self.model = model
        self.rows = rows
        plen = max(len(r.job.prompt_ids) for _, r in rows)
        self.budget = max(r.job.max_tokens for _, r in rows)
        idx = torch.zeros(len(rows), plen, dtype=torch.long)
        self.mask = torch.zeros(len(rows), plen, dtype=torch.long)
        for b, (_, r) in enumerate(rows):
            p = r.job.prompt_ids
            idx[b, plen - len(p) :] = torch.tensor(p)
            self.mask[b, plen - len(p) :] = 1
        self.cache = model.new_cache(len(rows), plen + self.budget)
        self.logits = model(idx, cache=self.cache, attention_mask=self.mask)[:, -1]
        self.steps = 0

    @property
    def done(self) -> bool:
        return all(r.finish_reason for _, r in self.rows)

    def step(self, out: list[Step | None]) -> None:
        nxt = torch.empty(len(self.rows), dtype=torch.long)
        for b, (i, r) in enumerate(self.rows):
            if r.finish_reason:
                nxt[b] = r.eos_id  # a finished row still occupies its slot; its output is ignored
                continue
            tok = int(sample(self.logits[b], r.job.temperature, r.job.top_p, r.gen))
            nxt[b] = tok
            out[i] = r.push(tok)
        self.steps += 1
        if self.done or self.steps >= self.budget:
            return
        self.mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=torch.long)], dim=1)
        self.logits = self.model(nxt[:, None], cache=self.cache, attention_mask=self.mask)[:, -1]


def _groups(jobs: Sequence[Job], limit: int) -> list[list[int]]:
    """Indices of jobs packed so that each group's longest prompt + largest budget <= limit."""
    order = sorted(range(len(jobs)), key=lambda i: len(jobs[i].prompt_ids))
    groups: list[list[int]] = []
    for i in order:
        g = groups[-1] if groups else None
        if (
            g is not None
            and (
                max(len(jobs[i].prompt_ids), *(len(jobs[j].prompt_ids) for j in g))
                + max(jobs[i].max_tokens, *(jobs[j].max_tokens for j in g))
            )
            <= limit
        ):
            g.append(i)
        else:
            groups.append([i])
    return groups


@torch.inference_mode()
def generate_steps(
    model: torch.nn.Module, jobs: Sequence[Job], *, eos_id: int, decode: Callable[[list[int]], str]
) -> Iterator[list[Step | None]]:
    """Yield, per decoding step, one ``Step`` per job (None once a job has finished).

    Every job must satisfy ``len(prompt_ids) >= 1`` and ``len(prompt_ids) + max_tokens <=
    model.cfg.block_size`` (the caller validates and reports violations as 400s)."""
    rows = [_Row(j, eos_id, decode) for j in jobs]
    groups = [_Group(model, [(i, rows[i]) for i in g]) for g in _groups(jobs, model.cfg.block_size)]
    while not all(g.done for g in groups):
        out: list[Step | None] = [None] * len(jobs)
        for g in groups:
            if not g.done:
                g.step(out)
        yield out
