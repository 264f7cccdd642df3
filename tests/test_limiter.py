"""The pure rate limiter under a fake clock, and a discrete-event simulation against a token-bucket server."""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import pytest

from imitate.records import Message
from imitate.teacher.limiter import RateLimiter, estimate_tokens
from imitate.teacher.reply import RateLimitState

NO_HEADERS = RateLimitState()


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def admit_all(lim: RateLimiter, est: int = 1, limit: int = 10_000) -> int:
    n = 0
    while n < limit and lim.try_acquire(est) == 0.0:
        n += 1
    return n


def test_estimate_tokens():
    assert estimate_tokens([{"role": "user", "content": "abcd" * 10}], 100) == 3 + 4 + 10 + 100
    msgs = [Message(role="system", content="x"), Message(role="user", content="日本")]  # 6 UTF-8 bytes
    assert estimate_tokens(msgs, 0) == 3 + (4 + 1) + (4 + 2)


def test_request_bucket_capacity_and_refill():
    clock = Clock()
    lim = RateLimiter(rpm=60, tpm=None, clock=clock)
    assert lim.concurrency_limit == 256  # a configured limit: the bucket governs from the start
    assert admit_all(lim) == 30  # half held back until the first answer confirms the server is alive
    lim.on_success(1, 1, NO_HEADERS, 0.1)
    assert admit_all(lim) == 30
    assert lim.try_acquire(1) == pytest.approx(1.0)  # 60 rpm: one more per second
    clock.t += 2.5
    assert admit_all(lim) == 2


def test_token_reservation_and_reconciliation():
    clock = Clock()
    lim = RateLimiter(rpm=None, tpm=12_000, clock=clock)
    assert admit_all(lim, est=3000) == 2  # 6000 of 12000 usable before the first answer
    lim.on_success(3000, 5000, NO_HEADERS, 0.1)  # used more than estimated: 2000 more charged
    assert admit_all(lim, est=3000) == 1  # 12000 - 6000 - 2000 = 4000
    assert lim.try_acquire(3000) == pytest.approx(2000 / 200)  # 1000 left; 12000 tpm = 200 tokens/s
    clock.t += 10
    assert admit_all(lim, est=3000) == 1

    refunding = RateLimiter(rpm=None, tpm=12_000, clock=clock, refund_unused=True)
    assert admit_all(refunding, est=3000) == 2
    refunding.on_success(3000, 1000, NO_HEADERS, 0.1)  # 2000 unused max_tokens come back: 8000 left
    assert admit_all(refunding, est=3000) == 2


def test_header_loop_lowers_our_bucket_counting_later_admissions_once():
    clock = Clock()
    lim = RateLimiter(rpm=600, tpm=None, clock=clock)
    lim.on_success(1, 1, NO_HEADERS, 0.1)  # (no request out: just lifts the hold-back)
    assert admit_all(lim, limit=1) == 1  # sent at t0
    clock.t += 1.0
    assert admit_all(lim, limit=5) == 5  # sent after the first one: not in its `remaining`
    clock.t += 1.0
    # another client shares the key: the server had only 50 left when it took our first request (2 s ago)
    lim.on_success(1, 1, RateLimitState(remaining_requests=50), latency_s=2.0)
    # 50 + 10/s * (2 s - 0.05 margin) - 5 later admissions = 64.5
    assert admit_all(lim) == 64


def test_stated_limit_is_adopted_and_a_fresh_view_may_raise_our_bucket():
    clock = Clock()
    lim = RateLimiter(rpm=None, tpm=None, clock=clock)
    assert lim.concurrency_limit == 8
    assert admit_all(lim) == 8
    clock.t += 0.5
    view = RateLimitState(limit_requests=120, remaining_requests=112)  # the server saw all 8
    lim.on_success(1, 1, view, latency_s=0.5)
    assert lim.limit("requests") == 120 and lim.concurrency_limit == 256
    assert admit_all(lim) == 112 - 7  # the 7 same-instant admissions count as later: erring low
    clock.t += 1.0
    lim.on_success(1, 1, RateLimitState(limit_requests=120, remaining_requests=100), latency_s=0.01)
    assert admit_all(lim) > 90  # a fresher view raises our level again (the server's limit is in force)
    before = admit_all(lim)
    lim.on_success(1, 1, RateLimitState(limit_requests=120, remaining_requests=120), latency_s=5.0)
    assert admit_all(lim) == before == 0  # an older view is ignored


def test_configured_lower_limit_is_never_raised_by_headers():
    clock = Clock()
    lim = RateLimiter(rpm=60, tpm=None, clock=clock)
    lim.on_success(1, 1, RateLimitState(limit_requests=6000, remaining_requests=5999), latency_s=0.1)
    assert lim.limit("requests") == 60
    assert admit_all(lim) == 60


def test_retry_after_pauses_the_whole_teacher():
    clock = Clock()
    lim = RateLimiter(rpm=None, tpm=None, clock=clock)
    assert admit_all(lim, limit=3) == 3
    lim.on_rate_limited(1, RateLimitState(retry_after_s=5.0), latency_s=0.05)
    assert lim.paused_until == pytest.approx(clock.t + 5.0)
    assert lim.try_acquire(1) == pytest.approx(5.0)
    clock.t += 4.0
    assert lim.try_acquire(1) == pytest.approx(1.0)  # every caller waits, not just the throttled task
    clock.t += 1.0
    assert lim.try_acquire(1) == 0.0


def test_aimd_cuts_once_per_round_trip_and_stays_in_bounds():
    clock = Clock()
    lim = RateLimiter(rpm=None, tpm=None, max_concurrency=20, clock=clock)
    assert admit_all(lim) == 8
    assert 0 < lim.try_acquire(1) <= 0.25  # slots full: a short hint
    throttled = RateLimitState(remaining_requests=0)  # a stated 429: no pace to learn, only AIMD
    lim.on_rate_limited(1, throttled, latency_s=0.05)
    assert lim.concurrency_limit == 5  # 8 * 0.7
    lim.on_rate_limited(1, throttled, latency_s=0.05)  # same burst: sent before the cut
    assert lim.concurrency_limit == 5
    for _ in range(20):  # cut again and again (each signal from a request sent after the last cut)
        clock.t += 1.0
        lim.on_rate_limited(1, throttled, latency_s=0.05)
    assert lim.concurrency_limit == 1
    for _ in range(400):  # additive increase (+1 per full round) never passes max_concurrency
        clock.t += 0.01
        for _ in range(admit_all(lim)):
            lim.on_success(1, 1, NO_HEADERS, 0.01)
    assert lim.concurrency_limit == 20


def test_no_limits_slow_start_and_failures_free_slots():
    clock = Clock()
    lim = RateLimiter(rpm=None, tpm=None, clock=clock)
    assert admit_all(lim) == 8 and lim.in_flight == 8
    lim.on_success(1, 1, NO_HEADERS, 0.5)
    assert lim.concurrency_limit == 9 and lim.in_flight == 7  # slow start: +1 per success
    lim.on_failure(1)
    assert lim.in_flight == 6 and lim.concurrency_limit == 9
    lim.on_failure(1, overloaded=True)
    assert lim.concurrency_limit == 8  # 9 * 0.9
    snap = lim.snapshot()
    assert snap["in_flight"] == 5 and snap["utilisation"] is None and snap["failed"] == 2
    assert {"concurrency_limit", "rate_limited", "pace_rpm", "paused_for_s", "rpm_limit"} <= set(snap)


# ---------------------------------------------------------------------------------------------- simulation


@dataclass
class SimServer:
    """Enforces RPM (and optionally TPM, charging the estimate, no refunds) as token buckets, answering
    with OpenAI-style headers as of the moment it takes the request."""

    rpm: int
    tpm: int | None = None
    headers: bool = True
    t: float = 0.0

    def __post_init__(self) -> None:
        self.req, self.tok = float(self.rpm), float(self.tpm or 0)

    def take(self, now: float, est: int) -> tuple[bool, RateLimitState]:
        dt, self.t = now - self.t, now
        self.req = min(self.rpm, self.req + dt * self.rpm / 60)
        self.tok = min(self.tpm or 0, self.tok + dt * (self.tpm or 0) / 60)
        ok = self.req >= 1 - 1e-9 and (not self.tpm or self.tok >= est - 1e-6)
        if ok:
            self.req -= 1
            self.tok -= est if self.tpm else 0
        if not self.headers:
            return ok, NO_HEADERS
        retry = None if ok else max(1 - self.req, 0) * 60 / self.rpm
        return ok, RateLimitState(
            limit_requests=self.rpm,
            remaining_requests=int(self.req),
            limit_tokens=self.tpm,
            remaining_tokens=int(self.tok) if self.tpm else None,
            retry_after_s=retry,
        )


def simulate(server: SimServer, rpm, tpm=None, *, est=500, used=300, duration=180.0, latency=2.0):
    """Fixed latency (a 429 comes back in 50 ms, the request reaches the server 1 ms after it is sent)."""
    clock = Clock()
    clock.t = 0.0
    lim = RateLimiter(rpm=rpm, tpm=tpm, clock=clock)
    events: list[tuple[float, int, str, RateLimitState | None]] = [(0.0, 0, "wake", None)]
    seq = ok = limited = 0
    next_wake = 0.0
    while events:
        clock.t, _, kind, rate = heapq.heappop(events)
        if kind == "ok":
            lim.on_success(est, used, rate, latency)
        elif kind == "429":
            lim.on_rate_limited(est, rate, latency_s=0.05)
        if clock.t > duration:
            continue
        while (wait := lim.try_acquire(est)) == 0.0:
            accepted, rate = server.take(clock.t + 0.001, est)
            ok, limited, seq = ok + accepted, limited + (not accepted), seq + 1
            heapq.heappush(events, (clock.t + (latency if accepted else 0.05), seq, "ok" if accepted else "429", rate))
        slots_full = lim.in_flight >= lim.concurrency_limit and clock.t >= lim.paused_until
        if not slots_full and (next_wake <= clock.t or clock.t + wait < next_wake):  # else a completion wakes us
            next_wake, seq = clock.t + wait, seq + 1
            heapq.heappush(events, (next_wake, seq, "wake", None))
    per_minute = min(server.rpm, server.tpm / est if server.tpm else server.rpm)
    ideal = (1 + duration / 60) * per_minute  # the initial bucket plus the refill over the run
    return ok / ideal, limited / (ok + limited)


@pytest.mark.parametrize("configured", [600, 1200, None], ids=["right", "2x-too-high", "not-configured"])
def test_simulation_reaches_the_servers_throughput(configured):
    throughput, share_429 = simulate(SimServer(rpm=600), rpm=configured)
    assert throughput >= 0.97 and share_429 <= 0.02, (throughput, share_429)


@pytest.mark.parametrize("configured", [60_000, 120_000, None], ids=["right", "2x-too-high", "not-configured"])
def test_simulation_tpm_bound(configured):
    throughput, share_429 = simulate(SimServer(rpm=10_000, tpm=60_000), rpm=None, tpm=configured, est=1000)
    assert throughput >= 0.97 and share_429 <= 0.02, (throughput, share_429)


@pytest.mark.parametrize("configured", [1200, None], ids=["2x-too-high", "not-configured"])
def test_simulation_without_headers_stays_stable(configured):
    throughput, share_429 = simulate(SimServer(rpm=600, headers=False), rpm=configured)
    assert throughput >= 0.95 and share_429 <= 0.1, (throughput, share_429)
