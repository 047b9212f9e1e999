"""The request router of a pool's deployment (Ray Serve's custom request-router API).

Serve's default router (power of two choices + multiplexing) knows which replica holds which
variant only from what replicas report (pushed at most every 0.1 s, then broadcast by the
controller), and prefers holders only on a request's first attempt (a retry goes to "the replicas
with the fewest models"). Under load on 2 cores that sends requests to replicas that just evicted
their variant, and loads popular variants on every replica, so the replicas' LRUs hold fewer
distinct variants (measured on bench/pools.py: 88% hits where two LRUs of 8 allow ~92%).

``VariantRouter`` keeps its own copy of each replica's LRU of variants, updated the moment it
routes a request (``on_request_routed``): the replica loads exactly what it is sent, in that
order, with the same ``max_models_per_replica``, so with one ingress replica (the default) the
copy is exact and never stale; a replica it has not routed to yet is judged by what it reports.
On every attempt it ranks:

1. replicas holding the variant, one rank each, in a fixed per-variant order (rendezvous
   hashing), so a second copy goes cold and leaves its LRU;
2. if none holds it, the replica where loading it costs least: one with a free slot, else the
   one whose least recently used variant (the one the load evicts) was requested least in the
   last ``window`` requests; then the rest.

Within a rank Serve takes a replica whose queue is not full; a full rank falls through to the
next, and only when every rank is full does the request back off. Requests without a variant
(the pool's base) go to the least loaded replica.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import random
from typing import Any

from ray.serve.request_router import FIFOMixin, MultiplexMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

logger = logging.getLogger("ray.serve")


def _affinity(model_id: str, replica: RunningReplica) -> bytes:
    return hashlib.sha1(f"{model_id}|{replica.replica_id.unique_id}".encode()).digest()


class VariantRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    """Sticky, eviction-aware routing of pool variants (module docstring)."""

    def initialize_state(self, max_models: int = 8, window: int = 1000, **kwargs: Any) -> None:
        self._init_variants(max_models, window)
        logger.info(
            "pool %s: variant-sticky request router (%d variants per replica)", self._deployment_id.name, max_models
        )

    def _init_variants(self, max_models: int, window: int) -> None:
        self._max_models = max_models
        self._lru: dict[ReplicaID, collections.OrderedDict[str, None]] = {}
        self._recent: collections.deque[str] = collections.deque(maxlen=window)
        self._counts: collections.Counter[str] = collections.Counter()

    def _holds(self, r: RunningReplica, model_id: str) -> bool:
        lru = self._lru.get(r.replica_id)
        return model_id in lru if lru is not None else model_id in r.multiplexed_model_ids

    def _eviction_cost(self, r: RunningReplica) -> tuple[int, float]:
        """What loading one more variant on ``r`` evicts: nothing (free slot), else how often the
        least recently used one was asked for lately."""
        lru = self._lru.get(r.replica_id)
        loaded = list(lru) if lru is not None else list(r.multiplexed_model_ids)
        if len(loaded) < self._max_models:
            return (0, float(len(loaded)))
        victim = loaded[0] if lru is not None else min(loaded, key=lambda m: self._counts[m])
        return (1, float(self._counts[victim]))

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # every rank below was offered
        model_id = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not model_id:
            return [candidate_replicas]
        holders = sorted(
            (r for r in candidate_replicas if self._holds(r, model_id)),
            key=lambda r: _affinity(model_id, r),
            reverse=True,
        )
        others = [r for r in candidate_replicas if not self._holds(r, model_id)]
        if holders:
            return [[h] for h in holders] + ([others] if others else [])
        random.shuffle(others)  # equal costs: no replica is everyone's first choice
        others.sort(key=self._eviction_cost)
        return [[r] for r in others]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        model_id = pending_request.metadata.multiplexed_model_id
        if not model_id:
            return
        if len(self._recent) == self._recent.maxlen:
            self._counts[self._recent[0]] -= 1
        self._recent.append(model_id)
        self._counts[model_id] += 1
        lru = self._lru.setdefault(replica_id, collections.OrderedDict())
        if model_id in lru:
            lru.move_to_end(model_id)
            return
        lru[model_id] = None
        while len(lru) > self._max_models:
            lru.popitem(last=False)
