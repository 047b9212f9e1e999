"""A small httpx client for the OpenAI-compatible API (``modelfleet generate``, benchmarks, drills).

Retries: completions change nothing on the server (no state, no side effects), so they are
idempotent and the client retries them, like OpenAI's own client does. A request is retried when
it never got an answer (connection refused or reset, timeout) or when the answer says "try
again": 429 and 503 (overload, or the replica serving it stopped; both carry ``Retry-After``),
502 and 504, and a 500 that the HTTP proxy answered rather than the app: Ray 2.60's HAProxy turns
its own 502/503/504 (a replica gone mid-request after its retries) into a plain 500, and every
answer of our app carries ``x-modelfleet-ingress-pid``, so a 500 without it is the proxy's. Waits grow exponentially with jitter (``backoff_s`` doubling up to
``max_backoff_s``) and honour ``Retry-After`` up to the same cap; after ``max_retries`` the
last error is raised. Other errors (400, 401, 404, 413, the app's 500) are never retried: repeating them
cannot succeed. A stream is retried only until its first event arrives: once text has been
shown, a retry would repeat it.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import tenacity

# Statuses that mean "not now" rather than "never": overload, a replica that stopped, a gateway.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
APP_HEADER = "x-modelfleet-ingress-pid"
"""Every response of the app carries it (serve.guard tags it)."""


class ServeRequestError(RuntimeError):
    """The server answered with an error status; the message is the server's."""

    def __init__(
        self, message: str, *, status: int = 0, retry_after_s: float | None = None, from_proxy: bool = False
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s
        self.from_proxy = from_proxy
        """The proxy answered, not the app (no ``x-modelfleet-ingress-pid`` header)."""


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def api_key_from_env(var: str) -> str | None:
    """The key in env var ``var`` (the server's ``serve.api_key_env``), or None when unset or empty."""
    return os.environ.get(var) or None


def _retry_after(resp: httpx.Response) -> float | None:
    try:
        return max(0.0, float(resp.headers["retry-after"]))
    except (KeyError, ValueError):  # absent, or an HTTP date (we never send one): use backoff
        return None


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code >= 400:
        resp.read()
        try:
            msg = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = resp.text[:200]
        proxy = APP_HEADER not in resp.headers
        raise ServeRequestError(
            f"HTTP {resp.status_code} from {resp.request.url}{' (the proxy, not the app)' if proxy else ''}: {msg}",
            status=resp.status_code,
            retry_after_s=_retry_after(resp),
            from_proxy=proxy,
        )


def retryable(e: BaseException) -> bool:
    """Whether a failed completion may be sent again (see the module docstring)."""
    if isinstance(e, ServeRequestError):
        return e.status in RETRY_STATUSES or (e.status == 500 and e.from_proxy)
    return isinstance(e, httpx.TransportError)


class Client:
    """One connection pool to one app URL, with retries; thread-safe (share it between threads).

    ``retried`` counts retries over the client's life (how often a request had to be resent)."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 4,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
    ) -> None:
        if max_retries < 0 or backoff_s < 0 or max_backoff_s < backoff_s:
            raise ValueError(
                f"retries: need max_retries >= 0 and 0 <= backoff_s <= max_backoff_s, got "
                f"max_retries={max_retries}, backoff_s={backoff_s}, max_backoff_s={max_backoff_s}"
            )
        self.url = url.rstrip("/")
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s
        self.retried = 0
        self._lock = threading.Lock()
        self._http = httpx.Client(headers=_headers(api_key), timeout=timeout_s)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _wait(self, state: tenacity.RetryCallState) -> float:
        backoff = tenacity.wait_exponential_jitter(
            initial=self.backoff_s, max=self.max_backoff_s, jitter=self.backoff_s
        )(state)
        hint = getattr(state.outcome.exception() if state.outcome else None, "retry_after_s", None)
        return min(self.max_backoff_s, max(backoff, hint or 0.0))

    def _count(self, state: tenacity.RetryCallState) -> None:
        with self._lock:
            self.retried += 1

    def _retrying(self) -> tenacity.Retrying:
        return tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.max_retries + 1),
            wait=self._wait,
            retry=tenacity.retry_if_exception(retryable),
            before_sleep=self._count,
            reraise=True,
        )

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        for attempt in self._retrying():
            with attempt:
                r = self._http.post(f"{self.url}{path}", json=body)
                _raise_for(r)
                return r.json()
        raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover

    def complete(self, prompt: str, *, model: str | None = None, **params: Any) -> dict[str, Any]:
        """POST /v1/completions; returns the OpenAI response body."""
        return self._post("/v1/completions", {"prompt": prompt, **({"model": model} if model else {}), **params})

    def chat(self, messages: list[dict[str, str]], *, model: str | None = None, **params: Any) -> dict[str, Any]:
        """POST /v1/chat/completions; returns the OpenAI response body."""
        return self._post(
            "/v1/chat/completions", {"messages": messages, **({"model": model} if model else {}), **params}
        )

    def models(self) -> dict[str, Any]:
        """GET /v1/models."""
        for attempt in self._retrying():
            with attempt:
                r = self._http.get(f"{self.url}/v1/models")
                _raise_for(r)
                return r.json()
        raise AssertionError("unreachable")  # pragma: no cover

    def stream_completion(self, prompt: str, *, model: str | None = None, **params: Any) -> Iterator[str]:
        """POST /v1/completions with ``stream: true``; yields text pieces as they arrive."""
        body = {"prompt": prompt, "stream": True, **({"model": model} if model else {}), **params}
        with contextlib.ExitStack() as stack:
            for attempt in self._retrying():
                with attempt:
                    inner = contextlib.ExitStack()
                    r = inner.enter_context(self._http.stream("POST", f"{self.url}/v1/completions", json=body))
                    try:
                        _raise_for(r)
                    except BaseException:
                        inner.close()
                        raise
                    stack.push(inner)
            for event in iter_sse(r.iter_lines()):
                if "error" in event:
                    raise ServeRequestError(event["error"]["message"])
                for choice in event.get("choices", []):
                    if choice.get("text"):
                        yield choice["text"]


def complete(
    url: str,
    prompt: str,
    *,
    model: str | None = None,
    api_key: str | None = None,
    timeout_s: float = 120.0,
    max_retries: int = 4,
    **params: Any,
) -> dict[str, Any]:
    """POST /v1/completions (retried as the module docstring says); returns the response body."""
    with Client(url, api_key=api_key, timeout_s=timeout_s, max_retries=max_retries) as c:
        return c.complete(prompt, model=model, **params)


def stream_completion(
    url: str,
    prompt: str,
    *,
    model: str | None = None,
    api_key: str | None = None,
    timeout_s: float = 120.0,
    max_retries: int = 4,
    **params: Any,
) -> Iterator[str]:
    """POST /v1/completions with ``stream: true``; yields text pieces as they arrive."""
    with Client(url, api_key=api_key, timeout_s=timeout_s, max_retries=max_retries) as c:
        yield from c.stream_completion(prompt, model=model, **params)


def iter_sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Parsed ``data:`` events of an SSE stream, stopping at ``[DONE]``."""
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            return
        yield json.loads(data)
