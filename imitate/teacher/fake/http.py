"""The fake teacher's HTTP/1.1 server side: an asyncio protocol (keep-alive, Content-Length request bodies,
write flow control), its request and response types, OpenAI-style error bodies, and multipart/form-data parsing
for file uploads. It knows the application only through the `Server` protocol below, so it imports nothing
of the rest of the fake."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import Awaitable
from http import HTTPStatus
from typing import Any, Protocol

_PHRASES = {status.value: status.phrase for status in HTTPStatus}


@dataclasses.dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


@dataclasses.dataclass
class Response:
    status: int
    body: bytes
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    content_type: str = "application/json"
    counted: bool = True  # False for /fake/*: stats describe teacher traffic only


class Server(Protocol):
    """What a connection needs from the application (FakeTeacher)."""

    conns: set[Connection]

    def handle(self, req: Request, conn: Connection) -> Response | Awaitable[Response | None]: ...

    def spawn(self, coro: Awaitable[None]) -> asyncio.Task: ...

    def count_status(self, status: int) -> None: ...


def error_body(message: str, type_: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def json_response(status: int, obj: Any, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, json.dumps(obj, separators=(",", ":")).encode(), headers or [])


def invalid(status: int, message: str) -> Response:
    return json_response(status, error_body(message, "invalid_request_error"))


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection. Requests are answered in order; a slow one pauses parsing."""

    def __init__(self, server: Server):
        self.server = server
        self.buf = bytearray()
        self.task: asyncio.Task | None = None
        self.transport: asyncio.Transport | None = None
        self._writable = asyncio.Event()  # cleared while the peer is not reading (pause_writing)
        self._writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.conns.discard(self)
        self._writable.set()  # wake a writer so it sees the connection is gone
        if self.task is not None:
            self.task.cancel()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    @property
    def open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    async def drain(self) -> None:
        """Wait until the peer has read enough: an endless or huge body must not pile up in our buffers."""
        await self._writable.wait()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.task is None:
            self._drain_requests()

    def _drain_requests(self) -> None:
        while self.task is None and self.open:
            try:
                request = self._parse()
            except ValueError:
                self.write(invalid(400, "malformed HTTP request"), keep_alive=False)
                return
            if request is None:
                return
            result = self.server.handle(request, self)
            if isinstance(result, Response):
                self.write(result, request.keep_alive)
            else:
                self.task = self.server.spawn(self._finish(result, request.keep_alive))

    async def _finish(self, pending: Awaitable[Response | None], keep_alive: bool) -> None:
        response = await pending
        if response is not None:
            self.write(response, keep_alive)
        self.task = None
        self._drain_requests()

    def _parse(self) -> Request | None:
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
            raise ValueError("chunked bodies are not supported")  # every client we serve sends a length
        size = int(headers.get("content-length", "0"))
        if len(self.buf) < end + 4 + size:
            return None
        body = bytes(self.buf[end + 4 : end + 4 + size])
        del self.buf[: end + 4 + size]
        keep_alive = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        return Request(method, target.split("?", 1)[0], headers, body, keep_alive)

    def head(self, response: Response, keep_alive: bool, *, chunked: bool = False) -> bytes:
        """Status line and headers; the body is framed by its length, or chunked when it is sent as a stream."""
        lines = [
            f"HTTP/1.1 {response.status} {_PHRASES.get(response.status, '')}",
            f"content-type: {response.content_type}",
            "transfer-encoding: chunked" if chunked else f"content-length: {len(response.body)}",
        ]
        lines += [f"{k}: {v}" for k, v in response.headers]
        if not keep_alive:
            lines.append("connection: close")
        if response.counted:
            self.server.count_status(response.status)
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def write_raw(self, data: bytes) -> None:
        if self.open:
            self.transport.write(data)  # type: ignore[union-attr]

    def write(self, response: Response, keep_alive: bool) -> None:
        self.write_raw(self.head(response, keep_alive) + response.body)
        if not keep_alive and self.transport is not None:
            self.transport.close()


def multipart(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
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
