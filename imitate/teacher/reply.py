"""What a teacher call returns (`Reply`) and the rate-limit state read off response headers (pure parsing).

OpenAI sends `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` on every response (reset as durations like
`6m0s`, `1.5s`, `20ms`) and `retry-after` / `retry-after-ms` on 429s. Servers such as vLLM and llama.cpp send
none of these; every field is then None and the limiter falls back to learning from latency and errors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from imitate.records import Usage

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


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
