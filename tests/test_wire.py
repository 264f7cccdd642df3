"""imitate.teacher.wire, the harvester's minimal HTTP/1.1 client, against scripted raw-socket servers: framing
(length, chunked, close-delimited, 1xx, gzip), keep-alive reuse and every reason not to reuse, timeouts,
cancellation, the connection cap, malformed responses, TLS, and the exact bytes it sends."""

import asyncio
import contextlib
import gzip
import json
import shutil
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from imitate.records import GenerationParams, Message
from imitate.teacher.client import TeacherClient
from imitate.teacher.wire import WireClient, WireError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
HEADERS = [("Authorization", "Bearer k"), ("Content-Type", "application/json")]


class Server:
    """A loopback server running `handler` per connection; records raw requests and connection counts."""

    def __init__(self, handler: Handler):
        self.handler = handler
        self.connections = 0
        self.open_now = 0
        self.max_open = 0
        self.requests: list[bytes] = []
        self.port = 0

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        length = int(
            next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")).split(b":")[1]
        )
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open_now -= 1
            writer.close()


@contextlib.asynccontextmanager
async def serve(handler_factory: Callable[[Server], Handler], ssl_context=None) -> AsyncIterator[Server]:
    server = Server(None)  # type: ignore[arg-type]
    server.handler = handler_factory(server)
    srv = await asyncio.start_server(server._serve, "127.0.0.1", 0, ssl=ssl_context)
    server.port = srv.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        for _ in range(200):  # let handlers see the client's EOF and end by themselves (no cancelled handlers)
            if not server.open_now:
                break
            await asyncio.sleep(0.01)
        srv.close()
        await srv.wait_closed()


def ok(body: bytes = b'{"ok":true}', extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n{extra}\r\n".encode()
        + body
    )


def answering(*responses: bytes, keep_open: bool = True) -> Callable[[Server], Handler]:
    """Each connection answers requests with `responses` in turn (cycling), byte-exact."""

    def factory(server: Server) -> Handler:
        async def handler(reader, writer):
            i = 0
            while await server.read_request(reader) is not None:
                writer.write(responses[i % len(responses)])
                await writer.drain()
                i += 1
                if not keep_open:
                    return

        return handler

    return factory


def run(coro):
    return asyncio.run(coro)


async def post(server: Server, body: bytes = b"{}", timeout: float = 5.0, **kw) -> tuple:
    client = WireClient(f"http://127.0.0.1:{server.port}/v1", HEADERS, **kw)
    try:
        return await client.post("chat/completions", body, timeout=timeout)
    finally:
        await client.aclose()


# ---------------------------------------------------------------------------------------------- framing


def test_content_length_response_and_the_exact_request_bytes():
    async def go():
        async with serve(answering(ok(extra="X-Request-Id: req_1\r\nx-ratelimit-remaining-requests: 9\r\n"))) as s:
            status, headers, body = await post(s, b'{"q":"\xc3\xa9"}')
            return s, status, headers, body

    s, status, headers, body = run(go())
    assert (status, body) == (200, b'{"ok":true}')
    assert headers["x-request-id"] == "req_1" and headers["x-ratelimit-remaining-requests"] == "9"  # lowercased
    assert s.requests == [
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer k\r\n"
        b"Content-Type: application/json\r\nContent-Length: 10\r\n\r\n" % s.port + b'{"q":"\xc3\xa9"}'
    ]


def test_chunked_body_with_extensions_and_trailers_delivered_one_byte_at_a_time():
    payload = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n"
    )

    def factory(server):
        async def handler(reader, writer):
            while await server.read_request(reader) is not None:
                for i in range(len(payload)):
                    writer.write(payload[i : i + 1])
                    await writer.drain()
                    await asyncio.sleep(0)

        return handler

    async def go():
        async with serve(factory) as s:
            client = WireClient(f"http://127.0.0.1:{s.port}", HEADERS)
            first = await client.post("/x", b"{}", timeout=5)
            second = await client.post("/x", b"{}", timeout=5)  # the same connection: the framing ended exactly
            await client.aclose()
            return s, first, second

    s, first, second = run(go())
    assert first[2] == second[2] == b"hello world"
    assert s.connections == 1


def test_close_delimited_body_and_http10():
    response = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"

    async def go():
        async with serve(answering(response, keep_open=False)) as s:
            client = WireClient(f"http://127.0.0.1:{s.port}", HEADERS)
            results = [await client.post("/", b"", timeout=5) for _ in range(2)]
            await client.aclose()
            return s, results

    s, results = run(go())
    assert [r[2] for r in results] == [b"until the end"] * 2
    assert s.connections == 2  # never reused


def test_informational_responses_are_skipped_and_gzip_is_decoded():
    body = gzip.compress(b'{"choices":[]}')
    response = (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        + f"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )

    async def go():
        async with serve(answering(response)) as s:
            return await post(s)

    assert run(go())[2] == b'{"choices":[]}'


def test_error_statuses_come_back_as_responses_not_exceptions():
    response = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 2\r\nContent-Length: 2\r\n\r\n{}"

    async def go():
        async with serve(answering(response)) as s:
            return await post(s)

    status, headers, body = run(go())
    assert (status, headers["retry-after"], body) == (429, "2", b"{}")


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.x response"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed response header"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10, 11\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY", "chunk not followed by CRLF"),
        (b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 2\r\n\r\nab", "unsupported Content-Encoding"),
        (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 2\r\n\r\nab", "not valid gzip"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "switched protocols"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000, "larger than 64 KiB"),
        (b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n", "not an HTTP/1.x response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\nab\r\n0\r\n\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", "unsupported Transfer-Encoding"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + b"X-T: y\r\n" * 10_000 + b"\r\n",
            "trailers larger than 64 KiB",
        ),
    ],
)
def test_malformed_responses_are_wire_errors(response, message):
    async def go():
        async with serve(answering(response)) as s:
            return await post(s)

    with pytest.raises(WireError, match=message) as info:
        run(go())
    assert not info.value.timeout
    assert info.value.response is None or message in ("unsupported Content-Encoding", "not valid gzip")


def test_an_undecodable_but_complete_response_is_not_a_network_error():
    """A server that compresses with a coding we cannot decode did answer: the error carries the response, and the
    client classifies it by status (a 200 is BadResponse, a 429 RateLimited), never NetworkError (resend)."""
    from imitate.errors import BadResponse, NetworkError, RateLimited

    async def go(status: bytes):
        async with (
            serve(answering(b"HTTP/1.1 " + status + b"\r\nContent-Encoding: br\r\nContent-Length: 2\r\n\r\nab")) as s,
            TeacherClient(f"http://127.0.0.1:{s.port}/v1", transport="wire") as client,
        ):
            await client.chat([Message(role="user", content="hi")], model="m", params=GenerationParams())

    with pytest.raises(BadResponse, match="HTTP 200 but response uses an unsupported Content-Encoding: br") as info:
        run(go(b"200 OK"))
    assert isinstance(info.value.__cause__, WireError) and info.value.__cause__.response[0] == 200
    with pytest.raises(RateLimited) as info:
        run(go(b"429 Too Many Requests"))
    assert not isinstance(info.value, NetworkError)


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part", "in the middle of the response"),
        (b"", "closed the connection before answering"),
    ],
)
def test_a_connection_closed_early_is_an_error_not_a_short_body(response, message):
    async def go():
        async with serve(answering(response, keep_open=False)) as s:
            return await post(s)

    with pytest.raises(WireError, match=message):
        run(go())


# ---------------------------------------------------------------------------------------------- keep-alive


def test_keep_alive_reuses_one_connection_and_close_does_not():
    async def go(response):
        async with serve(answering(response)) as s:
            client = WireClient(f"http://127.0.0.1:{s.port}", HEADERS)
            for _ in range(5):
                assert (await client.post("/", b"{}", timeout=5))[0] == 200
            await client.aclose()
            return s.connections

    assert run(go(ok())) == 1
    assert run(go(ok(extra="Connection: close\r\n"))) == 5


def test_a_connection_the_server_closed_while_idle_is_not_reused():
    """The server closes every connection 50 ms after answering; requests spaced wider must all succeed."""

    def factory(server):
        async def handler(reader, writer):
            if await server.read_request(reader) is not None:
                writer.write(ok())
                await writer.drain()
                await asyncio.sleep(0.05)

        return handler

    async def go():
        async with serve(factory) as s:
            client = WireClient(f"http://127.0.0.1:{s.port}", HEADERS)
            for _ in range(3):
                assert (await client.post("/", b"{}", timeout=5))[0] == 200
                await asyncio.sleep(0.2)
            await client.aclose()
            return s.connections

    assert run(go()) == 3


def test_idle_connections_expire_by_our_limit_and_by_the_servers_keep_alive_timeout():
    async def go(response, expiry):
        async with serve(answering(response)) as s:
            client = WireClient(f"http://127.0.0.1:{s.port}", HEADERS, keepalive_expiry=expiry)
            await client.post("/", b"{}", timeout=5)
            await asyncio.sleep(0.3)
            await client.post("/", b"{}", timeout=5)
            await client.aclose()
            return s.connections

    assert run(go(ok(), expiry=10.0)) == 1
    assert run(go(ok(), expiry=0.1)) == 2
    assert run(go(ok(extra="Keep-Alive: timeout=1, max=100\r\n"), expiry=10.0)) == 2  # timeout - 1 s margin = 0


def test_bytes_nobody_asked_for_retire_the_connection():
    def factory(server):
        async def handler(reader, writer):
            while await server.read_request(reader) is not None:
                writer.write(ok())
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(b"HTTP/1.1 200 OK\r\n")  # a stray second response

        return handler

    async def go():
        async with serve(factory) as s:
            client = WireClient(f"http://127.0.0.1:{s.port}", HEADERS)
            await client.post("/", b"{}", timeout=5)
            await asyncio.sleep(0.2)
            assert (await client.post("/", b"{}", timeout=5))[2] == b'{"ok":true}'
            await client.aclose()
            return s.connections

    assert run(go()) == 2


def test_connections_are_capped_and_waiters_are_served():
    def factory(server):
        async def handler(reader, writer):
            while await server.read_request(reader) is not None:
                await asyncio.sleep(0.02)
                writer.write(ok())
                await writer.drain()

        return handler

    async def go():
        async with serve(factory) as s:
            client = WireClient(f"http://127.0.0.1:{s.port}", HEADERS, max_connections=3)
            results = await asyncio.gather(*(client.post("/", b"{}", timeout=5) for _ in range(20)))
            await client.aclose()
            return s, results

    s, results = run(go())
    assert [r[0] for r in results] == [200] * 20
    assert s.max_open <= 3 and s.connections == 3


def test_a_reset_cuts_a_close_delimited_body_instead_of_ending_it():
    def factory(server):
        async def handler(reader, writer):
            await server.read_request(reader)
            writer.write(b'HTTP/1.1 200 OK\r\n\r\n{"choices":[{"message":{"content":"hel')
            await writer.drain()
            await asyncio.sleep(0.05)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
            writer.transport.abort()

        return handler

    async def go():
        async with serve(factory) as s:
            return await post(s)

    with pytest.raises(WireError, match="in the middle of the response"):
        run(go())


def test_a_connection_closed_right_after_its_answer_is_not_reused_even_before_the_loop_sees_it():
    """The server answers (keep-alive by default) and closes at once; the next request is issued without yielding
    to the event loop, so only the readability check before reuse can tell the connection is dead."""

    def factory(server):
        async def handler(reader, writer):
            if await server.read_request(reader) is not None:
                writer.write(ok())
                await writer.drain()

        return handler

    async def go():
        async with serve(factory) as s:
            client = WireClient(f"http://127.0.0.1:{s.port}", HEADERS)
            statuses = []
            for _ in range(30):
                statuses.append((await client.post("/", b"{}", timeout=5))[0])
                time.sleep(0.002)  # the server's FIN arrives while this loop does not yield
            await client.aclose()
            return statuses, s.connections

    statuses, connections = run(go())
    assert statuses == [200] * 30 and connections == 30


def test_transfer_encoding_with_content_length_is_read_chunked_and_the_connection_dropped():
    response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n2\r\nab\r\n0\r\n\r\n"

    async def go():
        async with serve(answering(response)) as s:
            client = WireClient(f"http://127.0.0.1:{s.port}", HEADERS)
            bodies = [(await client.post("/", b"{}", timeout=5))[2] for _ in range(2)]
            await client.aclose()
            return bodies, s.connections

    assert run(go()) == ([b"ab", b"ab"], 2)


def test_only_a_proxy_that_applies_to_the_teacher_switches_off_the_wire(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
                 "no_proxy"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    url = "http://127.0.0.1:8089/v1"
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    monkeypatch.setenv("APT_PROXY", "http://10.0.0.1:3142")
    assert TeacherClient(url)._wire is not None
    monkeypatch.setenv("HTTP_PROXY", "http://10.0.0.1:3128")
    assert TeacherClient(url)._wire is not None  # NO_PROXY exempts the host
    monkeypatch.delenv("NO_PROXY")
    assert TeacherClient(url)._wire is None


# ---------------------------------------------------------------------------------------------- timeouts


def test_no_answer_times_out_and_the_connection_is_closed():
    def factory(server):
        async def handler(reader, writer):
            await server.read_request(reader)
            server.eof = await reader.read() == b""  # blocks until the client gives up and closes

        return handler

    async def go():
        async with serve(factory) as s:
            with pytest.raises(WireError, match="no complete response within 0.2 s") as info:
                await post(s, timeout=0.2)
            for _ in range(100):
                if getattr(s, "eof", None) is not None:
                    break
                await asyncio.sleep(0.01)
            return info.value, s

    exc, s = run(go())
    assert exc.timeout and s.eof is True


def test_a_cancelled_request_never_hands_its_connection_to_the_next_one():
    """The first request is cancelled while its (slow) answer is on the way; the second must not read it."""

    def factory(server):
        async def handler(reader, writer):
            n = 0
            while await server.read_request(reader) is not None:
                n += 1
                await asyncio.sleep(0.2 if n == 1 else 0)
                writer.write(ok(f'{{"n":{n},"conn":{server.connections}}}'.encode()))
                await writer.drain()

        return handler

    async def go():
        async with serve(factory) as s:
            client = WireClient(f"http://127.0.0.1:{s.port}", HEADERS)
            task = asyncio.create_task(client.post("/", b"{}", timeout=5))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            second = await client.post("/", b"{}", timeout=5)
            await client.aclose()
            return json.loads(second[2])

    assert run(go()) == {"n": 1, "conn": 2}  # a fresh connection's first answer


def test_refused_connection_and_bad_urls():
    async def go():
        client = WireClient("http://127.0.0.1:9", HEADERS)  # port 9 (discard) is closed on loopback
        try:
            await client.post("/", b"", timeout=5)
        finally:
            await client.aclose()

    with pytest.raises(WireError, match="cannot connect to 127.0.0.1:9"):
        run(go())
    with pytest.raises(ValueError, match="http:// or https://"):
        WireClient("ftp://example.org", HEADERS)


# ---------------------------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    assert openssl, "the openssl command is needed to make a test certificate"
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_https_verifies_the_certificate(certificate):
    cert, key = certificate
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)

    async def go(trust: bool):
        async with serve(answering(ok()), ssl_context=server_ctx) as s:
            ctx = ssl.create_default_context(cafile=str(cert)) if trust else ssl.create_default_context()
            client = WireClient(f"https://localhost:{s.port}/v1", HEADERS, ssl_context=ctx)
            try:
                return await client.post("chat/completions", b"{}", timeout=5), s
            finally:
                await client.aclose()

    (status, _, body), s = run(go(trust=True))
    assert (status, body) == (200, b'{"ok":true}')
    assert s.requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost:%d\r\n" % s.port)
    with pytest.raises(WireError, match="TLS handshake"):
        run(go(trust=False))


# ---------------------------------------------------------------------------------------------- via TeacherClient


def test_teacher_client_on_wire_sends_what_the_sdk_sends():
    """The default transport's request body equals the SDK's for the same call (raw bytes captured)."""
    answer = json.dumps(
        {"choices": [{"message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}],
         "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}, "model": "m"}
    ).encode()  # fmt: skip

    async def go(transport: str) -> bytes:
        async with serve(answering(ok(answer))) as s:
            async with TeacherClient(f"http://127.0.0.1:{s.port}/v1", api_key="sk-x", transport=transport) as c:
                params = GenerationParams(max_tokens=64, temperature=0.2, seed=7, stop=["\n\n"])
                messages = [Message(role="system", content="Be brief."), Message(role="user", content="Explain é.")]
                reply = await c.chat(messages, model="m", params=params, extra={"user": "u1"})
                assert reply.text == "fine" and reply.usage.total_tokens == 4
            return s.requests[0]

    wire, sdk = run(go("wire")), run(go("sdk"))
    wire_head, wire_body = wire.split(b"\r\n\r\n", 1)
    sdk_head, sdk_body = sdk.split(b"\r\n\r\n", 1)
    assert json.loads(wire_body) == json.loads(sdk_body)
    assert wire_head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"\r\nAuthorization: Bearer sk-x\r\n" in wire_head
    assert b"\r\nAccept-Encoding: gzip, deflate\r\n" in wire_head
    assert b"authorization: bearer sk-x" in sdk_head.lower()
