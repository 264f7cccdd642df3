"""The teacher client: the only module that imports `openai`. Every SDK failure is translated here, once.

`TeacherClient.chat` sends one chat completion through the SDK's raw-response API (so the rate-limit headers
are readable), with the SDK's own retries off: the harvester's retry policy decides. It returns a `Reply` even
when `finish_reason` is "length" or "content_filter"; `check_finish` turns those into errors for callers that
want that. The Batch API methods return plain dicts / bytes so no openai type leaks past this module.

Error mapping (`error_for_status` for HTTP statuses, `_translate` for SDK exceptions):

    429 insufficient_quota / billing      QuotaExhausted        401, 403                 AuthError
    429 otherwise                         RateLimited           400 context length       ContextTooLong
    400 content_filter / policy           ContentFiltered       other 4xx                BadRequest
    408, connection error, timeout        NetworkError          5xx                      ServerError
    200 with bad JSON / no choices        BadResponse

Messages never contain the API key: anything echoed by the server passes through `_scrub`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx2
import openai

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

NO_KEY = "not-needed"  # local servers (vLLM, llama.cpp, the fake) need no key but the SDK insists on one
_QUOTA_HINTS = ("insufficient_quota", "billing", "exceeded your current quota", "credit balance")
_CONTEXT_HINTS = ("context_length_exceeded", "maximum context length", "context size", "context window")
_FILTER_CODES = {"content_filter", "content_policy_violation"}
_KEY_LIKE = re.compile(r"\b(sk-[A-Za-z0-9_\-]{6})[A-Za-z0-9_\-]+")


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
    ):
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._owns_http = http_client is None
        self._http = http_client or httpx2.AsyncClient(
            timeout=httpx2.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx2.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )
        self._sdk = openai.AsyncOpenAI(
            api_key=api_key or NO_KEY, base_url=self.base_url, timeout=timeout, max_retries=0, http_client=self._http
        )

    async def __aenter__(self) -> TeacherClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:  # an injected client belongs to whoever made it
            await self._http.aclose()

    # ------------------------------------------------------------------------------------------ chat

    async def chat(
        self, messages: list[Message], *, model: str, params: GenerationParams, extra: dict[str, Any] | None = None
    ) -> Reply:
        body = {"model": model, "messages": [m.model_dump() for m in messages], **params.api_kwargs()}
        start = time.perf_counter()
        content, headers = await self._send(body, extra)
        return reply_from_body(content, headers, time.perf_counter() - start)

    async def _send(self, body: dict[str, Any], extra: dict[str, Any] | None) -> tuple[bytes, Mapping[str, str]]:
        """POST one completion; (raw body, headers) of the 200 or a TeacherError. A lean raw-httpx2 path
        would replace only this method, reusing `error_for_status` and `reply_from_body`."""
        try:
            raw = await self._sdk.chat.completions.with_raw_response.create(**body, extra_body=extra)
        except openai.OpenAIError as exc:
            raise self._translate(exc, "chat completion") from exc
        return raw.http_response.content, raw.http_response.headers

    def _translate(self, exc: openai.OpenAIError, what: str) -> TeacherError:
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
        try:
            page = await self._sdk.models.list()
        except openai.OpenAIError as exc:
            raise self._translate(exc, "list models") from exc
        return [model.id for model in page.data]

    async def upload_batch_file(self, path: str | Path) -> str:
        """Upload a batch input JSONL (purpose "batch"); returns the file id."""
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
        try:
            batch = await self._sdk.batches.retrieve(batch_id)
        except openai.OpenAIError as exc:
            raise self._translate(exc, f"get batch {batch_id}") from exc
        return batch.model_dump(mode="json")

    async def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        try:
            batch = await self._sdk.batches.cancel(batch_id)
        except openai.OpenAIError as exc:
            raise self._translate(exc, f"cancel batch {batch_id}") from exc
        return batch.model_dump(mode="json")

    async def download_file(self, file_id: str) -> bytes:
        try:
            response = await self._sdk.files.content(file_id)
        except openai.OpenAIError as exc:
            raise self._translate(exc, f"download file {file_id}") from exc
        return response.content
