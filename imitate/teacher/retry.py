"""Retry policy by error class, as data for tenacity (pure: the RNG is injected, nothing sleeps here).

| error class                     | what happens                                                        |
|---------------------------------|---------------------------------------------------------------------|
| RateLimited (429)               | retry; the *limiter* pauses the whole teacher (Retry-After), so the  |
|                                 | task itself waits ~0; up to `max_attempts * 4` throttled attempts     |
| ServerError, NetworkError,      | retry with full-jitter exponential backoff (base·2^(n-1), capped),   |
| BadResponse                     | a server's Retry-After wins when longer; up to `max_attempts`         |
| QuotaExhausted, AuthError       | no retry; the teacher is retired for this run                       |
| ContextTooLong, BadRequest,     | no retry; recorded as a failed row with its class                   |
| ContentFiltered, Truncated      |                                                                     |
"""

from __future__ import annotations

import random

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from imitate.config import RetryConfig
from imitate.errors import RateLimited, TeacherError

THROTTLE_FACTOR = 4


class RetryPolicy:
    def __init__(self, cfg: RetryConfig, rng: random.Random | None = None):
        self.cfg = cfg
        self.rng = rng or random.Random(0)

    @staticmethod
    def should_retry(exc: BaseException) -> bool:
        return isinstance(exc, TeacherError) and exc.retryable

    def max_attempts_for(self, exc: BaseException) -> int:
        if isinstance(exc, RateLimited):
            return self.cfg.max_attempts * THROTTLE_FACTOR
        return self.cfg.max_attempts

    def delay(self, exc: BaseException, attempt: int) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None when no further attempt should be made."""
        if not self.should_retry(exc) or attempt >= self.max_attempts_for(exc):
            return None
        if isinstance(exc, RateLimited):
            return 0.0  # the limiter holds the whole teacher until Retry-After; waiting here too would double it
        cap = min(self.cfg.max_delay_s, self.cfg.base_delay_s * 2 ** (attempt - 1))
        wait = self.rng.uniform(0, cap)
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.cfg.max_delay_s))
        return wait

    # tenacity adapters: the same decisions, for code that prefers `async for attempt in policy.retrying()`
    def _stop(self, state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        return exc is None or self.delay(exc, state.attempt_number) is None

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        return (self.delay(exc, state.attempt_number) or 0.0) if exc else 0.0

    def retrying(self, sleep=None) -> AsyncRetrying:
        kwargs = {"sleep": sleep} if sleep is not None else {}
        return AsyncRetrying(
            retry=retry_if_exception(self.should_retry),
            stop=self._stop,
            wait=self._wait,
            reraise=True,
            **kwargs,
        )
