"""TeacherClient against the real loopback fake teacher, on both transports: every fault maps onto the error
tree once, headers become Reply.rate, the Batch API works end to end, the API key never shows up in an error, and
only the client imports openai. (TLS, proxies, what goes on the wire and the response cap: test_teacher_transport.)"""

import asyncio
import json
from pathlib import Path

import aiohttp
import openai
import pytest
from teacher_fixtures import KEY, PARAMS, TRANSPORTS, ask, ask_error, assert_no_secret, closed_port

from imitate.errors import (
    TEACHER_FATAL,
    AuthError,
    BadRequest,
    BadResponse,
    ConnectFailed,
    ContentFiltered,
    ContextTooLong,
    InputError,
    ModelNotFound,
    NetworkError,
    QuotaExhausted,
    RateLimited,
    ServerError,
    TeacherError,
    Truncated,
)
from imitate.records import Message
from imitate.teacher.client import TeacherClient, check_finish
from imitate.teacher.reply import Reply, parse_rate_headers


@pytest.fixture(params=TRANSPORTS)
def transport(request) -> str:
    return request.param


# ---------------------------------------------------------------------------------------------- the fake teacher


def test_chat_returns_a_reply_with_usage_and_request_id(fake_teacher, transport):
    reply = asyncio.run(ask(fake_teacher.base_url, "Why is the sky blue?", transport=transport))
    assert "Why is the sky blue" in reply.text and "Step 1:" in reply.text
    assert reply.finish_reason == "stop" and reply.model == "fake-teacher"
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens > 0
    assert reply.request_id and reply.request_id.startswith("req_") and reply.latency_s > 0
    assert not reply.rate.has_limits  # the default fake sets no limits, so it sends no rate headers
    check_finish(reply)
    assert fake_teacher.stats()["completed"] == 1


@pytest.mark.parametrize(
    ("fault", "error", "status"),
    [
        ("500", ServerError, 500),
        ("503", ServerError, 503),
        ("429", RateLimited, 429),
        ("quota", QuotaExhausted, 429),
        ("auth", AuthError, 401),
        ("403", AuthError, 403),
        ("context", ContextTooLong, 400),
        ("policy", ContentFiltered, 400),
        ("nomodel", ModelNotFound, 404),
        ("404", ModelNotFound, 404),  # any 404 on the chat endpoint: the model or the URL is wrong
        ("422", BadRequest, 422),
        ("malformed", BadResponse, 200),
        ("empty", BadResponse, 200),
        ("nomessage", BadResponse, 200),
        ("reset", NetworkError, None),
        ("cut", NetworkError, None),
    ],
)
def test_each_fault_maps_onto_one_error_class(fake_teacher, transport, fault, error, status):
    exc = ask_error(fake_teacher.base_url, f"Explain tides. [[fault:{fault}]]", transport=transport)
    assert type(exc) is error and exc.status == status
    if status is None:  # translated once, chained
        assert isinstance(exc.__cause__, openai.OpenAIError if transport == "sdk" else aiohttp.ClientError)
    if status is not None:
        assert exc.request_id and exc.request_id.startswith("req_")
    assert_no_secret(exc)


def test_an_undecodable_body_is_a_bad_response_not_a_network_error(fake_teacher):
    exc = ask_error(fake_teacher.base_url, "Explain tides. [[fault:badgzip]]")
    assert type(exc) is BadResponse and exc.status == 200 and "content-encoding" in exc.message
    assert exc.request_id and exc.request_id.startswith("req_")


def test_model_not_found_stops_the_teacher(fake_teacher, transport):
    exc = ask_error(fake_teacher.base_url, "Explain tides. [[fault:nomodel]]", transport=transport)
    assert isinstance(exc, TEACHER_FATAL) and not exc.retryable and "model" in exc.one_line()


def test_a_redirect_is_one_bad_request_and_is_not_followed(fake_teacher):
    exc = ask_error(fake_teacher.base_url, "Explain tides. [[fault:redirect]]")
    assert type(exc) is BadRequest and exc.status == 307 and not exc.retryable
    assert f"redirect to {fake_teacher.base_url}/moved/chat/completions; set base_url" in exc.message
    assert fake_teacher.stats()["requests"] == 1


def test_scripted_429_carries_retry_after(fake_teacher, transport):
    exc = ask_error(fake_teacher.base_url, "Explain snow. [[fault:429]]", transport=transport)
    assert isinstance(exc, RateLimited) and exc.retryable
    assert exc.retry_after == pytest.approx(0.05)  # retry-after-ms wins over the rounded retry-after


def test_fault_x2_fails_twice_then_succeeds_on_one_connection(fake_teacher, transport):
    async def three_attempts() -> tuple[list, int]:
        async with TeacherClient(fake_teacher.base_url, timeout=5, transport=transport) as client:
            messages = [Message(role="user", content="Explain rain. [[fault:500x2]]")]
            out = []
            for _ in range(3):
                try:
                    out.append(await client.chat(messages, model="fake-teacher", params=PARAMS))
                except ServerError as exc:
                    out.append(exc)
            return out, fake_teacher.stats()["connections"]

    (first, second, third), connections = asyncio.run(three_attempts())
    assert isinstance(first, ServerError) and isinstance(second, ServerError)
    assert isinstance(third, Reply) and "Explain rain" in third.text
    assert connections == 2  # one kept-alive connection for all three, plus the one asking for stats


def test_length_and_filter_return_replies_that_check_finish_rejects(fake_teacher, transport):
    truncated = asyncio.run(ask(fake_teacher.base_url, "Explain dew. [[fault:length]]", transport=transport))
    assert truncated.finish_reason == "length" and truncated.text
    with pytest.raises(Truncated):
        check_finish(truncated)
    filtered = asyncio.run(ask(fake_teacher.base_url, "Explain storms. [[fault:filter]]", transport=transport))
    assert filtered.finish_reason == "content_filter" and filtered.text == ""
    with pytest.raises(ContentFiltered):
        check_finish(filtered)


def test_hang_is_a_timeout_and_a_slow_body_still_arrives(fake_teacher, transport):
    exc = ask_error(fake_teacher.base_url, "Explain fog. [[fault:hang]]", timeout=0.3, transport=transport)
    assert type(exc) is NetworkError and exc.retryable and "timed out" in exc.message
    reply = asyncio.run(ask(fake_teacher.base_url, "Explain hail. [[fault:slow]]", timeout=2, transport=transport))
    assert reply.finish_reason == "stop" and reply.latency_s >= 0.4


@pytest.mark.parametrize("where", ["refused", "dns"])
def test_no_connection_is_connect_failed(transport, where):
    host = f"127.0.0.1:{closed_port()}" if where == "refused" else "no-such-host.invalid"
    exc = ask_error(f"http://alice:pw-in-url-123@{host}/v1", "anyone there?", timeout=2, transport=transport)
    assert type(exc) is ConnectFailed and exc.retryable and exc.status is None
    assert_no_secret(exc, KEY, "pw-in-url-123")


def test_wrong_key_is_auth_error_and_the_echoed_key_is_scrubbed(make_fake_teacher, transport):
    fake = make_fake_teacher(api_key="the-right-key")
    for key in (KEY, "plain-secret-without-prefix-123"):
        exc = ask_error(fake.base_url, "Explain wind.", key=key, transport=transport)
        assert isinstance(exc, AuthError) and exc.status == 401 and exc.hint
        assert_no_secret(exc, key)
    assert asyncio.run(ask(fake.base_url, "Explain wind.", key="the-right-key", transport=transport)).text


def test_rate_headers_become_reply_rate(make_fake_teacher, transport):
    fake = make_fake_teacher(rpm=600, tpm=100_000)
    reply = asyncio.run(ask(fake.base_url, "Explain clouds.", transport=transport, params={"max_tokens": 200}))
    rate = reply.rate
    assert (rate.limit_requests, rate.remaining_requests, rate.limit_tokens) == (600, 599, 100_000)
    assert rate.remaining_tokens == 100_000 - (reply.usage.prompt_tokens + 200)  # charged up front
    assert rate.reset_requests_s == pytest.approx(0.1, abs=0.02) and rate.retry_after_s is None


def test_bucket_overflow_is_rate_limited_and_headers_off_means_no_state(make_fake_teacher, transport):
    fake = make_fake_teacher(rpm=60)

    async def burst() -> list:
        async with TeacherClient(fake.base_url, timeout=5, transport=transport) as client:
            calls = [client.chat([Message(role="user", content="Ice?")], model="m", params=PARAMS) for _ in range(61)]
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(burst())
    limited = [r for r in results if isinstance(r, RateLimited)]
    assert len(limited) == 1 and sum(isinstance(r, Reply) for r in results) == 60
    assert 0.5 < limited[0].retry_after <= 1.0 and limited[0].status == 429
    quiet = make_fake_teacher(rpm=1, headers=False)
    assert asyncio.run(ask(quiet.base_url, "Explain frost.", transport=transport)).rate == parse_rate_headers({})
    exc = ask_error(quiet.base_url, "Explain frost.", transport=transport)
    assert isinstance(exc, RateLimited) and exc.retry_after is None


# ---------------------------------------------------------------------------------------------- models, Batch API


def test_list_models(fake_teacher):
    async def models() -> list[str]:
        async with TeacherClient(fake_teacher.base_url) as client:
            return await client.list_models()

    assert asyncio.run(models()) == ["fake-teacher"]


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
    assert [o["custom_id"] for o in out] == ["c0", "c2"] and out[0]["response"]["status_code"] == 200
    assert "Explain tides" in out[0]["response"]["body"]["choices"][0]["message"]["content"]
    assert err[0]["custom_id"] == "c1" and err[0]["response"]["status_code"] == 500
    assert err[1]["response"] is None and err[1]["error"]["code"] == "invalid_request"
    assert [(type(e), e.status) for e in errors] == [(BadRequest, 409), (BadRequest, 404)]  # a 404 off chat


def test_batch_cancel_and_missing_upload(make_fake_teacher, tmp_path: Path):
    fake = make_fake_teacher(batch_delay_s=0.2)
    src = write_batch(tmp_path / "in.jsonl", ["Explain tides."])

    async def run() -> tuple[str, str]:
        async with TeacherClient(fake.base_url) as client:
            batch = await client.create_batch(await client.upload_batch_file(src))
            cancelling = (await client.cancel_batch(batch["id"]))["status"]
            with pytest.raises(InputError):
                await client.upload_batch_file(tmp_path / "missing.jsonl")
            for _ in range(500):  # poll until the fake settles the cancel (batch_delay_s later)
                status = (await client.get_batch(batch["id"]))["status"]
                if status != "cancelling":
                    break
                await asyncio.sleep(0.01)
            return cancelling, status

    assert asyncio.run(run()) == ("cancelling", "cancelled")


def test_only_the_client_imports_openai_and_nothing_imports_httpx2():
    root = Path(__file__).resolve().parents[1] / "imitate"
    imports = {p.relative_to(root).as_posix(): p.read_text().splitlines() for p in root.rglob("*.py")}

    def importers(module: str) -> set[str]:
        heads = (["import", module], ["from", module])
        return {path for path, lines in imports.items() if any(line.split()[:2] in heads for line in lines)}

    assert importers("openai") == {"teacher/client.py"}
    assert importers("httpx2") == set()  # the SDK brings its own HTTP client
