"""The HTTP side of `imitate serve`: a starlette app speaking OpenAI's chat-completions API over the scheduler.

    POST /v1/chat/completions   messages, max_tokens | max_completion_tokens, temperature, top_p, n, stop, seed,
                                stream (+ stream_options.include_usage), ignore_eos (vLLM's extension)
    GET  /v1/models             the one served model
    GET  /health                200 "ok" while the engine runs (no key needed)
    GET  /stats                 running / waiting / completed / rejected / steps / generated tokens (no key needed)

Prompts are rendered with the model's chat template exactly as training renders them (`ChatFormat.render`: no
system turn unless the request has one; "developer" is a system turn) and tokenised without added specials.
`model` may be omitted; another name than the served one is a 404 `model_not_found`, as OpenAI and vLLM answer
(a harvest pointed at the wrong model fails at once instead of mislabelling its records). A prompt that leaves no
room, or `max_tokens` beyond the context, is a 400 `context_length_exceeded`; without `max_tokens` the answer
may use the rest of the context. With `--api-key-env` every /v1 route needs `Authorization: Bearer <key>` (401).

A client that disconnects frees its rows at the next step: a stream's generator is cancelled by sse-starlette
(which watches for the disconnect), a plain request races its answer against `http.disconnect`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from imitate.errors import TrainError
from imitate.records import Message
from imitate.serve.engine import Delta, Params
from imitate.serve.protocol import ApiError, ChatRequest, Completion, context_error, parse_request
from imitate.serve.scheduler import Scheduler, Ticket


@dataclass
class Service:
    """What the routes need: the scheduler, the tokenizer and chat format, the served name and limits."""

    scheduler: Scheduler
    tokenizer: Any
    fmt: Any  # imitate.train.tokenize.ChatFormat
    name: str
    max_model_len: int
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            what = "Incorrect API key provided" if token else "Missing bearer token in the Authorization header"
            raise ApiError(401, what, code="invalid_api_key")

    def prompt(self, req: ChatRequest) -> list[int]:
        messages = [Message(role="system" if m.role == "developer" else m.role, content=m.text()) for m in req.messages]
        try:
            text = self.fmt.render(messages, generation_prompt=True)
        except TrainError as exc:
            raise ApiError(400, f"cannot render the messages with the chat template: {exc.message}") from exc
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def params(self, req: ChatRequest, prompt_tokens: int) -> tuple[Params, int]:
        if req.model is not None and req.model != self.name:
            raise ApiError(
                404, f"The model `{req.model}` does not exist: this server serves `{self.name}`",
                type="invalid_request_error", param="model", code="model_not_found",
            )  # fmt: skip
        n = req.n or 1
        if n > self.scheduler.max_batch:
            raise ApiError(400, f"n: at most {self.scheduler.max_batch} (the server's --max-batch), got {n}", param="n")
        limit = req.limit
        if prompt_tokens >= self.max_model_len or (limit and prompt_tokens + limit > self.max_model_len):
            raise context_error(prompt_tokens, limit or 1, self.max_model_len)
        params = Params(
            max_tokens=limit or self.max_model_len - prompt_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            stop=tuple(req.stop or ()),
            seed=req.seed,
            ignore_eos=req.ignore_eos,
        )
        return params, n


def build_app(service: Service) -> Starlette:
    scheduler = service.scheduler

    async def chat(request: Request) -> Response:
        service.authorize(request)
        try:
            body = await request.json()
        except ValueError as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        req = parse_request(body)
        prompt = service.prompt(req)
        params, n = service.params(req, len(prompt))
        ticket = scheduler.submit(Ticket(prompt, params, n))
        completion = Completion(service.name)
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventSourceResponse(_stream(scheduler, ticket, completion, usage), sep="\n", ping=15)
        return await _answer(request, scheduler, ticket, completion)

    async def models(request: Request) -> Response:
        service.authorize(request)
        card = {"id": service.name, "object": "model", "created": service.created, "owned_by": "imitate"}
        return JSONResponse({"object": "list", "data": [card]})

    async def health(request: Request) -> Response:
        if scheduler.failed is not None:
            return PlainTextResponse(f"engine stopped: {scheduler.failed}", status_code=503)
        return PlainTextResponse("ok")

    async def stats(request: Request) -> Response:
        return JSONResponse(scheduler.snapshot())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(scheduler.run(), name="imitate-serve-engine")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    routes = [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/stats", stats, methods=["GET"]),
    ]
    handlers = {ApiError: _api_error, HTTPException: _http_error}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)  # type: ignore[arg-type]


async def _api_error(request: Request, exc: ApiError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=str(exc.status_code))
    return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)


async def _answer(request: Request, scheduler: Scheduler, ticket: Ticket, completion: Completion) -> Response:
    """Wait for every choice, unless the client leaves first (then its rows are freed)."""
    n = len(ticket.sequences)
    texts, finishes, tokens = [""] * n, [""] * n, [0] * n

    async def collect() -> ApiError | None:
        pending = n
        while pending:
            event = await ticket.events.get()
            if isinstance(event, ApiError):
                return event
            texts[event.index] += event.text
            tokens[event.index] = event.tokens
            if event.finish is not None:
                finishes[event.index] = event.finish
                pending -= 1
        return None

    work = asyncio.ensure_future(collect())
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            scheduler.cancel(ticket)
    if not work.done() or work.cancelled():
        return Response(status_code=499)  # nobody is listening
    error = work.result()
    if error is not None:
        raise error
    body = completion.response(list(zip(texts, finishes, strict=True)), ticket.prompt_tokens, sum(tokens))
    return JSONResponse(body)


async def _client_gone(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream(
    scheduler: Scheduler, ticket: Ticket, completion: Completion, include_usage: bool
) -> AsyncIterator[ServerSentEvent]:
    """SSE chunks in OpenAI's shape, then `[DONE]`. Cancelled (client gone) -> the request is cancelled."""
    n = len(ticket.sequences)
    tokens = [0] * n
    try:
        for i in range(n):
            yield _event(completion.chunk(i, {"role": "assistant", "content": ""}))
        pending = n
        while pending:
            event: Delta | ApiError = await ticket.events.get()
            if isinstance(event, ApiError):
                yield _event(event.body())
                return
            tokens[event.index] = event.tokens
            if event.text:
                yield _event(completion.chunk(event.index, {"content": event.text}))
            if event.finish is not None:
                pending -= 1
                yield _event(completion.chunk(event.index, {}, event.finish))
        if include_usage:
            yield _event(completion.usage_chunk(ticket.prompt_tokens, sum(tokens)))
        yield ServerSentEvent(data="[DONE]")
    finally:
        scheduler.cancel(ticket)


def _event(obj: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(obj, ensure_ascii=False, separators=(",", ":")))
