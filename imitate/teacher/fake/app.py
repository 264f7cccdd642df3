"""A real loopback OpenAI-compatible teacher for tests, the demo and benchmarks.

    python -m imitate.teacher.fake --port 8089 --rpm 600 --tpm 200000 --faults 500=0.02,reset=0.01

Speaks `POST /v1/chat/completions`, `GET /v1/models` and the Batch API (`/v1/files`, `/v1/batches`) over a
plain asyncio HTTP/1.1 server (keep-alive, Content-Length bodies). No framework sits between the socket and the
handler because this server is the ceiling every harvester benchmark is measured against.

- Answers are deterministic explanations built from the prompt: same messages -> same text. `[[len:N]]` in the
  last user turn asks for N body sentences; `max_tokens` truncates with `finish_reason="length"`.
- Tokens are estimated (`estimate_tokens`): ceil(chars / 4) per message plus 4 per message.
- Rate limits are OpenAI-style token buckets: capacity = the per-minute limit, refilled continuously at
  limit/60 per second. A request costs 1 request and (prompt estimate + max_tokens) tokens, charged up front
  as OpenAI does; one that does not fit gets a 429 with `retry-after`/`retry-after-ms` and an OpenAI error
  body. Chat responses carry `x-ratelimit-*` headers unless `headers=False` (vLLM / llama.cpp behaviour).
- Faults: `[[fault:KIND]]` in the last user turn fails every attempt of that exact prompt, `[[fault:KINDxN]]`
  only the first N. Random faults: `faults={"500": 0.02, "reset": 0.01}`, drawn from `seed`. KIND is a 4xx/5xx
  code or a name in `NAMED_FAULTS`. In a batch, connection-level faults become a 500 for that line.
- Stats: `GET /fake/stats` or `FakeTeacher.stats()`; `POST /fake/reset` clears stats, buckets and attempts.

Run it (a) in the current loop with `await FakeTeacher(...).start()`, (b) from sync code with
`running_fake_teacher(process=True|False, **options)` / `FakeTeacherServer`, (c) via `serve_forever(...)`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Awaitable, Iterator
from http import HTTPStatus
from typing import Any

from imitate.errors import ConfigError
from imitate.teacher.reply import format_duration

NAMED_FAULTS = {
    "reset": "close the connection without answering",
    "hang": "answer only after hang_s (tests client timeouts)",
    "slow": "send the body in pieces over slow_s",
    "malformed": "200 with invalid JSON",
    "empty": "200 with choices: []",
    "nomessage": "200 with a choice lacking its message",
    "length": "200, answer truncated, finish_reason length",
    "filter": "200, content null, finish_reason content_filter",
    "quota": "429 insufficient_quota",
    "context": "400 context_length_exceeded",
    "policy": "400 content_policy_violation",
    "auth": "401 invalid_api_key",
}
_CONNECTION_FAULTS = {"reset", "hang", "slow", "malformed"}
_FAULT_MARK = re.compile(r"\[\[fault:([a-z]+|\d{3})(?:x(\d+))?\]\]")
_LEN_MARK = re.compile(r"\[\[len:(\d+)\]\]")
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9'-]{3,}")
_PHRASES = {status.value: status.phrase for status in HTTPStatus}
_STOP = frozenset("what which when where that this with from does have about into your during there".split())  # noqa: SIM905


@dataclasses.dataclass
class FakeConfig:
    model: str = "fake-teacher"
    rpm: int | None = None
    tpm: int | None = None
    headers: bool = True  # False: no x-ratelimit-* and no retry-after, like vLLM / llama.cpp
    faults: dict[str, float] = dataclasses.field(default_factory=dict)
    seed: int = 0
    latency_s: float = 0.0
    jitter_s: float = 0.0
    sentences: int = 4
    api_key: str | None = None  # when set, requests must send `Authorization: Bearer <api_key>`
    hang_s: float = 3600.0
    slow_s: float = 0.5
    retry_after_s: float = 0.05  # what a scripted 429 asks the client to wait
    batch_delay_s: float = 0.05  # pause before each batch state change
    default_max_tokens: int = 1024  # TPM charge for a request without max_tokens

    def __post_init__(self) -> None:
        self.faults = check_faults(self.faults)


def parse_faults(text: str | None) -> dict[str, float]:
    """'500=0.02,reset=0.01' -> {'500': 0.02, 'reset': 0.01}; bad items raise one ConfigError naming each."""
    out, problems = {}, []
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        kind, _, prob = item.partition("=")
        try:
            out[kind.strip()] = float(prob)
        except ValueError:
            problems.append(f"{item!r}: expected KIND=PROBABILITY")
    if problems:
        raise ConfigError("bad --faults", problems=problems)
    return check_faults(out)


def check_faults(faults: dict[str, float]) -> dict[str, float]:
    problems = []
    for kind, prob in faults.items():
        if kind not in NAMED_FAULTS and not re.fullmatch(r"[45]\d\d", kind):
            problems.append(f"{kind!r}: unknown fault (a 4xx/5xx code or one of {', '.join(NAMED_FAULTS)})")
        elif not 0.0 <= prob <= 1.0:
            problems.append(f"{kind}={prob}: probability must be within 0..1")
    if sum(faults.values()) > 1.0 + 1e-9:
        problems.append("fault probabilities add up to more than 1")
    if problems:
        raise ConfigError("bad faults", problems=problems)
    return dict(faults)


# ---------------------------------------------------------------------------------------------- answers


def estimate_tokens(text: str | None) -> int:
    return (len(text) + 3) // 4 if text else 0


def _text(content: Any) -> str:
    if isinstance(content, list):  # content parts
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    return sum(estimate_tokens(_text(m.get("content"))) + 4 for m in messages)


def _digest(messages: list[dict[str, Any]]) -> bytes:
    """A hash of roles and contents: cheaper than canonical JSON, and the answer depends on nothing else."""
    return hashlib.sha256(
        "\x00".join(f"{m.get('role')}\x01{_text(m.get('content'))}" for m in messages).encode()
    ).digest()


def _last_user(messages: list[dict[str, Any]]) -> str:
    return next((_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")


_OPENERS = (
    "Let's work through this carefully.",
    "Here is how to think about it.",
    "Good question, so let's reason it out.",
    "We can answer this in a few steps.",
)
_STEPS = (
    "First, pin down what {a} means here and why it matters for the question.",
    "Next, relate {a} to {b}, because the answer depends on how the two interact.",
    "Take a concrete case: when {b} changes, {c} follows in a predictable way.",
    "Then check the assumption behind {c}; it holds because the question is really about {a}.",
    "Comparing {c} with {b} separates what is essential from what is incidental.",
    "Putting these together, {a} accounts for most of what we observe about {c}.",
)


def fake_answer(messages: list[dict[str, Any]], sentences: int = 4) -> str:
    """A deterministic step-by-step explanation that quotes the question and follows the system style."""
    system = " ".join(_text(m.get("content")) for m in messages if m.get("role") == "system").lower()
    question = _last_user(messages)
    if marker := _LEN_MARK.search(question):
        sentences = int(marker.group(1))
    if "brief" in system or "concise" in system:
        sentences = min(sentences, 2)
    question = " ".join(_LEN_MARK.sub("", _FAULT_MARK.sub("", question)).split())
    digest = _digest(messages)
    words = list(dict.fromkeys(w for w in _WORD.findall(question) if w.lower() not in _STOP))
    words += ["the idea", "the details", "the result"][len(words) :]
    topic = question if len(question) <= 70 else question[:70].rsplit(" ", 1)[0]
    parts = [_OPENERS[digest[0] % len(_OPENERS)], f'The question is "{topic.rstrip("?.! ")}".']
    if "child" in system or "simple" in system:
        parts.append("Think of it like explaining to a friend, one small idea at a time.")
    for i in range(sentences):
        a, b, c = (words[(digest[1 + i + j] + j) % len(words)] for j in range(3))
        step = _STEPS[(digest[1] + i) % len(_STEPS)].format(a=a, b=b, c=c)
        parts.append(f"Step {i + 1}: {step}" if "step" in system else step)
    parts.append(f"So, in short: it comes down to {words[0]} and {words[1]}.")
    return " ".join(parts)


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


# ---------------------------------------------------------------------------------------------- HTTP


@dataclasses.dataclass
class _Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


@dataclasses.dataclass
class _Response:
    status: int
    body: bytes
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    content_type: str = "application/json"
    counted: bool = True  # False for /fake/*: stats describe teacher traffic only


def _error_body(message: str, type_: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def _json(status: int, obj: Any, headers: list[tuple[str, str]] | None = None) -> _Response:
    return _Response(status, json.dumps(obj, separators=(",", ":")).encode(), headers or [])


def _invalid(status: int, message: str) -> _Response:
    return _json(status, _error_body(message, "invalid_request_error"))


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection. Requests are answered in order; a slow one pauses parsing."""

    def __init__(self, app: FakeTeacher):
        self.app = app
        self.buf = bytearray()
        self.task: asyncio.Task | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.app._conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.app._conns.discard(self)
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.task is None:
            self._drain()

    def _drain(self) -> None:
        while self.task is None and self.transport and not self.transport.is_closing():
            try:
                request = self._parse()
            except ValueError:
                self.write(_invalid(400, "malformed HTTP request"), keep_alive=False)
                return
            if request is None:
                return
            result = self.app._handle(request, self)
            if isinstance(result, _Response):
                self.write(result, request.keep_alive)
            else:
                self.task = self.app._spawn(self._finish(result, request.keep_alive))

    async def _finish(self, pending: Awaitable[_Response | None], keep_alive: bool) -> None:
        response = await pending
        if response is not None:
            self.write(response, keep_alive)
        self.task = None
        self._drain()

    def _parse(self) -> _Request | None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        lines = self.buf[:end].decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise ValueError("chunked bodies are not supported")  # the SDK always sends a length
        size = int(headers.get("content-length", "0"))
        if len(self.buf) < end + 4 + size:
            return None
        body = bytes(self.buf[end + 4 : end + 4 + size])
        del self.buf[: end + 4 + size]
        keep_alive = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        return _Request(method, target.split("?", 1)[0], headers, body, keep_alive)

    def head(self, response: _Response, keep_alive: bool) -> bytes:
        lines = [
            f"HTTP/1.1 {response.status} {_PHRASES.get(response.status, '')}",
            f"content-type: {response.content_type}",
        ]
        lines.append(f"content-length: {len(response.body)}")
        lines += [f"{k}: {v}" for k, v in response.headers]
        if not keep_alive:
            lines.append("connection: close")
        if response.counted:
            self.app._count_status(response.status)
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def write_raw(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def write(self, response: _Response, keep_alive: bool) -> None:
        self.write_raw(self.head(response, keep_alive) + response.body)
        if not keep_alive and self.transport is not None:
            self.transport.close()


def _multipart(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    boundary = re.search(r'boundary="?([^";]+)"?', content_type)
    if not boundary:
        raise ValueError("no multipart boundary")
    parts = {}
    for part in body.split(b"--" + boundary.group(1).encode())[1:]:
        head, _, data = part.partition(b"\r\n\r\n")
        disposition = head.decode("latin-1")
        name = re.search(r'(?<![a-z])name="([^"]*)"', disposition)
        filename = re.search(r'filename="([^"]*)"', disposition)
        if name:
            parts[name.group(1)] = (filename.group(1) if filename else None, data.removesuffix(b"\r\n"))
    return parts


# ---------------------------------------------------------------------------------------------- the server


class FakeTeacher:
    """The server in the current event loop: `base_url = await FakeTeacher(rpm=60).start()`; `await stop()`."""

    def __init__(self, **options: Any):
        self.config = FakeConfig(**options)
        self.host, self.port = "127.0.0.1", 0
        self._server: asyncio.Server | None = None
        self._conns: set[_Connection] = set()
        self._tasks: set[asyncio.Task] = set()
        self._files: dict[str, tuple[dict[str, Any], bytes]] = {}
        self._batches: dict[str, dict[str, Any]] = {}
        self._ids = 0
        self.reset()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port, backlog=4096)
        self.host, self.port = host, self._server.sockets[0].getsockname()[1]
        return self.base_url

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
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
        """Forget stats, bucket levels, scripted-fault attempts and the fault RNG (files and batches stay)."""
        cfg, now = self.config, time.monotonic()
        self._rng = random.Random(cfg.seed)
        self._rpm = TokenBucket(cfg.rpm, now) if cfg.rpm else None
        self._tpm = TokenBucket(cfg.tpm, now) if cfg.tpm else None
        self._attempts: dict[bytes, int] = {}
        counters = "requests rate_limited completed prompt_tokens completion_tokens tokens_served batch_lines"
        self._stats: dict[str, Any] = dict.fromkeys(counters.split(), 0)
        self._stats |= {"by_status": {}, "faults": {}, "in_flight": 0, "max_in_flight": 0}

    def stats(self) -> dict[str, Any]:
        """Counters since start/reset: requests, by_status, rate_limited (429s), completed, tokens, faults."""
        out = {k: dict(v) if isinstance(v, dict) else v for k, v in self._stats.items()}
        return out | {"connections": len(self._conns)}

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _next_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}{self._ids:010d}"

    def _count_status(self, status: int) -> None:
        by_status = self._stats["by_status"]
        by_status[status] = by_status.get(status, 0) + 1
        self._stats["rate_limited"] += status == 429

    def _handle(self, req: _Request, conn: _Connection) -> _Response | Awaitable[_Response | None]:
        path = req.path.removeprefix("/v1")
        if path.startswith("/fake/"):
            if path == "/fake/reset" and req.method == "POST":
                self.reset()
            return dataclasses.replace(_json(200, self.stats()), counted=False)
        self._stats["requests"] += 1
        given_key = req.headers.get("authorization", "").removeprefix("Bearer ")
        if self.config.api_key is not None and given_key != self.config.api_key:
            return _json(*self._fault_error("auth", "", given_key))
        if (req.method, path) == ("POST", "/chat/completions"):
            return self._chat(req, conn, given_key)
        if (req.method, path) == ("GET", "/models"):
            model = {"id": self.config.model, "object": "model", "created": 0, "owned_by": "imitate-fake"}
            return _json(200, {"object": "list", "data": [model]})
        if (req.method, path) == ("POST", "/files"):
            return self._upload(req)
        if (req.method, path) == ("POST", "/batches"):
            return self._create_batch(req)
        if req.method == "GET" and (match := re.fullmatch(r"/files/([\w-]+)(/content)?", path)):
            if match.group(1) not in self._files:
                return _invalid(404, f"No such File object: {match.group(1)}")
            meta, data = self._files[match.group(1)]
            return _Response(200, data, content_type="application/octet-stream") if match[2] else _json(200, meta)
        if match := re.fullmatch(r"/batches/([\w-]+)(/cancel)?", path):
            if match.group(1) not in self._batches:
                return _invalid(404, f"No such batch: {match.group(1)}")
            return self._cancel_batch(match.group(1)) if match[2] else _json(200, self._batches[match.group(1)])
        return _invalid(404, f"Unknown request URL: {req.method} {req.path}")

    # ------------------------------------------------------------------------------------------ chat

    def _chat(self, req: _Request, conn: _Connection, given_key: str) -> _Response | Awaitable[_Response | None]:
        try:
            payload = json.loads(req.body)
            p_tokens = prompt_tokens(payload["messages"])
        except (ValueError, KeyError, TypeError, AttributeError):
            return _invalid(400, "could not parse the JSON body or its messages")
        headers = [("x-request-id", self._next_id("req_"))]
        cost = p_tokens + (payload.get("max_tokens") or self.config.default_max_tokens)
        throttled = self._admit(cost, payload.get("model") or self.config.model, headers)
        if throttled is not None:
            return throttled
        fault = self._pick_fault(payload["messages"])
        if fault in _CONNECTION_FAULTS or self.config.latency_s or self.config.jitter_s:
            return self._chat_later(conn, req.keep_alive, payload, p_tokens, fault, headers, given_key)
        return self._respond(payload, p_tokens, fault, headers, given_key)

    def _respond(self, payload: dict, p_tokens: int, fault: str | None, headers: list, given_key: str) -> _Response:
        status, body = self._outcome(payload, p_tokens, fault, given_key)
        if fault == "429" and self.config.headers:
            wait = self.config.retry_after_s
            headers += [("retry-after", str(math.ceil(wait))), ("retry-after-ms", str(round(wait * 1000)))]
        return _json(status, body, headers)

    async def _chat_later(
        self,
        conn: _Connection,
        keep_alive: bool,
        payload: dict,
        p_tokens: int,
        fault: str | None,
        headers: list[tuple[str, str]],
        given_key: str,
    ) -> _Response | None:
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
                return _Response(200, b'{"id":"chatcmpl-broken","choices":[{"index":0,"message":{"ro', headers)
            response = self._respond(
                payload, p_tokens, None if fault in _CONNECTION_FAULTS else fault, headers, given_key
            )
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

    def _pick_fault(self, messages: list[dict[str, Any]]) -> str | None:
        last, fault = _last_user(messages), None
        if "[[fault:" in last and (mark := _FAULT_MARK.search(last)):
            key = _digest(messages)
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

    def _admit(self, cost: int, model: str, headers: list[tuple[str, str]]) -> _Response | None:
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
        return _json(429, _error_body(message, kind, "rate_limit_exceeded"), headers)

    def _fault_error(self, fault: str, model: str, given_key: str) -> tuple[int, dict[str, Any]] | None:
        """(status, error body) for a fault answered with an HTTP error; None for those answered with a 200."""
        if fault == "quota":
            message = "You exceeded your current quota, please check your plan and billing details."
            return 429, _error_body(message, "insufficient_quota", "insufficient_quota")
        if fault == "context":
            message = f"This model's maximum context length is 8192 tokens ({model}). You requested 9000 tokens."
            return 400, _error_body(message, "invalid_request_error", "context_length_exceeded")
        if fault == "policy":
            message = "Your request was rejected as a result of our safety system."
            return 400, _error_body(message, "invalid_request_error", "content_policy_violation")
        if fault == "auth":  # echoes the key unmasked, like a careless proxy: the client must scrub it
            message = f"Incorrect API key provided: {given_key}."
            return 401, _error_body(message, "invalid_request_error", "invalid_api_key")
        if fault == "429":
            message = f"Rate limit reached for {model} on requests per min (RPM): scripted fault."
            return 429, _error_body(message, "requests", "rate_limit_exceeded")
        if fault.isdigit() and int(fault) >= 500:
            message = "The server had an error while processing your request. Sorry about that!"
            return int(fault), _error_body(message, "server_error")
        if fault.isdigit():
            return int(fault), _error_body(f"Scripted client error {fault}.", "invalid_request_error")
        if fault not in NAMED_FAULTS:
            return 400, _error_body(f"Unknown scripted fault {fault!r}.", "invalid_request_error")
        return None

    def _outcome(self, payload: dict, p_tokens: int, fault: str | None, given_key: str) -> tuple[int, dict]:
        """The answer to one chat request (online or a batch line) as (status, body)."""
        model = payload.get("model") or self.config.model
        if fault is not None and (error := self._fault_error(fault, model, given_key)) is not None:
            return error
        text = fake_answer(payload["messages"], self.config.sentences)
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

    # ------------------------------------------------------------------------------------------ batches

    def _store_file(self, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        meta = {"id": self._next_id("file-"), "object": "file", "bytes": len(data), "filename": filename}
        meta |= {"created_at": int(time.time()), "purpose": purpose, "status": "processed"}
        self._files[meta["id"]] = (meta, data)
        return meta

    def _upload(self, req: _Request) -> _Response:
        try:
            parts = _multipart(req.body, req.headers.get("content-type", ""))
            filename, data = parts["file"]
            purpose = parts.get("purpose", (None, b"batch"))[1].decode()
        except (ValueError, KeyError):
            return _invalid(400, "expected multipart/form-data with file and purpose")
        return _json(200, self._store_file(filename or "upload.jsonl", purpose, data))

    def _create_batch(self, req: _Request) -> _Response:
        try:
            payload = json.loads(req.body)
            file_id, endpoint = payload["input_file_id"], payload["endpoint"]
        except (ValueError, KeyError, TypeError):
            return _invalid(400, "expected input_file_id and endpoint")
        if file_id not in self._files or endpoint != "/v1/chat/completions":
            return _invalid(400, f"unknown input file {file_id!r} or unsupported endpoint {endpoint!r}")
        stamps = "in_progress_at finalizing_at completed_at failed_at expired_at cancelling_at cancelled_at"
        batch = {"id": self._next_id("batch_"), "object": "batch", "endpoint": endpoint, "errors": None}
        batch |= {"input_file_id": file_id, "completion_window": payload.get("completion_window", "24h")}
        batch |= {"status": "validating", "output_file_id": None, "error_file_id": None}
        batch |= {"created_at": int(time.time()), "expires_at": int(time.time()) + 86400}
        batch |= dict.fromkeys(stamps.split()) | {"metadata": payload.get("metadata")}
        batch["request_counts"] = {"total": 0, "completed": 0, "failed": 0}
        self._batches[batch["id"]] = batch
        self._spawn(self._run_batch(batch))
        return _json(200, batch)

    def _cancel_batch(self, batch_id: str) -> _Response:
        batch = self._batches[batch_id]
        if batch["status"] not in ("validating", "in_progress", "finalizing"):
            return _invalid(409, f"Cannot cancel a batch with status '{batch['status']}'.")
        batch["status"], batch["cancelling_at"] = "cancelling", int(time.time())
        return _json(200, batch)

    async def _run_batch(self, batch: dict[str, Any]) -> None:
        """validating -> in_progress -> finalizing -> completed (or cancelled), batch_delay_s per step."""
        await asyncio.sleep(self.config.batch_delay_s)
        if batch["status"] == "cancelling":
            batch["status"], batch["cancelled_at"] = "cancelled", int(time.time())
            return
        batch["status"], batch["in_progress_at"] = "in_progress", int(time.time())
        lines = [line for line in self._files[batch["input_file_id"]][1].decode().splitlines() if line.strip()]
        results = [self._batch_line(line, n) for n, line in enumerate(lines, 1)]
        await asyncio.sleep(self.config.batch_delay_s)
        if batch["status"] != "cancelling":
            batch["status"], batch["finalizing_at"] = "finalizing", int(time.time())
        for ok, kind in ((True, "output"), (False, "error")):
            chosen = [json.dumps(entry) + "\n" for entry, good in results if good is ok]
            if chosen:
                meta = self._store_file(f"{batch['id']}_{kind}.jsonl", "batch_output", "".join(chosen).encode())
                batch[f"{kind}_file_id"] = meta["id"]
        completed = sum(good for _, good in results)
        batch["request_counts"] = {"total": len(results), "completed": completed, "failed": len(results) - completed}
        done = "cancelled" if batch["status"] == "cancelling" else "completed"
        batch["status"], batch[f"{done}_at"] = done, int(time.time())

    def _batch_line(self, line: str, n: int) -> tuple[dict[str, Any], bool]:
        """One line in the official batch output format, and whether it succeeded."""
        self._stats["batch_lines"] += 1
        entry: dict[str, Any] = {"id": self._next_id("batch_req_"), "custom_id": None, "response": None}
        try:
            item = json.loads(line)
            entry["custom_id"] = item.get("custom_id")
            body = item["body"]
            p_tokens = prompt_tokens(body["messages"])
        except (ValueError, KeyError, TypeError, AttributeError):
            return entry | {"error": {"code": "invalid_request", "message": f"line {n}: not a batch request"}}, False
        fault = self._pick_fault(body["messages"])
        status, obj = self._outcome(body, p_tokens, "500" if fault in _CONNECTION_FAULTS else fault, "")
        entry["response"] = {"status_code": status, "request_id": self._next_id("req_"), "body": obj}
        return entry | {"error": None}, status == 200


# ---------------------------------------------------------------------------------------------- running it


class FakeTeacherServer:
    """A FakeTeacher for sync code: in a background thread (fast start, shares the GIL) or, with
    `process=True`, in its own Python process so a benchmark does not measure a server sharing its GIL."""

    def __init__(self, *, process: bool = False, host: str = "127.0.0.1", port: int = 0, **options: Any):
        self.options = dataclasses.asdict(FakeConfig(**options))  # fail here, in the caller, on bad options
        self.process, self.host, self.port = process, host, port
        self.base_url = ""
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never proxy

    @property
    def pid(self) -> int:
        return self._proc.pid if self._proc is not None else os.getpid()

    def start(self) -> str:
        self.base_url = self._start_process() if self.process else self._start_thread()
        return self.base_url

    def _start_process(self) -> str:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        cmd = [sys.executable, "-m", "imitate.teacher.fake", "--host", self.host, "--port", str(self.port)]
        self._proc = subprocess.Popen(
            [*cmd, "--config-json", json.dumps(self.options)], stdout=subprocess.PIPE, env=env
        )
        line = self._proc.stdout.readline().decode() if self._proc.stdout else ""
        if not line.startswith("fake teacher listening on "):
            self.stop()
            raise RuntimeError(f"the fake teacher process did not start: {line.strip() or 'no output'}")
        return line.split()[-1]

    def _start_thread(self) -> str:
        started, failed = threading.Event(), []
        fake = FakeTeacher(**self.options)

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            try:
                self.base_url = loop.run_until_complete(fake.start(self.host, self.port))
            except OSError as exc:
                failed.append(exc)
            finally:
                started.set()
            if not failed:
                loop.run_forever()
                loop.run_until_complete(fake.stop())
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-teacher", daemon=True)
        self._thread.start()
        started.wait()
        if failed or not self.base_url:
            raise failed[0] if failed else RuntimeError("the fake teacher thread did not start")
        return self.base_url

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None
        if self._thread is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeTeacherServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/fake/stats")

    def reset(self) -> dict[str, Any]:
        return self._call("POST", "/fake/reset")

    def _call(self, method: str, path: str) -> dict[str, Any]:
        request = urllib.request.Request(self.base_url.removesuffix("/v1") + path, method=method)
        with self._opener.open(request, timeout=10) as response:
            out = json.loads(response.read())
        out["by_status"] = {int(k): v for k, v in out["by_status"].items()}  # JSON keys are strings
        return out


@contextlib.contextmanager
def running_fake_teacher(*, process: bool = True, **options: Any) -> Iterator[str]:
    """`with running_fake_teacher(rpm=600) as base_url:` a fake teacher in its own process (or a thread)."""
    with FakeTeacherServer(process=process, **options) as server:
        yield server.base_url


def serve_forever(
    host: str = "127.0.0.1",
    port: int = 8089,
    rpm: int | None = None,
    tpm: int | None = None,
    faults: str | dict[str, float] | None = None,
    latency: float = 0.0,
    headers: bool = True,
    seed: int = 0,
    **options: Any,
) -> None:
    """Serve until SIGINT/SIGTERM; prints `fake teacher listening on <base_url>` once accepting connections."""
    faults = parse_faults(faults) if isinstance(faults, str) else dict(faults or {})
    fake = FakeTeacher(rpm=rpm, tpm=tpm, faults=faults, latency_s=latency, headers=headers, seed=seed, **options)

    async def serve() -> None:
        stopping = asyncio.Event()
        with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows loops
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
        try:
            base_url = await fake.start(host, port)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        print(f"fake teacher listening on {base_url}", flush=True)
        try:
            await stopping.wait()
        finally:
            await fake.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m imitate.teacher.fake", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--rpm", type=int)
    parser.add_argument("--tpm", type=int)
    parser.add_argument("--faults", help="e.g. 500=0.02,reset=0.01")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before every answer")
    parser.add_argument("--jitter", type=float, default=0.0, help="extra uniform random seconds")
    parser.add_argument("--no-headers", action="store_true", help="no x-ratelimit-* or retry-after (like vLLM)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config-json", help="all FakeConfig fields as JSON (used by FakeTeacherServer)")
    args = parser.parse_args(argv)
    try:
        options = json.loads(args.config_json) if args.config_json else {"faults": parse_faults(args.faults)}
        if not args.config_json:
            options |= {"rpm": args.rpm, "tpm": args.tpm, "seed": args.seed, "headers": not args.no_headers}
            options |= {"latency_s": args.latency, "jitter_s": args.jitter}
        config = dataclasses.asdict(FakeConfig(**options))
        serve_forever(args.host, args.port, latency=config.pop("latency_s"), **config)
    except ConfigError as exc:
        parser.exit(2, exc.one_line() + "\n")


if __name__ == "__main__":
    main()
