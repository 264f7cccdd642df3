"""A teacher's replicas — several servers of one model (`base_urls`: vLLM, llama.cpp, `imitate serve`) — and which
one gets the next attempt. Pure: the clock is injected and nothing awaits; the collector drives it:

    wait, replica, ticket = fleet.try_acquire(est_tokens)   # None: ask again in `wait` s (or on a completion)
    ... reply = await replica.client.chat(...) ...
    fleet.ok(replica, latency_s)          # an answer
    fleet.answered(replica)               # a 429 or 4xx: the server is up, the request was not served
    fleet.failed(replica, ticket.at)      # refused, reset, timeout, 5xx

Balance: among the replicas in service whose own limiter admits the attempt now, the one with the fewest attempts
outstanding gets it (join the shortest queue: a replica twice as fast frees its slots twice as often, so it gets
about twice the work, with no speed model to tune). Ties go to the lowest recent latency (a moving average; a
replica not measured yet counts as fastest, so each one is tried early), then round robin. A replica whose last
attempt failed comes after the others until it answers again (a dead server fails fast, so it would otherwise
always have the fewest outstanding and draw the next attempts).

Limits are per replica: each has its own RateLimiter made from the teacher's rpm / tpm / max_concurrency, as each
server enforces its own (a fleet of three at rpm 600 may send 1800 a minute), and learns its own pace from its
own headers and 429s.

Back-off: `out_after` failures in a row take a replica out of service for `backoff_s`. When that has passed it is
on probation: it takes one attempt at a time (the next row's; no synthetic probe, which a paid endpoint would
bill); an answer puts it back in service, a failure takes it out again for twice as long (up to
`max_backoff_s`). Failures of attempts sent before it was taken out do not lengthen its back-off. When no replica
is in service none is held back: the fleet is then one failing teacher, and the teacher's breaker
(`runtime.Health`, which any replica's answer resets) decides whether it is down — so a teacher is down only when
all its replicas are. A one-replica teacher never backs off: it behaves exactly as before fleets.

Fatal answers (auth, quota, unknown model, TLS) from any replica retire the whole teacher, as before: replicas
are meant to be the same server, and one that disagrees is a configuration error to fix, not to route around.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from imitate.config import redact_url
from imitate.teacher.limiter import RateLimiter, Ticket

LATENCY_WEIGHT = 0.2  # moving average of a replica's latency: the weight of the newest answer


@dataclass
class Replica:
    """One server of a teacher: its (redacted) URL, client and own limiter, and its place in the rotation."""

    index: int
    url: str
    client: Any  # TeacherClient; Any keeps this module free of the openai import chain in type checks
    limiter: RateLimiter
    failures: int = 0  # failed attempts in a row
    out_until: float | None = None  # out of service until then, on probation after
    backoff_s: float = 0.0  # the length of the current (or last) back-off
    latency_s: float | None = None
    sent: int = 0
    ok: int = 0
    failed: int = 0
    times_out: int = 0

    def state(self, now: float) -> str:
        if self.out_until is None:
            return "in"
        return "out" if now < self.out_until else "probation"


class FleetClients:
    """The clients of a fleet teacher, one per replica in `base_urls` order (what `make_clients` gives the
    collector for a teacher with several replicas); closing it closes them all."""

    def __init__(self, clients: Sequence[Any]):
        self.clients = list(clients)

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()


class Fleet:
    def __init__(
        self,
        replicas: Sequence[Replica],
        *,
        out_after: int,
        backoff_s: float,
        max_backoff_s: float,
        clock: Callable[[], float],
    ):
        if not replicas:
            raise ValueError("a fleet needs at least one replica")
        self.replicas = list(replicas)
        self.out_after = out_after
        self.backoff_s = backoff_s
        self.max_backoff_s = max(max_backoff_s, backoff_s)
        self.clock = clock
        self._next = 0  # round robin among exact ties

    @classmethod
    def build(cls, urls: Sequence[str], clients: Sequence[Any], make_limiter: Callable[[], RateLimiter], **options):
        if len(urls) != len(clients):
            raise ValueError(f"{len(urls)} replica URLs but {len(clients)} clients")
        replicas = [
            Replica(i, redact_url(u), c, make_limiter()) for i, (u, c) in enumerate(zip(urls, clients, strict=True))
        ]
        return cls(replicas, **options)

    @property
    def is_fleet(self) -> bool:
        return len(self.replicas) > 1

    def label(self, replica: Replica) -> str | None:
        """What a record's provenance names as the replica: its URL in a fleet, None for a lone server."""
        return replica.url if self.is_fleet else None

    # ------------------------------------------------------------------------------------------ admission

    def _usable(self, now: float) -> list[Replica]:
        if not any(r.out_until is None for r in self.replicas):
            return self.replicas  # nothing in service: hold none back (the teacher's breaker decides)
        return [r for r in self.replicas if r.out_until is None or (now >= r.out_until and r.limiter.in_flight == 0)]

    @staticmethod
    def _suspect(replica: Replica) -> bool:
        """In service but its last attempt failed: a dead server fails fast, so it would always have the fewest
        outstanding and draw every next attempt until taken out; it comes after the others instead."""
        return replica.out_until is None and replica.failures > 0

    def try_acquire(self, est_tokens: int) -> tuple[float, Replica | None, Ticket | None]:
        """(0.0, replica, ticket): send the attempt to `replica` and answer `ticket` through its limiter.
        (wait, None, None): nothing admits it now; ask again within `wait` seconds, or after a completion."""
        now, n = self.clock(), len(self.replicas)
        usable = self._usable(now)
        order = sorted(usable, key=lambda r: (self._suspect(r), r.limiter.in_flight, r.latency_s or 0.0,
                                              (r.index - self._next) % n))  # fmt: skip
        wait = math.inf
        for replica in order:
            w, ticket = replica.limiter.try_acquire(est_tokens)
            if ticket is not None:
                self._next = (replica.index + 1) % n
                replica.sent += 1
                return 0.0, replica, ticket
            wait = min(wait, w)
        for replica in self.replicas:  # an out replica's return may come first
            if replica.out_until is not None and replica.out_until > now and replica not in usable:
                wait = min(wait, replica.out_until - now)
        return (wait if math.isfinite(wait) else 0.25), None, None

    # ------------------------------------------------------------------------------------------ outcomes

    def ok(self, replica: Replica, latency_s: float) -> None:
        replica.ok += 1
        self.answered(replica)
        if replica.latency_s is None:
            replica.latency_s = latency_s
        else:
            replica.latency_s += LATENCY_WEIGHT * (latency_s - replica.latency_s)

    def answered(self, replica: Replica) -> None:
        """The server answered (even with a 429 or a 4xx): it is up, back in service."""
        replica.failures = 0
        replica.out_until = None
        replica.backoff_s = 0.0

    def failed(self, replica: Replica, admitted_at: float) -> None:
        """A failed attempt (refused, reset, timeout, 5xx) admitted at `admitted_at`."""
        replica.failed += 1
        replica.failures += 1
        if not self.is_fleet:
            return
        now = self.clock()
        if replica.out_until is None:
            if replica.failures >= self.out_after:
                self._take_out(replica, now, self.backoff_s)
        elif admitted_at >= replica.out_until:  # its probe failed: out again, for twice as long
            self._take_out(replica, now, min(self.max_backoff_s, max(replica.backoff_s * 2, self.backoff_s)))

    def _take_out(self, replica: Replica, now: float, backoff_s: float) -> None:
        replica.backoff_s = backoff_s
        replica.out_until = now + backoff_s
        replica.times_out += 1

    # ------------------------------------------------------------------------------------------ telemetry

    def snapshot(self) -> dict[str, Any]:
        """A lone server: its limiter's snapshot, as before fleets. A fleet: the counts summed, the highest
        utilisation, and one entry per replica under `replicas`."""
        snaps = [r.limiter.snapshot() for r in self.replicas]
        if not self.is_fleet:
            return snaps[0]
        out: dict[str, Any] = {}
        for key in snaps[0]:
            values = [s[key] for s in snaps if s.get(key) is not None]
            if key == "limits_from_headers":
                out[key] = all(values)
            elif key == "utilisation":  # the busiest server's
                out[key] = max(values) if values else None
            elif key == "paused_for_s":  # the teacher is paused only while every server is
                out[key] = min(values) if values else None
            elif key == "latency_s":
                out[key] = sum(values) / len(values) if values else None
            else:  # counts and limits add up across servers
                out[key] = sum(values) if values else None
        now = self.clock()
        out["replicas"] = [
            {
                "url": r.url,
                "state": r.state(now),
                "out_for_s": round(max(0.0, r.out_until - now), 3) if r.out_until is not None else 0.0,
                "times_out": r.times_out,
                "sent": r.sent,
                "ok": r.ok,
                "failed": r.failed,
                "in_flight": s["in_flight"],
                "concurrency_limit": s["concurrency_limit"],
                "latency_s": round(r.latency_s, 6) if r.latency_s is not None else None,
            }
            for r, s in zip(self.replicas, snaps, strict=True)
        ]
        return out
