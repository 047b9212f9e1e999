"""The request router of a one-hop LM deployment (Ray Serve's custom request-router API).

HAProxy asks the app's ingress request router (``serve/route_front.py``) where each request goes;
that router calls ``DeploymentHandle.choose_replica(RouteKey)`` on the LM deployment, which runs
this class in the router's process. It ranks the candidates with ``PrefixRouter``
(``serve/prefix_route.py``) over the ``ReplicaView`` each replica publishes through Serve's
routing stats (``record_routing_stats``, every ``stats_period_s``; Serve's controller fetches them
and broadcasts them to every handle, so all router replicas see the same publications).

Calls that carry no ``RouteKey`` (handle calls) get the variant-sticky ranking of
``VariantRouter``. The ingress router keys every request, a body it could not read with no
tokens, so its picks are always ranked here (Serve's pick-only mode takes the first candidate of
an unranked list).
"""

from __future__ import annotations

import logging
from typing import Any

from ray.serve.request_router import PendingRequest, RunningReplica

from modelfleet.serve.prefix_route import VIEW_KEY, PrefixRouter, ReplicaView, RouteKey, RouterPolicy
from modelfleet.serve.routing import VariantRouter

logger = logging.getLogger("ray.serve")


def view_of(replica: RunningReplica) -> ReplicaView | None:
    view = replica.routing_stats.get(VIEW_KEY) if replica.routing_stats else None
    return view if isinstance(view, ReplicaView) else None


class CacheAwareRouter(VariantRouter):
    """Prefix-, load- and session-aware ranking for requests the ingress router keyed."""

    def initialize_state(
        self,
        ttft_ceiling_s: float = 1.0,
        stale_after_s: float = 2.0,
        max_models: int = 8,
        window: int = 1000,
        **kwargs: Any,
    ) -> None:
        self._init_variants(max_models, window)
        self._prefix = PrefixRouter(RouterPolicy(ttft_ceiling_s=ttft_ceiling_s, stale_after_s=stale_after_s))
        logger.info("%s: cache-aware request router (TTFT ceiling %g s)", self._deployment_id.name, ttft_ceiling_s)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        key = pending_request.args[0] if pending_request is not None and pending_request.args else None
        if not isinstance(key, RouteKey) or not candidate_replicas:
            return await super().choose_replicas(candidate_replicas, pending_request)
        by_id = {r.replica_id: r for r in candidate_replicas}
        self._prefix.forget(set(by_id))
        order = self._prefix.choose({rid: view_of(r) for rid, r in by_id.items()}, key)
        # The pick-only path (``_reserve=False``) takes the first replica of the first rank; a
        # reserving caller walks the ranks while replicas refuse.
        return [[by_id[rid]] for rid in order]
