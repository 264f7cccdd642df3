"""The pure per-teacher rate limiter: token buckets, a closed loop on rate-limit headers, AIMD concurrency and
a learned pace for servers that say nothing. No asyncio, no sleeping: the clock is injected and every method
returns at once, so it is unit-tested with a fake clock and driven by the async collector like this:

    est = estimate_tokens(messages, max_tokens)
    wait, ticket = limiter.try_acquire(est)      # (0.0, ticket): a slot and the budget are reserved
    while ticket is None:
        await sleep(min(wait, 1.0))              # also fine to retry early, e.g. after a completion
        wait, ticket = limiter.try_acquire(est)
    ...send...
    limiter.on_success(ticket, usage.total_tokens, reply.rate, reply.latency_s)     # 200
    limiter.on_rate_limited(ticket, rate, latency_s=...)                            # 429 (throttling)
    limiter.on_failure(ticket, overloaded=...)                                      # anything else

Every ticket must be answered by exactly one `on_*` call (it frees the slot). A ticket carries the request's
estimate and its place among the admissions, so the limiter never has to infer them from a measured latency.

How it decides (tests/test_limiter.py simulates it against a token-bucket server):
- Buckets: `rpm`/`tpm` (configured, or from `x-ratelimit-limit-*`; the lower wins) are token buckets holding a
  minute's worth, refilled continuously. A request reserves 1 request and `est` tokens (prompt estimate +
  max_tokens: what OpenAI counts at admission). Until the first success, half of a configured bucket is held
  back, so a limit configured up to 2x too high cannot overrun the server before its headers correct us.
- Reconciliation: a prompt that used more than estimated is charged the difference. Unused max_tokens are
  refunded only with `refund_unused=True` (servers differ; the header loop credits real refunds once certain).
- Header loop (imitate/teacher/views.py): a response's `remaining-*` is the server's bucket right after it took
  that request, at a moment we do not know exactly, and it counts every client on the key. Each view *lowers*
  our level at once to `min(capacity, remaining + refill since the earliest moment it was read) - admissions
  after this request`, and *raises* it at once only to what is certain, `remaining - every request unanswered
  when this one was admitted or admitted since` (uncapped, a view from a request that overtook earlier ones
  still waiting for a connection raised the level by what those would take, 34 -> 174, and a cluster of 429s
  followed). What certainty leaves on the server (about the requests in flight: 1.6 s of a 30 s run with a
  busy client) is *reclaimed* once a row of views, all of requests admitted while the bucket held us back,
  agree that it is there. The refill our bucket counts on is the server's less what other clients on the key
  drain, measured from how `remaining` falls between views seconds apart beyond what we took; crediting the
  whole refill gave 7-17 % 429s against a second job using half the limit. Raises are only made when the
  server's stated limit is the one in force (a lower configured limit, a deliberate share, is never raised).
- AIMD concurrency: start at max_concurrency when a limit is configured, else at `initial_concurrency` with
  slow start (+1 per success, paced at 2x the current throughput so the first 429s stop the burst); jump to
  max_concurrency once headers state the limits (the buckets govern). A 429 multiplies the limit by 0.7 at
  most once per round trip (only a 429 for a request admitted after the last cut counts), then growth is
  +1/cwnd per success; 5xx/timeouts with `overloaded=True` cut by 0.9. Bounded by [1, max_concurrency]; no growth
  while per-token latency is 4x its floor (a queueing server) or while half the slots are idle.
- Retry-After pauses the whole teacher until now + retry_after (every `try_acquire` waits), not one task.
- Learned pace, for 429s no stated limit explains (header-less servers, wrong config): the request rate is cut
  to 0.85 x the lower of the recent send rate and the rate the server accepted between the last two 429s
  (both mean "bucket empty", so what it took in between is its refill), at most halving per cut, and grows
  2 %/s (at most 0.5 % per success). The server's own minute-deep bucket absorbs the sawtooth.
- No refund on failures or 429s: the server has most likely counted the attempt (OpenAI counts rejected
  requests too).
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from typing import Any

from imitate.teacher.buckets import EPS, Bucket, Ticket, estimate_tokens
from imitate.teacher.reply import RateLimitState
from imitate.teacher.views import ServerView, View

__all__ = ["RateLimiter", "Ticket", "estimate_tokens"]

CONCURRENCY_CUT = 0.7  # multiplicative decrease of the concurrency limit on a 429
OVERLOAD_CUT = 0.9  # ... and on a 5xx / timeout reported as overload
PACE_CUT = 0.85  # learned pace: multiplicative decrease on a 429 ...
PACE_CUT_MIN = 0.5  # ... but never below this fraction of the current rate in one cut
MIN_SAMPLE = 4  # requests between two 429s needed to estimate the server's rate from them
PACE_GROWTH_PER_S = 0.02  # learned pace: relative growth per second (at full pace) ...
PACE_GROWTH_PER_OK = 0.005  # ... but at most this much per success
STARTUP_GAIN = 2.0  # with nothing known, slow start sends at most this multiple of the current throughput
PACE_BURST_S = 1.0  # the pace bucket holds this many seconds of requests
LATENCY_TOLERANCE = 4.0  # concurrency stops growing above this multiple of the per-token latency floor
HISTORY_S = 60.0  # admissions kept at least this long (utilisation, header loop)


class RateLimiter:
    def __init__(
        self,
        *,
        rpm: int | None,
        tpm: int | None,
        max_concurrency: int = 256,
        clock: Callable[[], float] = time.monotonic,
        initial_concurrency: int = 8,
        refund_unused: bool = False,
    ):
        self._clock = clock
        now = clock()
        self._cfg = {"requests": rpm, "tokens": tpm}
        self._buckets: dict[str, Bucket | None] = {
            "requests": Bucket.per_minute(rpm, now) if rpm else None,
            "tokens": Bucket.per_minute(tpm, now) if tpm else None,
        }
        self._confirmed = False  # a limit header has been seen
        # a server-stated limit we adopted: its `remaining` may raise our bucket too, not only lower it
        self._authoritative = {"requests": False, "tokens": False}
        self._views = {"requests": ServerView(), "tokens": ServerView()}  # what the headers have shown
        self._rejected = {"requests": 0, "tokens": 0.0}  # answered 429: not taken by the server
        self._answered = False  # a success yet (until then half of a configured bucket is held back)
        self.max_concurrency = max(1, max_concurrency)
        configured = bool(rpm or tpm)
        start = self.max_concurrency if configured else min(self.max_concurrency, max(1, initial_concurrency))
        self._cwnd = float(start)
        self._ssthresh = float(self.max_concurrency)
        self._refund = refund_unused
        self._in_flight = 0
        self._paused_until = -math.inf
        self._last_cut = -math.inf
        self._cut_after = 0  # admissions before the last cut
        self._pace: Bucket | None = None
        self._startup_next = -math.inf
        # admissions: times and cumulative tokens (a list with a moving start, for bisect)
        self._adm_t: list[float] = []
        self._adm_cum: list[float] = []
        self._adm_start = 0
        self._adm_tokens = 0.0
        self._settled = 0  # requests answered (any outcome), and their estimated tokens
        self._settled_tokens = 0.0
        self._oks: deque[float] = deque()
        self._latency: float | None = None
        self._per_token: float | None = None
        self._per_token_floor = math.inf
        self._max_latency = 0.0
        self.counts = {"admitted": 0, "ok": 0, "rate_limited": 0, "failed": 0, "cuts": 0}

    # ------------------------------------------------------------------------------------------ state

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def concurrency_limit(self) -> int:
        return int(self._cwnd)

    @property
    def paused_until(self) -> float:
        return self._paused_until

    @property
    def pace_rpm(self) -> float | None:
        return self._pace.rate * 60.0 if self._pace else None

    def limit(self, kind: str) -> float | None:
        """The per-minute limit in force for 'requests' or 'tokens' (None: unknown)."""
        b = self._buckets[kind]
        return b.capacity if b else None

    # ------------------------------------------------------------------------------------------ admission

    def _gates(self, est_tokens: int) -> list[tuple[Bucket, float, float]]:
        """(bucket, cost, held back) for every bucket in force, the learned pace included."""
        out = []
        for kind, cost in (("requests", 1.0), ("tokens", float(est_tokens))):
            b = self._buckets[kind]
            if b is not None:
                out.append((b, cost, 0.0 if self._answered or self._confirmed else b.capacity / 2))
        return out + ([(self._pace, 1.0, 0.0)] if self._pace is not None else [])

    def _startup_rate(self) -> float | None:
        """With nothing known, slow start is paced at twice the current throughput, so the first 429s come
        back before a whole round trip's burst has been sent."""
        if self._pace or self._latency is None or any(self._buckets.values()) or self._cwnd >= self._ssthresh:
            return None
        return STARTUP_GAIN * self._cwnd / max(self._latency, 1e-3)

    def try_acquire(self, est_tokens: int) -> tuple[float, Ticket | None]:
        """(0.0, ticket): admitted, a slot and the budget are reserved; answer the ticket with one `on_*` call.
        (wait, None): ask again in `wait` seconds; when only a slot is missing the value is a short hint and
        asking again after any completion is better."""
        now = self._clock()
        if now < self._paused_until:
            return self._paused_until - now, None
        if self._in_flight >= int(self._cwnd):
            return min(0.25, max(0.001, (self._latency or 0.01) / max(1.0, self._cwnd))), None
        startup = self._startup_rate()
        wait = max(0.0, self._startup_next - now) if startup else 0.0
        gates = self._gates(est_tokens)
        for bucket, cost, held in gates:
            bucket.refill(now)
            wait = max(wait, bucket.wait(cost, held))
        if wait > 0:
            return wait, None
        for bucket, cost, _ in gates:
            bucket.level -= cost
        if startup:
            self._startup_next = max(self._startup_next, now) + 1.0 / startup
        self._in_flight += 1
        self.counts["admitted"] += 1
        self._log_admission(now, est_tokens)
        known, known_tokens = self._settled + 1, self._settled_tokens + est_tokens
        return 0.0, Ticket(est_tokens, now, self.counts["admitted"], self._adm_tokens, known, known_tokens)

    def _log_admission(self, now: float, tokens: float) -> None:
        self._adm_tokens += tokens
        self._adm_t.append(now)
        self._adm_cum.append(self._adm_tokens)
        horizon = now - max(HISTORY_S, 2.0 * self._max_latency)
        while self._adm_start < len(self._adm_t) and self._adm_t[self._adm_start] < horizon:
            self._adm_start += 1
        if self._adm_start > 4096 and self._adm_start * 2 > len(self._adm_t):
            del self._adm_t[: self._adm_start], self._adm_cum[: self._adm_start]
            self._adm_start = 0

    def _admitted_since(self, t: float) -> tuple[int, float]:
        """(requests, tokens) admitted at or after time t (within the kept history)."""
        i = bisect_left(self._adm_t, t, lo=self._adm_start)
        n = len(self._adm_t) - i
        before = self._adm_cum[i - 1] if i > 0 else 0.0
        return n, self._adm_tokens - before

    # ------------------------------------------------------------------------------------------ outcomes

    def on_success(self, ticket: Ticket, used_tokens: int, rate: RateLimitState, latency_s: float) -> None:
        now = self._clock()
        self._release(ticket)
        self.counts["ok"] += 1
        self._answered = True
        tok, est_tokens = self._buckets["tokens"], ticket.est_tokens
        if tok is not None and (self._refund or used_tokens > est_tokens):
            tok.refill(now)
            tok.level = min(tok.capacity, tok.level + est_tokens - used_tokens)
        self._observe(ticket, rate, now, latency_s)
        self._note_latency(now, latency_s, used_tokens)
        self._grow()

    def on_rate_limited(self, ticket: Ticket, rate: RateLimitState, latency_s: float | None = None) -> None:
        """A 429. Repeated 429s from one burst (requests admitted before the last cut) count as one signal."""
        now = self._clock()
        self._release(ticket)
        self.counts["rate_limited"] += 1
        self._rejected["requests"] += 1
        self._rejected["tokens"] += ticket.est_tokens
        for kind, remaining, cost in (
            ("requests", rate.remaining_requests, 1),
            ("tokens", rate.remaining_tokens, ticket.est_tokens),
        ):
            self._views[kind].on_rejected(ticket.seq, exhausted=remaining is not None and remaining < cost)
        self._observe(ticket, rate, now, latency_s)
        if rate.retry_after_s:
            self._paused_until = max(self._paused_until, now + rate.retry_after_s)
        if not self._new_signal(ticket):
            return
        since = self._last_cut
        self._cut(now, CONCURRENCY_CUT)
        if not (rate.has_limits or self._confirmed):
            self._learn_pace(now, self._accepted_rate(since, ticket.at))
        if self._pace is not None:  # a rate limit is the pace's job: keep enough slots to follow it
            self._cwnd = max(
                self._cwnd, min(self._cwnd / CONCURRENCY_CUT, 1.5 * self._pace.rate * (self._latency or 0))
            )
        self._ssthresh = self._cwnd  # slow start is over once a limit has been hit

    def on_failure(self, ticket: Ticket, *, overloaded: bool = False) -> None:
        """Any other error. The budget stays spent (the server most likely counted the attempt)."""
        now = self._clock()
        self._release(ticket)
        self.counts["failed"] += 1
        if overloaded and self._new_signal(ticket):
            self._cut(now, OVERLOAD_CUT)

    def _release(self, ticket: Ticket) -> None:
        self._in_flight = max(0, self._in_flight - 1)
        self._settled += 1
        self._settled_tokens += ticket.est_tokens

    def _new_signal(self, ticket: Ticket) -> bool:
        """One decrease per round trip: a signal counts if its request was admitted after the last cut (an
        earlier one was let through by the limits the cut has already lowered)."""
        return ticket.seq > self._cut_after

    def _cut(self, now: float, factor: float) -> None:
        self._last_cut, self._cut_after = now, self.counts["admitted"]
        self.counts["cuts"] += 1
        self._cwnd = max(1.0, self._cwnd * factor)

    def _grow(self) -> None:
        if self._pace is not None:
            # relative growth per success: PACE_GROWTH_PER_S per second at speed, but never faster than
            # PACE_GROWTH_PER_OK per success, so a slow server still sees many requests per 429
            rate = self._pace.rate * (1.0 + min(PACE_GROWTH_PER_OK, PACE_GROWTH_PER_S / self._pace.rate))
            self._pace.resize(max(1.0, rate * PACE_BURST_S), rate)
        inflated = self._per_token is not None and self._per_token > LATENCY_TOLERANCE * self._per_token_floor
        if inflated or self._in_flight + 1 < self._cwnd / 2:
            return
        step = 1.0 if self._cwnd < self._ssthresh else 1.0 / self._cwnd
        self._cwnd = min(float(self.max_concurrency), self._cwnd + step)

    def _accepted_rate(self, since: float, until: float) -> float | None:
        """The server's rate between two 429s, which both say its bucket was empty: what it accepted in
        between (the admissions from the last cut to this request: any 429 among them would have cut since) is
        exactly its refill. Those whose 429 has not come back yet count as accepted (429s are fast), so this
        errs high, and the caller takes the lower of it and the current rate."""
        span = until - since
        sent = self._admitted_since(since)[0] - self._admitted_since(until)[0]
        if not math.isfinite(span) or span <= 0 or sent < MIN_SAMPLE:
            return None
        return sent / span

    def _learn_pace(self, now: float, accepted: float | None) -> None:
        window = min(30.0, max(1.0, 2.0 * (self._latency or 0.5)))
        sent, _ = self._admitted_since(now - window)
        current = sent / window
        if self._pace is not None:
            current = min(current, self._pace.rate)
        factor = PACE_CUT if accepted is None else PACE_CUT * min(1.0, accepted / max(current, EPS))
        rate = max(max(PACE_CUT_MIN, factor) * current, 1.0 / 60.0)
        level = min(self._pace.level, 0.0) if self._pace else 0.0
        self._pace = Bucket(max(1.0, rate * PACE_BURST_S), rate, now, level=level)

    # ------------------------------------------------------------------------------------------ headers

    def _observe(self, ticket: Ticket, rate: RateLimitState, now: float, latency_s: float | None) -> None:
        """Reconcile our buckets with the server's `remaining` in the response to `ticket` (imitate/teacher/views.py:
        lowered to the best estimate, raised to what is certain, slack reclaimed, other clients' drain learned)."""
        # the earliest moment the server can have read `remaining`; it may be much later (a send delayed by a
        # busy client), or just now
        sent = ticket.at if latency_s is None else max(ticket.at, now - max(0.0, latency_s))
        n, t = self.counts["admitted"], self._adm_tokens
        dims = (  # kind, limit, remaining, admitted after this request, unanswered when it was admitted or since,
            # taken by the server up to this one, the cost of one request
            ("requests", rate.limit_requests, rate.remaining_requests, n - ticket.seq, n - ticket.known,
             ticket.seq - self._rejected["requests"], 1.0),
            ("tokens", rate.limit_tokens, rate.remaining_tokens, t - ticket.cum_tokens, t - ticket.known_tokens,
             ticket.cum_tokens - self._rejected["tokens"], float(ticket.est_tokens)),
        )  # fmt: skip
        for kind, limit, remaining, later, unsure, taken, cost in dims:
            if limit:
                self._adopt_limit(kind, limit, now)
            bucket = self._buckets[kind]
            if bucket is None or remaining is None:
                continue
            view = View(remaining, sent, later, unsure, taken, ticket.seq, cost)
            self._views[kind].apply(bucket, view, now, limit, self._authoritative[kind], n)

    def _adopt_limit(self, kind: str, limit: int, now: float) -> None:
        """The server states a limit: the buckets govern from now on (not slow start or the learned pace), at
        the lower of it and ours; only when it is the lower one may its `remaining` raise our level."""
        if not self._confirmed:
            self._confirmed, self._pace = True, None
            self._cwnd = self._ssthresh = float(self.max_concurrency)
        cfg = self._cfg[kind]
        self._authoritative[kind] = not cfg or cfg >= limit
        target = min(cfg, limit) if cfg else limit
        bucket = self._buckets[kind]
        if bucket is None:
            self._buckets[kind] = Bucket.per_minute(target, now)
        elif bucket.capacity != target:
            bucket.refill(now)
            bucket.resize(target, target / 60.0)

    # ------------------------------------------------------------------------------------------ telemetry

    def _note_latency(self, now: float, latency_s: float, used_tokens: int) -> None:
        self._oks.append(now)
        while self._oks[0] < now - HISTORY_S:
            self._oks.popleft()
        self._max_latency = max(self._max_latency, latency_s)
        self._latency = latency_s if self._latency is None else 0.9 * self._latency + 0.1 * latency_s
        per_token = latency_s / max(1, used_tokens)
        self._per_token = per_token if self._per_token is None else 0.9 * self._per_token + 0.1 * per_token
        # the floor forgets slowly, so a server that got faster or slower for good is re-learned
        self._per_token_floor = min(self._per_token_floor * 1.0001, per_token)

    def snapshot(self) -> dict[str, Any]:
        """For the progress view: limits in force, how much of them the last minute used, AIMD state, counts."""
        now = self._clock()
        n, tokens = self._admitted_since(now - HISTORY_S)
        shares = []
        for kind, used in (("requests", n), ("tokens", tokens)):
            b = self._buckets[kind]
            if b:
                b.refill(now)
                shares.append(used / b.capacity)
        while self._oks and self._oks[0] < now - HISTORY_S:
            self._oks.popleft()
        return {
            "in_flight": self._in_flight,
            "concurrency_limit": self.concurrency_limit,
            "rpm_limit": self.limit("requests"),
            "tpm_limit": self.limit("tokens"),
            "limits_from_headers": self._confirmed,
            "others_rpm": self._views["requests"].drain * 60.0,  # what other clients on the key drain
            "pace_rpm": self.pace_rpm,
            "utilisation": max(shares) if shares else None,
            "ok_last_minute": len(self._oks),
            "paused_for_s": max(0.0, self._paused_until - now),
            "latency_s": self._latency,
            **self.counts,
        }
