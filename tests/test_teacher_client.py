"""TeacherClient against the real loopback fake: every fault class maps onto the error tree once, headers become
Reply.rate, the Batch API works end to end, and the API key never shows up in an error."""

import asyncio
import json
import socket
from pathlib import Path

import httpx2
import openai
import pytest

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
from imitate.records import GenerationParams, Message
from imitate.teacher.client import TeacherClient, check_finish, error_for_status, reply_from_body
from imitate.teacher.reply import Reply, format_duration, parse_duration, parse_rate_headers
from imitate.teacher.wire import WireError

KEY = "sk-imitate-test-DO-NOT-LEAK-7f3a9c0e"
PARAMS = GenerationParams(max_tokens=256)
TRANSPORTS = ["wire", "httpx", "sdk"]  # the lean default path, httpx2 and the SDK path must behave the same


@pytest.fixture(params=TRANSPORTS)
def transport(request) -> str:
    return request.param


async def ask(
    base_url: str, question: str, *, timeout: float = 5.0, key: str = KEY, transport: str = "wire", **params
) -> Reply:
    async with TeacherClient(base_url, api_key=key, timeout=timeout, transport=transport) as client:
        messages = [Message(role="system", content="Explain step by step."), Message(role="user", content=question)]
        return await client.chat(messages, model="fake-teacher", params=PARAMS.model_copy(update=params))


def ask_error(base_url: str, question: str, **kw) -> TeacherError:
    with pytest.raises(TeacherError) as info:
        asyncio.run(ask(base_url, question, **kw))
    return info.value


def assert_no_key(exc: BaseException, key: str = KEY) -> None:
    for text in (str(exc), repr(exc), exc.one_line() if isinstance(exc, TeacherError) else ""):
        assert key not in text


def test_chat_returns_a_reply_with_usage_and_request_id(fake_teacher, transport):
    reply = asyncio.run(ask(fake_teacher.base_url, "Why is the sky blue?", transport=transport))
    assert "Why is the sky blue" in reply.text and "Step 1:" in reply.text
    assert reply.finish_reason == "stop" and reply.model == "fake-teacher"
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.request_id and reply.request_id.startswith("req_")
    assert reply.latency_s > 0
    assert not reply.rate.has_limits  # the default fake sets no limits, so it sends no rate headers
    check_finish(reply)
    assert fake_teacher.stats()["completed"] == 1


@pytest.mark.parametrize(
    ("fault", "error", "status"),
    [
        ("500", ServerError, 500),
        ("502", ServerError, 502),
        ("503", ServerError, 503),
        ("429", RateLimited, 429),
        ("quota", QuotaExhausted, 429),
        ("auth", AuthError, 401),
        ("403", AuthError, 403),
        ("context", ContextTooLong, 400),
        ("policy", ContentFiltered, 400),
        ("404", BadRequest, 404),
        ("422", BadRequest, 422),
        ("malformed", BadResponse, 200),
        ("empty", BadResponse, 200),
        ("nomessage", BadResponse, 200),
        ("reset", NetworkError, None),
    ],
)
def test_each_fault_maps_onto_one_error_class(fake_teacher, transport, fault, error, status):
    exc = ask_error(fake_teacher.base_url, f"Explain tides. [[fault:{fault}]]", transport=transport)
    assert type(exc) is error
    assert exc.status == status
    if transport == "sdk":
        assert isinstance(exc.__cause__, openai.OpenAIError | ValueError | LookupError)  # translated once, chained
    elif status is None or status == 200:  # the lean paths: exceptions are chained, a status needs no cause
        assert isinstance(exc.__cause__, httpx2.TransportError | WireError | ValueError | LookupError)
    if status is not None:
        assert exc.request_id and exc.request_id.startswith("req_")
    assert_no_key(exc)


def test_scripted_429_carries_retry_after(fake_teacher, transport):
    exc = ask_error(fake_teacher.base_url, "Explain snow. [[fault:429]]", transport=transport)
    assert isinstance(exc, RateLimited) and exc.retryable
    assert exc.retry_after == pytest.approx(0.05)  # retry-after-ms wins over the rounded retry-after


def test_fault_x2_fails_twice_then_succeeds(fake_teacher, transport):
    async def three_attempts() -> list:
        async with TeacherClient(fake_teacher.base_url, timeout=5, transport=transport) as client:
            messages = [Message(role="user", content="Explain rain. [[fault:500x2]]")]
            out = []
            for _ in range(3):
                try:
                    out.append(await client.chat(messages, model="fake-teacher", params=PARAMS))
                except ServerError as exc:
                    out.append(exc)
            return out

    first, second, third = asyncio.run(three_attempts())
    assert isinstance(first, ServerError) and isinstance(second, ServerError)
    assert isinstance(third, Reply) and "Explain rain" in third.text


def test_length_and_filter_return_replies_that_check_finish_rejects(fake_teacher, transport):
    truncated = asyncio.run(ask(fake_teacher.base_url, "Explain dew. [[fault:length]]", transport=transport))
    assert truncated.finish_reason == "length" and truncated.text
    with pytest.raises(Truncated):
        check_finish(truncated)
    filtered = asyncio.run(ask(fake_teacher.base_url, "Explain storms. [[fault:filter]]", transport=transport))
    assert filtered.finish_reason == "content_filter" and filtered.text == ""
    with pytest.raises(ContentFiltered):
        check_finish(filtered)


def test_max_tokens_truncates_with_finish_reason_length(fake_teacher, transport):
    reply = asyncio.run(ask(fake_teacher.base_url, "Explain gravity.", max_tokens=10, transport=transport))
    assert reply.finish_reason == "length" and reply.usage.completion_tokens == 10


def test_hang_becomes_network_error_at_the_client_timeout(fake_teacher, transport):
    exc = ask_error(fake_teacher.base_url, "Explain fog. [[fault:hang]]", timeout=0.3, transport=transport)
    assert isinstance(exc, NetworkError) and exc.retryable and "timed out" in exc.message


def test_slow_body_still_arrives_within_the_timeout(fake_teacher, transport):
    reply = asyncio.run(ask(fake_teacher.base_url, "Explain hail. [[fault:slow]]", timeout=2, transport=transport))
    assert reply.finish_reason == "stop" and reply.latency_s >= 0.4


def test_refused_connection_is_network_error(transport):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exc = ask_error(f"http://127.0.0.1:{port}/v1", "anyone there?", timeout=2, transport=transport)
    assert isinstance(exc, NetworkError) and exc.status is None
    assert_no_key(exc)


def test_proxy_environment_is_honoured(fake_teacher, transport, monkeypatch):
    """With HTTP_PROXY set, both paths go through the proxy (here a dead one), as httpx2 and the SDK would."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    exc = ask_error(fake_teacher.base_url, "Explain fog.", timeout=2, transport=transport)
    assert isinstance(exc, NetworkError)
    assert fake_teacher.stats()["requests"] == 0


def test_wrong_key_is_auth_error_and_the_echoed_key_is_scrubbed(make_fake_teacher, transport):
    fake = make_fake_teacher(api_key="the-right-key")
    for key in (KEY, "plain-secret-without-prefix-123"):
        exc = ask_error(fake.base_url, "Explain wind.", key=key, transport=transport)
        assert isinstance(exc, AuthError) and exc.status == 401 and exc.hint
        assert_no_key(exc, key)
    # the right key, sent as `Authorization: Bearer`, is accepted
    assert asyncio.run(ask(fake.base_url, "Explain wind.", key="the-right-key", transport=transport)).text


def test_rate_headers_become_reply_rate(make_fake_teacher, transport):
    fake = make_fake_teacher(rpm=600, tpm=100_000)
    reply = asyncio.run(ask(fake.base_url, "Explain clouds.", max_tokens=200, transport=transport))
    rate = reply.rate
    assert (rate.limit_requests, rate.remaining_requests) == (600, 599)
    assert rate.limit_tokens == 100_000
    assert rate.remaining_tokens == 100_000 - (reply.usage.prompt_tokens + 200)  # charged up front
    assert rate.reset_requests_s == pytest.approx(0.1, abs=0.02)  # one request refills in 60/600 s
    assert rate.reset_tokens_s is not None and rate.reset_tokens_s > 0
    assert rate.retry_after_s is None


def test_bucket_overflow_is_rate_limited_with_retry_after_about_a_second(make_fake_teacher, transport):
    fake = make_fake_teacher(rpm=60)

    async def burst() -> list:
        async with TeacherClient(fake.base_url, timeout=5, transport=transport) as client:
            messages = [Message(role="user", content="Explain ice.")]
            calls = [client.chat(messages, model="fake-teacher", params=PARAMS) for _ in range(61)]
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(burst())
    limited = [r for r in results if isinstance(r, RateLimited)]
    assert len(limited) == 1 and sum(isinstance(r, Reply) for r in results) == 60
    assert 0.5 < limited[0].retry_after <= 1.0 and limited[0].status == 429


def test_headers_off_means_no_rate_state_and_no_retry_after(make_fake_teacher, transport):
    fake = make_fake_teacher(rpm=1, headers=False)
    reply = asyncio.run(ask(fake.base_url, "Explain frost.", transport=transport))
    assert reply.rate == parse_rate_headers({})
    exc = ask_error(fake.base_url, "Explain frost.", transport=transport)
    assert isinstance(exc, RateLimited) and exc.retry_after is None


def test_list_models(fake_teacher):
    async def models() -> list[str]:
        async with TeacherClient(fake_teacher.base_url) as client:
            return await client.list_models()

    assert asyncio.run(models()) == ["fake-teacher"]


def test_injected_http_client_is_used_and_left_open(fake_teacher, transport):
    seen = []

    async def hook(request: httpx2.Request) -> None:
        seen.append(request)

    async def run() -> bool:
        async with httpx2.AsyncClient(event_hooks={"request": [hook]}) as http:
            client = TeacherClient(fake_teacher.base_url, http_client=http, transport=transport)
            await client.chat([Message(role="user", content="hi")], model="m", params=PARAMS)
            await client.aclose()
            return http.is_closed

    assert asyncio.run(run()) is False
    assert [r.url.path for r in seen] == ["/v1/chat/completions"]


def test_unknown_transport_is_rejected():
    with pytest.raises(ValueError, match="transport"):
        TeacherClient("http://127.0.0.1:9/v1", transport="carrier-pigeon")


def test_both_paths_send_the_same_body_and_the_key_as_bearer(make_fake_teacher):
    """What the lean path puts on the wire is what the SDK path does (extra body fields included)."""
    seen: dict[str, list[httpx2.Request]] = {t: [] for t in TRANSPORTS}

    async def run(transport: str) -> None:
        async def hook(request: httpx2.Request) -> None:
            seen[transport].append(request)

        async with httpx2.AsyncClient(event_hooks={"request": [hook]}) as http:
            client = TeacherClient(fake.base_url, api_key=KEY, http_client=http, transport=transport)
            params = GenerationParams(max_tokens=64, temperature=0.2, seed=7, stop=["\n\n"])
            messages = [Message(role="system", content="Be brief."), Message(role="user", content="Explain é.")]
            await client.chat(messages, model="fake-teacher", params=params, extra={"user": "u1"})

    fake = make_fake_teacher()
    for transport in TRANSPORTS:
        asyncio.run(run(transport))
    assert [r.url.path for r in seen["wire"]] == ["/v1/chat/completions"]  # injected client: wire defers to it
    lean, sdk = seen["httpx"][0], seen["sdk"][0]
    assert json.loads(seen["wire"][0].content) == json.loads(sdk.content)
    assert json.loads(lean.content) == json.loads(sdk.content)
    assert lean.headers["authorization"] == sdk.headers["authorization"] == f"Bearer {KEY}"
    assert lean.headers["content-type"] == "application/json"
    assert lean.url == sdk.url


# ---------------------------------------------------------------------------------------------- Batch API


def write_batch(path: Path, questions: list[str]) -> Path:
    lines = []
    for i, question in enumerate(questions):
        body = {"model": "fake-teacher", "messages": [{"role": "user", "content": question}], "max_tokens": 100}
        lines.append(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}))
    path.write_text("\n".join(lines + ["this line is not JSON"]) + "\n")
    return path


def test_batch_round_trip(fake_teacher, tmp_path: Path):
    src = write_batch(tmp_path / "in.jsonl", ["Explain tides.", "Explain waves. [[fault:500]]", "Explain salt."])

    async def run() -> tuple[dict, list[dict], list[dict], list[TeacherError]]:
        async with TeacherClient(fake_teacher.base_url, api_key=KEY) as client:
            file_id = await client.upload_batch_file(src)
            batch = await client.create_batch(file_id, metadata={"run": "test"})
            assert batch["status"] == "validating" and batch["metadata"] == {"run": "test"}
            for _ in range(200):
                batch = await client.get_batch(batch["id"])
                if batch["status"] == "completed":
                    break
                await asyncio.sleep(0.01)
            out = [json.loads(x) for x in (await client.download_file(batch["output_file_id"])).splitlines()]
            err = [json.loads(x) for x in (await client.download_file(batch["error_file_id"])).splitlines()]
            errors = []
            for call in (client.cancel_batch(batch["id"]), client.get_batch("batch_nope")):
                try:
                    await call
                except TeacherError as exc:
                    errors.append(exc)
            return batch, out, err, errors

    batch, out, err, errors = asyncio.run(run())
    assert batch["request_counts"] == {"total": 4, "completed": 2, "failed": 2}
    assert [o["custom_id"] for o in out] == ["c0", "c2"]
    assert out[0]["response"]["status_code"] == 200
    assert "Explain tides" in out[0]["response"]["body"]["choices"][0]["message"]["content"]
    assert err[0]["custom_id"] == "c1" and err[0]["response"]["status_code"] == 500
    assert err[1]["response"] is None and err[1]["error"]["code"] == "invalid_request"
    assert [(type(e), e.status) for e in errors] == [(BadRequest, 409), (BadRequest, 404)]


def test_batch_cancel(make_fake_teacher, tmp_path: Path):
    fake = make_fake_teacher(batch_delay_s=0.2)
    src = write_batch(tmp_path / "in.jsonl", ["Explain tides."])

    async def run() -> tuple[str, str]:
        async with TeacherClient(fake.base_url) as client:
            batch = await client.create_batch(await client.upload_batch_file(src))
            cancelling = (await client.cancel_batch(batch["id"]))["status"]
            await asyncio.sleep(0.3)
            return cancelling, (await client.get_batch(batch["id"]))["status"]

    assert asyncio.run(run()) == ("cancelling", "cancelled")


def test_upload_of_a_missing_file_is_input_error(fake_teacher, tmp_path: Path):
    async def run() -> None:
        async with TeacherClient(fake_teacher.base_url) as client:
            await client.upload_batch_file(tmp_path / "missing.jsonl")

    with pytest.raises(InputError):
        asyncio.run(run())


# ---------------------------------------------------------------------------------------------- pure mapping


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (429, {"error": {"message": "Rate limit reached", "code": "rate_limit_exceeded"}}, RateLimited),
        (429, {"error": {"message": "You exceeded your current quota", "type": "insufficient_quota"}}, QuotaExhausted),
        (429, {"error": {"message": "Please check your plan and billing details."}}, QuotaExhausted),
        (429, {"error": {"message": "Quota exceeded for requests per minute", "code": 429}}, RateLimited),
        (400, {"error": {"message": "This model's maximum context length is 4096 tokens"}}, ContextTooLong),
        (400, {"error": {"message": "x", "code": "context_length_exceeded"}}, ContextTooLong),
        (400, {"error": {"message": "filtered", "code": "content_filter"}}, ContentFiltered),
        (400, {"error": "the request exceeds the available context size"}, ContextTooLong),
        (400, "plain text body", BadRequest),
        (403, None, AuthError),
        (408, None, NetworkError),
        (409, None, BadRequest),
        (500, {"detail": "boom"}, ServerError),
        (529, None, ServerError),
    ],
)
def test_error_for_status(status, body, error):
    exc = error_for_status(status, {"retry-after": "2", "x-request-id": "req_1"}, body)
    assert type(exc) is error and exc.status == status
    assert exc.retry_after == 2.0 and exc.request_id == "req_1"


def test_error_for_status_scrubs_key_and_key_like_strings():
    body = {"error": {"message": f"Incorrect API key provided: {KEY}. Also sk-proj-abcdefghijklmnop."}}
    exc = error_for_status(401, {}, body, api_key=KEY)
    assert KEY not in str(exc) and "abcdefghijklmnop" not in str(exc) and "sk-proj-" in str(exc)


def test_reply_from_body_edge_cases():
    ok = {"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]}
    reply = reply_from_body(json.dumps(ok).encode(), {"x-ratelimit-remaining-requests": "5"}, 0.1)
    assert reply.text == "hi" and reply.usage.total_tokens == 0 and reply.rate.remaining_requests == 5
    no_content = {"choices": [{"message": {"content": None}, "finish_reason": "stop"}]}
    for bad in (b"{", b"[]", b'{"choices": []}', json.dumps(no_content).encode()):
        with pytest.raises(BadResponse):
            reply_from_body(bad, {}, 0.1)


def test_only_the_client_imports_openai():
    root = Path(__file__).resolve().parents[1] / "imitate"
    importers = {
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if any(line.split()[:2] in (["import", "openai"], ["from", "openai"]) for line in p.read_text().splitlines())
    }
    assert importers == {"teacher/client.py"}


# ---------------------------------------------------------------------------------------------- reply.py


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("6m0s", 360.0), ("1.5s", 1.5), ("20ms", 0.02), ("7", 7.0), ("1h2m3s", 3723.0), ("0.25", 0.25)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", [None, "", "soon", "5x", "1s2", "-"])
def test_parse_duration_rejects_garbage(text):
    assert parse_duration(text) is None


@pytest.mark.parametrize("seconds", [0.0, 0.02, 0.12, 1.0, 1.5, 59.25, 60.0, 360.0, 3725.5])
def test_format_duration_round_trips(seconds):
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=0.001)
    assert format_duration(360.0) == "6m0s" and format_duration(0.12) == "120ms"


def test_parse_rate_headers():
    headers = {
        "X-RateLimit-Limit-Requests": "500",
        "x-ratelimit-limit-tokens": "30000",
        "x-ratelimit-remaining-requests": "499",
        "x-ratelimit-remaining-tokens": "29000",
        "x-ratelimit-reset-requests": "120ms",
        "x-ratelimit-reset-tokens": "2s",
        "retry-after": "3",
        "retry-after-ms": "1500",
    }
    rate = parse_rate_headers(headers)
    assert (rate.limit_requests, rate.limit_tokens) == (500, 30000)
    assert (rate.remaining_requests, rate.remaining_tokens) == (499, 29000)
    assert (rate.reset_requests_s, rate.reset_tokens_s) == (pytest.approx(0.12), 2.0)
    assert rate.retry_after_s == 1.5 and rate.has_limits
    assert parse_rate_headers({"retry-after": "3"}).retry_after_s == 3.0
    assert not parse_rate_headers({"x-ratelimit-remaining-requests": "lots"}).has_limits
