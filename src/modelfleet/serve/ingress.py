"""The OpenAI-compatible HTTP front: routes, auth, limits, errors and HTTP metrics.

Two deployments serve it (``build_openai_app`` builds the same FastAPI app in each):

- **One hop** (single-model apps, the default): the model's own replicas are the ingress
  (``LMIngress`` / ``PredictIngress``). With the cluster's HAProxy ingress on
  (``modelfleet.cluster.haproxy``), a request goes client -> HAProxy -> the replica that decodes.
- **Multi-model** apps: ``Ingress`` (no weights) reads the OpenAI ``model`` field and forwards to one
  deployment per model through deployment handles, whose queue limit (``max_queued_requests``)
  turns overload into a fast 503/429; HAProxy routes by path only, so the ``model`` field needs
  this Python hop.

Route code reaches its deployment through ``serve.get_replica_context().servable_object``; a
one-hop replica answers the same handle-shaped calls in process (``_Local``).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import reprlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from ray.util import metrics
from starlette.exceptions import HTTPException

from modelfleet.config.serve import ServeConfig, parse_serve_config
from modelfleet.serve import auth
from modelfleet.serve import openai as oa
from modelfleet.serve.model import LMReplica
from modelfleet.serve.pool import variant_id
from modelfleet.serve.predict import PredictReplica

logger = logging.getLogger("ray.serve")

_ROUTES = ("/healthz", "/v1/models", "/v1/completions", "/v1/chat/completions")


class APIError(Exception):
    """An error answered in OpenAI's envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(
        oa.error_body(exc.message, type=exc.type, param=exc.param, code=exc.code),
        status_code=exc.status,
        headers=exc.headers,
    )


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    # OpenAI answers bad parameters with 400 and names the parameter; so do we.
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
    msg = f"{field}: {err['msg']}"
    if err.get("type") not in ("missing", "json_invalid") and "input" in err:
        msg += f" (got {reprlib.repr(err['input'])[:80]})"  # reprlib: bounded depth for hostile nesting
    return JSONResponse(oa.error_body(msg, param=field, code="invalid_value"), status_code=400)


# Bodies that json.loads cannot read for reasons other than syntax reach FastAPI's bare
# "There was an error parsing the body"; name the reason instead.
_BODY_ERRORS = {
    UnicodeDecodeError: "request body is not valid UTF-8 JSON",
    RecursionError: "request body JSON is nested too deeply to parse",
}


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    # Every error, including FastAPI's own (404 route, 405 method, unreadable body), in OpenAI's envelope.
    cause = type(exc.__cause__) if exc.__cause__ is not None else None
    msg = next((m for t, m in _BODY_ERRORS.items() if cause and issubclass(cause, t)), None)
    if msg is None:
        msg = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(oa.error_body(msg), status_code=exc.status_code, headers=getattr(exc, "headers", None))


def _reject(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(oa.error_body(message, code=code), status_code=status, headers=headers)


class _Guard:
    """Auth, body limit, ingress pid header and HTTP metrics, before any route runs.

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware runs the
    route in a task group with a memory stream per request, which cost ~0.5 ms a request here
    (measured: 0.37 -> 0.85-1.07 ms per request in process) on the path every request takes."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        st, t0 = _front().http, time.perf_counter()
        # Under a route prefix the ASGI path still includes it (root_path); match routes without it.
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        headers: dict[bytes, bytes] = {}
        for k, v in scope["headers"]:  # the first of a repeated header counts, as in Starlette
            if k in (b"authorization", b"content-length"):
                headers.setdefault(k, v)
        # RFC 9110 allows optional whitespace around a field value ("2 " is a valid length of 2).
        length = headers[b"content-length"].decode("latin-1").strip() if b"content-length" in headers else None
        reject: Response | None = None
        if path not in auth.PUBLIC_PATHS and not auth.authorized(
            headers[b"authorization"].decode("latin-1") if b"authorization" in headers else None, st.api_key
        ):
            reject = _reject(
                401,
                "missing or invalid API key; send 'Authorization: Bearer <key>'",
                "invalid_api_key",
                {"WWW-Authenticate": "Bearer"},
            )
        elif length is not None and not length.isdigit():
            reject = _reject(400, f"Content-Length {length[:40]!r} is not a number of bytes", "invalid_value")
        elif length is not None and int(length) > st.max_body:
            reject = _reject(
                413, f"request body of {length} bytes exceeds the limit of {st.max_body} bytes", "body_too_large"
            )
        elif scope["method"] == "POST":
            # Read the whole body here, within body_timeout_s, so a client that declares a body and
            # stops sending (or trickles it) holds a slot for that long at most; a chunked body has
            # no declared size, so reading stops at the limit + 1 chunk. The route gets the bytes.
            body, more = b"", True
            try:
                async with asyncio.timeout(st.body_timeout_s):
                    while more and len(body) <= st.max_body:
                        msg = await receive()
                        if msg["type"] != "http.request":
                            return  # the client went away
                        body, more = body + msg.get("body", b""), msg.get("more_body", False)
            except TimeoutError:
                reject = _reject(
                    408,
                    f"request body not received within {st.body_timeout_s:g} s ({len(body)} bytes arrived)",
                    "request_timeout",
                    {"Connection": "close"},
                )
            else:
                if len(body) > st.max_body:
                    reject = _reject(413, f"request body exceeds the limit of {st.max_body} bytes", "body_too_large")
                else:
                    receive = _replay(body, receive)
        route = path if path in _ROUTES else "predict" if path.endswith("/predict") else "other"
        pid = str(os.getpid()).encode()

        async def send_tagged(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                msg["headers"] = [*msg.get("headers", []), (b"x-modelfleet-ingress-pid", pid)]
                _count(st, route, msg["status"], t0)
            await send(msg)

        if reject is None and st.limit is not None and route not in ("/healthz", "other"):
            if st.in_flight >= st.limit:
                retry = st.retry_after_s
                reject = _reject(
                    st.overload_status,
                    f"server overloaded ({st.in_flight} requests in flight on "
                    f"this replica, limit {st.limit}); retry after {retry:g} s",
                    "overloaded",
                    {"Retry-After": str(max(1, round(retry)))},
                )
        if reject is not None:
            await reject(scope, receive, send_tagged)
            return
        st.in_flight += 1
        started = False

        async def send_started(msg: dict[str, Any]) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
                deadline.reschedule(None)  # a stream is bounded by idle time (HAProxy), not in total
            await send_tagged(msg)

        try:
            # Our own bound on time to response headers, whatever x-request-timeout-seconds says.
            async with asyncio.timeout(st.request_timeout_s) as deadline:
                await self.app(scope, receive, send_started)
        except TimeoutError:
            if not started:
                await _reject(
                    504, f"no answer within {st.request_timeout_s:g} s; retry with fewer max_tokens", "timeout"
                )(scope, receive, send_tagged)
        finally:
            st.in_flight -= 1


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return await receive()  # afterwards: the real channel (http.disconnect)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _count(st: Any, route: str, status: int, t0: float) -> None:
    tags = {"route": route, "status": str(status)}
    st.m_requests.inc(tags=tags)
    st.m_latency.observe(time.perf_counter() - t0, tags={"route": route})
    if status >= 400:
        st.m_errors.inc(tags=tags)


# Helpers live above the deployment class: Serve pickles the class when it is decorated, so
# module globals defined after it would be missing in the replica.
async def _first(gen: Any) -> dict[str, Any]:
    return await gen.__anext__()


def _overloaded(e: BackPressureError) -> APIError:
    retry = e.retry_after_s if e.retry_after_s is not None else 1
    return APIError(
        e.status_code,
        f"server overloaded ({e.message}); retry after {retry:g} s",
        type="server_error",
        code="overloaded",
        headers={"Retry-After": str(max(1, round(retry)))},
    )


def _replica_lost(e: RayActorError) -> APIError:
    # The replica died or became unreachable mid-request (killed, crashed, node lost). Nothing was
    # sent to the client yet and generation has no side effects: a retry is safe and will reach
    # a live replica, so answer 503 with Retry-After (the client retries; a 500 would not be).
    return APIError(
        503,
        f"the model replica handling this request stopped before answering ({type(e).__name__}); retry the request",
        type="server_error",
        code="replica_unavailable",
        headers={"Retry-After": "1"},
    )


def _headers(r: dict[str, Any]) -> dict[str, str]:
    return {
        "x-modelfleet-replica-pid": str(r["pid"]),
        "x-modelfleet-batch-size": str(r["batch_size"]),
        "x-modelfleet-artifact": r["artifact"],
        **_variant_headers(r),
    }


def _variant_headers(r: dict[str, Any]) -> dict[str, str]:
    """Pools: whether the replica already held the variant (hit) or loaded it for this request."""
    out = {}
    if "variant" in r:
        out["x-modelfleet-variant"] = r["variant"]
        out["x-modelfleet-variant-cache"] = "miss" if r["variant_cold"] else "hit"
        out["x-modelfleet-variant-load-s"] = f"{r['variant_load_s']:.4f}"
    if "tensor_bytes" in r:
        out["x-modelfleet-tensor-bytes"] = str(r["tensor_bytes"])
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
            completion, cached = step["completion_tokens"], step.get("cached_tokens", 0)
            if step["text"] or step["finish_reason"]:
                yield chunk(step["text"], step["finish_reason"])
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


@dataclass
class HttpState:
    """What the guard and routes of one replica's HTTP front need (set up in ``_init_front``)."""

    api_key: str | None
    max_body: int
    m_requests: metrics.Counter
    m_errors: metrics.Counter
    m_latency: metrics.Histogram
    limit: int | None = None
    """One-hop fronts: requests in flight on this replica before overload answers (max_ongoing +
    max_queued); None where Serve's handle queue does it (the multi-model ingress)."""
    overload_status: int = 503
    retry_after_s: float = 1.0
    body_timeout_s: float = 10.0
    request_timeout_s: float = 300.0
    in_flight: int = 0


def _front() -> Any:
    return serve.get_replica_context().servable_object


class _Front:
    """The HTTP side every front deployment shares: config, auth state, metrics, model lookup."""

    cfg: ServeConfig
    http: HttpState
    models: dict[str, Any]

    def _init_front(
        self, config: dict[str, Any], models: dict[str, Any], lms: set[str], limit: int | None = None
    ) -> None:
        self.cfg = parse_serve_config(config)
        self.models = models
        self.lms = lms  # names of the language models (the others answer /predict only)
        first = self.cfg.models[0]
        key = auth.load_api_key(self.cfg)
        auth.check_exposure(self.cfg, key)
        self.http = HttpState(
            api_key=key,
            max_body=self.cfg.max_body_bytes,
            m_requests=metrics.Counter(
                "modelfleet_http_requests", "HTTP requests by route and status.", tag_keys=("route", "status")
            ),
            m_errors=metrics.Counter(
                "modelfleet_http_errors", "HTTP error responses by status.", tag_keys=("route", "status")
            ),
            m_latency=metrics.Histogram(
                "modelfleet_http_latency_seconds",
                "Time to response headers.",
                boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
                tag_keys=("route",),
            ),
            limit=limit,
            overload_status=first.overload_status,
            retry_after_s=first.retry_after_s,
            body_timeout_s=self.cfg.body_timeout_s,
            request_timeout_s=self.cfg.request_timeout_s,
        )
        # Only where the key comes from is logged, never the key.
        logger.info(
            "HTTP front up (pid %d): models %s, auth %s",
            os.getpid(),
            list(models),
            "on" if self.http.api_key else "off",
        )

    _ready_at: float = float("-inf")
    _ready_ok: bool = False
    _ready_lock: asyncio.Lock | None = None
    READY_TTL_S = 2.0
    """How long a readiness answer is reused: 1,000 probes make at most one check per model per TTL."""

    async def ready(self) -> bool:
        """Whether every model answers ``info`` (has weights), asked at most once per TTL however
        many probes arrive (one check in flight; the others reuse its answer)."""
        if time.monotonic() - self._ready_at < self.READY_TTL_S:
            return self._ready_ok
        if self._ready_lock is None:
            self._ready_lock = asyncio.Lock()
        async with self._ready_lock:
            if time.monotonic() - self._ready_at >= self.READY_TTL_S:
                try:
                    await asyncio.wait_for(asyncio.gather(*(h.info.remote() for h in self.models.values())), 10)
                    self._ready_ok = True
                except Exception:  # noqa: BLE001 - any failure means "not ready"
                    self._ready_ok = False
                self._ready_at = time.monotonic()
        return self._ready_ok

    def auth_state(self) -> dict[str, Any]:
        """Whether this front holds an API key, and its fingerprint (never the key): ``deploy``
        checks it against the key the caller has."""
        return {"auth": self.http.api_key is not None, "fingerprint": auth.fingerprint(self.http.api_key)}

    def serve_config(self) -> dict[str, Any]:
        """The config this application was deployed with (``modelfleet deploy`` edits and redeploys it)."""
        return self.cfg.model_dump()

    def _init_one_hop(self, config: dict[str, Any], storage_path: str, replica: type, *, lm: bool) -> None:
        """A single model's replica that is also the front: it calls itself in process."""
        cfg = parse_serve_config(config)
        m = cfg.models[0]
        replica.__init__(self, m.model_dump(), storage_path)
        self._init_front(config, {m.name: _Local(self)}, {m.name} if lm else set(), _one_hop_limit(cfg))

    pools: dict[str, dict[str, str]] = {}
    """Pool name -> {variant name: adapter artifact} (the multi-model ``Ingress`` sets it)."""

    def _served(self) -> str:
        return "; ".join(
            f"{n} (variants: {', '.join(sorted(self.pools[n])) or 'none'})" if n in self.pools else n
            for n in self.models
        )

    def _handle(self, model: str | None, *, lm: bool) -> tuple[str, Any]:
        """The model's handle; ``lm`` says which kind the route needs (a mismatch is a 400). A
        pool's variant is its pool's handle with the variant as Serve's multiplexed model id, so
        Serve routes it to a replica that already holds that adapter when one does."""
        name = model or self.cfg.models[0].name
        for pool, variants in self.pools.items():
            if name in variants:
                handle = self.models[pool].options(multiplexed_model_id=variant_id(name, variants[name]))
                if not lm:
                    raise APIError(
                        400,
                        f"model {name!r} is a language model; use /v1/completions",
                        param="model",
                        code="wrong_endpoint",
                    )
                return name, handle
        if name not in self.models:
            raise APIError(
                404,
                f"model {name!r} does not exist; served models: {self._served()}",
                param="model",
                code="model_not_found",
            )
        if lm and name not in self.lms:
            raise APIError(
                400,
                f"model {name!r} is not a language model; use POST /v1/models/{name}/predict",
                param="model",
                code="wrong_endpoint",
            )
        if not lm and name in self.lms:
            raise APIError(
                400, f"model {name!r} is a language model; use /v1/completions", param="model", code="wrong_endpoint"
            )
        return name, self.models[name]


class _LocalMethod:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        out = self.fn(*args)
        if inspect.isawaitable(out) or inspect.isasyncgen(out):
            return out
        done = asyncio.get_running_loop().create_future()  # a plain method: awaitable like a handle call
        done.set_result(out)
        return done


class _Local:
    """The call shape of a ``DeploymentHandle`` (``h.complete.remote(...)``, ``h.options(stream=True)``)
    over this replica's own methods: a one-hop front calls its model in process."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def options(self, **_: Any) -> _Local:
        return self

    def __getattr__(self, name: str) -> _LocalMethod:
        return _LocalMethod(getattr(self._target, name))


def _one_hop_limit(cfg: ServeConfig) -> int | None:
    m = cfg.models[0]
    return None if m.max_queued_requests < 0 else m.max_ongoing_requests + m.max_queued_requests


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
        infos = await asyncio.gather(*(h.info.remote() for h in front.models.values()))
    except RayActorError as e:
        raise _replica_lost(e) from None
    now = int(time.time())
    cards = []
    for i in infos:
        card = oa.ModelCard(
            id=i["name"],
            created=now,
            artifact=i["artifact"],
            context_length=i["context_length"],
            replica_pid=i["pid"],
            device=i["device"],
            dtype=i["dtype"],
        )
        cards.append(card)
        for variant, artifact in sorted(front.pools.get(i["name"], {}).items()):
            cards.append(card.model_copy(update={"id": variant, "artifact": artifact, "pool": i["name"]}))
    return oa.ModelList(data=cards)


async def completions(body: oa.CompletionRequest) -> Response:
    name, handle = _front()._handle(body.model, lm=True)
    if body.stream:
        return await _stream(handle, name, body.prompt, body, chat=False)
    r = await _call(handle.complete.remote(body.prompt, body.sampling()))
    resp = oa.CompletionResponse(
        model=name,
        choices=[oa.CompletionChoice(text=r["text"], finish_reason=r["finish_reason"])],
        usage=oa.Usage.of(r["prompt_tokens"], r["completion_tokens"], r.get("cached_tokens", 0)),
    )
    return JSONResponse(resp.model_dump(), headers=_headers(r))


async def chat_completions(body: oa.ChatCompletionRequest) -> Response:
    name, handle = _front()._handle(body.model, lm=True)
    if body.stream:
        return await _stream(handle, name, body.prompt(), body, chat=True)
    r = await _call(handle.complete.remote(body.prompt(), body.sampling()))
    resp = oa.ChatCompletionResponse(
        model=name,
        choices=[oa.ChatChoice(message=oa.AssistantMessage(content=r["text"]), finish_reason=r["finish_reason"])],
        usage=oa.Usage.of(r["prompt_tokens"], r["completion_tokens"], r.get("cached_tokens", 0)),
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
    try:
        r = await handle.predict.remote(body)
    except BackPressureError as e:
        raise _overloaded(e) from None
    except DeploymentUnavailableError as e:
        raise APIError(503, f"model unavailable: {e}", type="server_error", code="unavailable") from None
    except RayActorError as e:
        raise _replica_lost(e) from None
    if "error" in r:
        raise APIError(
            r["error"]["status"],
            r["error"]["message"],
            param=r["error"]["param"],
            code="invalid_value",
            headers={"x-modelfleet-replica-pid": str(r["pid"])},
        )
    return JSONResponse({k: r[k] for k in ("model", "artifact", "predictions")}, headers=_headers(r))


async def _call(pending: Any) -> dict[str, Any]:
    try:
        r = await pending
    except BackPressureError as e:
        raise _overloaded(e) from None
    except DeploymentUnavailableError as e:
        raise APIError(503, f"model unavailable: {e}", type="server_error", code="unavailable") from None
    except RayActorError as e:
        raise _replica_lost(e) from None
    if "error" in r:
        headers = {"x-modelfleet-replica-pid": str(r["pid"])}
        if "retry_after" in r:  # the replica's engine queue is full: overload, retryable
            headers["Retry-After"] = str(max(1, round(r["retry_after"])))
            raise APIError(
                r["error"]["status"], r["error"]["message"], type="server_error", code="overloaded", headers=headers
            )
        raise APIError(
            r["error"]["status"],
            r["error"]["message"],
            param=r["error"]["param"],
            code=r["error"].get("code", "context_length_exceeded"),
            headers=headers,
        )
    return r


async def _stream(handle: Any, name: str, prompt: str, body: oa._Sampling, *, chat: bool) -> StreamingResponse:
    gen = handle.options(stream=True).stream.remote(prompt, body.sampling())
    first = await _call(_first(gen))  # errors and overload surface before headers are sent
    meta = first["meta"]
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(
        _sse(gen, name, chat, meta["prompt_tokens"], include_usage),
        media_type="text/event-stream",
        headers={"x-modelfleet-replica-pid": str(meta["pid"]), "cache-control": "no-cache", **_variant_headers(meta)},
    )


def build_openai_app() -> FastAPI:
    """The FastAPI app of every front deployment (Serve builds it in each replica)."""
    app = FastAPI(title="modelfleet", docs_url=None, redoc_url=None)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_middleware(_Guard)
    app.get("/healthz")(healthz)
    app.get("/v1/models")(list_models)
    app.post("/v1/completions", response_model=None)(completions)
    app.post("/v1/chat/completions", response_model=None)(chat_completions)
    app.post("/v1/models/{name}/predict", response_model=None)(predict)
    return app


@serve.deployment(health_check_period_s=10)
@serve.ingress(build_openai_app)
class Ingress(_Front):
    """HTTP front door of a multi-model application: forwards to each model's deployment."""

    def __init__(self, config: dict[str, Any], models: dict[str, DeploymentHandle], lms: list[str]) -> None:
        self._init_front(config, models, set(lms))

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apps with pools: a variant was added or removed; route by the new list, no restart."""
        self.pools = {p: dict(v) for p, v in (user_config.get("variants") or {}).items()}
        self.cfg = self.cfg.model_copy(
            update={
                "models": [
                    m.model_copy(update={"variants": dict(self.pools[m.name])}) if m.name in self.pools else m
                    for m in self.cfg.models
                ]
            }
        )
        logger.info("pools: %s", {p: sorted(v) for p, v in self.pools.items()})


@serve.deployment  # every option comes from the ModelSpec, in build_app
@serve.ingress(build_openai_app)
class LMIngress(_Front, LMReplica):
    """A single language model that serves HTTP itself: no hop between the front and the decoder."""

    def __init__(self, config: dict[str, Any], storage_path: str) -> None:
        self._init_one_hop(config, storage_path, LMReplica, lm=True)


@serve.deployment  # every option comes from the ModelSpec, in build_app
@serve.ingress(build_openai_app)
class PredictIngress(_Front, PredictReplica):
    """A single predict model that serves HTTP itself."""

    def __init__(self, config: dict[str, Any], storage_path: str) -> None:
        self._init_one_hop(config, storage_path, PredictReplica, lm=False)
