"""The teacher client: one OpenAI-compatible endpoint, and the only module that imports `openai`. Every
transport failure is translated here, once.

`TeacherClient.chat` sends one chat completion and returns a `Reply` even when `finish_reason` is "length" or
"content_filter"; `check_finish` turns those into errors for callers that want that. Two transports sit behind
one seam, `_send(body, extra) -> (raw 200 body, headers)`:

- `transport="aiohttp"` (default): one pre-encoded JSON POST over an `aiohttp.ClientSession` (one per client,
  opened in the running loop). aiohttp is the fast transport the openai SDK itself offers (its `aiohttp`
  extra): a C parser, TLS, proxies and decompression that are maintained elsewhere, for ~0.09 ms of client CPU
  per request against ~1 ms through the SDK (bench/RESULTS.md, "Fake teacher ceiling").
- `transport="sdk"`: the openai SDK's raw-response API (so the rate-limit headers stay readable), for setups the
  SDK already handles and aiohttp does not (see the README: Azure-style gateways, exotic auth or proxies).

What the aiohttp path guarantees:
- TLS verified with hostname check: system CAs or `SSL_CERT_FILE`/`SSL_CERT_DIR`, plus `ca_bundle` if given;
- proxies from `HTTP_PROXY`/`HTTPS_PROXY` minus `NO_PROXY`, resolved once with aiohttp's own helper (aiohttp's
  `trust_env=True` would do that lookup and a ~/.netrc read in a thread on every request, and a netrc entry
  for the teacher's host would clash with the bearer key);
- redirects are not followed (a POST must not be re-sent somewhere else): a 3xx is one BadRequest per row;
- the *decoded* body is capped at `max_response_bytes` (aiohttp inflates gzip as it is read), and beyond
  `FREE_BODY_BYTES` a response needs a share of a client-wide budget (`LARGE_BODY_BUDGET`), so 256 endless or
  decompression-bomb responses hold ~256 x 100 KiB + 128 MiB, not 256 x the cap (8 GiB);
- `user:password@` in `base_url` is stripped (aiohttp would send it as Basic auth) and scrubbed from messages.

Neither transport retries (the harvester's retry policy decides); both send the key as `Authorization: Bearer`.
The SDK keeps its own client's rules (it follows redirects and reads bodies whole; of ours it only learns
`ca_bundle`). The Batch/Files API and model listing always use the SDK, which returns plain dicts / bytes so no
openai type leaks past this module; `openai` is imported on first use (~1.5 s).

Error mapping, once: statuses through `reply.error_for_status` (pure), exceptions in `_transport_error`,
`_body_error` (aiohttp) and `_translate` (SDK):

    429 insufficient_quota / billing   QuotaExhausted     401, 403                       AuthError
    429 otherwise                      RateLimited        404 on chat, or "model ... not found"  ModelNotFound
    400 context length                 ContextTooLong     400 content_filter / policy    ContentFiltered
    3xx (not followed), other 4xx      BadRequest         5xx                            ServerError
    refused, DNS, unreachable          ConnectFailed      certificate / handshake        TLSFailure
    408, timeout, reset, cut body      NetworkError       200 with bad JSON / no choices / over the cap  BadResponse

Messages never contain the API key or URL userinfo: anything echoed by the server passes through `scrub`.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import aiohttp
import yarl
from aiohttp.helpers import get_env_proxy_for_url

from imitate import __version__
from imitate.errors import (
    BadRequest,
    BadResponse,
    ConfigError,
    ConnectFailed,
    InputError,
    NetworkError,
    ResponseTooLarge,
    TeacherError,
    TLSFailure,
)
from imitate.records import GenerationParams, Message
from imitate.teacher.reply import NO_KEY, Reply, check_finish, error_body, error_for_status, reply_from_body, scrub

__all__ = ["TRANSPORTS", "TeacherClient", "check_finish", "error_for_status", "parse_base_url", "reply_from_body"]

T = TypeVar("T")
TRANSPORTS = ("aiohttp", "sdk")
DEFAULT_MAX_RESPONSE_BYTES = 32 * 1024 * 1024
FREE_BODY_BYTES = 64 * 1024  # what any response may buffer freely: a 16k-token answer
LARGE_BODY_BUDGET = 128 * 1024 * 1024  # what all responses past FREE_BODY_BYTES may hold at once
ERROR_BODY_BYTES = 64 * 1024  # an error body is only read for its message
# one encoder for every request: json.dumps with options builds a fresh JSONEncoder per call
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False).encode


def parse_base_url(base_url: str) -> yarl.URL:
    """The base URL as aiohttp will read it, or ConfigError (the config validates too; this is the backstop)."""
    shown = scrub(base_url)
    try:
        url = yarl.URL(base_url.rstrip("/"))
        url.port  # noqa: B018 — yarl checks the port range lazily
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"bad teacher base_url {shown!r}: {exc}") from exc
    bad_host = not url.raw_host or any(c.isspace() for c in url.raw_host) or url.port == 0
    if url.scheme not in ("http", "https") or bad_host:
        raise ConfigError(f"bad teacher base_url {shown!r}: expected http(s)://host[:port]/path")
    return url


def ssl_context(ca_bundle: str | None = None) -> ssl.SSLContext:
    """Verification with hostname check: the system CAs (or `SSL_CERT_FILE`/`SSL_CERT_DIR`, which OpenSSL reads
    in place of them), plus `ca_bundle` (a file or a directory of PEM certificates) when given."""
    context = ssl.create_default_context()
    if ca_bundle:
        try:
            if os.path.isdir(ca_bundle):
                context.load_verify_locations(capath=ca_bundle)
            else:
                context.load_verify_locations(cafile=ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load ca_bundle {ca_bundle!r}: {exc}") from exc
    return context


def _causes(exc: BaseException | None) -> list[BaseException]:
    """`exc` and what it was raised from, outermost first (the SDK wraps httpx2's errors, which wrap OSError)."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


class TeacherClient:
    """One OpenAI-compatible endpoint. `async with TeacherClient(base_url, api_key=...) as client: ...`"""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_connections: int = 1000,
        transport: Literal["aiohttp", "sdk"] = "aiohttp",
        ca_bundle: str | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ):
        if transport not in TRANSPORTS:
            raise ConfigError(f"transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}")
        url = parse_base_url(base_url)
        # the configured key is the credential: userinfo in the URL is dropped, and treated as a secret
        self._secrets = tuple(s for s in (api_key, url.password, url.user) if s)
        url = url.with_user(None)
        self.base_url = str(url)
        self.transport = transport
        self._api_key = api_key
        self._timeout_s = timeout
        self._max_connections = max_connections
        self._max_bytes = max_response_bytes
        self._ssl = ssl_context(ca_bundle) if url.scheme == "https" or ca_bundle else None
        self._ca_bundle = ca_bundle
        self._chat_url = url / "chat/completions"
        try:  # the proxy the environment asks for (NO_PROXY honoured), looked up once
            self._proxy, self._proxy_auth = get_env_proxy_for_url(self._chat_url)
        except LookupError:
            self._proxy, self._proxy_auth = None, None
        self._headers = {
            "Authorization": f"Bearer {api_key or NO_KEY}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Accept-Encoding": "gzip, deflate",
            "User-Agent": f"imitate/{__version__}",
        }
        self._session: aiohttp.ClientSession | None = None
        self._large_bodies: asyncio.Semaphore | None = None
        self._sdk_client: Any = None  # openai.AsyncOpenAI, made on first use (`_sdk`)

    def _open_session(self) -> aiohttp.ClientSession:
        """The session, made on first use because aiohttp binds it to the running loop."""
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            ssl=self._ssl or True,
            keepalive_timeout=4.0,  # below uvicorn's 5 s idle close, so a reused connection is rarely dead
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            timeout=aiohttp.ClientTimeout(total=self._timeout_s, sock_connect=min(self._timeout_s, 10.0)),
            cookie_jar=aiohttp.DummyCookieJar(),  # a teacher's cookies are never wanted, and cost per request
            read_bufsize=16 * 1024,  # a paused connection then holds ~32 KiB in aiohttp, not ~512 KiB (measured)
        )
        self._large_bodies = asyncio.Semaphore(max(1, LARGE_BODY_BUDGET // max(self._max_bytes, FREE_BODY_BYTES)))
        return self._session

    @property
    def _sdk(self) -> Any:
        if self._sdk_client is None:
            import openai

            # the SDK brings its own HTTP client; it is only told about a configured CA bundle
            http = openai.DefaultAsyncHttpxClient(verify=self._ssl) if self._ca_bundle else None
            self._sdk_client = openai.AsyncOpenAI(
                api_key=self._api_key or NO_KEY,
                base_url=self.base_url,
                timeout=self._timeout_s,
                max_retries=0,
                http_client=http,
            )
        return self._sdk_client

    async def __aenter__(self) -> TeacherClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._sdk_client is not None:
            await self._sdk_client.close()
            self._sdk_client = None

    # ------------------------------------------------------------------------------------------ chat

    async def chat(
        self, messages: list[Message], *, model: str, params: GenerationParams, extra: dict[str, Any] | None = None
    ) -> Reply:
        body = {"model": model, "messages": [{"role": m.role, "content": m.content} for m in messages]}
        body.update(params.api_kwargs())
        start = time.perf_counter()
        content, headers = await self._send(body, extra)
        return reply_from_body(content, headers, time.perf_counter() - start, secrets=self._secrets)

    async def _send(self, body: dict[str, Any], extra: dict[str, Any] | None) -> tuple[bytes, Mapping[str, str]]:
        """POST one completion; (raw body, headers) of the 200 or a TeacherError."""
        if self.transport == "sdk":
            return await self._send_sdk(body, extra)
        return await self._send_aiohttp(body, extra)

    async def _send_aiohttp(
        self, body: dict[str, Any], extra: dict[str, Any] | None
    ) -> tuple[bytes, Mapping[str, str]]:
        payload = _encode({**body, **extra} if extra else body).encode()
        session = self._session or self._open_session()
        try:
            response = await session.post(
                self._chat_url, data=payload, allow_redirects=False, proxy=self._proxy, proxy_auth=self._proxy_auth
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._transport_error(exc) from exc
        status = response.status
        try:
            if 200 <= status < 300:
                content = await self._read(response, self._max_bytes)
                if content is None:
                    raise self._too_large(response)
                return content, response.headers
            if 300 <= status < 400:
                where = scrub(response.headers.get("Location", "nowhere"), *self._secrets)
                raise BadRequest(
                    f"teacher answered HTTP {status} redirect to {where}; set base_url to the final URL",
                    status=status,
                )
            content = await self._read(response, ERROR_BODY_BYTES)
            body = error_body(content) if content is not None else f"(an error body over {ERROR_BODY_BYTES} bytes)"
            raise error_for_status(status, response.headers, body, secrets=self._secrets, chat=True)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._body_error(exc, response) from exc
        finally:
            response.close()  # a no-op once the body was read in full (the connection is back in the pool)

    async def _read(self, response: aiohttp.ClientResponse, limit: int) -> bytes | None:
        """The decoded body, or None once it passes `limit` (the caller closes the connection). Past
        FREE_BODY_BYTES a response waits for a share of LARGE_BODY_BUDGET before reading on (its connection
        pauses meanwhile), so many huge answers at once cost the budget, not connections x limit. Chunks are
        kept as they come and joined once: growing one buffer reallocates, and glibc keeps freed blocks in RSS."""
        content = response.content
        chunks: list[bytes] = []
        size, slot = 0, False
        try:
            while chunk := await content.readany():
                size += len(chunk)
                if size > limit:
                    return None
                if not slot and size > FREE_BODY_BYTES:
                    assert self._large_bodies is not None
                    await self._large_bodies.acquire()
                    slot = True
                chunks.append(chunk)
        finally:
            if slot:
                self._large_bodies.release()  # type: ignore[union-attr]
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _too_large(self, response: aiohttp.ClientResponse) -> ResponseTooLarge:
        """Not retryable: a server that sent an endless or inflating body once would send it again, and the
        teacher may bill each attempt."""
        return ResponseTooLarge(
            f"HTTP {response.status} body over max_response_bytes={self._max_bytes} decoded bytes; not retried",
            status=response.status,
            hint="raise harvest.teachers.N.max_response_bytes if answers this large are expected",
        )

    def _transport_error(self, exc: BaseException, what: str = "chat completion") -> TeacherError:
        """The one translation of an aiohttp failure before a response arrived."""
        detail = scrub(f"{type(exc).__name__}: {exc}", *self._secrets)
        if isinstance(exc, aiohttp.ClientSSLError):
            hint = "set the teacher's ca_bundle (or SSL_CERT_FILE) to the CA that signed its certificate"
            return TLSFailure(f"{what}: TLS with {self.base_url} failed ({detail})", hint=hint)
        if isinstance(exc, aiohttp.ClientProxyConnectionError):
            where = scrub(str(self._proxy), *self._secrets)
            return ConnectFailed(f"{what}: cannot connect to the proxy {where} for {self.base_url} ({detail})")
        if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
            return ConnectFailed(f"{what}: cannot connect to {self.base_url} ({detail})")
        if isinstance(exc, TimeoutError):
            return NetworkError(f"{what}: timed out talking to {self.base_url}")
        return NetworkError(f"{what}: connection to {self.base_url} failed ({detail})")

    def _body_error(self, exc: BaseException, response: aiohttp.ClientResponse) -> TeacherError:
        """A failure while reading a response that had arrived: undecodable is the server's fault, else network."""
        if isinstance(exc, aiohttp.ClientPayloadError) and "encoding" in str(exc).lower():
            detail, status = scrub(" ".join(str(exc).split()), *self._secrets), response.status
            request_id = scrub(response.headers.get("x-request-id", ""), *self._secrets) or None
            return BadResponse(
                f"HTTP {status} with an undecodable body ({detail})", status=status, request_id=request_id
            )
        if isinstance(exc, TimeoutError):
            return NetworkError(f"chat completion: timed out reading the answer from {self.base_url}")
        detail = scrub(f"{type(exc).__name__}: {exc}", *self._secrets)
        return NetworkError(f"chat completion: answer from {self.base_url} cut short ({detail})")

    async def _send_sdk(self, body: dict[str, Any], extra: dict[str, Any] | None) -> tuple[bytes, Mapping[str, str]]:
        raw = await self._call_sdk(
            "chat completion", lambda sdk: sdk.chat.completions.with_raw_response.create(**body, extra_body=extra)
        )
        return raw.http_response.content, raw.http_response.headers

    async def _call_sdk(self, what: str, call: Callable[[Any], Awaitable[T]]) -> T:
        import openai

        try:
            return await call(self._sdk)
        except openai.OpenAIError as exc:
            raise self._translate(exc, what) from exc

    def _translate(self, exc: Exception, what: str) -> TeacherError:
        import openai

        if isinstance(exc, openai.APIStatusError):
            return error_for_status(
                exc.status_code, exc.response.headers, exc.body, secrets=self._secrets, chat=what == "chat completion"
            )
        if isinstance(exc, openai.APITimeoutError):
            return NetworkError(f"{what}: timed out talking to {self.base_url}")
        if isinstance(exc, openai.APIConnectionError):
            chain = _causes(exc.__cause__ or exc.__context__)
            cause = chain[0] if chain else exc
            detail = scrub(f"{type(cause).__name__}: {cause}", *self._secrets)
            if any(isinstance(c, ssl.SSLError) for c in chain):
                return TLSFailure(f"{what}: TLS with {self.base_url} failed ({detail})")
            if any(type(c).__name__ == "ConnectError" for c in chain):  # httpx2's, not imported here
                return ConnectFailed(f"{what}: cannot connect to {self.base_url} ({detail})")
            return NetworkError(f"{what}: connection to {self.base_url} failed ({detail})")
        return BadResponse(scrub(f"{what}: {type(exc).__name__}: {exc}", *self._secrets))

    # ------------------------------------------------------------------------------------------ models, batches

    async def list_models(self) -> list[str]:
        page = await self._call_sdk("list models", lambda sdk: sdk.models.list())
        return [model.id for model in page.data]

    async def upload_batch_file(self, path: str | Path) -> str:
        """Upload a batch input JSONL (purpose "batch"); returns the file id."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read batch file {path}: {exc.strerror}") from exc
        uploaded = await self._call_sdk(
            "upload batch file", lambda sdk: sdk.files.create(file=(path.name, data), purpose="batch")
        )
        return uploaded.id

    async def create_batch(
        self,
        file_id: str,
        *,
        endpoint: str = "/v1/chat/completions",
        completion_window: str = "24h",
        metadata: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Start a batch; returns the batch object as a plain dict (id, status, output_file_id, ...)."""
        options = {"metadata": metadata} if metadata else {}
        batch = await self._call_sdk(
            "create batch",
            lambda sdk: sdk.batches.create(
                input_file_id=file_id, endpoint=endpoint, completion_window=completion_window, **options
            ),
        )
        return batch.model_dump(mode="json")

    async def get_batch(self, batch_id: str) -> dict[str, Any]:
        batch = await self._call_sdk(f"get batch {batch_id}", lambda sdk: sdk.batches.retrieve(batch_id))
        return batch.model_dump(mode="json")

    async def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        batch = await self._call_sdk(f"cancel batch {batch_id}", lambda sdk: sdk.batches.cancel(batch_id))
        return batch.model_dump(mode="json")

    async def download_file(self, file_id: str) -> bytes:
        response = await self._call_sdk(f"download file {file_id}", lambda sdk: sdk.files.content(file_id))
        return response.content
