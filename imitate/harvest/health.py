"""Whether a teacher is down: pure bookkeeping of failed attempts in a row, with the clock injected.

Failed attempts in a row (no connection, 5xx, timeouts) count. A teacher that was never reached is down after
`down_after` attempts in a row that could not connect (refused, DNS, unreachable): a wrong port or a dead server
stops the run within seconds, with exit code 4, instead of turning every row into a failure. Otherwise (it
answered before, or it answers with 5xx / times out) it must also have gone `down_after_s` without an answer, so
a brief outage (a server restarting while 256 requests are in flight) is ridden out by the retry policy.
"""

from __future__ import annotations

from collections.abc import Callable


class Health:
    def __init__(self, down_after: int, down_after_s: float, clock: Callable[[], float]):
        self.down_after = down_after
        self.down_after_s = down_after_s
        self.clock = clock
        self.answered = False
        self.failures = 0
        self.connect_failures = 0
        self.failing_since: float | None = None

    def ok(self) -> None:
        self.answered = True
        self.failures = self.connect_failures = 0
        self.failing_since = None

    def failed(self, *, connect: bool) -> bool:
        """Count one failed attempt (`connect`: no connection could be made); True when the teacher is down."""
        self.failures += 1
        self.connect_failures = self.connect_failures + 1 if connect else 0
        now = self.clock()
        if self.failing_since is None:
            self.failing_since = now
        if self.failures < self.down_after:
            return False
        never_reached = not self.answered and self.connect_failures >= self.down_after
        return never_reached or now - self.failing_since >= self.down_after_s
