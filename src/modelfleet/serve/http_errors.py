"""HTTP errors in OpenAI's envelope: ``APIError`` and the FastAPI handlers every front installs,
and the one mapping of a replica's refusal (``ReplicaError``), Serve's overload and a lost replica
to the status and code OpenAI's clients expect."""

from __future__ import annotations

import reprlib

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException

from modelfleet.serve import openai as oa
from modelfleet.serve.protocol import ReplicaError


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


async def api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(
        oa.error_body(exc.message, type=exc.type, param=exc.param, code=exc.code),
        status_code=exc.status,
        headers=exc.headers,
    )


async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
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


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    # Every error, including FastAPI's own (404 route, 405 method, unreadable body), in OpenAI's envelope.
    cause = type(exc.__cause__) if exc.__cause__ is not None else None
    msg = next((m for t, m in _BODY_ERRORS.items() if cause and issubclass(cause, t)), None)
    if msg is None:
        msg = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(oa.error_body(msg), status_code=exc.status_code, headers=getattr(exc, "headers", None))


def reject(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(oa.error_body(message, code=code), status_code=status, headers=headers)


def overloaded(e: BackPressureError) -> APIError:
    retry = e.retry_after_s if e.retry_after_s is not None else 1
    return APIError(
        e.status_code,
        f"server overloaded ({e.message}); retry after {retry:g} s",
        type="server_error",
        code="overloaded",
        headers={"Retry-After": str(max(1, round(retry)))},
    )


def replica_lost(e: RayActorError) -> APIError:
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


def refused(r: ReplicaError) -> APIError:
    """The one mapping of a replica's refusal to OpenAI's error envelope."""
    headers = {"x-modelfleet-replica-pid": str(r.pid)}
    if r.retry_after_s is not None:  # the replica's engine queue is full: overload, retryable
        headers["Retry-After"] = str(max(1, round(r.retry_after_s)))
        return APIError(r.status, r.message, type="server_error", code=r.code, headers=headers)
    return APIError(r.status, r.message, param=r.param, code=r.code, headers=headers)
