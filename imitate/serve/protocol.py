"""The OpenAI chat-completions wire format of `imitate serve`: the request model, error bodies, responses and stream
chunks, the 429 headers, and the stop-string scan. Pure: no torch, no sockets.

Requests are validated by pydantic (`ChatRequest`); every problem becomes one 400 whose body is OpenAI's
`{"error": {"message", "type": "invalid_request_error", "param", "code"}}`, the message naming the field.
Unknown fields are ignored, as OpenAI-compatible servers do, except those that would silently change the
answer's meaning (tools, logprobs, a JSON response format): those are refused by name.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOPS = 4  # OpenAI's limit
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs", "response_format")


class ApiError(Exception):
    """An error answer: HTTP status plus OpenAI's error body (and headers, for a 429)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is not None:
            if len(stops) > MAX_STOPS:
                raise ValueError(f"at most {MAX_STOPS} stop sequences, got {len(stops)}")
            if any(not s for s in stops):
                raise ValueError("a stop sequence must not be empty")
        return stops or None

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse_request(body: Any) -> ChatRequest:
    """The validated request, or an ApiError(400) naming the field and what is wrong with it."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for name in UNSUPPORTED:
        value = body.get(name)
        if value not in (None, False, [], {"type": "text"}):
            raise ApiError(400, f"{name} is not supported by imitate serve", param=name, code="unsupported_parameter")
    try:
        return ChatRequest.model_validate(body)
    except ValidationError as exc:
        problems = [(".".join(str(p) for p in e["loc"]), e["msg"]) for e in exc.errors(include_url=False)]
        message = "; ".join(f"{loc}: {msg}" if loc else msg for loc, msg in problems)
        raise ApiError(400, message, param=problems[0][0] or None) from None


def context_error(prompt: int, completion: int, limit: int) -> ApiError:
    return ApiError(
        400,
        f"This model's maximum context length is {limit} tokens. However, you requested {prompt + completion} "
        f"tokens ({prompt} in the messages, {completion} in the completion). Please reduce the length of the "
        "messages or completion.",
        param="messages",
        code="context_length_exceeded",
    )


def scan_stop(text: str, stops: Sequence[str], start: int) -> tuple[int | None, int]:
    """(cut, safe) for `text` of which `text[:start]` was already sent: `cut` is where the first stop string
    begins (None if none occurs); `safe` is how far text can be sent without sending what may be the start of a
    stop string."""
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    if hits:
        return min(hits), min(hits)
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text) - start), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return None, len(text) - hold


class Completion:
    """Ids and builders for one request's response or stream chunks."""

    def __init__(self, model: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = model

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def response(self, choices: list[tuple[str, str]], prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {
            **self._head("chat.completion"),
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                    "logprobs": None,
                }
                for i, (text, finish) in enumerate(choices)
            ],
            "usage": usage(prompt_tokens, completion_tokens),
        }

    def chunk(self, index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {**self._head("chat.completion.chunk"), "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {**self._head("chat.completion.chunk"), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def busy_error(capacity: int, retry_after_s: float, per_minute: int | None) -> ApiError:
    """The 429 for a full queue. `Retry-After` (whole seconds, at least 1) and `retry-after-ms` say when a slot
    should be free; `x-ratelimit-*-requests` say the server holds `capacity` requests and has none left, resetting
    then. The limit header is per minute, as OpenAI's is: the requests the server completes per minute at its
    current pace (Little's law, measured), sent only once it is known, so a client that adopts it as its RPM
    (imitate's limiter does) runs at the server's pace rather than at its queue length per minute."""
    headers = {
        "retry-after": str(max(1, math.ceil(retry_after_s))),
        "retry-after-ms": str(max(1, round(retry_after_s * 1000))),
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": f"{retry_after_s:.3f}s",
    }
    if per_minute:
        headers["x-ratelimit-limit-requests"] = str(per_minute)
    message = f"The server is busy: {capacity} requests are running or waiting. Retry after {retry_after_s:.1f} s."
    return ApiError(429, message, type="requests", code="rate_limit_exceeded", headers=headers)
