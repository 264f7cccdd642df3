"""The event-loop side of `imitate serve`: admission, the bounded queue, and the one task that drives the engine.

    ticket = scheduler.submit(Ticket(prompt, params, n))   # or ApiError(429) when the queue is full
    delta = await ticket.events.get()                       # Delta(index, text, finish, tokens) ... per choice
    scheduler.cancel(ticket)                                # client gone: its rows leave at the next step

Continuous batching: `run()` loops forever; before each step it admits waiting requests, first come first
served, while their sequences fit in the free rows (`max_batch` rows in all) and their prompts in a prefill
budget (so a burst of arrivals cannot stall the running rows for long), then awaits `Engine.step` in its own
worker thread — the event loop stays free to accept, stream and reject while the model computes. Deltas are
handed to each request's queue on the loop.

Load = the sequences running or waiting. A request whose `n` would take the load past `max_batch + queue` is
refused at once with a 429 (`protocol.busy_error`); its Retry-After is the time one row takes to free on
average at the measured pace (mean request latency / max_batch). A step that fails with a RuntimeError (torch:
out of memory, a bad kernel) fails the requests in the batch with a 500 and the engine starts over empty; any
other failure stops the engine, fails every request and makes later ones 503.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from imitate.serve.engine import Delta, Engine, Params, Request, Sequence
from imitate.serve.protocol import ApiError, busy_error

PREFILL_BUDGET = 512  # prompt tokens prefilled per step (at least one request is always admitted)
LATENCY_EWMA = 0.2


class Ticket(Request):
    """A request inside the server: its events queue, and which of its sequences still hold a place."""

    def __init__(self, prompt: list[int], params: Params, n: int = 1):
        super().__init__(prompt, params, n)
        self.events: asyncio.Queue[Delta | ApiError] = asyncio.Queue()
        self.open = set(range(n))
        self.admitted_at: float | None = None
        self.prompt_tokens = len(prompt)


class Scheduler:
    def __init__(self, engine: Engine, *, queue: int, clock: Any = time.monotonic):
        self.engine = engine
        self.max_batch = engine.max_batch
        self.capacity = engine.max_batch + queue
        self.waiting: deque[Ticket] = deque()
        self.load = 0  # sequences running or waiting
        self.running = 0  # sequences admitted to the engine and not finished
        self.failed: BaseException | None = None
        self._clock = clock
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="imitate-serve-engine")
        self._batch: list[Ticket] = []  # admitted tickets with rows (or about to get them)
        self.stats = {"completed": 0, "cancelled": 0, "rejected": 0, "failed": 0, "step_s": 0.0}
        self.latency_s: float | None = None
        self.started = clock()

    # ------------------------------------------------------------------------------------------ requests

    def submit(self, ticket: Ticket) -> Ticket:
        if self.failed is not None:
            raise ApiError(503, f"the engine has stopped: {self.failed}", type="server_error", code="engine_stopped")
        n = len(ticket.sequences)
        if self.load + n > self.capacity:
            self.stats["rejected"] += 1
            raise busy_error(self.capacity, self.retry_after_s(), self.per_minute())
        self.waiting.append(ticket)
        self.load += n
        self._wake.set()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The client has gone (or the answer is complete): free what the request still holds."""
        if not ticket.open:
            return
        self.stats["cancelled"] += 1
        ticket.cancel()
        if ticket in self.waiting:
            self.waiting.remove(ticket)
        if ticket in self._batch:
            self._batch.remove(ticket)
        for index in list(ticket.open):
            self._release(ticket, index)

    def _release(self, ticket: Ticket, index: int) -> None:
        if index in ticket.open:
            ticket.open.discard(index)
            self.load -= 1
            if ticket.admitted_at is not None:
                self.running -= 1

    # ------------------------------------------------------------------------------------------ pace

    def retry_after_s(self) -> float:
        if self.latency_s is None:
            return 1.0
        return min(30.0, max(0.2, self.latency_s / self.max_batch))

    def per_minute(self) -> int | None:
        """Requests per minute at the measured pace with every row busy (Little's law), once measured."""
        return None if not self.latency_s else max(1, round(self.max_batch * 60.0 / self.latency_s))

    def snapshot(self) -> dict[str, Any]:
        uptime = self._clock() - self.started
        return {
            "running": self.running,
            "waiting": sum(len(t.open) for t in self.waiting),
            "capacity": self.capacity,
            "max_batch": self.max_batch,
            "steps": self.engine.steps,
            "generated_tokens": self.engine.generated,
            "mean_latency_s": self.latency_s,
            "uptime_s": uptime,
            **self.stats,
        }

    # ------------------------------------------------------------------------------------------ the engine task

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self.running and not self.waiting:
                    self._wake.clear()
                    await self._wake.wait()
                admitted = self._admit()
                start = time.perf_counter()
                try:
                    deltas = await loop.run_in_executor(self._pool, self.engine.step, admitted)
                except RuntimeError as exc:
                    self._fail_batch(exc)
                    continue
                finally:
                    self.stats["step_s"] += time.perf_counter() - start
                self._deliver(deltas)
        except BaseException as exc:
            self._stop(exc)
            raise

    def _admit(self) -> list[Ticket]:
        admitted: list[Ticket] = []
        budget = PREFILL_BUDGET
        while self.waiting:
            ticket = self.waiting[0]
            n = len(ticket.open)
            if self.running + n > self.max_batch or (admitted and ticket.prompt_tokens > budget):
                break
            self.waiting.popleft()
            ticket.admitted_at = self._clock()
            self.running += n
            budget -= ticket.prompt_tokens
            admitted.append(ticket)
            self._batch.append(ticket)
        return admitted

    def _deliver(self, deltas: list[tuple[Sequence, Delta]]) -> None:
        for seq, delta in deltas:
            ticket = seq.owner
            if delta.index not in ticket.open:
                continue  # cancelled while the step ran
            if delta.finish is not None:
                self._release(ticket, delta.index)
                if not ticket.open:
                    self._finished(ticket)
            ticket.events.put_nowait(delta)

    def _finished(self, ticket: Ticket) -> None:
        self.stats["completed"] += 1
        self._batch.remove(ticket)
        latency = self._clock() - (ticket.admitted_at or self._clock())
        self.latency_s = (
            latency if self.latency_s is None else (1 - LATENCY_EWMA) * self.latency_s + (LATENCY_EWMA * latency)
        )

    def _fail_batch(self, exc: BaseException) -> None:
        self.engine.reset()
        error = ApiError(500, f"generation failed: {str(exc)[:300]}", type="server_error")
        for ticket in [t for t in self._batch if t.open]:
            self.stats["failed"] += 1
            for index in list(ticket.open):
                self._release(ticket, index)
            ticket.events.put_nowait(error)
        self._batch = [t for t in self._batch if t.open]

    def _stop(self, exc: BaseException) -> None:
        self.failed = exc if not isinstance(exc, asyncio.CancelledError) else RuntimeError("server shutting down")
        error = ApiError(503, f"the engine has stopped: {self.failed}", type="server_error", code="engine_stopped")
        for ticket in [*self._batch, *self.waiting]:
            if ticket.open:
                for index in list(ticket.open):
                    self._release(ticket, index)
                ticket.events.put_nowait(error)
        self.waiting.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
