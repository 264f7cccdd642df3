"""The pure rate limiter under a fake clock, and a discrete-event simulation against a token-bucket server."""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass

import pytest

from imitate.records import Message
from imitate.teacher.buckets import Bucket
from imitate.teacher.limiter import RateLimiter, Ticket, estimate_tokens
from imitate.teacher.reply import RateLimitState
from imitate.teacher.views import RECLAIM_VIEWS, ServerView, View

NO_HEADERS = RateLimitState()


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def admit_all(lim: RateLimiter, est: int = 1, limit: int = 10_000) -> list[Ticket]:
    tickets: list[Ticket] = []
    while len(tickets) < limit and (ticket := lim.try_acquire(est)[1]) is not None:
        tickets.append(ticket)
    return tickets


def answer(lim: RateLimiter, tickets: list[Ticket], rate: RateLimitState = NO_HEADERS, latency: float = 0.1) -> None:
    for ticket in tickets:
        lim.on_success(ticket, ticket.est_tokens, rate, latency)


def test_estimate_tokens():
    assert estimate_tokens([{"role": "user", "content": "abcd" * 10}], 100) == 3 + 4 + 10 + 100
    msgs = [Message(role="system", content="x"), Message(role="user", content="日本")]  # 6 UTF-8 bytes
    assert estimate_tokens(msgs, 0) == 3 + (4 + 1) + (4 + 2)


def test_request_bucket_capacity_and_refill():
    clock = Clock()
    lim = RateLimiter(rpm=60, tpm=None, clock=clock)
    assert lim.concurrency_limit == 256  # a configured limit: the bucket governs from the start
    first = admit_all(lim)
    assert len(first) == 30  # half held back until the first answer confirms the server is alive
    answer(lim, first[:1])
    assert len(admit_all(lim)) == 30
    wait, ticket = lim.try_acquire(1)
    assert ticket is None and wait == pytest.approx(1.0)  # 60 rpm: one more per second
    clock.t += 2.5
    assert len(admit_all(lim)) == 2


def test_token_reservation_and_reconciliation():
    clock = Clock()
    lim = RateLimiter(rpm=None, tpm=12_000, clock=clock)
    first = admit_all(lim, est=3000)
    assert len(first) == 2  # 6000 of 12000 usable before the first answer
    lim.on_success(first[0], 5000, NO_HEADERS, 0.1)  # used more than estimated: 2000 more charged
    assert len(admit_all(lim, est=3000)) == 1  # 12000 - 6000 - 2000 = 4000
    assert lim.try_acquire(3000) == (pytest.approx(2000 / 200), None)  # 1000 left; 12000 tpm = 200 tokens/s
    clock.t += 10
    assert len(admit_all(lim, est=3000)) == 1

    refunding = RateLimiter(rpm=None, tpm=12_000, clock=clock, refund_unused=True)
    first = admit_all(refunding, est=3000)
    assert len(first) == 2
    refunding.on_success(first[0], 1000, NO_HEADERS, 0.1)  # 2000 unused max_tokens come back: 8000 left
    assert len(admit_all(refunding, est=3000)) == 2


@pytest.mark.parametrize("latency", [2.0, 3.5], ids=["measured", "inflated"])
def test_header_loop_lowers_our_bucket_counting_later_admissions_once(latency):
    clock = Clock()
    lim = RateLimiter(rpm=600, tpm=None, clock=clock)
    answer(lim, admit_all(lim, limit=1))  # lifts the hold-back
    (first,) = admit_all(lim, limit=1)  # admitted and sent at t0
    clock.t += 1.0
    assert len(admit_all(lim, limit=5)) == 5  # admitted after the first one: not in its `remaining`
    clock.t += 1.0
    # another client shares the key: the server had only 50 left when it took our first request (2 s ago)
    lim.on_success(first, 1, RateLimitState(remaining_requests=50), latency_s=latency)
    # 50 + 10/s x 2 s since it was admitted - 5 later admissions; a latency inflated by a busy client (longer
    # than the request's age) credits no refill from before its admission
    assert len(admit_all(lim)) == 65


def test_views_lower_at_once_but_raise_only_to_what_is_certain():
    clock = Clock()
    lim = RateLimiter(rpm=None, tpm=None, clock=clock)
    assert lim.concurrency_limit == 8
    burst = admit_all(lim)
    assert len(burst) == 8
    clock.t += 0.5
    lim.on_success(burst[0], 1, RateLimitState(limit_requests=120, remaining_requests=112), latency_s=0.5)
    assert lim.limit("requests") == 120 and lim.concurrency_limit == 256  # the stated limit is adopted
    more = admit_all(lim)
    assert len(more) == 112 + 1 - 7  # + 2/s since it left, - the 7 admitted after it (not in `remaining`)
    clock.t += 1.0
    # burst[1] waited for a connection and reached the server only now, after requests admitted later had
    # perhaps overtaken it: 100 left says nothing certain about the 112 admitted after it. A level taken from
    # it as `100 + refill - admissions since it left` was the bench's 429 cluster (bench/RESULTS.md)
    lim.on_success(burst[1], 1, RateLimitState(limit_requests=120, remaining_requests=100), latency_s=0.01)
    assert admit_all(lim) == []  # not raised; lowered at once, assuming none of them is in `remaining`
    answer(lim, burst[2:] + more)  # every request answered (without headers)
    clock.t += 10.0
    probes = admit_all(lim)
    assert len(probes) == 8  # -12 + 2/s x 10 s
    lim.on_success(probes[0], 1, RateLimitState(limit_requests=120, remaining_requests=100), latency_s=0.1)
    assert len(admit_all(lim)) == 100 - 7  # certain now: only the 7 other probes may be missing from it


def test_configured_lower_limit_is_never_raised_by_headers():
    clock = Clock()
    lim = RateLimiter(rpm=60, tpm=None, clock=clock)
    (ticket,) = admit_all(lim, limit=1)
    lim.on_success(ticket, 1, RateLimitState(limit_requests=6000, remaining_requests=5999), latency_s=0.1)
    assert lim.limit("requests") == 60
    assert len(admit_all(lim)) == 59


def test_retry_after_pauses_the_whole_teacher():
    clock = Clock()
    lim = RateLimiter(rpm=None, tpm=None, clock=clock)
    tickets = admit_all(lim, limit=3)
    assert len(tickets) == 3
    lim.on_rate_limited(tickets[0], RateLimitState(retry_after_s=5.0), latency_s=0.05)
    assert lim.paused_until == pytest.approx(clock.t + 5.0)
    assert lim.try_acquire(1) == (pytest.approx(5.0), None)
    clock.t += 4.0
    assert lim.try_acquire(1) == (pytest.approx(1.0), None)  # every caller waits, not just the throttled task
    clock.t += 1.0
    assert lim.try_acquire(1)[0] == 0.0


def test_aimd_cuts_once_per_round_trip_and_stays_in_bounds():
    clock = Clock()
    lim = RateLimiter(rpm=None, tpm=None, max_concurrency=20, clock=clock)
    burst = admit_all(lim)
    assert len(burst) == 8
    wait, ticket = lim.try_acquire(1)
    assert ticket is None and 0 < wait <= 0.25  # slots full: a short hint
    throttled = RateLimitState(remaining_requests=0)  # a stated 429: no pace to learn, only AIMD
    lim.on_rate_limited(burst[0], throttled, latency_s=0.05)
    assert lim.concurrency_limit == 5  # 8 * 0.7
    lim.on_rate_limited(burst[1], throttled)  # same burst: admitted before the cut (with or without a latency)
    assert lim.concurrency_limit == 5
    for t in burst[2:]:
        lim.on_failure(t)  # not overloaded: no cut
    for _ in range(20):  # cut again and again (each signal from a request admitted after the last cut)
        clock.t += 1.0
        lim.on_rate_limited(admit_all(lim, limit=1)[0], throttled, latency_s=0.05)
    assert lim.concurrency_limit == 1
    for _ in range(400):  # additive increase (+1 per full round) never passes max_concurrency
        clock.t += 0.01
        answer(lim, admit_all(lim), latency=0.01)
    assert lim.concurrency_limit == 20


def test_no_limits_slow_start_and_failures_free_slots():
    clock = Clock()
    lim = RateLimiter(rpm=None, tpm=None, clock=clock)
    burst = admit_all(lim)
    assert len(burst) == 8 and lim.in_flight == 8
    lim.on_success(burst[0], 1, NO_HEADERS, 0.5)
    assert lim.concurrency_limit == 9 and lim.in_flight == 7  # slow start: +1 per success
    lim.on_failure(burst[1])
    assert lim.in_flight == 6 and lim.concurrency_limit == 9
    lim.on_failure(burst[2], overloaded=True)
    assert lim.concurrency_limit == 8  # 9 * 0.9
    snap = lim.snapshot()
    assert snap["in_flight"] == 5 and snap["utilisation"] is None and snap["failed"] == 2
    assert {"concurrency_limit", "rate_limited", "pace_rpm", "paused_for_s", "rpm_limit"} <= set(snap)


def test_views_reclaim_slack_only_when_a_row_agrees_and_the_bucket_holds_us_back():
    bucket, server = Bucket(600, 10.0, 0.0, level=0.5), ServerView()  # a 600 RPM server, 0.5 left to us

    def view(seq: int, remaining: float) -> None:  # in flight: many (nothing certain), none admitted after it
        server.apply(bucket, View(remaining, 0.0, 0.0, 100.0, seq, seq, 1.0), 0.0, 600, True, 100 + seq)

    for seq in range(1, RECLAIM_VIEWS):
        view(seq, 10.5 + seq)  # every view says at least 10 more than our level is there
        assert bucket.level == 0.5
    view(RECLAIM_VIEWS, 30.0)
    assert bucket.level == pytest.approx(0.5 + 10.0 + 1.0 - 2.0)  # the smallest gap (11), less a margin of 2
    bucket.level = 300.0  # in a burst (sends waiting for connections) a row of views proves nothing
    for seq in range(200, 200 + 2 * RECLAIM_VIEWS):
        view(seq, 400.0)
    assert bucket.level == 300.0


def test_views_measure_what_other_clients_on_the_key_drain():
    bucket, server = Bucket(600, 10.0, 0.0, level=0.0), ServerView()
    for i in range(50):  # 5 s: the server stays empty while we take 5 of its 10 requests a second
        t = i / 10
        server.apply(bucket, View(0.0, t, 0.0, 0.0, 5 * t, i + 1, 1.0), t, 600, True, i + 1)
    assert server.foreign == pytest.approx(5.0, rel=0.01)
    assert bucket.rate == pytest.approx(10.0 - 1.1 * 5.0, rel=0.01)  # their share and a tenth more left to them
    server.on_rejected(51, exhausted=True)  # a 429: they took more than measured, for a while
    assert server.drain == pytest.approx(5.5, rel=0.01)


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


@dataclass
class IdleClient:
    """Fixed latency: a request reaches the server 1 ms after its admission, a 429 comes back in 50 ms."""

    latency: float = 2.0

    def send_at(self, now: float) -> float:
        return now + 0.001

    def read_at(self, sent: float, accepted: bool) -> float:
        return sent - 0.001 + (self.latency if accepted else 0.05)


@dataclass
class BusyClient:
    """A client on a saturated CPU (bench/RESULTS.md, `--parallel`): new connections open one at a time,
    `connect_s` each, while a request that finds an idle one leaves at once, so later admissions overtake
    earlier ones; every send is up to `send_jitter` late and every response is read up to `read_jitter` late
    (the server answers in 0.3-1.0 s, a 429 in 10 ms). Latency is timed from the admission, as by the collector.
    """

    connect_s: float = 0.02
    send_jitter: float = 1.0
    read_jitter: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        self.rng, self.idle, self.connecting = random.Random(self.seed), 0, 0.0

    def send_at(self, now: float) -> float:
        if self.idle:
            self.idle -= 1
            return now + self.rng.uniform(0.0, self.send_jitter)
        self.connecting = max(self.connecting, now) + self.connect_s
        return self.connecting

    def read_at(self, sent: float, accepted: bool) -> float:
        self.idle += 1  # (free from the moment it is read: the order of events is what matters here)
        return sent + (self.rng.uniform(0.3, 1.0) if accepted else 0.01) + self.rng.uniform(0.0, self.read_jitter)


@dataclass
class JitterClient:
    """The fake teacher's latency: uniform in [low, high] (the bench's 0.3-1.0 s), a 429 back in 10 ms; each
    send up to `send_jitter` late (an event loop's scheduling, a connection from the pool)."""

    low: float = 0.3
    high: float = 1.0
    send_jitter: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def send_at(self, now: float) -> float:
        return now + 0.001 + self.rng.uniform(0.0, self.send_jitter)

    def read_at(self, sent: float, accepted: bool) -> float:
        return sent + (self.rng.uniform(self.low, self.high) if accepted else 0.01)


@dataclass
class SimResult:
    ok: int  # our requests the server took
    limited: int  # ... and answered 429
    other_ok: int  # the other client's requests the server took
    last: float  # when our last success was read

    @property
    def share_429(self) -> float:
        return self.limited / max(1, self.ok + self.limited)


def simulate_run(server, rpm, tpm=None, *, est=500, used=300, duration=180.0, client=None, rows=None, other_rps=0.0,
                 seed=0, limiter=RateLimiter) -> SimResult:  # fmt: skip
    """Drives a limiter against `server` until `duration` s (or until `rows` rows are answered, a 429'd row
    being sent again), then lets the last requests finish. `other_rps`: another client on the same key takes
    that many requests a second from the same server bucket, one at a random moment of each 1/other_rps s slot
    (a 429 is its own loss: it keeps its pace)."""
    client = client or IdleClient()
    clock = Clock()
    clock.t = 0.0
    lim = limiter(rpm=rpm, tpm=tpm, clock=clock)
    events: list[tuple[float, int, str, tuple]] = [(0.0, 0, "wake", ())]
    rng = random.Random(seed)
    if other_rps:
        events.append((rng.uniform(0.0, 1.0 / other_rps), 0, "other", ()))
    seq = ok = limited = other_ok = 0
    todo = rows if rows is not None else -1
    next_wake = last = 0.0
    while events:
        clock.t, _, kind, data = heapq.heappop(events)
        if kind == "other":
            other_ok += server.take(clock.t, est)[0]
            if (at := (math.floor(clock.t * other_rps) + 1 + rng.random()) / other_rps) <= duration:
                heapq.heappush(events, (at, 0, "other", ()))
            continue
        if kind == "send":
            ticket, admitted = data
            accepted, rate = server.take(clock.t, est)
            ok, limited, seq = ok + accepted, limited + (not accepted), seq + 1
            heapq.heappush(events, (client.read_at(clock.t, accepted), seq, "read", (ticket, admitted, accepted, rate)))
            continue
        if kind == "read":
            ticket, admitted, accepted, rate = data
            if accepted:
                lim.on_success(ticket, used, rate, clock.t - admitted)
                last = clock.t
            else:
                lim.on_rate_limited(ticket, rate, latency_s=clock.t - admitted)
                todo += 1 if rows is not None else 0
        if clock.t > duration:
            continue
        while todo != 0 and (admission := lim.try_acquire(est))[1] is not None:
            seq, todo = seq + 1, todo - 1
            heapq.heappush(events, (client.send_at(clock.t), seq, "send", (admission[1], clock.t)))
        if todo == 0:
            continue
        slots_full = lim.in_flight >= lim.concurrency_limit and clock.t >= lim.paused_until
        wait = admission[0]
        if not slots_full and (next_wake <= clock.t or clock.t + wait < next_wake):  # else a completion wakes us
            next_wake, seq = clock.t + wait, seq + 1
            heapq.heappush(events, (next_wake, seq, "wake", ()))
    return SimResult(ok, limited, other_ok, last)


def simulate(server: SimServer, rpm, tpm=None, *, est=500, used=300, duration=180.0, client=None):
    """The share of the ideal throughput a limiter got over `duration` s, and the share of its requests
    answered 429."""
    run = simulate_run(server, rpm, tpm, est=est, used=used, duration=duration, client=client)
    per_minute = min(server.rpm, server.tpm / est if server.tpm else server.rpm)
    ideal = (1 + duration / 60) * per_minute  # the initial bucket plus the refill over the run
    return run.ok / ideal, run.share_429


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


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("configured", [600, 1200, None], ids=["right", "2x-too-high", "not-configured"])
def test_simulation_with_a_busy_client_keeps_429s_rare(configured, seed):
    """The bench's stress variant: sends late and out of admission order, responses read late, latencies 2-3x
    the server's. Views dated by the measured latency raised the bucket by requests still waiting to leave:
    4.0-4.4 % of requests were 429s here (limiter.py as of 4904c5f)."""
    throughput, share_429 = simulate(SimServer(rpm=600), rpm=configured, client=BusyClient(seed=seed))
    assert throughput >= 0.97 and share_429 <= 0.02, (throughput, share_429)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("configured", [1200, 2400, None], ids=["right", "2x-too-high", "not-configured"])
def test_simulation_shares_a_key_quietly(configured, seed):
    """Another job on the same key sends half of a 1,200 RPM limit, one request at a random moment of every
    100 ms (200 ms latency, our sends up to 20 ms late). The server's `remaining` counts its requests too, so
    the refill we may count on is only the share it leaves. Crediting the whole refill (limiter.py as of
    6d097b4) gave 16-17 % 429s here, and the other job lost 14-19 % of its requests to us."""
    duration = 180.0
    client = JitterClient(0.2, 0.2, send_jitter=0.02, seed=seed)
    run = simulate_run(SimServer(rpm=1200), rpm=configured, duration=duration, client=client, other_rps=10.0, seed=seed)
    left = 1200 * (1 + duration / 60) - run.other_ok  # what the other job left of the first bucket and the refill
    assert run.ok / left >= 0.97 and run.share_429 <= 0.02, (run.ok / left, run.share_429)
    assert run.other_ok >= 0.95 * 10.0 * duration, run.other_ok  # and it still gets its half


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("configured", [1200, 2400, None], ids=["right", "2x-too-high", "not-configured"])
def test_simulation_short_run_spends_the_burst(configured, seed):
    """1,800 rows at 1,200 RPM, the server's bucket full at the start: ideally 1,200 at once and the rest at
    20/s, the last one sent after 30 s. Sends up to 200 ms late and out of order, 0.3-1.0 s latency. Raising
    the level only to what is certain left about the requests in flight unused on the server for good:
    0.938-0.947 of the ideal time here (limiter.py as of 6d097b4); reclaimed, 0.96-0.97."""
    run = simulate_run(SimServer(rpm=1200), rpm=configured, rows=1800, client=JitterClient(send_jitter=0.2, seed=seed))
    assert run.ok == 1800 and run.limited == 0 and 30.0 / run.last >= 0.95, (30.0 / run.last, run.limited)
