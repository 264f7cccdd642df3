"""What a teacher answered, parsed (pure): a 200 body into a `Reply`, an error status into the one TeacherError
for it (`error_for_status`), and the rate-limit state read off response headers. `scrub` keeps secrets out of
anything a server echoes back.

OpenAI sends `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` on every response (reset as durations like
`6m0s`, `1.5s`, `20ms`) and `retry-after` / `retry-after-ms` on 429s. Servers such as vLLM and llama.cpp send
none of these; every field is then None and the limiter falls back to learning from latency and errors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from imitate.errors import (
    AuthError,
    BadRequest,
    BadResponse,
    ContentFiltered,
    ContextTooLong,
    ModelNotFound,
    NetworkError,
    QuotaExhausted,
    RateLimited,
    ServerError,
    TeacherError,
    Truncated,
)
from imitate.records import Usage

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
NO_KEY = "not-needed"  # local servers (vLLM, llama.cpp, the fake) need no key but the SDK insists on one
_QUOTA_HINTS = ("insufficient_quota", "billing", "exceeded your current quota", "credit balance")
_CONTEXT_HINTS = ("context_length_exceeded", "maximum context length", "context size", "context window")
_FILTER_CODES = {"content_filter", "content_policy_violation"}
_MODEL_MISSING = re.compile(r"model_not_found|model\b.*\b(does not exist|not found)", re.IGNORECASE)
_KEY_LIKE = re.compile(r"\b(sk-[A-Za-z0-9_\-]{6})[A-Za-z0-9_\-]+")
_USERINFO = re.compile(r"(?<=://)[^/?#\s]*@")  # to the last @ before the path, as URL parsers read it


def parse_duration(text: str | None) -> float | None:
    """'6m0s' -> 360.0, '1.5s' -> 1.5, '20ms' -> 0.02, '7' -> 7.0; None or garbage -> None."""
    if text is None:
        return None
    text = text.strip()
    if not text:
        return None
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def format_duration(seconds: float) -> str:
    """The inverse of `parse_duration`, in OpenAI's style: 0.12 -> '120ms', 1.5 -> '1.5s', 360 -> '6m0s'."""
    seconds = max(0.0, seconds)
    if seconds < 1.0:
        return f"{round(seconds * 1000)}ms"
    minutes, rest = divmod(round(seconds, 3), 60.0)
    secs = f"{rest:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{secs}s" if minutes else f"{secs}s"


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(float(text))
    except ValueError:
        return None


@dataclass(frozen=True)
class RateLimitState:
    limit_requests: int | None = None
    limit_tokens: int | None = None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests_s: float | None = None
    reset_tokens_s: float | None = None
    retry_after_s: float | None = None

    @property
    def has_limits(self) -> bool:
        return self.remaining_requests is not None or self.remaining_tokens is not None


def parse_rate_headers(headers: Mapping[str, str]) -> RateLimitState:
    h = {k.lower(): v for k, v in headers.items()}
    retry_after = None
    if "retry-after-ms" in h:
        ms = parse_duration(h["retry-after-ms"])
        retry_after = ms / 1000.0 if ms is not None else None
    if retry_after is None:
        retry_after = parse_duration(h.get("retry-after"))
    return RateLimitState(
        limit_requests=_int(h.get("x-ratelimit-limit-requests")),
        limit_tokens=_int(h.get("x-ratelimit-limit-tokens")),
        remaining_requests=_int(h.get("x-ratelimit-remaining-requests")),
        remaining_tokens=_int(h.get("x-ratelimit-remaining-tokens")),
        reset_requests_s=parse_duration(h.get("x-ratelimit-reset-requests")),
        reset_tokens_s=parse_duration(h.get("x-ratelimit-reset-tokens")),
        retry_after_s=retry_after,
    )


@dataclass
class Reply:
    """A successful (HTTP 200) chat completion. `finish_reason` may still be 'length' or 'content_filter':
    the caller decides what that means for the row."""

    text: str
    usage: Usage
    finish_reason: str | None
    latency_s: float
    rate: RateLimitState = field(default_factory=RateLimitState)
    request_id: str | None = None
    model: str | None = None


# ---------------------------------------------------------------------------------------------- bodies


def scrub(text: str, *secrets: str | None) -> str:
    """`text` without the given secrets, URL userinfo or anything shaped like an OpenAI key."""
    for secret in secrets:
        if secret and secret != NO_KEY and len(secret) >= 4:  # shorter ones would garble every message
            text = text.replace(secret, "***")
    return _KEY_LIKE.sub(r"\1***", _USERINFO.sub("***@", text))


def _error_fields(body: object) -> tuple[str, str, str]:
    """(message, type, code) from an OpenAI-shaped error body, its inner `error` object, or plain text."""
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping):
            body = inner
        elif isinstance(inner, str):  # vLLM / llama.cpp / Ollama variants: {"error": "text"}
            return inner, "", ""
        return tuple(str(body.get(k) or "") for k in ("message", "type", "code"))  # type: ignore[return-value]
    return (str(body) if body is not None else ""), "", ""


def error_for_status(
    status: int,
    headers: Mapping[str, str],
    body: object,
    *,
    api_key: str | None = None,
    secrets: tuple[str, ...] = (),
    chat: bool = False,
) -> TeacherError:
    """The TeacherError for an HTTP error response (pure: usable by every path). `chat`: the request was a chat
    completion, where a 404 means the model or the endpoint is missing whatever the body says."""
    message, type_, code = _error_fields(body)
    rate = parse_rate_headers(headers)
    lowered = f"{type_} {code} {message}".lower()
    text = f"HTTP {status}{f' {code or type_}' if code or type_ else ''}: {message or 'no message'}"
    text = scrub(text, api_key, *secrets)
    request_id = headers.get("x-request-id")
    kwargs = {
        "status": status,
        "retry_after": rate.retry_after_s,
        "request_id": scrub(request_id, api_key, *secrets) if request_id else None,
        "rate": rate,
    }
    if status == 429 and any(hint in lowered for hint in _QUOTA_HINTS):
        return QuotaExhausted(text, hint="add credit or raise the quota, then rerun to resume", **kwargs)
    if status == 429:
        return RateLimited(text, **kwargs)
    if status in (401, 403):
        return AuthError(text, hint="check the API key environment variable and its permissions", **kwargs)
    if status == 404 and (chat or _MODEL_MISSING.search(lowered)):
        return ModelNotFound(text, hint="check the teacher's model name and base_url", **kwargs)
    if status == 408:
        return NetworkError(text, **kwargs)
    if status == 400 and any(hint in lowered for hint in _CONTEXT_HINTS):
        return ContextTooLong(text, **kwargs)
    if status == 400 and (code in _FILTER_CODES or type_ in _FILTER_CODES):
        return ContentFiltered(text, **kwargs)
    if status >= 500:
        return ServerError(text, **kwargs)
    return BadRequest(text, **kwargs)


def reply_from_body(
    content: bytes, headers: Mapping[str, str], latency_s: float, *, secrets: tuple[str, ...] = ()
) -> Reply:
    """Parse a 200 chat-completion body into a Reply; anything unusable is BadResponse. Header values kept in
    the Reply pass the same scrub as error bodies (a careless proxy may echo the key into them)."""
    request_id = headers.get("x-request-id")
    if request_id:
        request_id = scrub(request_id, *secrets)
    try:
        data = json.loads(content)
        choice = data["choices"][0]
        message = choice["message"]
        text = message.get("content")
        usage = Usage(**{k: int(v or 0) for k, v in (data.get("usage") or {}).items() if k in Usage.model_fields})
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        what = "no choices" if isinstance(exc, IndexError) else f"malformed completion ({type(exc).__name__})"
        raise BadResponse(f"HTTP 200 but {what}", status=200, request_id=request_id) from exc
    finish = choice.get("finish_reason")
    if text is None and finish != "content_filter":
        raise BadResponse("HTTP 200 but the message has no content", status=200, request_id=request_id)
    return Reply(
        text=text or "",
        usage=usage,
        finish_reason=finish,
        latency_s=latency_s,
        rate=parse_rate_headers(headers),
        request_id=request_id,
        model=data.get("model"),
    )


def check_finish(reply: Reply) -> None:
    """Raise Truncated / ContentFiltered for a reply that ended on length or the content filter."""
    if reply.finish_reason == "length":
        raise Truncated(f"answer cut at {reply.usage.completion_tokens} tokens", request_id=reply.request_id)
    if reply.finish_reason == "content_filter":
        raise ContentFiltered("answer stopped by the content filter", request_id=reply.request_id)


def error_body(content: bytes) -> object:
    """An error response's body as the SDK would hand it over: parsed JSON, else the text."""
    try:
        return json.loads(content)
    except ValueError:
        return content.decode("utf-8", "replace")
