"""The header loop for one of the server's buckets (requests or tokens): how the limiter's own bucket is
reconciled with the `remaining` a response states, and what the server's bucket shows of other clients on the
same key (`imitate/teacher/limiter.py` explains the whole limiter). Pure: the times come in as arguments.

A response's `remaining` is the server's bucket right after it took that request, at a moment we do not know
exactly: after the admission, at the earliest `now - latency`, or later (a busy client sends late and out of
admission order). It counts every client on the key. From each such view:

- Lower at once to the estimate `min(capacity, remaining + refill since then) - ours admitted after it`, the
  refill being the share the other clients leave us (below). Low when later requests overtook it: only
  throughput lost, and undone by the next two rules.
- Raise at once only to what is certain, `remaining - ours unanswered when it was admitted or admitted since`
  with no refill credited, which no send order or latency can make overrun the server.
- Reclaim slack: when `RECLAIM_VIEWS` views in a row, all of requests admitted after the last reclaim, put the
  estimate above our level, the level goes up by the smallest of those gaps less a margin. The certain rule
  alone left the server's bucket holding about the requests in flight for good (a second and a half of refill
  on a short run with a busy client); one view that overtook earlier requests cannot do this, a row of them
  that all agree on a gap can.
- The other clients' drain: between two views a few seconds apart, the server refilled `rate x span`, we took
  what we admitted in between (less the 429s), so the rest of the fall in `remaining` is theirs. Measured only
  while the server's bucket cannot have been full in between (a full bucket wastes refill), smoothed, and taken
  off the refill our bucket counts on; a shared key's 429s came from crediting the whole refill.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from imitate.teacher.buckets import Bucket

RECLAIM_VIEWS = 8  # views that must agree on a gap before it is reclaimed
MAX_MARGIN = 64.0  # at most this many requests' worth left unclaimed
FOREIGN_WINDOW_S = 10.0  # the other clients' drain is measured over at most this long ...
FOREIGN_MIN_SPAN_S = 1.0  # ... and at least this long
FOREIGN_GAIN = 0.2  # weight of each new measurement of the other clients' drain (after the first few)
ANCHORS = 50  # views kept for those measurements (one a measurement), evenly spread over the window
FOREIGN_SPREAD = 0.25  # ... when ours of unknown order, at its two ends, are at most this share of its refill
FOREIGN_HEADROOM = 0.1  # the others are left this much more than they take, so a growing need is seen
FOREIGN_BUMP = 0.05  # share of the server's rate a 429 adds to the others' drain
MIN_SHARE = 0.05  # our bucket refills at no less than this share of the server's rate


@dataclass(frozen=True, slots=True)
class View:
    """One response's `remaining` for one bucket, and where its request stood among ours."""

    remaining: float
    sent: float  # the earliest moment the server can have read it
    later: float  # ours admitted after the request (not in `remaining` when sent in admission order)
    unsure: float  # ours unanswered when it was admitted or admitted since (perhaps not in `remaining`)
    taken: float  # ours the server took up to this one, in admission order (429s excluded)
    seq: int  # the request's admission number
    cost: float  # what one request costs in this bucket (the reclaim's margin)


class ServerView:
    """What the views of one of the server's buckets have shown: the date of the last one applied, the other
    clients' drain per second, and the slack window."""

    def __init__(self) -> None:
        self.last = -math.inf  # date of the last view that could lower
        self.foreign = 0.0  # the other clients' drain, per second, as measured ...
        self._bump = 0.0  # ... plus what 429s added to it since (fading)
        self._stamp = -math.inf
        self._rate = 0.0  # the server's refill per second, as last stated
        self._measured = 0
        self._anchors: deque[tuple[float, float, float, float]] = deque()  # (sent, remaining, taken, unordered)
        self._since = 0  # the slack window counts views of requests admitted after this number
        self._gap = math.inf
        self._views = 0
        self._margin = 2.0  # requests' worth left unclaimed, doubled by a 429 after a reclaim
        self._reclaimed = math.inf  # admissions when slack was last reclaimed (inf: none to blame since)

    @property
    def drain(self) -> float:
        """The other clients' drain counted on, per second."""
        return self.foreign + self._bump

    def apply(self, bucket: Bucket, view: View, now: float, limit: float | None, authoritative: bool, admitted: int):
        """Reconcile `bucket` with `view`. `limit`: the server's stated per-minute limit (None: ours);
        `authoritative`: that limit is the one in force, so its `remaining` may raise our level too;
        `admitted`: our admissions so far."""
        capacity = float(limit or bucket.capacity)
        rate = self._rate = capacity / 60.0
        bucket.refill(now)
        self._measure_foreign(view, rate, capacity)
        self._bump *= math.exp(-max(0.0, now - self._stamp) / FOREIGN_WINDOW_S)
        self._stamp = now
        share = rate - (1.0 + FOREIGN_HEADROOM) * self.drain
        bucket.rate = min(bucket.capacity / 60.0, max(share, MIN_SHARE * rate))
        estimate = min(bucket.capacity, view.remaining + bucket.rate * (now - view.sent)) - view.later
        level = bucket.level
        if authoritative:
            level = max(level, view.remaining - view.unsure)
        if view.sent >= self.last:  # an older view than one already applied says nothing new
            self.last = view.sent
            level = min(level, estimate)
        if authoritative:
            level += self._reclaim(estimate - level, level, view, admitted)
        bucket.level = min(bucket.capacity, level)

    def _reclaim(self, gap: float, level: float, view: View, admitted: int) -> float:
        """How much to raise the level by: the smallest gap of a full window, less a margin; else 0. Only
        while the bucket is what holds us back, so every view of the window is of a request admitted at the
        pace of the refill (in a burst, sends wait for connections for seconds: the refill credited from the
        admission made a row of views agree on a gap of 200 requests that was not there)."""
        if level >= (self._margin + 1.0) * view.cost:
            self._gap, self._views, self._since = math.inf, 0, admitted
            return 0.0
        if view.seq <= self._since:
            return 0.0
        self._gap, self._views = min(self._gap, gap), self._views + 1
        if self._views < RECLAIM_VIEWS:
            return 0.0
        gap, self._gap, self._views, self._since = self._gap, math.inf, 0, admitted
        if gap <= self._margin * view.cost:
            return 0.0
        self._reclaimed = admitted
        return gap - self._margin * view.cost

    def on_rejected(self, seq: int, exhausted: bool) -> None:
        """A 429 for request `seq`. If this bucket was the one `exhausted`, someone took what we counted on:
        the others' drain is taken to be higher by `FOREIGN_BUMP` of the server's rate, fading over
        `FOREIGN_WINDOW_S` (measured while they lost the races to us, it is low and rises by itself only slowly;
        and a busy client's views may never be sure enough to measure it again). If it was
        admitted after a reclaim, the next ones keep twice the margin."""
        if exhausted:
            self._bump = min(self._rate, self._bump + FOREIGN_BUMP * self._rate)
        if seq > self._reclaimed:
            self._reclaimed, self._margin = math.inf, min(MAX_MARGIN, 2 * self._margin)

    def _measure_foreign(self, view: View, rate: float, capacity: float) -> None:
        """`taken` assumes the server took ours in admission order; those admitted before a view's request and
        unanswered then may come after it (waiting for a connection), so each end of a window is unsure by
        that many. The window used is the surest of the last `FOREIGN_WINDOW_S` (a burst of hundreds in flight
        made 18 of 20 requests a second look foreign), and counts only if its ends together are unsure by at
        most `FOREIGN_SPREAD` of its refill."""
        anchors, unordered = self._anchors, view.unsure - view.later
        if anchors and view.sent - anchors[-1][0] < FOREIGN_WINDOW_S / ANCHORS:
            return  # out of order (the anchors stay in the server's order), or measured a moment ago
        while anchors and anchors[0][0] < view.sent - FOREIGN_WINDOW_S:
            anchors.popleft()
        best, best_spread = None, FOREIGN_SPREAD * rate
        for anchor in anchors:
            sent, remaining, _, unsure = anchor
            span = view.sent - sent
            if span < FOREIGN_MIN_SPAN_S:
                break
            # the bucket cannot have been full in between (a full bucket wastes refill)
            if remaining + rate * span < capacity and (spread := (unsure + unordered) / span) <= best_spread:
                best, best_spread = anchor, spread
        anchors.append((view.sent, view.remaining, view.taken, unordered))
        if best is None:
            return
        sent, remaining, taken, _ = best
        span = view.sent - sent
        drain = min(max((remaining - view.remaining + rate * span - (view.taken - taken)) / span, 0.0), rate)
        self._measured += 1
        self.foreign += max(FOREIGN_GAIN, 1.0 / self._measured) * (drain - self.foreign)
