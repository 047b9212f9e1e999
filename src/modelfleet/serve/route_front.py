"""The ingress request router of a one-hop LM app: HAProxy's ``/internal/route`` side call.

Ray 2.60's HAProxy ingress asks an app's ``ingress_request_router`` deployment, for every POST,
which replica of the app's ingress deployment should take it: it POSTs the request body (with
``RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY=1``, see ``cluster/haproxy.py``) to
``/internal/route`` on one router replica (round robin; a connection failure tries the next) and
pins the request to the ``replica_id`` that comes back. The data still goes one hop, HAProxy to
the replica; this is a small side call (Ray's contract: see ``ray/serve/_private/
ingress_request_router.lua.tmpl``).

The router parses the body with the same OpenAI schemas and tokenizes it with the same tokenizer
as the replica, then asks the LM deployment's ``CacheAwareRouter`` (``choose_replica`` with
a pick, no slot reserved: the request itself arrives through HAProxy). A body it cannot
use (not JSON, truncated by HAProxy's buffer, another schema, another model) is routed by load
alone and never refused here: HAProxy answers any non-200 with a 503, and the replica's own answer
(400, 404, 413) is the one the client should get.

It never checks the API key: the replica does, before any work. What an unauthenticated client
can make the router do is bounded: the body is at most HAProxy's buffer, and at most
``MAX_PROMPT_CHARS`` of a prompt are tokenized (its prefix is all routing needs).
"""

# No ``from __future__ import annotations``: FastAPI reads the route's ``Request`` annotation
# through Serve's class-based view, which does not resolve string annotations.
import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from pydantic import ValidationError
from ray import serve
from ray.serve import metrics

from modelfleet import registry
from modelfleet.families.artifact import load_preprocessor
from modelfleet.raycompat import pick_replica
from modelfleet.serve import openai as oa
from modelfleet.serve.prefix_route import RouteKey

logger = logging.getLogger("ray.serve")

MAX_PROMPT_CHARS = 64 * 1024
"""Characters of a prompt tokenized for routing (longer ones are routed on their head)."""
SESSION_HEADER = "x-session-id"
ROUTE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)

router_app = FastAPI()


@dataclass(frozen=True)
class RoutedPrompt:
    """What the router reads of an OpenAI completion or chat body."""

    text: str
    model: str | None
    max_tokens: int | None
    cache_salt: str | None


def prompt_of(body: bytes) -> RoutedPrompt | None:
    """The prompt and routing fields of an OpenAI completion or chat body, or None."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: JSON nested past the parser's limit
        return None
    if not isinstance(data, dict):
        return None
    try:
        if "messages" in data:
            chat = oa.ChatCompletionRequest.model_validate(data)
            return RoutedPrompt(chat.prompt(), chat.model, chat.max_tokens, chat.cache_salt)
        if "prompt" in data:
            req = oa.CompletionRequest.model_validate(data)
            return RoutedPrompt(req.prompt, req.model, req.max_tokens, req.cache_salt)
    except ValidationError:
        return None
    return None


@serve.deployment  # every option comes from ServeConfig.router, in build_app
@serve.ingress(router_app)
class IngressRouter:
    """``/internal/route`` for one LM deployment (module docstring)."""

    def __init__(self, server: Any, model: str, artifact: str, storage_path: str, default_max_tokens: int) -> None:
        self._handle = server
        self._model = model
        self._default_max_tokens = default_max_tokens
        tokenizer, _ = load_preprocessor(registry.resolve(storage_path, artifact).uri)
        self._tokenizer = tokenizer
        self.m_decisions = metrics.Counter(
            "modelfleet_route_decisions", "Routing decisions by reason.", tag_keys=("model", "reason")
        )
        self.m_seconds = metrics.Histogram(
            "modelfleet_route_seconds",
            "Time to answer HAProxy's /internal/route.",
            boundaries=list(ROUTE_BUCKETS),
            tag_keys=("model",),
        )
        self.m_seconds.set_default_tags({"model": model})
        logger.info("ingress request router for model %s: prefix-, load- and session-aware", model)

    async def _key(self, body: bytes, session: str | None) -> RouteKey | None:
        try:
            return await self._parse(body, session)
        except Exception:  # noqa: BLE001 - client input never fails routing (HAProxy would answer 503)
            logger.warning("could not read a routing key from a request body; routing it by load", exc_info=True)
            return None

    async def _parse(self, body: bytes, session: str | None) -> RouteKey | None:
        parsed = prompt_of(body)
        if parsed is None or (parsed.model is not None and parsed.model != self._model):
            return None
        text = parsed.text[:MAX_PROMPT_CHARS]
        # Long prompts are tokenized off the event loop, as in the replica.
        ids = (
            await asyncio.to_thread(self._tokenizer.encode, text) if len(text) > 4096 else self._tokenizer.encode(text)
        )
        max_tokens = parsed.max_tokens or self._default_max_tokens
        return RouteKey(ids or [self._tokenizer.eos_id], session, max_tokens, parsed.cache_salt)

    @router_app.post("/internal/route")
    async def route(self, request: Request) -> dict[str, Any]:
        t0 = time.perf_counter()
        session = request.headers.get(SESSION_HEADER)
        key = await self._key(await request.body(), session)
        keyed = key is not None
        if key is None:
            # No prompt to score: still a key, with no tokens, so the pick is by token load with
            # random ties. Without one, Serve's pick-only mode takes the first candidate, and every
            # unreadable body would land on the same replica.
            key = RouteKey([], session, self._default_max_tokens)
        name = await pick_replica(self._handle, key)
        reason = key.decision.reason if keyed and key.decision is not None else "unkeyed"
        self.m_decisions.inc(tags={"model": self._model, "reason": reason})
        self.m_seconds.observe(time.perf_counter() - t0)
        # HAProxy sets ``request_headers`` on the request it pins (the front reports it back as
        # ``x-modelfleet-route``): which rule chose the replica, how many tokens it had cached, and
        # which router replica decided.
        cached = key.decision.cached_tokens if key.decision is not None else 0
        route = f"{reason}; cached={cached}; router={os.getpid()}"
        return {"replica_id": name, "request_headers": {"x-serve-router-route": route}}

    @router_app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}
