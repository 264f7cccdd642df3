"""The limiter's small parts: the TPM cost estimate of a request, the admission `Ticket` it hands out, and the
continuously refilled token bucket (`imitate/teacher/limiter.py` explains how they are used)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

EPS = 1e-9


def estimate_tokens(messages: Iterable[Any], max_tokens: int) -> int:
    """What a request counts against TPM: ~4 UTF-8 bytes per prompt token, a few tokens of chat framing per
    message, plus every completion token it may use. Messages are `Message`s or `{"role", "content"}` dicts."""
    prompt = 3
    for m in messages:
        content = m["content"] if isinstance(m, Mapping) else m.content
        prompt += 4 + math.ceil(len(content.encode("utf-8")) / 4)
    return prompt + max(0, max_tokens)


@dataclass(frozen=True, slots=True)
class Ticket:
    """One admitted request: what it reserved, when, and its place among the other admissions."""

    est_tokens: int
    at: float  # admission time (the limiter's clock): the request cannot have reached the server earlier
    seq: int  # admissions so far, this one included
    cum_tokens: float  # tokens admitted so far, this one included
    # certainly inside the `remaining` of this request's response: itself, and every request answered (any
    # outcome) before it was admitted, since those reached the server before it could
    known: int
    known_tokens: float


class Bucket:
    """A token bucket refilled continuously at `rate` per second; the level may go negative (debt)."""

    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, capacity: float, rate: float, now: float, level: float | None = None):
        self.capacity, self.rate, self.stamp = float(capacity), float(rate), now
        self.level = self.capacity if level is None else min(level, self.capacity)

    @classmethod
    def per_minute(cls, limit: float, now: float) -> Bucket:
        """OpenAI's model of a limit: a minute's worth of capacity, refilled evenly."""
        return cls(limit, limit / 60.0, now)

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now

    def wait(self, cost: float, held: float = 0.0) -> float:
        need = min(cost + held, self.capacity)  # a request bigger than the bucket waits for a full one
        short = need - self.level
        return 0.0 if short <= EPS * max(1.0, need) else short / self.rate

    def resize(self, capacity: float, rate: float) -> None:
        self.capacity, self.rate = float(capacity), float(rate)
        self.level = min(self.level, self.capacity)
