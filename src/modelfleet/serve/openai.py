"""OpenAI-compatible HTTP schemas (requests, responses, streaming chunks, errors).

Requests reject unknown fields like OpenAI's API does ("Unrecognized request argument"), but
accept the common fields we do not implement when they carry their neutral value, so stock
OpenAI clients work unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from modelfleet.serve.protocol import Sampling

MAX_STOP_CHARS = 256
MAX_CACHE_SALT_CHARS = 256
"""Longest ``cache_salt``: room for any random secret, and a bound on what every block hash reads."""
"""Longest stop string accepted (characters)."""

# The byte model has no chat tokens: turns are plain-text headers and the next header stops
# generation, so a model trained on this format ends its answer where the next turn begins.
CHAT_TURN = "### {role}:\n"
CHAT_STOP = "\n### "
_TURN_HEADER = re.compile(r"^### (System|User|Assistant):", re.MULTILINE | re.IGNORECASE)


def _unicode(v: str) -> str:
    # JSON may carry lone surrogates ("\ud800"): valid JSON, not valid text. Refuse them here
    # with a 400 instead of failing in the tokenizer.
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"is not valid Unicode (a lone surrogate at character {e.start}); send UTF-8 text") from None
    return v


Text = Annotated[str, AfterValidator(_unicode)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(False, description="Send a last chunk with token usage before [DONE].")


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Bounded: error messages quote the id back (served ids are at most 63 characters).
    model: Text | None = Field(None, max_length=128, description="Served model id; defaults to the first model.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    stop: str | list[str] | None = Field(
        None, description="Up to 4 strings of at most 256 characters that end generation (not returned)."
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Makes sampling reproducible.")
    cache_salt: Text | None = Field(
        None,
        min_length=1,
        max_length=MAX_CACHE_SALT_CHARS,
        description=(
            "Keeps this request's prefix cache apart: only requests with the same salt share cached "
            "prompt blocks (a random secret per tenant; hit timing would otherwise tell one tenant "
            "what another sent)."
        ),
    )
    stream: bool = Field(False, description="Stream Server-Sent Events ending with `data: [DONE]`.")
    stream_options: StreamOptions | None = None
    n: Literal[1] = Field(1, description="Only one choice per request is supported.")
    user: Text | None = Field(None, description="End-user id (accepted, unused).")
    frequency_penalty: Literal[0, 0.0] = 0.0
    presence_penalty: Literal[0, 0.0] = 0.0

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("must be up to 4 non-empty strings")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            # Each token re-checks the output's tail against every stop: a bounded stop keeps that
            # cost per token small and independent of the other requests sharing the replica.
            raise ValueError(f"each stop string must be at most {MAX_STOP_CHARS} characters")
        return [_unicode(s) for s in stops]

    def sampling(self) -> Sampling:
        """The generation parameters the model deployment needs (plain data: crosses processes)."""
        return Sampling(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=tuple(self.stop or ()),
            seed=self.seed,
            cache_salt=self.cache_salt,
        )


class CompletionRequest(_Sampling):
    prompt: Text = Field(description="The text to continue.")
    echo: Literal[False] = False
    logprobs: None = None
    suffix: None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: Text
    name: Text | None = None

    @field_validator("content")
    @classmethod
    def _no_turn_headers(cls, v: str) -> str:
        # The prompt format marks turns with "### Role:" lines; content carrying one could forge
        # a system or assistant turn (prompt injection), so it is refused rather than passed on.
        m = _TURN_HEADER.search(v)
        if m:
            raise ValueError(
                f"contains the chat turn header {m.group(0)!r} at the start of a line, which "
                "would forge another turn; remove it or indent it"
            )
        return v


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")

    def prompt(self) -> str:
        turns = [CHAT_TURN.format(role=m.role.capitalize()) + m.content + "\n\n" for m in self.messages]
        return "".join(turns) + CHAT_TURN.format(role="Assistant")

    def sampling(self) -> Sampling:
        s = super().sampling()
        return dataclasses.replace(s, stop=(*s.stop, CHAT_STOP))


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0
    """Prompt tokens served from the replica's prefix cache (their prefill was skipped)."""


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        )


FinishReason = Literal["stop", "length"]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason | None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "modelfleet"
    artifact: str = Field(description="Registry name@version (or path) of the loaded weights.")
    context_length: int
    replica_pid: int = Field(description="Process id of the replica that answered (diagnostics).")
    device: str = Field("cpu", description="Where the replica runs the model (cpu, cuda:0).")
    dtype: str = Field("float32", description="The weights' dtype on the replica.")
    pool: str | None = Field(None, description="Variants: the pool (base model) that serves this LoRA adapter.")
    running_sequences: int = Field(0, description="Language models: sequences in the answering replica's batch.")
    cancelled_requests: int = Field(
        0, description="Language models: requests the answering replica freed because their client went away."
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error envelope."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def sse(payload: BaseModel | str) -> str:
    """One Server-Sent Event line pair."""
    if isinstance(payload, str):
        return f"data: {payload}\n\n"
    d = payload.model_dump()
    # OpenAI omits what a chunk does not carry: usage until the last chunk, delta keys not sent.
    if d.get("usage") is None:
        d.pop("usage", None)
    for c in d.get("choices", []):
        if isinstance(c.get("delta"), dict):
            c["delta"] = {k: v for k, v in c["delta"].items() if v is not None}
    return f"data: {json.dumps(d)}\n\n"
