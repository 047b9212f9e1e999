"""Where a one-hop LM request runs: prefix cache, token load and stickiness in one score.

Pure policy (no Ray): ``serve/cache_router.py`` feeds it Serve's candidate replicas and what each
one published; tests drive it directly. The shape is llm-d's "sticky until saturated" scorer over
the engine's own truth, not a guess from text:

- **prefix from the truth**: every replica publishes the leading bytes of its prefix cache's block
  keys (``BlockManager.published_keys``). A request's keys are recomputed here with the engine's
  own hash chain (``serve/blocks.block_hash``: same tokenizer, block size and weights' sha256), so
  "replica R holds the first k blocks of this prompt" is exact, not estimated;
- **token load**: a replica's queued uncached prefill plus the decode tokens its sequences may
  still produce, as it published them, plus what *this* router sent it since (a router replica
  counts only its own sends; another router's land in the next publication, ~0.5 s later);
- **sticky until saturated**: a request goes to the replica holding most of its prefix unless that
  replica's queued prefill, with this request's uncached part, passes what it can prefill within
  the TTFT ceiling (its measured prefill rate x ``ttft_ceiling_s``); then to the least-loaded one.
  The check is per replica: one saturated replica never switches affinity off for the others (the
  fleet-wide imbalance gate of vllm-project/router#238);
- **ties spread**: equal scores are ordered at random, and each send raises the chosen replica's
  load at once, so a burst of identical cold requests spreads (llm-d-router#2515);
- **silent replicas last**: a replica whose publication has not changed for ``stale_after_s`` (it
  is frozen, hung or cut off; a live one publishes every period, idle or not) is ranked after every
  other. Its last view would keep it looking light, and the requests sent there are never seen
  finishing, so without this a frozen replica takes a share of every burst until each client is
  stuck on it;
- **sessions**: with no cached prefix anywhere, the replica that last served the request's
  ``x-session-id`` is preferred while it is not saturated (a multi-turn hint).
"""

from __future__ import annotations

import collections
import random
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field

from modelfleet.serve.blocks import block_hash

VIEW_KEY = "modelfleet"
"""The key of a replica's ``ReplicaView`` in its Serve routing stats (Ray's contract is a dict)."""


@dataclass(frozen=True)
class ReplicaView:
    """What one LM replica publishes for routing (its ``record_routing_stats``)."""

    keys: frozenset[bytes]
    """Leading bytes of its published prefix-cache block keys."""
    base_sha: str
    block_size: int
    queued_prefill_tokens: int
    decode_tokens: int
    prefill_tokens_per_s: float
    at: float
    """When it was taken (the replica's clock: compared for equality only, never across replicas)."""


@dataclass
class RouteKey:
    """A request as the router sees it: its prompt's token ids (the engine's own tokenization)
    and the session hint. ``decision`` is filled by the router for metrics and logs."""

    token_ids: Sequence[int]
    session_id: str | None = None
    max_tokens: int = 0
    """Tokens it may decode: counted, with its uncached prompt, as work sent to the chosen replica."""
    cache_salt: str | None = None
    """The request's ``cache_salt``: its blocks are keyed in that salt's space, as the engine keys them."""
    decision: Decision | None = None


@dataclass(frozen=True)
class Decision:
    replica: Hashable
    reason: str
    """``prefix`` (warm replica), ``spill`` (warm but saturated), ``session``, ``load`` (no warm one)."""
    cached_tokens: int


@dataclass(frozen=True)
class RouterPolicy:
    ttft_ceiling_s: float = 1.0
    """A warm replica whose queued prefill would take longer than this is saturated."""
    default_prefill_tokens_per_s: float = 2000.0
    """Until a replica has measured its own rate."""
    decode_token_weight: float = 1.0
    """Cost of one decode token left, in prefill tokens (on CPU a decode row costs about one token)."""
    max_sessions: int = 4096
    stale_after_s: float = 2.0
    """A replica whose publication has not changed for this long is ranked last."""


@dataclass
class _Sent:
    """What this router sent a replica since its last publication."""

    since: float = -1.0
    tokens: int = 0
    keys: set[bytes] = field(default_factory=set)


def request_keys(
    token_ids: Sequence[int], base_sha: str, block_size: int, nbytes: int, cache_salt: str | None = None
) -> list[bytes]:
    """The request's block keys as the engine computes them: full blocks of all but the last
    prompt token (the engine always computes that one), truncated to ``nbytes``."""
    out: list[bytes] = []
    parent: bytes | None = None
    for i in range((len(token_ids) - 1) // block_size):
        block = token_ids[i * block_size : (i + 1) * block_size]
        parent = block_hash(parent, block, base_sha=base_sha, cache_salt=cache_salt)
        out.append(parent[:nbytes])
    return out


class PrefixRouter:
    """The policy's state: what was sent where since the last publication, and sessions."""

    def __init__(
        self,
        policy: RouterPolicy | None = None,
        *,
        key_bytes: int = 8,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy or RouterPolicy()
        self.key_bytes = key_bytes
        self.rng = rng or random.Random()
        self.clock = clock
        self._changed: dict[Hashable, tuple[float, float]] = {}
        """Per replica: its last publication's ``at`` and when (our clock) it first showed it."""
        self._sent: dict[Hashable, _Sent] = {}
        self._sessions: collections.OrderedDict[str, Hashable] = collections.OrderedDict()
        self._keys_cache: dict[tuple[str, int], list[bytes]] = {}
        """This request's keys per (weights, block size): cleared for each request."""

    def forget(self, alive: set[Hashable]) -> None:
        """Drop state of replicas no longer among the candidates (dead or scaled down)."""
        for r in [r for r in self._sent if r not in alive]:
            del self._sent[r]
        for r in [r for r in self._changed if r not in alive]:
            del self._changed[r]
        for s in [s for s, r in self._sessions.items() if r not in alive]:
            del self._sessions[s]

    def _sent_to(self, replica: Hashable, view: ReplicaView | None) -> _Sent:
        sent = self._sent.setdefault(replica, _Sent())
        at = view.at if view is not None else -1.0
        if sent.since != at:  # a newer publication already counts what we sent before it
            sent.since, sent.tokens, sent.keys = at, 0, set()
        return sent

    def _silent(self, replica: Hashable, view: ReplicaView | None, now: float) -> bool:
        at = view.at if view is not None else -1.0
        last = self._changed.get(replica)
        if last is None or last[0] != at:
            self._changed[replica] = (at, now)
            return False
        return now - last[1] > self.policy.stale_after_s

    def _keys(self, key: RouteKey, view: ReplicaView) -> list[bytes]:
        k = (view.base_sha, view.block_size)
        if k not in self._keys_cache:
            self._keys_cache[k] = request_keys(
                key.token_ids, view.base_sha, view.block_size, self.key_bytes, key.cache_salt
            )
        return self._keys_cache[k]

    def choose(self, replicas: Mapping[Hashable, ReplicaView | None], key: RouteKey) -> list[Hashable]:
        """Every replica, best first; the first is recorded as sent (its load rises at once)."""
        self._keys_cache.clear()
        n, now = len(key.token_ids), self.clock()
        silent = {r for r, view in replicas.items() if self._silent(r, view, now)}
        if silent and len(silent) < len(replicas):
            live = {r: v for r, v in replicas.items() if r not in silent}
            return [*self.choose(live, key), *sorted(silent, key=lambda _: self.rng.random())]
        rows = []
        for r, view in replicas.items():
            sent = self._sent_to(r, view)
            cached = 0
            if view is not None and view.block_size > 0:
                for k in self._keys(key, view):
                    if k not in view.keys and k not in sent.keys:
                        break
                    cached += view.block_size
            queued = (view.queued_prefill_tokens if view else 0) + sent.tokens
            decode = view.decode_tokens if view else 0
            rate = (view.prefill_tokens_per_s if view else 0.0) or self.policy.default_prefill_tokens_per_s
            uncached = n - cached
            load = queued + uncached + decode * self.policy.decode_token_weight
            saturated = queued + uncached > rate * self.policy.ttft_ceiling_s
            rows.append((r, cached, load, saturated, self.rng.random()))
        by_load = sorted(rows, key=lambda row: (row[2], row[4]))
        warm = [row for row in rows if row[1] > 0]
        best = max(warm, key=lambda row: (row[1], -row[2], row[4])) if warm else None
        session = self._sessions.get(key.session_id) if key.session_id else None
        if best is not None and not best[3]:
            first, reason = best, "prefix"
        elif best is not None:
            first, reason = by_load[0], "spill"
        elif session is not None and any(row[0] == session and not row[3] for row in rows):
            first, reason = next(row for row in rows if row[0] == session), "session"
        else:
            first, reason = by_load[0], "load"
        self._record(first[0], replicas.get(first[0]), key, n - first[1])
        key.decision = Decision(first[0], reason, first[1])
        return [first[0]] + [row[0] for row in by_load if row[0] != first[0]]

    def _record(self, replica: Hashable, view: ReplicaView | None, key: RouteKey, uncached: int) -> None:
        sent = self._sent_to(replica, view)
        # Its decode counts like the decode tokens a replica publishes: a replica that answers
        # nothing (frozen) looks as busy as one that is serving the same requests.
        sent.tokens += uncached + int(key.max_tokens * self.policy.decode_token_weight)
        if view is not None and view.block_size > 0:
            # Once prefilled there, the prompt's blocks are on that replica: a burst of the same
            # prefix follows it before the next publication says so.
            sent.keys.update(self._keys(key, view))
        if key.session_id:
            self._sessions[key.session_id] = replica
            self._sessions.move_to_end(key.session_id)
            while len(self._sessions) > self.policy.max_sessions:
                self._sessions.popitem(last=False)
