"""Each teacher's state during a run (`TeacherRuntime`), the `Doorbell` that wakes tasks waiting on it, and
`Health`: whether a teacher is down, pure bookkeeping of failed attempts in a row with the clock injected.

Failed attempts in a row (no connection, 5xx, timeouts) count. A teacher that was never reached is down after
`down_after` attempts in a row that could not connect (refused, DNS, unreachable): a wrong port or a dead server
stops the run within seconds, with exit code 4, instead of turning every row into a failure. Otherwise (it
answered before, or it answers with 5xx / times out) it must also have gone `down_after_s` without an answer, so
a brief outage (a server restarting while 256 requests are in flight) is ridden out by the retry policy.
For a fleet (`base_urls`) the count runs over all replicas and any replica's answer resets it: while one server
answers the teacher is up, and its failing servers are taken out and brought back by `fleet.py`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from imitate.config import RetryConfig, TeacherConfig
from imitate.harvest.fleet import Fleet, FleetClients
from imitate.teacher.limiter import RateLimiter


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


class Doorbell:
    """Wakes tasks that wait for the limiter as soon as something changed (a request of the teacher finished,
    freeing a slot and feeding the limiter; or the run is stopping) instead of polling it: a timer and a future
    per wait, no task."""

    def __init__(self) -> None:
        self._waiters: set[asyncio.Future] = set()

    async def wait(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        timer = loop.call_later(timeout, _resolve, fut)
        self._waiters.add(fut)
        try:
            await fut
        finally:
            timer.cancel()
            self._waiters.discard(fut)

    def ring(self) -> None:
        for fut in self._waiters:
            _resolve(fut)


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


@dataclass
class TeacherRuntime:
    """One teacher during a run: its replicas (`fleet.py`; a lone server is a fleet of one, each with its own
    client and limiter), its queue of rows, and its breaker (`health`: any replica's answer resets it, so the
    teacher is down only when all its replicas are)."""

    cfg: TeacherConfig
    fleet: Fleet
    queue: asyncio.Queue
    health: Health
    doorbell: Doorbell = field(default_factory=Doorbell)
    dead: str | None = None
    sent: int = 0
    ok: int = 0
    throttled: int = 0
    tokens: int = 0

    @classmethod
    def start(cls, t: TeacherConfig, client: Any, retry: RetryConfig, clock: Callable[[], float]) -> TeacherRuntime:
        """`client`: a TeacherClient, or a FleetClients (one per replica) for a teacher with several base_urls."""
        fleet = Fleet.build(
            t.replicas,
            client.clients if isinstance(client, FleetClients) else [client],
            lambda: RateLimiter(rpm=t.rpm, tpm=t.tpm, max_concurrency=t.max_concurrency, clock=clock),
            out_after=retry.replica_out_after,
            backoff_s=retry.replica_backoff_s,
            max_backoff_s=retry.max_delay_s,
            clock=clock,
        )
        queue: asyncio.Queue = asyncio.Queue(maxsize=max(16, 2 * t.max_concurrency * len(t.replicas)))
        return cls(t, fleet, queue, Health(retry.down_after, retry.down_after_s, clock))

    def snapshot(self) -> dict[str, Any]:
        """The limiter state (summed over replicas, each listed under `replicas` in a fleet) and the counts."""
        return {**self.fleet.snapshot(), "sent": self.sent, "ok": self.ok, "throttled": self.throttled,
                "dead": self.dead}  # fmt: skip
