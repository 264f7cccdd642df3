"""Helpers for the teacher-client tests: one chat request (or its error) against a base URL, secret checks, a
closed port, and `Recorder`, a loopback HTTP/1.1 server that records what a client sends (also as a proxy)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable

import pytest

from imitate.errors import TeacherError
from imitate.records import GenerationParams, Message
from imitate.teacher.client import TeacherClient
from imitate.teacher.reply import Reply

KEY = "sk-imitate-test-DO-NOT-LEAK-7f3a9c0e"
PARAMS = GenerationParams(max_tokens=256)
TRANSPORTS = ["aiohttp", "sdk"]  # the default and the one alternative must behave the same
OK_BODY = {"choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}], "usage": {}}


async def ask(base_url: str, question: str, *, timeout: float = 5.0, key: str = KEY, **options) -> Reply:
    params = PARAMS.model_copy(update=options.pop("params", {}))
    async with TeacherClient(base_url, api_key=key, timeout=timeout, **options) as client:
        messages = [Message(role="system", content="Explain step by step."), Message(role="user", content=question)]
        return await client.chat(messages, model="fake-teacher", params=params)


def ask_error(base_url: str, question: str, **kw) -> TeacherError:
    with pytest.raises(TeacherError) as info:
        asyncio.run(ask(base_url, question, **kw))
    return info.value


def assert_no_secret(exc: BaseException, *secrets: str) -> None:
    for text in (str(exc), repr(exc), exc.one_line() if isinstance(exc, TeacherError) else ""):
        for secret in secrets or (KEY,):
            assert secret not in text


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Recorder:
    """A loopback HTTP/1.1 server that records each request (as a proxy it sees absolute-form targets) and
    answers with `answer(request) -> (status, headers, body)`."""

    def __init__(self, answer: Callable[[dict], tuple[int, list, bytes]] | None = None):
        self.requests: list[dict] = []
        self.answer = answer or (lambda req: (200, [("x-request-id", "req_rec")], json.dumps(OK_BODY).encode()))
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Recorder:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for writer in self._writers:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            while True:
                lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                request = {"method": method, "target": target, "headers": headers, "body": body}
                self.requests.append(request)
                status, extra, payload = self.answer(request)
                head = f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(payload)}\r\n"
                writer.write((head + "".join(f"{k}: {v}\r\n" for k, v in extra) + "\r\n").encode() + payload)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
