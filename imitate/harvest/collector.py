"""The async collector: it only *drives* the pure parts (planner, limiter, budget, retry policy, journal).

    source ─▶ planner ─▶ per-teacher bounded queue ─▶ dispatcher (a replica admits) ─▶ task: client + retries
                                                                                         │
                                   journal (exactly once) ◀── record (ok / failed) ◀────┘

- The producer reads the source lazily and never gets more than a bounded queue ahead of the teachers.
- A request already in the journal (or answered by a fallback teacher) is skipped: never paid twice.
- Each row ends as one record (`results.py`), ok or failed with its error class; a failure never fails the run.
- Every attempt is admitted by the budget (all runs of this output, in-flight attempts reserved) and the
  limiter of one of the teacher's replicas (`fleet.py`: the fewest outstanding; a lone server is a fleet of
  one), written to the ledger before it is sent, and its ticket answered with its outcome.
- Quota/auth/unknown-model/TLS errors, or a teacher down (`health.py`), retire a teacher: its rows stay pending
  for a rerun, or go to a fallback teacher. Rows that failed for a transient reason are asked again next run.
- `stop()` stops admitting, waits for in-flight work up to the drain timeout, then cancels; `finally` flushes.
  A journal that cannot be written (disk full) stops everything at once: no answer is bought that cannot be kept.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from imitate.config import ImitateConfig, Price
from imitate.errors import (
    TEACHER_FATAL,
    ConnectFailed,
    ContentFiltered,
    NetworkError,
    RateLimited,
    ServerError,
    StorageError,
    TeacherError,
)
from imitate.harvest.fleet import Replica
from imitate.harvest.journal import Journal
from imitate.harvest.plan import Budget, Planned, Planner, estimate_request
from imitate.harvest.results import Accum, Stats, build_record
from imitate.harvest.runtime import Doorbell, TeacherRuntime
from imitate.records import Request
from imitate.teacher.limiter import Ticket
from imitate.teacher.reply import RateLimitState
from imitate.teacher.retry import RetryPolicy

Admitted = tuple[Replica, Ticket]  # an attempt's replica and its limiter's ticket


class _Abandoned(Exception):
    """Internal: a row given up without a record (stopping, or its teacher retired); it stays pending."""


class Collector:
    def __init__(
        self,
        cfg: ImitateConfig,
        source: Any,
        planner: Planner,
        journal: Journal,
        clients: dict[str, Any],
        *,
        budget: Budget,
        clock=time.monotonic,
        rng: random.Random | None = None,
    ):
        self.cfg = cfg
        self.h = cfg.harvest
        self.source = source
        self.planner = planner
        self.journal = journal
        self.budget = budget
        self.clock = clock
        self.policy = RetryPolicy(self.h.retry, rng=rng or random.Random(self.h.seed))
        self.stats = Stats()
        self.stop_reason: str | None = None
        self.fatal: StorageError | None = None  # the output cannot be written: the run's error
        self._budget_bell = Doorbell()  # rung whenever an attempt settles: a refused one may fit now
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._inflight_keys: set[str] = set()
        self._producer_done = False
        self._holding = 0
        self._prices: dict[str, Price] = {}
        self.teachers: dict[str, TeacherRuntime] = {}
        for t in self.h.teachers:
            self.teachers[t.name] = TeacherRuntime.start(t, clients[t.name], self.h.retry, clock)

    # ------------------------------------------------------------------------------------------ control

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self._stopping.set()
        self._budget_bell.ring()
        for rt in self.teachers.values():
            rt.doorbell.ring()

    def _fail(self, exc: StorageError) -> None:
        """The journal cannot be written: stop now, cancelling what is in flight (it stays pending)."""
        if self.fatal is None:
            self.fatal = exc
        self.stop(f"output not writable ({exc.message})")
        self.h = self.h.model_copy(update={"drain_timeout_s": 0.0})
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def run(self) -> Stats:
        dispatchers = [asyncio.create_task(self._dispatch(rt)) for rt in self.teachers.values()]
        try:
            try:
                await self._produce()
            finally:
                self._producer_done = True
            await asyncio.gather(*dispatchers)
            await self._drain()
        finally:
            for d in dispatchers:
                d.cancel()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*dispatchers, *self._tasks, return_exceptions=True)
            self.journal.flush()
        return self.stats

    async def _drain(self) -> None:
        if not self._tasks:
            return
        if not self.stopping:
            await asyncio.gather(*self._tasks, return_exceptions=True)
            return
        _, pending = await asyncio.wait(self._tasks, timeout=self.h.drain_timeout_s)
        for task in pending:
            task.cancel()

    # ------------------------------------------------------------------------------------------ producer

    def _is_done(self, p: Planned) -> bool:
        if self.journal.status_of(p.key) is not None:
            return True
        return any(self.journal.status_of(r.key()) is not None for r in self.planner.fallback_requests(p))

    async def _produce(self) -> None:
        n = 0
        for query in self.source:
            if self.stopping:
                return
            for p in self.planner.plan(query):
                self.stats.planned += 1
                if p.key in self._inflight_keys or self._is_done(p):
                    self.stats.skipped_done += 1
                    continue
                rt = self._live_teacher(p)
                if rt is None:
                    continue
                if not await self._enqueue(rt, p):
                    return
            n += 1
            if n % 256 == 0:
                await asyncio.sleep(0)  # a long run of already-done rows must not starve the event loop
        self.stats.source_exhausted = True

    def _live_teacher(self, p: Planned) -> TeacherRuntime | None:
        rt = self.teachers[p.request.teacher]
        if rt.dead is None:
            return rt
        dead = {name for name, r in self.teachers.items() if r.dead}
        alt = self.planner.fallback_for(p, dead)
        if alt is None:
            return None
        p.request = alt
        return self.teachers[alt.teacher]

    def _estimate(self, req: Request, params=None) -> tuple[int, float]:
        return estimate_request(req, self._price(req.model), (params or req.params).max_tokens)

    def _price(self, model: str) -> Price:
        price = self._prices.get(model)
        if price is None:  # `price_for` builds a default Price for an unpriced model: once per model, not per row
            price = self._prices[model] = self.cfg.price_for(model)
        return price

    async def _enqueue(self, rt: TeacherRuntime, p: Planned) -> bool:
        est_tokens, est_usd = self._estimate(p.request)
        self._inflight_keys.add(p.key)
        if not rt.queue.full():  # the common case: no task, no wait, one yield so dispatchers keep pace
            rt.queue.put_nowait((p, est_tokens, est_usd))
            await asyncio.sleep(0)
            return True
        put = asyncio.create_task(rt.queue.put((p, est_tokens, est_usd)))
        stop = asyncio.create_task(self._stopping.wait())
        await asyncio.wait({put, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not put.done():
            put.cancel()
            self._inflight_keys.discard(p.key)
            return False
        return True

    # ------------------------------------------------------------------------------------------ dispatch

    async def _acquire(self, rt: TeacherRuntime, est_tokens: int, est_usd: float) -> Admitted | None:
        """The replica for one attempt and its limiter's ticket, with the budget reserved; or None once stopping,
        the teacher is retired, or the budget is used up (an attempt that does not fit while others are in
        flight waits for them to settle: they usually cost less than they reserved)."""
        while not (self.stopping or rt.dead):
            if not self.budget.fits(est_usd, est_tokens):
                if self.budget.reserved_requests == 0:
                    self.stop(self.budget.describe())
                    return None
                await self._budget_bell.wait(1.0)
                continue
            wait, replica, ticket = rt.fleet.try_acquire(est_tokens)
            if replica is not None and ticket is not None:
                self.budget.reserve(est_usd, est_tokens)
                return replica, ticket
            await rt.doorbell.wait(min(wait, 1.0))
        return None

    async def _next_item(self, rt: TeacherRuntime):
        """The next queued row, or None once the producer is done and no queue, dispatcher or task holds work
        (rows may still be re-routed to this teacher, so an empty queue alone is not the end)."""
        while True:
            try:
                return rt.queue.get_nowait()
            except asyncio.QueueEmpty:
                pass
            if (
                self._producer_done
                and self._holding == 0
                and not self._tasks  # a running row may still be re-routed here when its teacher is retired
                and all(r.queue.empty() for r in self.teachers.values())
            ):
                return None
            try:
                return await asyncio.wait_for(rt.queue.get(), timeout=0.05)
            except TimeoutError:
                continue

    async def _dispatch(self, rt: TeacherRuntime) -> None:
        while (item := await self._next_item(rt)) is not None:
            self._holding += 1
            try:
                p, est_tokens, est_usd = item
                if (admitted := await self._acquire(rt, est_tokens, est_usd)) is not None:
                    task = asyncio.create_task(self._run_one(rt, p, est_tokens, est_usd, admitted))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                elif self.stopping:
                    self._abandon(p)
                    self._discard_queue(rt)
                    return
                else:
                    await self._reroute(p, est_tokens, est_usd)
            finally:
                self._holding -= 1

    async def _reroute(self, p: Planned, est_tokens: int, est_usd: float) -> bool:
        """A row whose teacher was retired goes to a live fallback teacher (True), or stays pending (False)."""
        old_key, old_teacher = p.key, p.request.teacher
        alt = self._live_teacher(p)
        if alt is None or alt.cfg.name == old_teacher:
            self._abandon(p)
            return False
        self._inflight_keys.discard(old_key)
        self._inflight_keys.add(p.key)
        self._holding += 1  # the row is in nobody's queue while we wait for room: dispatchers must not end
        try:
            await alt.queue.put((p, est_tokens, est_usd))
        finally:
            self._holding -= 1
        return True

    def _abandon(self, p: Planned) -> None:
        self._inflight_keys.discard(p.key)

    def _discard_queue(self, rt: TeacherRuntime) -> None:
        while not rt.queue.empty():
            self._abandon(rt.queue.get_nowait()[0])

    # ------------------------------------------------------------------------------------------ one row

    async def _run_one(
        self, rt: TeacherRuntime, p: Planned, est_tokens: int, est_usd: float, admitted: Admitted
    ) -> None:
        """One row (its first attempt `admitted`) until it is journaled, handed off or abandoned."""
        try:
            await self._row(rt, p, (est_tokens, est_usd), admitted)
        except StorageError as exc:
            self._fail(exc)
        finally:
            self._inflight_keys.discard(p.key)

    async def _row(self, rt: TeacherRuntime, p: Planned, est: tuple[int, float], admitted: Admitted) -> None:
        req = p.request
        acc = Accum()
        params = req.params
        for reask in range(self.h.retry.reask_truncated + 1):
            first = admitted if reask == 0 else None  # a re-ask is a new attempt: budget and limiter admit it
            try:
                reply = await self._chat_with_retries(rt, p, params, est, acc, first)
            except _Abandoned:
                return  # stopping, budget used up or teacher retired: pending for a rerun
            except TeacherError as exc:
                if isinstance(exc, TEACHER_FATAL) or (rt.dead and exc.retryable):
                    if not self.stopping:  # not the row's fault: a fallback or a rerun answers it
                        await self._reroute(p, *est)
                    return
                self._record(p, acc, params=p.request.params, error=exc)
                return
            if reply.finish_reason == "content_filter":
                exc = ContentFiltered("the teacher's content filter stopped the answer", status=200)
                self._record(p, acc, params=p.request.params, reply=reply, error=exc)
                return
            if reply.finish_reason != "length" or reask == self.h.retry.reask_truncated:
                break
            params = params.model_copy(update={"max_tokens": params.max_tokens * 2})
            est = self._estimate(req, params)
        self._record(p, acc, params=params, reply=reply)

    async def _chat_with_retries(
        self, rt: TeacherRuntime, p: Planned, params, est: tuple[int, float], acc: Accum, first: Admitted | None
    ):
        """One logical request: tenacity drives attempts by error class; every attempt is admitted to a replica
        (`first`: admitted by the dispatcher; None: acquire one, so a retry may go to another replica), written
        to the ledger before it is sent, and settled in the budget, the ledger and the limiter when it ends."""
        req = p.request
        est_tokens, est_usd = est
        async for attempt in self.policy.retrying():
            with attempt:
                if first is None and (first := await self._acquire(rt, est_tokens, est_usd)) is None:
                    raise _Abandoned
                (replica, admitted), first = first, None  # a ticket admits one attempt
                if acc.attempts == 0:
                    self.journal.note_send(p.key)
                try:
                    seq = self.journal.ledger.sent(p.key, est_usd, est_tokens)
                except StorageError:
                    replica.limiter.on_failure(admitted, overloaded=False)
                    self.budget.release(est_usd, est_tokens)
                    raise
                acc.attempts += 1
                acc.replica = rt.fleet.label(replica)
                rt.sent += 1
                self.stats.requests += 1
                if acc.attempts > 1:
                    self.stats.retries += 1
                try:
                    reply = await replica.client.chat(req.messages, model=req.model, params=params)
                except TeacherError as exc:
                    self.journal.ledger.unbilled(seq)
                    self.budget.settle(est_usd, est_tokens, 0.0, 0)
                    self._on_error(rt, replica, exc, admitted)
                    raise
                except asyncio.CancelledError:  # may have been answered and billed: count it at its estimate
                    self.budget.settle(est_usd, est_tokens, est_usd, est_tokens)
                    raise
                replica.limiter.on_success(admitted, reply.usage.total_tokens, reply.rate, reply.latency_s)
                rt.fleet.ok(replica, reply.latency_s)
                self._account(rt, req, reply, acc, seq, est)
                return reply
        raise AssertionError("unreachable: tenacity reraises the last error")

    def _account(self, rt: TeacherRuntime, req: Request, reply, acc: Accum, seq: int, est: tuple[int, float]) -> None:
        used = reply.usage.total_tokens
        cost = self._price(req.model).cost(reply.usage.prompt_tokens, reply.usage.completion_tokens)
        self.journal.ledger.billed(seq, cost, used)
        rt.ok += 1
        rt.tokens += used
        rt.health.ok()
        acc.usage = acc.usage + reply.usage
        acc.cost += cost
        self.budget.settle(est[1], est[0], cost, used)
        self._budget_bell.ring()
        rt.doorbell.ring()  # a slot is free and the limiter has news: admit the next row now

    def _on_error(self, rt: TeacherRuntime, replica: Replica, exc: TeacherError, ticket: Ticket) -> None:
        down = isinstance(exc, ServerError | NetworkError)  # no answer from that server (or a 5xx)
        if isinstance(exc, RateLimited):
            rt.throttled += 1
            self.stats.throttled += 1
            rate = exc.rate if isinstance(exc.rate, RateLimitState) else RateLimitState(retry_after_s=exc.retry_after)
            replica.limiter.on_rate_limited(ticket, rate)  # the ticket dates it: no latency needed
        else:
            replica.limiter.on_failure(ticket, overloaded=down)
        if down:
            rt.fleet.failed(replica, ticket.at)
        else:
            rt.fleet.answered(replica)
        if isinstance(exc, TEACHER_FATAL):
            self._retire(rt, exc)
        elif down and rt.health.failed(connect=isinstance(exc, ConnectFailed)):
            self._retire(rt, exc, down=True)
        self._budget_bell.ring()
        rt.doorbell.ring()

    def _retire(self, rt: TeacherRuntime, exc: TeacherError, *, down: bool = False) -> None:
        if rt.dead is None:
            what = f"down after {rt.health.failures} failed attempts in a row, last " if down else ""
            rt.dead = f"{what}{type(exc).__name__}: {exc.message}"
        if all(r.dead for r in self.teachers.values() if not r.cfg.fallback) and not any(
            r.dead is None for r in self.teachers.values() if r.cfg.fallback
        ):
            self.stop(f"teacher {rt.cfg.name!r} stopped ({rt.dead}); no teacher left to send to")

    def _record(self, p: Planned, acc: Accum, *, params, reply=None, error: TeacherError | None = None) -> None:
        record = build_record(p, acc, params=params, reply=reply, error=error)
        self.journal.append(record)
        self.stats.count(record, acc)
