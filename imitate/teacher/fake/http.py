"""The fake teacher's wire: a plain asyncio HTTP/1.1 protocol (keep-alive, Content-Length bodies), its
request and response types, OpenAI-style error bodies, and multipart/form-data parsing for file uploads."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import Awaitable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imitate.teacher.fake.app import FakeTeacher

_PHRASES = {status.value: status.phrase for status in HTTPStatus}


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
