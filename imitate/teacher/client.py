"""The teacher client: the only module that imports `openai`. Every SDK failure is translated here, once.

`TeacherClient.chat` sends one chat completion and returns a `Reply` even when `finish_reason` is "length" or
"content_filter"; `check_finish` turns those into errors for callers that want that. Three paths behind one seam
(`_send`, which returns the raw 200 body and its headers):

- `transport="wire"` (default): one pre-encoded POST over `imitate.teacher.wire`, a minimal HTTP/1.1 client on
  asyncio protocols. The harvester needs nothing from the SDK on this path but a JSON POST, and both the SDK
  (its per-request parameter transform) and httpx2 (three quarters of the harvester's CPU per row) were the
  bottleneck of a fast harvest (bench/RESULTS.md, "Harvest overhead"). With an injected `http_client`, or when
  proxy environment variables are set, the POST goes through `http_client.send` (httpx2) instead.
- `transport="httpx"`: the same POST through httpx2 transports, in several small pools used in turn (`_Pools`).
- `transport="sdk"`: the openai SDK's raw-response API (so the rate-limit headers are readable).

All three have no retries of their own (the harvester's retry policy decides), send the key as
`Authorization: Bearer`, and map failures onto the same errors. The Batch API and model listing always use the
SDK; they return plain dicts / bytes so no openai type leaks past this module. `openai` is imported on first use
of the SDK (in the methods below): importing it takes ~1.5 s, which the lean paths never need to pay.

Error mapping (`error_for_status` for HTTP statuses, `_translate` / `_send_lean` for exceptions):

    429 insufficient_quota / billing      QuotaExhausted        401, 403                 AuthError
    429 otherwise                         RateLimited           400 context length       ContextTooLong
    400 content_filter / policy           ContentFiltered       other 4xx                BadRequest
    408, connection error, timeout        NetworkError          5xx                      ServerError
    200 with bad JSON / no choices        BadResponse

Messages never contain the API key: anything echoed by the server passes through `_scrub`.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx2

from imitate import __version__
from imitate.errors import (
    AuthError,
    BadRequest,
    BadResponse,
    ContentFiltered,
    ContextTooLong,
    InputError,
    NetworkError,
    QuotaExhausted,
    RateLimited,
    ServerError,
    TeacherError,
    Truncated,
)
from imitate.records import GenerationParams, Message, Usage
from imitate.teacher.reply import Reply, parse_rate_headers
from imitate.teacher.wire import WireClient, WireError

NO_KEY = "not-needed"  # local servers (vLLM, llama.cpp, the fake) need no key but the SDK insists on one
_QUOTA_HINTS = ("insufficient_quota", "billing", "exceeded your current quota", "credit balance")
_CONTEXT_HINTS = ("context_length_exceeded", "maximum context length", "context size", "context window")
_FILTER_CODES = {"content_filter", "content_policy_violation"}
_KEY_LIKE = re.compile(r"\b(sk-[A-Za-z0-9_\-]{6})[A-Za-z0-9_\-]+")
POOL_CONNECTIONS = 32  # connections per httpx2 transport on the httpx path (see `_Pools`)
TRANSPORTS = ("wire", "httpx", "sdk")


def _scrub(text: str, api_key: str | None) -> str:
    if api_key and api_key != NO_KEY:
        text = text.replace(api_key, "***")
    return _KEY_LIKE.sub(r"\1***", text)


def _error_fields(body: object) -> tuple[str, str, str]:
    """(message, type, code) from an OpenAI-shaped error body, its inner `error` object, or plain text."""
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping):
            body = inner
        elif isinstance(inner, str):  # vLLM / llama.cpp variants: {"error": "text"}
            return inner, "", ""
        return tuple(str(body.get(k) or "") for k in ("message", "type", "code"))  # type: ignore[return-value]
    return (str(body) if body is not None else ""), "", ""


def error_for_status(
    status: int, headers: Mapping[str, str], body: object, *, api_key: str | None = None
) -> TeacherError:
    """The TeacherError for an HTTP error response (pure: usable by the SDK path and any raw path)."""
    message, type_, code = _error_fields(body)
    rate = parse_rate_headers(headers)
    lowered = f"{type_} {code} {message}".lower()
    text = _scrub(f"HTTP {status}{f' {code or type_}' if code or type_ else ''}: {message or 'no message'}", api_key)
    kwargs = {
        "status": status,
        "retry_after": rate.retry_after_s,
        "request_id": headers.get("x-request-id"),
        "rate": rate,
    }
    if status == 429 and any(hint in lowered for hint in _QUOTA_HINTS):
        return QuotaExhausted(text, hint="add credit or raise the quota, then rerun to resume", **kwargs)
    if status == 429:
        return RateLimited(text, **kwargs)
    if status in (401, 403):
        return AuthError(text, hint="check the API key environment variable and its permissions", **kwargs)
    if status == 408:
        return NetworkError(text, **kwargs)
    if status == 400 and any(hint in lowered for hint in _CONTEXT_HINTS):
        return ContextTooLong(text, **kwargs)
    if status == 400 and (code in _FILTER_CODES or type_ in _FILTER_CODES):
        return ContentFiltered(text, **kwargs)
    if status >= 500:
        return ServerError(text, **kwargs)
    return BadRequest(text, **kwargs)


def reply_from_body(content: bytes, headers: Mapping[str, str], latency_s: float) -> Reply:
    """Parse a 200 chat-completion body into a Reply; anything unusable is BadResponse."""
    request_id = headers.get("x-request-id")
    try:
        data = json.loads(content)
        choice = data["choices"][0]
        message = choice["message"]
        text = message.get("content")
        usage = Usage(**{k: int(v or 0) for k, v in (data.get("usage") or {}).items() if k in Usage.model_fields})
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        what = "no choices" if isinstance(exc, IndexError) else f"malformed completion ({type(exc).__name__})"
        raise BadResponse(f"HTTP 200 but {what}", status=200, request_id=request_id) from exc
    finish = choice.get("finish_reason")
    if text is None and finish != "content_filter":
        raise BadResponse("HTTP 200 but the message has no content", status=200, request_id=request_id)
    return Reply(
        text=text or "",
        usage=usage,
        finish_reason=finish,
        latency_s=latency_s,
        rate=parse_rate_headers(headers),
        request_id=request_id,
        model=data.get("model"),
    )


def check_finish(reply: Reply) -> None:
    """Raise Truncated / ContentFiltered for a reply that ended on length or the content filter."""
    if reply.finish_reason == "length":
        raise Truncated(f"answer cut at {reply.usage.completion_tokens} tokens", request_id=reply.request_id)
    if reply.finish_reason == "content_filter":
        raise ContentFiltered("answer stopped by the content filter", request_id=reply.request_id)


class _Pools:
    """The lean path's connections: several small httpx2 transports, used in turn. httpcore2's pool does work
    in proportion to its connections on every request (it scans them all, probing idle sockets), so one pool
    with hundreds of requests in flight costs twice the CPU per request of a pool of 32 (bench/RESULTS.md);
    small pools keep the cost flat however many requests are in flight."""

    def __init__(self, max_connections: int):
        n = max(1, math.ceil(max_connections / POOL_CONNECTIONS))
        per = math.ceil(max_connections / n)
        limits = httpx2.Limits(max_connections=per, max_keepalive_connections=per)
        ssl_context = httpx2.create_ssl_context()  # one, shared: loading the CA bundle per pool is slow
        self.transports = [httpx2.AsyncHTTPTransport(verify=ssl_context, limits=limits) for _ in range(n)]
        self._turn = itertools.cycle(self.transports)

    async def send(self, request: httpx2.Request) -> tuple[int, httpx2.Headers, bytes]:
        response = await next(self._turn).handle_async_request(request)
        try:
            content = await response.aread()
        finally:
            await response.aclose()
        return response.status_code, response.headers, content

    async def aclose(self) -> None:
        for transport in self.transports:
            await transport.aclose()


def _proxied(url: str) -> bool:
    """Whether the proxy environment (HTTP(S)_PROXY / ALL_PROXY, minus NO_PROXY) sends `url` through a proxy."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    if not (proxies.get(parts.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(parts.hostname or "")


def _error_body(content: bytes) -> object:
    """An error response's body as the SDK would hand it over: parsed JSON, else the text."""
    try:
        return json.loads(content)
    except ValueError:
        return content.decode("utf-8", "replace")


class TeacherClient:
    """One OpenAI-compatible endpoint. `async with TeacherClient(base_url, api_key=...) as client: ...`"""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_connections: int = 1000,
        http_client: httpx2.AsyncClient | None = None,
        transport: Literal["wire", "httpx", "sdk"] = "wire",
    ):
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}")
        self.base_url = base_url.rstrip("/")
        self.transport = transport
        self._api_key = api_key
        self._owns_http = http_client is None
        self._timeout = httpx2.Timeout(timeout, connect=min(timeout, 10.0))
        self._http = http_client or httpx2.AsyncClient(
            timeout=self._timeout,
            limits=httpx2.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )
        self._sdk_client: Any = None  # openai.AsyncOpenAI, made on first use (`_sdk`)
        self._timeout_s = timeout
        # the lean path's constant parts, built once: URL, headers (the key as a bearer token), timeouts
        self._chat_url = httpx2.URL(self.base_url + "/chat/completions")
        headers = [
            ("Authorization", f"Bearer {api_key or NO_KEY}"),
            ("Content-Type", "application/json"),
            ("Accept", "application/json"),
            ("User-Agent", f"imitate/{__version__}"),
        ]
        self._headers = [(name.encode(), value.encode()) for name, value in headers]
        self._extensions = {"timeout": self._timeout.as_dict()}
        # an owned client without proxies sends through our own connections (wire, or small httpx2 pools);
        # otherwise through `http_client.send`, which applies whatever the caller (or the environment) configured
        own = self._owns_http and not _proxied(self.base_url)
        self._wire: WireClient | None = None
        self._pools: _Pools | None = None
        if own and transport == "wire":
            self._wire = WireClient(
                self.base_url,
                [*headers, ("Accept-Encoding", "gzip, deflate")],  # what the wire decodes (httpx2 sends the same)
                max_connections=max_connections,
                connect_timeout=min(timeout, 10.0),
                ssl_context=httpx2.create_ssl_context(),  # the CA bundle httpx2 and the SDK would use
            )
        elif own and transport == "httpx":
            self._pools = _Pools(max_connections)

    @property
    def _sdk(self) -> Any:
        if self._sdk_client is None:
            import openai

            self._sdk_client = openai.AsyncOpenAI(
                api_key=self._api_key or NO_KEY,
                base_url=self.base_url,
                timeout=self._timeout_s,
                max_retries=0,
                http_client=self._http,
            )
        return self._sdk_client

    async def __aenter__(self) -> TeacherClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._wire is not None:
            await self._wire.aclose()
        if self._pools is not None:
            await self._pools.aclose()
        if self._owns_http:  # an injected client belongs to whoever made it
            await self._http.aclose()

    # ------------------------------------------------------------------------------------------ chat

    async def chat(
        self, messages: list[Message], *, model: str, params: GenerationParams, extra: dict[str, Any] | None = None
    ) -> Reply:
        body = {"model": model, "messages": [{"role": m.role, "content": m.content} for m in messages]}
        body.update(params.api_kwargs())
        start = time.perf_counter()
        content, headers = await self._send(body, extra)
        return reply_from_body(content, headers, time.perf_counter() - start)

    async def _send(self, body: dict[str, Any], extra: dict[str, Any] | None) -> tuple[bytes, Mapping[str, str]]:
        """POST one completion; (raw body, headers) of the 200 or a TeacherError."""
        if self.transport == "sdk":
            return await self._send_sdk(body, extra)
        return await self._send_lean(body, extra)

    async def _send_sdk(self, body: dict[str, Any], extra: dict[str, Any] | None) -> tuple[bytes, Mapping[str, str]]:
        import openai

        try:
            raw = await self._sdk.chat.completions.with_raw_response.create(**body, extra_body=extra)
        except openai.OpenAIError as exc:
            raise self._translate(exc, "chat completion") from exc
        return raw.http_response.content, raw.http_response.headers

    async def _send_lean(self, body: dict[str, Any], extra: dict[str, Any] | None) -> tuple[bytes, Mapping[str, str]]:
        """The same POST without the SDK: the errors are those the SDK path maps to (timeouts and connection
        failures -> NetworkError, statuses through `error_for_status`)."""
        payload = json.dumps({**body, **extra} if extra else body, ensure_ascii=False, separators=(",", ":")).encode()
        post = self._post_wire if self._wire is not None else self._post_httpx
        status, headers, content = await post(payload)
        if not 200 <= status < 300:
            raise error_for_status(status, headers, _error_body(content), api_key=self._api_key)
        return content, headers

    async def _post_wire(self, payload: bytes) -> tuple[int, Mapping[str, str], bytes]:
        assert self._wire is not None
        try:
            return await self._wire.post("chat/completions", payload, timeout=self._timeout_s)
        except WireError as exc:
            if exc.response is not None:  # answered in full, but the body cannot be decoded: not a network error
                status, headers, _ = exc.response
                if 200 <= status < 300:
                    raise BadResponse(f"HTTP {status} but {exc}", status=status) from exc
                raise error_for_status(status, headers, str(exc), api_key=self._api_key) from exc
            if exc.timeout:
                raise NetworkError(f"chat completion: timed out talking to {self.base_url} ({exc})") from exc
            detail = _scrub(str(exc), self._api_key)
            raise NetworkError(f"chat completion: connection to {self.base_url} failed ({detail})") from exc

    async def _post_httpx(self, payload: bytes) -> tuple[int, Mapping[str, str], bytes]:
        request = httpx2.Request(
            "POST", self._chat_url, headers=self._headers, content=payload, extensions=self._extensions
        )
        try:
            if self._pools is not None:
                return await self._pools.send(request)
            response = await self._http.send(request)
            return response.status_code, response.headers, response.content
        except httpx2.TimeoutException as exc:
            raise NetworkError(f"chat completion: timed out talking to {self.base_url}") from exc
        except (httpx2.HTTPError, httpx2.InvalidURL, httpx2.StreamError) as exc:
            detail = _scrub(f"{type(exc).__name__}: {exc}", self._api_key)
            raise NetworkError(f"chat completion: connection to {self.base_url} failed ({detail})") from exc

    def _translate(self, exc: Exception, what: str) -> TeacherError:
        import openai

        if isinstance(exc, openai.APIStatusError):
            return error_for_status(exc.status_code, exc.response.headers, exc.body, api_key=self._api_key)
        if isinstance(exc, openai.APITimeoutError):
            return NetworkError(f"{what}: timed out talking to {self.base_url}")
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__ or exc.__context__
            detail = _scrub(f"{type(cause).__name__}: {cause}" if cause else str(exc), self._api_key)
            return NetworkError(f"{what}: connection to {self.base_url} failed ({detail})")
        return BadResponse(_scrub(f"{what}: {type(exc).__name__}: {exc}", self._api_key))

    # ------------------------------------------------------------------------------------------ models, batches

    async def list_models(self) -> list[str]:
        import openai

        try:
            page = await self._sdk.models.list()
        except openai.OpenAIError as exc:
            raise self._translate(exc, "list models") from exc
        return [model.id for model in page.data]

    async def upload_batch_file(self, path: str | Path) -> str:
        """Upload a batch input JSONL (purpose "batch"); returns the file id."""
        import openai

        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read batch file {path}: {exc.strerror}") from exc
        try:
            uploaded = await self._sdk.files.create(file=(path.name, data), purpose="batch")
        except openai.OpenAIError as exc:
            raise self._translate(exc, "upload batch file") from exc
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
        import openai

        try:
            batch = await self._sdk.batches.create(
                input_file_id=file_id,
                endpoint=endpoint,  # type: ignore[arg-type]
                completion_window=completion_window,  # type: ignore[arg-type]
                **({"metadata": metadata} if metadata else {}),
            )
        except openai.OpenAIError as exc:
            raise self._translate(exc, "create batch") from exc
        return batch.model_dump(mode="json")

    async def get_batch(self, batch_id: str) -> dict[str, Any]:
        import openai

        try:
            batch = await self._sdk.batches.retrieve(batch_id)
        except openai.OpenAIError as exc:
            raise self._translate(exc, f"get batch {batch_id}") from exc
        return batch.model_dump(mode="json")

    async def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        import openai

        try:
            batch = await self._sdk.batches.cancel(batch_id)
        except openai.OpenAIError as exc:
            raise self._translate(exc, f"cancel batch {batch_id}") from exc
        return batch.model_dump(mode="json")

    async def download_file(self, file_id: str) -> bytes:
        import openai

        try:
            response = await self._sdk.files.content(file_id)
        except openai.OpenAIError as exc:
            raise self._translate(exc, f"download file {file_id}") from exc
        return response.content
