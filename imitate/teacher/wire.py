"""A minimal HTTP/1.1 client on asyncio protocols, for the harvester's one hot request: POST a JSON body to one
origin and read the answer.

Why it exists: on the harvest hot path httpx2 (httpx2 -> httpcore2 -> h11 -> anyio) cost ~1.1-1.6 ms of CPU per
request on this machine, three quarters of everything the harvester spent per row, while a request written with
one `transport.write` and parsed from `data_received` costs ~0.1 ms (bench/RESULTS.md, "Harvest overhead"). A
harvest at a top API tier (30,000 RPM = 500 req/s) on 2 cores needs the latter. Everything that is not that one
request keeps using httpx2 / the openai SDK (`imitate/teacher/client.py` decides).

What it speaks (RFC 9112, client side, for one origin):
- `http` and `https` (TLS through `ssl`, SNI and hostname checked); TCP_NODELAY (asyncio's default);
- requests with `Content-Length`, written in one piece; responses framed by `Content-Length`, by
  `Transfer-Encoding: chunked` (extensions and trailers skipped) or by a clean close (a reset is an error); 1xx
  skipped; `Content-Encoding` gzip / deflate / identity (the caller should send `Accept-Encoding` to match: a
  complete response in another coding is a `WireError` carrying the response); header names lowercased,
  repeated headers joined with ", ";
- keep-alive pool: at most `max_connections` connections (a semaphore; waiting requests queue fairly), the most
  recently used idle connection first; a connection is dropped, never reused, when the server said `close`, spoke
  HTTP/1.0 without keep-alive, sent both Transfer-Encoding and Content-Length, closed it while idle (the protocol
  saw the EOF, or its socket polls readable just before reuse), sent bytes nobody asked for, or sat idle longer
  than `keepalive_expiry` (shorter than uvicorn's 5 s default, so the usual idle-close race does not arise) or
  than a `Keep-Alive: timeout=N` it announced;
- one deadline per request (waiting for a connection, connecting, sending and reading), plus a connect timeout.
  A request that fails or is cancelled halfway closes its connection: a half-read response is never reused.

What it does not do, on purpose: proxies, redirects, cookies, HTTP/2, streaming, retries. A failed request is
a `WireError` and the caller's retry policy decides (a silent resend could pay for a completion twice).
"""

from __future__ import annotations

import asyncio
import re
import select
import ssl
import zlib
from collections import deque
from collections.abc import Sequence
from urllib.parse import urlsplit

MAX_HEAD = 64 * 1024  # bytes of status line + headers
MAX_BODY = 256 * 1024 * 1024

_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _TRAILER, _UNTIL_CLOSE, _DONE = range(7)
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")

Response = tuple[int, dict[str, str], bytes]  # status, headers (lowercase names), decoded body


class WireError(Exception):
    """The request did not get a complete, well-formed response; `timeout` tells timeouts apart. `response` is
    set when the whole response arrived but its body could not be decoded (the server did answer: a caller must
    not treat that as a network failure and resend blindly)."""

    def __init__(self, message: str, *, timeout: bool = False, response: Response | None = None):
        super().__init__(message)
        self.timeout = timeout
        self.response = response


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _decode(body: bytes, encoding: str | None) -> bytes:
    """Undo `Content-Encoding` (the client asks for gzip or deflate; identity is always fine)."""
    encoding = (encoding or "identity").strip().lower()
    try:
        if encoding in ("identity", ""):
            return body
        if encoding in ("gzip", "x-gzip"):
            return zlib.decompress(body, 16 + zlib.MAX_WBITS)
        if encoding == "deflate":  # RFC says zlib-wrapped; some servers send raw deflate
            try:
                return zlib.decompress(body)
            except zlib.error:
                return zlib.decompress(body, -zlib.MAX_WBITS)
    except zlib.error as exc:
        raise WireError(f"response body is not valid {encoding} ({exc})") from exc
    raise WireError(f"response uses an unsupported Content-Encoding: {encoding}")


class _Connection(asyncio.Protocol):
    """One keep-alive connection: `request(data)` writes a whole request and returns a future of the response,
    which `data_received` completes by parsing incrementally."""

    def __init__(self, loop: asyncio.AbstractEventLoop, keepalive_expiry: float):
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.keep_alive = True
        self.expiry = keepalive_expiry
        self.idle_since = 0.0
        self._buf = bytearray()
        self._waiter: asyncio.Future[Response] | None = None
        self._state = _DONE
        self._status = 0
        self._headers: dict[str, str] = {}
        self._remaining = 0
        self._chunks: list[bytes] = []
        self._size = 0  # bytes in _chunks (body) or of trailers read so far

    # ------------------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():  # unasked-for bytes: the framing can no longer be trusted
            self.close()
            return
        self._buf += data
        try:
            self._parse()
        except WireError as exc:
            self._fail(exc)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost finishes a close-delimited body

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is None or self._waiter.done():
            return
        if self._state == _UNTIL_CLOSE and exc is None:  # a clean close ends the body; a reset cuts it
            self._chunks.append(bytes(self._buf))
            self._buf.clear()
            self.keep_alive = False
            self._finish(b"".join(self._chunks))
            return
        where = "before answering" if self._state == _HEAD and not self._buf else "in the middle of the response"
        detail = f": {type(exc).__name__}: {exc}" if exc else ""
        self._fail(WireError(f"the server closed the connection {where}{detail}"))

    # ------------------------------------------------------------------------------ requests

    def request(self, data: bytes) -> asyncio.Future[Response]:
        self._waiter = self._loop.create_future()
        self._state, self._status, self._headers, self._chunks, self._size = _HEAD, 0, {}, [], 0
        assert self.transport is not None
        self.transport.write(data)
        return self._waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _finish(self, body: bytes) -> None:
        self._state = _DONE
        if self._buf:  # bytes beyond this response: nothing was pipelined, so the framing is off
            self.keep_alive = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result((self._status, self._headers, body))

    def _fail(self, exc: WireError) -> None:
        self._state = _DONE
        self.keep_alive = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self.close()

    # ------------------------------------------------------------------------------ parsing

    def _parse(self) -> None:
        buf = self._buf
        while True:
            state = self._state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise WireError(f"response headers larger than {MAX_HEAD // 1024} KiB")
                    return
                head = bytes(buf[:end])
                del buf[: end + 4]
                self._read_head(head)
            elif state == _LENGTH:
                if len(buf) < self._remaining:
                    return
                body = bytes(buf[: self._remaining])
                del buf[: self._remaining]
                self._finish(body)
                return
            elif state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise WireError("chunk size line too long")
                    return
                size_text = bytes(buf[:end]).split(b";", 1)[0].strip(b" \t")
                del buf[: end + 2]
                if not _HEX.fullmatch(size_text):
                    raise WireError(f"bad chunk size {size_text[:20]!r}")
                size = int(size_text, 16)
                self._size += size
                if self._size > MAX_BODY:
                    raise WireError("chunked body too large")
                self._remaining = size
                if size:
                    self._state = _CHUNK_DATA
                else:
                    self._state, self._size = _TRAILER, 0
            elif state == _CHUNK_DATA:
                if len(buf) < self._remaining + 2:
                    return
                if buf[self._remaining : self._remaining + 2] != b"\r\n":
                    raise WireError("chunk not followed by CRLF")
                self._chunks.append(bytes(buf[: self._remaining]))
                del buf[: self._remaining + 2]
                self._state = _CHUNK_SIZE
            elif state == _TRAILER:
                end = buf.find(b"\r\n")
                if self._size + (end + 2 if end >= 0 else len(buf)) > MAX_HEAD:
                    raise WireError(f"response trailers larger than {MAX_HEAD // 1024} KiB")
                if end < 0:
                    return
                self._size += end + 2
                empty = end == 0
                del buf[: end + 2]
                if empty:
                    self._finish(b"".join(self._chunks))
                    return
            elif state == _UNTIL_CLOSE:
                self._chunks.append(bytes(buf))
                self._size += len(buf)
                buf.clear()
                if self._size > MAX_BODY:
                    raise WireError("response body too large")
                return
            else:
                return

    def _read_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        code = rest[:3]
        if not version.startswith(b"HTTP/1.") or not code.isdigit() or rest[3:4] not in (b"", b" "):
            raise WireError(f"not an HTTP/1.x response: {lines[0][:80]!r}")
        status = int(code)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise WireError(f"malformed response header line {line[:80]!r}")
            key, text = name.decode("latin-1").lower(), value.strip().decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        if 100 <= status < 200:
            if status == 101:
                raise WireError("the server switched protocols, which this client does not speak")
            return  # informational (100 Continue, 103 Early Hints): the real response follows
        self._status, self._headers = status, headers
        connection = headers.get("connection", "").lower()
        self.keep_alive = "close" not in connection if version == b"HTTP/1.1" else "keep-alive" in connection
        if "keep-alive" in headers:  # e.g. "timeout=5, max=100": leave before the server does
            for part in headers["keep-alive"].split(","):
                key, _, value = part.strip().partition("=")
                if key.lower() == "timeout" and _digits(value.strip()):
                    self.expiry = min(self.expiry, max(0.0, int(value) - 1.0))
        if status in (204, 304):
            self._finish(b"")
            return
        encoding = headers.get("transfer-encoding")
        length = headers.get("content-length")
        if encoding is not None:
            codings = [c.strip() for c in encoding.lower().split(",") if c.strip()]
            if any(c not in ("chunked", "identity") for c in codings):
                raise WireError(f"response uses an unsupported Transfer-Encoding: {encoding[:40]}")
            if codings and codings[-1] == "chunked":
                self._state = _CHUNK_SIZE
            else:  # RFC 9112 6.3: a final coding other than chunked is read until close
                self._state, self.keep_alive = _UNTIL_CLOSE, False
            if length is not None or version != b"HTTP/1.1":  # RFC 9112 6.3: do not trust this connection again
                self.keep_alive = False
        elif length is not None:
            values = {v.strip() for v in length.split(",")}
            if len(values) != 1 or not _digits(value := values.pop()):
                raise WireError(f"bad Content-Length {length[:40]!r}")
            self._remaining = int(value)
            if self._remaining > MAX_BODY:
                raise WireError("response body too large")
            self._state = _LENGTH
        else:
            self._state, self.keep_alive = _UNTIL_CLOSE, False


def _readable(conn: _Connection) -> bool:
    """Whether an idle connection's socket has something to read: an EOF (or stray bytes) the event loop has not
    delivered yet, e.g. the server closed it right after answering. Such a connection must not carry a request."""
    sock = conn.transport.get_extra_info("socket") if conn.transport is not None else None
    if sock is None:
        return True
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


class WireClient:
    """POSTs to one origin over a small keep-alive pool. Headers are fixed when the client is made."""

    def __init__(
        self,
        base_url: str,
        headers: Sequence[tuple[str, str]],
        *,
        max_connections: int = 100,
        connect_timeout: float = 10.0,
        keepalive_expiry: float = 4.0,
        ssl_context: ssl.SSLContext | None = None,
    ):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"WireClient needs an http:// or https:// URL, not {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self._path_prefix = parts.path.rstrip("/")
        self._ssl = (ssl_context or ssl.create_default_context()) if parts.scheme == "https" else None
        default_port = self.port == (443 if parts.scheme == "https" else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._host_header = host if default_port else f"{host}:{self.port}"
        self._fixed = "".join(f"{name}: {value}\r\n" for name, value in headers).encode("latin-1")
        self._heads: dict[str, bytes] = {}
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: deque[_Connection] = deque()
        self._connect_timeout = connect_timeout
        self._keepalive_expiry = keepalive_expiry
        self._closed = False

    async def post(self, path: str, body: bytes, *, timeout: float) -> Response:
        """POST `body` to base_url + path; the response whatever its status, or WireError."""
        head = self._heads.get(path)
        if head is None:
            target = self._path_prefix + "/" + path.lstrip("/")
            head = self._heads[path] = (
                f"POST {target} HTTP/1.1\r\nHost: {self._host_header}\r\n".encode("latin-1") + self._fixed
            )
        data = b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body)
        try:
            async with asyncio.timeout(timeout):
                async with self._slots:
                    conn = self._pop_idle() or await self._connect()
                    reusable = False
                    try:
                        status, headers, raw = await conn.request(data)
                        reusable = conn.keep_alive and not conn.closed and not self._closed
                    finally:
                        self._release(conn, reusable)
        except TimeoutError:
            raise WireError(f"no complete response within {timeout:g} s", timeout=True) from None
        try:
            return status, headers, _decode(raw, headers.get("content-encoding"))
        except WireError as exc:
            exc.response = (status, headers, raw)
            raise

    def _pop_idle(self) -> _Connection | None:
        now = asyncio.get_running_loop().time()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < conn.expiry and not _readable(conn):
                return conn
            conn.close()
        return None

    def _release(self, conn: _Connection, reusable: bool) -> None:
        if reusable:
            conn.idle_since = asyncio.get_running_loop().time()
            self._idle.append(conn)
        else:
            conn.close()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop, self._keepalive_expiry),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                    happy_eyeballs_delay=0.25,  # RFC 8305: a dead IPv6 route must not eat the connect timeout
                )
        except TimeoutError:
            raise WireError(f"connecting to {self.host}:{self.port} timed out", timeout=True) from None
        except ssl.SSLError as exc:
            raise WireError(f"TLS handshake with {self.host}:{self.port} failed: {exc.reason or exc}") from exc
        except OSError as exc:
            raise WireError(f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from exc
        return conn

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()
