"""The fake teacher itself: `FakeTeacher` routes requests, answers chat completions, charges OpenAI-style
token buckets (`TokenBucket`) and sends their `x-ratelimit-*` headers, and injects scripted or random faults
(connection-level ones, such as an endless or a decompression-bomb body, in `_chat_later`). Files and batches
are a `BatchEndpoints` it owns, the HTTP/1.1 side is `http`, the answers come from `answers`; none of those
imports this module."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import math
import random
import ssl
import time
import zlib
from collections.abc import Awaitable
from typing import Any

from imitate.teacher.fake.answers import (
    CONNECTION_FAULTS,
    FAULT_MARK,
    NAMED_FAULTS,
    FakeConfig,
    digest,
    estimate_tokens,
    fake_answer,
    last_user,
    prompt_tokens,
)
from imitate.teacher.fake.batches import BatchEndpoints
from imitate.teacher.fake.http import Connection, Request, Response, error_body, invalid, json_response
from imitate.teacher.reply import format_duration

BOMB_INFLATED = 1 << 30  # what the `bomb` fault's body inflates to
STREAM_PIECE = 64 * 1024  # bytes per write of a streamed body (then wait until the peer reads)


@functools.cache
def bomb_body() -> bytes:
    """~1 MB of gzip that inflates to BOMB_INFLATED zero bytes; built once per process (~2 s)."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: a gzip member
    zeros = bytes(1 << 20)
    return b"".join([*(deflate.compress(zeros) for _ in range(BOMB_INFLATED >> 20)), deflate.flush()])


# ---------------------------------------------------------------------------------------------- rate limits


class TokenBucket:
    """Capacity = the per-minute limit, refilled continuously at limit/60 per second (OpenAI's model)."""

    def __init__(self, per_minute: int, now: float):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self.updated = now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` fits (inf if it never can); call after `refill`."""
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.level) / self.rate)

    def reset_s(self) -> float:
        return (self.capacity - self.level) / self.rate


# ---------------------------------------------------------------------------------------------- the server


class FakeTeacher:
    """The server in the current event loop: `base_url = await FakeTeacher(rpm=60).start()`; `await stop()`.
    Options: FakeConfig's fields."""

    def __init__(self, **options: Any):
        self.config = FakeConfig(**options)
        self.host, self.port = "127.0.0.1", 0
        self._server: asyncio.Server | None = None
        self._tls = False
        self.conns: set[Connection] = set()
        self._tasks: set[asyncio.Task] = set()
        self._ids = 0
        self.reset()
        self.batches = BatchEndpoints(
            self._answer_line, self._next_id, self.spawn, lambda: self._stats, self.config.batch_delay_s
        )

    @property
    def base_url(self) -> str:
        return f"{'https' if self._tls else 'http'}://{self.host}:{self.port}/v1"

    async def start(self, host: str = "127.0.0.1", port: int = 0, *, tls: ssl.SSLContext | None = None) -> str:
        """Listen (over TLS with a server-side `tls` context, for certificate tests); returns the base URL."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: Connection(self), host, port, backlog=4096, ssl=tls)
        self.host, self.port, self._tls = host, self._server.sockets[0].getsockname()[1], tls is not None
        return self.base_url

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> FakeTeacher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def reset(self) -> None:
        """Forget stats, bucket levels, scripted-fault attempts, ask counts and the fault RNG (files and batches
        stay)."""
        cfg, now = self.config, time.monotonic()
        self._rng = random.Random(cfg.seed)
        self._rpm = TokenBucket(cfg.rpm, now) if cfg.rpm else None
        self._tpm = TokenBucket(cfg.tpm, now) if cfg.tpm else None
        self._attempts: dict[bytes, int] = {}
        self._asked: dict[bytes, int] = {}  # asks per messages digest (FakeConfig.vary)
        counters = "requests rate_limited completed prompt_tokens completion_tokens tokens_served batch_lines"
        self._stats: dict[str, Any] = dict.fromkeys(counters.split(), 0)
        self._stats |= {"by_status": {}, "faults": {}, "in_flight": 0, "max_in_flight": 0}

    def stats(self) -> dict[str, Any]:
        """Counters since start/reset: requests, by_status, rate_limited (429s), completed, tokens, faults."""
        out = {k: dict(v) if isinstance(v, dict) else v for k, v in self._stats.items()}
        return out | {"connections": len(self.conns)}

    def spawn(self, coro: Awaitable[None]) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _next_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}{self._ids:010d}"

    def count_status(self, status: int) -> None:
        by_status = self._stats["by_status"]
        by_status[status] = by_status.get(status, 0) + 1
        self._stats["rate_limited"] += status == 429

    def handle(self, req: Request, conn: Connection) -> Response | Awaitable[Response | None]:
        path = req.path.removeprefix("/v1")
        if path.startswith("/fake/"):
            if path == "/fake/reset" and req.method == "POST":
                self.reset()
            return dataclasses.replace(json_response(200, self.stats()), counted=False)
        self._stats["requests"] += 1
        given_key = req.headers.get("authorization", "").removeprefix("Bearer ")
        if self.config.api_key is not None and given_key != self.config.api_key:
            return json_response(*self._fault_error("auth", "", given_key))
        if (req.method, path) == ("POST", "/chat/completions"):
            return self._chat(req, conn, given_key)
        if (req.method, path) == ("GET", "/models"):
            model = {"id": self.config.model, "object": "model", "created": 0, "owned_by": "imitate-fake"}
            return json_response(200, {"object": "list", "data": [model]})
        if (routed := self.batches.route(req, path)) is not None:
            return routed
        return invalid(404, f"Unknown request URL: {req.method} {req.path}")

    # ------------------------------------------------------------------------------------------ chat

    def _chat(self, req: Request, conn: Connection, given_key: str) -> Response | Awaitable[Response | None]:
        try:
            payload = json.loads(req.body)
            p_tokens = prompt_tokens(payload["messages"])
        except (ValueError, KeyError, TypeError, AttributeError):
            return invalid(400, "could not parse the JSON body or its messages")
        headers = [("x-request-id", self._next_id("req_"))]
        cost = p_tokens + (payload.get("max_tokens") or self.config.default_max_tokens)
        throttled = self._admit(cost, payload.get("model") or self.config.model, headers)
        if throttled is not None:
            return throttled
        fault = self._pick_fault(payload["messages"])
        if fault in CONNECTION_FAULTS or self.config.latency_s or self.config.jitter_s:
            return self._chat_later(conn, req.keep_alive, payload, p_tokens, fault, headers, given_key)
        return self._respond(payload, p_tokens, fault, headers, given_key)

    def _respond(self, payload: dict, p_tokens: int, fault: str | None, headers: list, given_key: str) -> Response:
        status, body = self._outcome(payload, p_tokens, fault, given_key)
        if fault == "429" and self.config.headers:
            wait = self.config.retry_after_s
            headers += [("retry-after", str(math.ceil(wait))), ("retry-after-ms", str(round(wait * 1000)))]
        if fault == "redirect":
            headers.append(("location", f"{self.base_url}/moved/chat/completions"))
        return json_response(status, body, headers)

    async def _chat_later(
        self,
        conn: Connection,
        keep_alive: bool,
        payload: dict,
        p_tokens: int,
        fault: str | None,
        headers: list[tuple[str, str]],
        given_key: str,
    ) -> Response | None:
        """The answer after latency/jitter, or a connection-level fault. None: nothing left to write."""
        stats, cfg = self._stats, self.config
        stats["in_flight"] += 1
        stats["max_in_flight"] = max(stats["max_in_flight"], stats["in_flight"])
        try:
            delay = cfg.latency_s + (self._rng.uniform(0.0, cfg.jitter_s) if cfg.jitter_s else 0.0)
            await asyncio.sleep(delay + (cfg.hang_s if fault == "hang" else 0.0))
            if fault == "reset":
                if conn.transport is not None:
                    conn.transport.abort()
                return None
            if fault == "malformed":
                return Response(200, b'{"id":"chatcmpl-broken","choices":[{"index":0,"message":{"ro', headers)
            if fault in ("endless", "bomb"):
                await self._stream_forever(conn, fault, headers)
                return None
            response = self._respond(
                payload, p_tokens, None if fault in CONNECTION_FAULTS else fault, headers, given_key
            )
            if fault == "badgzip":
                response.headers.append(("content-encoding", "gzip"))
            if fault == "cut":
                conn.write_raw(conn.head(response, keep_alive) + response.body[: len(response.body) // 2])
                conn.transport.abort()  # type: ignore[union-attr]
                return None
            if fault != "slow":
                return response
            conn.write_raw(conn.head(response, keep_alive))
            step = len(response.body) // 5 + 1
            for start in range(0, len(response.body), step):
                await asyncio.sleep(cfg.slow_s / 5)
                conn.write_raw(response.body[start : start + step])
            return None
        finally:
            stats["in_flight"] -= 1

    async def _stream_forever(self, conn: Connection, fault: str, headers: list[tuple[str, str]]) -> None:
        """A 200 whose body never ends (chunked), or a small gzip body that inflates to a GiB; written as fast as
        the client reads, until it gives up and closes the connection (which cancels this task)."""
        if fault == "bomb":
            body = bomb_body()
            conn.write_raw(conn.head(Response(200, body, [*headers, ("content-encoding", "gzip")]), keep_alive=False))
            pieces = (body[i : i + STREAM_PIECE] for i in range(0, len(body), STREAM_PIECE))
        else:
            conn.write_raw(conn.head(Response(200, b"", headers), keep_alive=False, chunked=True))
            chunk = b"%x\r\n%s\r\n" % (STREAM_PIECE, b" " * STREAM_PIECE)  # JSON whitespace, forever
            pieces = iter(lambda: chunk, None)
        for piece in pieces:
            if not conn.open:
                return
            conn.write_raw(piece)
            await conn.drain()
        if conn.transport is not None:
            conn.transport.close()

    def _answer_line(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """A batch line's answer: what an online request would get, with connection faults as a 500."""
        p_tokens = prompt_tokens(body["messages"])
        fault = self._pick_fault(body["messages"])
        return self._outcome(body, p_tokens, "500" if fault in CONNECTION_FAULTS else fault, "")

    def _pick_fault(self, messages: list[dict[str, Any]]) -> str | None:
        last, fault = last_user(messages), None
        if "[[fault:" in last and (mark := FAULT_MARK.search(last)):
            key = digest(messages)
            attempt = self._attempts[key] = self._attempts.get(key, 0) + 1
            if mark.group(2) is None or attempt <= int(mark.group(2)):
                fault = mark.group(1)
        elif self.config.faults:
            draw, total = self._rng.random(), 0.0
            for kind, prob in self.config.faults.items():
                total += prob
                if draw < total:
                    fault = kind
                    break
        if fault is not None:
            self._stats["faults"][fault] = self._stats["faults"].get(fault, 0) + 1
        return fault

    def _admit(self, cost: int, model: str, headers: list[tuple[str, str]]) -> Response | None:
        """Charge the buckets, or answer 429 when the request does not fit. Appends the rate headers."""
        buckets = [(n, b, a) for n, b, a in (("requests", self._rpm, 1), ("tokens", self._tpm, cost)) if b]
        if not buckets:
            return None
        now, waits = time.monotonic(), {}
        for name, bucket, amount in buckets:
            bucket.refill(now)
            waits[name] = bucket.wait_for(amount)
        blocked = [name for name, wait in waits.items() if wait > 0]
        for _, bucket, amount in buckets if not blocked else ():
            bucket.level -= amount
        for name, bucket, _ in buckets if self.config.headers else ():
            headers.append((f"x-ratelimit-limit-{name}", str(int(bucket.capacity))))
            headers.append((f"x-ratelimit-remaining-{name}", str(max(0, int(bucket.level)))))
            headers.append((f"x-ratelimit-reset-{name}", format_duration(bucket.reset_s())))
        if not blocked:
            return None
        kind, wait = blocked[0], max(waits.values())
        limit, amount = (self.config.rpm, 1) if kind == "requests" else (self.config.tpm, cost)
        if math.isinf(wait):
            message = f"Request too large for {model} on tokens per min (TPM): Limit {limit}, Requested {cost}."
        else:
            unit = "RPM" if kind == "requests" else "TPM"
            message = f"Rate limit reached for {model} on {kind} per min ({unit}): Limit {limit}, "
            message += f"Requested {amount}. Please try again in {format_duration(wait)}."
            if self.config.headers:
                headers += [("retry-after", str(math.ceil(wait))), ("retry-after-ms", str(round(wait * 1000)))]
        return json_response(429, error_body(message, kind, "rate_limit_exceeded"), headers)

    def _fault_error(self, fault: str, model: str, given_key: str) -> tuple[int, dict[str, Any]] | None:
        """(status, error body) for a fault answered with an HTTP error; None for those answered with a 200."""
        if fault == "quota":
            message = "You exceeded your current quota, please check your plan and billing details."
            return 429, error_body(message, "insufficient_quota", "insufficient_quota")
        if fault == "context":
            message = f"This model's maximum context length is 8192 tokens ({model}). You requested 9000 tokens."
            return 400, error_body(message, "invalid_request_error", "context_length_exceeded")
        if fault == "policy":
            message = "Your request was rejected as a result of our safety system."
            return 400, error_body(message, "invalid_request_error", "content_policy_violation")
        if fault == "auth":  # echoes the key unmasked, like a careless proxy: the client must scrub it
            message = f"Incorrect API key provided: {given_key}."
            return 401, error_body(message, "invalid_request_error", "invalid_api_key")
        if fault == "nomodel":
            message = f"The model `{model}` does not exist or you do not have access to it."
            return 404, error_body(message, "invalid_request_error", "model_not_found")
        if fault == "redirect":
            return 307, error_body("This endpoint has moved.", "invalid_request_error")
        if fault == "429":
            message = f"Rate limit reached for {model} on requests per min (RPM): scripted fault."
            return 429, error_body(message, "requests", "rate_limit_exceeded")
        if fault.isdigit() and int(fault) >= 500:
            message = "The server had an error while processing your request. Sorry about that!"
            return int(fault), error_body(message, "server_error")
        if fault.isdigit():
            return int(fault), error_body(f"Scripted client error {fault}.", "invalid_request_error")
        if fault not in NAMED_FAULTS:
            return 400, error_body(f"Unknown scripted fault {fault!r}.", "invalid_request_error")
        return None

    def _outcome(self, payload: dict, p_tokens: int, fault: str | None, given_key: str) -> tuple[int, dict]:
        """The answer to one chat request (online or a batch line) as (status, body)."""
        model = payload.get("model") or self.config.model
        if fault is not None and (error := self._fault_error(fault, model, given_key)) is not None:
            return error
        variant = 0
        if self.config.vary:  # the k-th ask of the same messages: a sampling teacher words it differently
            key = digest(payload["messages"])
            variant = self._asked[key] = self._asked.get(key, -1) + 1
        cfg = self.config
        text = fake_answer(payload["messages"], cfg.sentences, cfg.list_items, seed=payload.get("seed"),
                           judge_bias=cfg.judge_bias, variant=variant)  # fmt: skip
        max_tokens = payload.get("max_tokens") or payload.get("max_completion_tokens")
        if fault == "length":
            max_tokens = min(max_tokens or 10**9, max(1, estimate_tokens(text) // 2))
        finish = "stop"
        if max_tokens and estimate_tokens(text) > max_tokens:
            text, finish = text[: max_tokens * 4], "length"
        content, finish = (None, "content_filter") if fault == "filter" else (text, finish)
        choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
        if fault == "nomessage":
            del choice["message"]
        c_tokens = estimate_tokens(content)
        usage = {"prompt_tokens": p_tokens, "completion_tokens": c_tokens, "total_tokens": p_tokens + c_tokens}
        for key in ("prompt_tokens", "completion_tokens"):
            self._stats[key] += usage[key]
        self._stats["tokens_served"] += p_tokens + c_tokens
        self._stats["completed"] += 1
        body = {"id": self._next_id("chatcmpl-"), "object": "chat.completion", "created": int(time.time())}
        choices = [] if fault == "empty" else [choice]
        return 200, body | {"model": model, "choices": choices, "usage": usage, "system_fingerprint": "fp_fake"}
