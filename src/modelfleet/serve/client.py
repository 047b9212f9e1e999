"""A small httpx client for the OpenAI-compatible API (``modelfleet generate``, the benchmark)."""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import httpx


class ServeRequestError(RuntimeError):
    """The server answered with an error status; the message is the server's."""


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def api_key_from_env(var: str = "MODELFLEET_API_KEY") -> str | None:
    return os.environ.get(var) or None


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code >= 400:
        resp.read()
        try:
            msg = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = resp.text[:200]
        raise ServeRequestError(f"HTTP {resp.status_code} from {resp.request.url}: {msg}")


def complete(url: str, prompt: str, *, model: str | None = None, api_key: str | None = None,
             timeout_s: float = 120.0, **params: Any) -> dict[str, Any]:
    """POST /v1/completions; returns the OpenAI response body."""
    body = {"prompt": prompt, **({"model": model} if model else {}), **params}
    r = httpx.post(f"{url.rstrip('/')}/v1/completions", json=body, headers=_headers(api_key), timeout=timeout_s)
    _raise_for(r)
    return r.json()


def stream_completion(url: str, prompt: str, *, model: str | None = None, api_key: str | None = None,
                      timeout_s: float = 120.0, **params: Any) -> Iterator[str]:
    """POST /v1/completions with ``stream: true``; yields text pieces as they arrive."""
    body = {"prompt": prompt, "stream": True, **({"model": model} if model else {}), **params}
    with httpx.stream("POST", f"{url.rstrip('/')}/v1/completions", json=body, headers=_headers(api_key),
                      timeout=timeout_s) as r:
        _raise_for(r)
        for event in iter_sse(r.iter_lines()):
            if "error" in event:
                raise ServeRequestError(event["error"]["message"])
            for choice in event.get("choices", []):
                if choice.get("text"):
                    yield choice["text"]


def iter_sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Parsed ``data:`` events of an SSE stream, stopping at ``[DONE]``."""
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            return
        yield json.loads(data)
