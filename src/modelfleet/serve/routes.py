"""The OpenAI-compatible routes (``build_openai_app``): completions, chat completions, model
listing, readiness and the typed predict route, over whatever the front's ``models`` are (deployment
handles, or a one-hop replica's own methods). A replica's answer is one of the typed results of
``serve/protocol.py``; refusals become HTTP errors in ``serve/http_errors.py``."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi import Body, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException

from modelfleet.serve import openai as oa
from modelfleet.serve.guard import Guard
from modelfleet.serve.guard import front as _front
from modelfleet.serve.http_errors import APIError, api_error, http_error, invalid, overloaded, refused, replica_lost
from modelfleet.serve.protocol import (
    Chunk,
    Completion,
    Prediction,
    ReplicaError,
    ReplicaInfo,
    StreamStart,
    VariantUse,
)

logger = logging.getLogger("ray.serve")

_R = TypeVar("_R")


async def _first(gen: Any) -> StreamStart | ReplicaError:
    return await gen.__anext__()


def _headers(r: Completion | Prediction) -> dict[str, str]:
    out = {
        "x-modelfleet-replica-pid": str(r.pid),
        "x-modelfleet-batch-size": str(r.batch_size),
        "x-modelfleet-artifact": r.artifact,
    }
    if isinstance(r, Completion):
        out.update(_variant_headers(r.variant, r.tensor_bytes))
    return out


def _variant_headers(variant: VariantUse | None, tensor_bytes: int | None = None) -> dict[str, str]:
    """Pools: whether the replica already held the variant (hit) or loaded it for this request."""
    out = {}
    if variant is not None:
        out["x-modelfleet-variant"] = variant.name
        out["x-modelfleet-variant-cache"] = "miss" if variant.cold else "hit"
        out["x-modelfleet-variant-load-s"] = f"{variant.load_s:.4f}"
    if tensor_bytes is not None:
        out["x-modelfleet-tensor-bytes"] = str(tensor_bytes)
    return out


async def _sse(gen: Any, name: str, chat: bool, prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI chunk format: one event per token, a last chunk with finish_reason, then [DONE]."""
    cid, created, completion = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time()), 0
    cached = 0

    def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            delta = oa.ChatDelta(role="assistant" if role else None, content=text)
            return oa.sse(
                oa.ChatCompletionChunk(
                    id=cid, created=created, model=name, choices=[oa.ChatChunkChoice(delta=delta, finish_reason=finish)]
                )
            )
        return oa.sse(
            oa.CompletionResponse(
                id=cid,
                created=created,
                model=name,
                choices=[oa.CompletionChoice(text=text or "", finish_reason=finish)],
            )
        )

    try:
        if chat:
            yield chunk("", None, role=True)
        async for step in gen:
            if not isinstance(step, Chunk):  # a replica error after the headers went out
                raise RuntimeError(step.message if isinstance(step, ReplicaError) else f"unexpected {step!r}")
            completion, cached = step.completion_tokens, step.cached_tokens
            if step.text or step.finish_reason:
                yield chunk(step.text, step.finish_reason)
        if include_usage:
            usage = oa.Usage.of(prompt_tokens, completion, cached)
            yield oa.sse(
                oa.ChatCompletionChunk(id=cid, created=created, model=name, choices=[], usage=usage)
                if chat
                else oa.CompletionResponse(id=cid, created=created, model=name, choices=[], usage=usage)
            )
    except Exception as e:  # noqa: BLE001 - headers are sent: report in-band, as OpenAI does
        logger.warning("stream failed: %s", e)
        yield oa.sse(json.dumps(oa.error_body(str(e), type="server_error")))
    yield oa.sse("[DONE]")


MAX_BODY_DEPTH = 16
"""Deepest JSON nesting a predict body may have (it is shipped between processes as it is)."""


def _depth(obj: Any, level: int = 0) -> int:
    if level > MAX_BODY_DEPTH:
        return level  # deep enough to refuse; stop walking
    if isinstance(obj, dict):
        return max((_depth(v, level + 1) for v in obj.values()), default=level + 1)
    if isinstance(obj, list):
        return max((_depth(v, level + 1) for v in obj), default=level + 1)
    return level


async def healthz() -> JSONResponse:
    """Public readiness: ``ok`` once every model has a replica with weights, else ``loading``, and
    nothing else (which models and artifacts are served is ``/v1/models``, behind the key). A
    probe never enters a model's queue: it reads what the front last learned (``_Front.ready``)."""
    if await _front().ready():
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "loading"}, status_code=503)


async def list_models() -> oa.ModelList:
    front = _front()
    try:
        infos: list[ReplicaInfo] = await asyncio.gather(*(h.info.remote() for h in front.models.values()))
    except RayActorError as e:
        raise replica_lost(e) from None
    now = int(time.time())
    cards = []
    for i in infos:
        card = oa.ModelCard(
            id=i.name,
            created=now,
            artifact=i.artifact,
            context_length=i.context_length,
            replica_pid=i.pid,
            device=i.device,
            dtype=i.dtype,
            running_sequences=i.running_sequences,
            cancelled_requests=i.cancelled_requests,
        )
        cards.append(card)
        for variant, artifact in sorted(front.pools.get(i.name, {}).items()):
            cards.append(card.model_copy(update={"id": variant, "artifact": artifact, "pool": i.name}))
    return oa.ModelList(data=cards)


async def completions(body: oa.CompletionRequest) -> Response:
    name, handle = _front()._handle(body.model, lm=True)
    if body.stream:
        return await _stream(handle, name, body.prompt, body, chat=False)
    r = await _call(handle.complete.remote(body.prompt, body.sampling()), Completion)
    resp = oa.CompletionResponse(
        model=name,
        choices=[oa.CompletionChoice(text=r.text, finish_reason=r.finish_reason)],
        usage=oa.Usage.of(r.prompt_tokens, r.completion_tokens, r.cached_tokens),
    )
    return JSONResponse(resp.model_dump(), headers=_headers(r))


async def chat_completions(body: oa.ChatCompletionRequest) -> Response:
    name, handle = _front()._handle(body.model, lm=True)
    if body.stream:
        return await _stream(handle, name, body.prompt(), body, chat=True)
    r = await _call(handle.complete.remote(body.prompt(), body.sampling()), Completion)
    resp = oa.ChatCompletionResponse(
        model=name,
        choices=[oa.ChatChoice(message=oa.AssistantMessage(content=r.text), finish_reason=r.finish_reason)],
        usage=oa.Usage.of(r.prompt_tokens, r.completion_tokens, r.cached_tokens),
    )
    return JSONResponse(resp.model_dump(), headers=_headers(r))


async def predict(name: str, body: Any = Body(None)) -> Response:
    """Typed predictions of a non-LM family: the replica validates ``body`` against the family's
    schema (it knows the artifact), so a bad field is a 422 naming it."""
    name, handle = _front()._handle(name, lm=False)
    if _depth(body) > MAX_BODY_DEPTH:
        raise APIError(
            422,
            f'request body is nested more than {MAX_BODY_DEPTH} levels deep; the body is {{"instances": [...]}}',
            param="instances",
            code="invalid_value",
        )
    r = await _call(handle.predict.remote(body), Prediction)
    return JSONResponse({"model": r.model, "artifact": r.artifact, "predictions": r.predictions}, headers=_headers(r))


async def _call(pending: Any, want: type[_R]) -> _R:
    """A replica call's result of type ``want``; a refusal, an overload or a lost replica raised as
    the ``APIError`` OpenAI's clients expect."""
    try:
        r = await pending
    except BackPressureError as e:
        raise overloaded(e) from None
    except DeploymentUnavailableError as e:
        raise APIError(503, f"model unavailable: {e}", type="server_error", code="unavailable") from None
    except RayActorError as e:
        raise replica_lost(e) from None
    if isinstance(r, ReplicaError):
        raise refused(r)
    if not isinstance(r, want):
        raise TypeError(f"the replica answered {type(r).__name__}, not {want.__name__}")
    return r


async def _stream(handle: Any, name: str, prompt: str, body: oa._Sampling, *, chat: bool) -> StreamingResponse:
    gen = handle.options(stream=True).stream.remote(prompt, body.sampling())
    meta = await _call(_first(gen), StreamStart)  # errors and overload surface before headers are sent
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(
        _sse(gen, name, chat, meta.prompt_tokens, include_usage),
        media_type="text/event-stream",
        headers={
            "x-modelfleet-replica-pid": str(meta.pid),
            "cache-control": "no-cache",
            **_variant_headers(meta.variant),
        },
    )


def build_openai_app() -> FastAPI:
    """The FastAPI app of every front deployment (Serve builds it in each replica)."""
    app = FastAPI(title="modelfleet", docs_url=None, redoc_url=None)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
    app.add_middleware(Guard)
    app.get("/healthz")(healthz)
    app.get("/v1/models")(list_models)
    app.post("/v1/completions", response_model=None)(completions)
    app.post("/v1/chat/completions", response_model=None)(chat_completions)
    app.post("/v1/models/{name}/predict", response_model=None)(predict)
    return app
