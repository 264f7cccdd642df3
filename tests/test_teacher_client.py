"""TeacherClient against real loopback servers (the fake teacher, a recording server, a TLS fake, a proxy): every
fault maps onto the error tree once, headers become Reply.rate, TLS is verified, proxies from the environment
are used, redirects are not followed, a response's decoded size is capped with memory bounded, the Batch API
works end to end, and neither the API key nor URL userinfo shows up in an error or a Reply."""

import asyncio
import json
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path

import aiohttp
import openai
import pytest

from imitate.errors import (
    TEACHER_FATAL,
    AuthError,
    BadRequest,
    BadResponse,
    ConfigError,
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
    TLSFailure,
    Truncated,
)
from imitate.records import GenerationParams, Message
from imitate.teacher.client import TeacherClient, check_finish
from imitate.teacher.fake import FakeTeacher
from imitate.teacher.reply import Reply, parse_rate_headers

KEY = "sk-imitate-test-DO-NOT-LEAK-7f3a9c0e"
PARAMS = GenerationParams(max_tokens=256)
TRANSPORTS = ["aiohttp", "sdk"]  # the default and the one alternative must behave the same
OK_BODY = {"choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}], "usage": {}}


@pytest.fixture(params=TRANSPORTS)
def transport(request) -> str:
    return request.param


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

    async def __aenter__(self) -> "Recorder":
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


# ---------------------------------------------------------------------------------------------- size cap, memory


def test_an_answer_over_the_cap_fails_its_row_without_retry(fake_teacher, transport):
    if transport == "sdk":
        pytest.skip("the SDK reads bodies whole: the cap is the aiohttp transport's")
    big = "Explain sand. [[len:400]]"  # ~40 KB of answer
    assert asyncio.run(ask(fake_teacher.base_url, big, params={"max_tokens": None}, max_response_bytes=1 << 20)).text
    exc = ask_error(fake_teacher.base_url, big, params={"max_tokens": None}, max_response_bytes=4096)
    assert type(exc) is BadResponse and not exc.retryable and exc.status == 200
    assert "max_response_bytes=4096" in exc.message and "max_response_bytes" in exc.hint


@pytest.mark.parametrize("fault", ["endless", "bomb"])
def test_endless_and_inflating_bodies_stop_at_the_cap(fake_teacher, fault):
    exc = ask_error(fake_teacher.base_url, f"Explain sand. [[fault:{fault}]]", max_response_bytes=1 << 20)
    assert type(exc) is BadResponse and not exc.retryable and "max_response_bytes=1048576" in exc.message


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.integration
def test_memory_stays_bounded_with_256_endless_or_bomb_responses(make_fake_teacher):
    """Before the cap an endless body took 4-8 GB of RSS at 256 connections. Now each response may buffer 64 KiB
    freely and larger ones share a 128 MiB budget: growth measured ~210 MB here (~1,080 MB with the cap alone,
    256 x 8 MiB, without the shared budget)."""
    fake = make_fake_teacher(process=True)  # its memory is not ours

    async def run() -> tuple[list, float]:
        base = peak = rss_mb()
        async with TeacherClient(fake.base_url, max_connections=256, max_response_bytes=8 << 20) as client:

            async def one(i: int) -> object:
                fault = ("endless", "bomb")[i % 2]
                messages = [Message(role="user", content=f"q{i} [[fault:{fault}]]")]
                return await client.chat(messages, model="m", params=PARAMS)

            calls = asyncio.gather(*(one(i) for i in range(256)), return_exceptions=True)
            while not calls.done():
                peak = max(peak, rss_mb())
                await asyncio.wait([calls], timeout=0.02)
            return calls.result(), peak - base

    results, growth = asyncio.run(run())
    assert {type(r) for r in results} == {BadResponse}
    assert growth < 400, f"RSS grew by {growth:.0f} MB"


# ---------------------------------------------------------------------------------------------- what is sent


def test_both_transports_send_the_same_body_with_the_key_as_bearer_and_no_url_userinfo():
    async def run(transport: str) -> dict:
        async with Recorder() as rec:
            base = rec.url.replace("://", "://alice:url-pw-1234@") + "/v1"
            async with TeacherClient(base, api_key=KEY, transport=transport) as client:
                assert "url-pw-1234" not in client.base_url
                params = GenerationParams(max_tokens=64, temperature=0.2, seed=7, stop=["\n\n"])
                messages = [Message(role="system", content="Be brief."), Message(role="user", content="Explain é.")]
                await client.chat(messages, model="fake-teacher", params=params, extra={"user": "u1"})
            return rec.requests[0]

    lean, sdk = asyncio.run(run("aiohttp")), asyncio.run(run("sdk"))
    assert json.loads(lean["body"]) == json.loads(sdk["body"])
    for request in (lean, sdk):
        assert request["method"] == "POST" and request["target"] == "/v1/chat/completions"
        assert request["headers"]["authorization"] == f"Bearer {KEY}"  # never Basic auth from the URL
    assert lean["headers"]["content-type"] == "application/json"
    assert lean["headers"]["accept-encoding"] == "gzip, deflate"


def test_header_values_echoing_the_key_are_scrubbed(transport):
    def echo(req: dict) -> tuple[int, list, bytes]:
        status = 200 if b"Fine" in req["body"] else 500
        return status, [("x-request-id", "req-" + req["headers"]["authorization"])], json.dumps(OK_BODY).encode()

    async def run() -> tuple[Reply, TeacherError]:
        async with Recorder(echo) as rec, TeacherClient(rec.url + "/v1", api_key=KEY, transport=transport) as client:
            reply = await client.chat([Message(role="user", content="Fine")], model="m", params=PARAMS)
            with pytest.raises(ServerError) as info:
                await client.chat([Message(role="user", content="Boom")], model="m", params=PARAMS)
            return reply, info.value

    reply, exc = asyncio.run(run())
    assert reply.request_id == "req-Bearer ***" and exc.request_id == "req-Bearer ***"


def test_proxy_from_the_environment_is_used_and_no_proxy_honoured(fake_teacher, transport, monkeypatch):
    for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)

    async def run() -> tuple[list, Reply, Reply]:
        async with Recorder() as proxy:
            monkeypatch.setenv("HTTP_PROXY", proxy.url)
            via_proxy = await ask(fake_teacher.base_url, "Explain fog.", transport=transport)
            monkeypatch.setenv("NO_PROXY", "127.0.0.1")
            direct = await ask(fake_teacher.base_url, "Explain fog.", transport=transport)
            return proxy.requests, via_proxy, direct

    seen, via_proxy, direct = asyncio.run(run())
    assert [r["target"] for r in seen] == [fake_teacher.base_url + "/chat/completions"]  # absolute form: a proxy
    assert via_proxy.text == "hi" and "Explain fog" in direct.text
    assert fake_teacher.stats()["requests"] == 1


@pytest.mark.parametrize(
    "url", ["ftp://h/v1", "localhost:8000/v1", "http://h:99999/v1", "http://[::1/v1", "/v1", "http://u:pw-secret@h:0"]
)
def test_bad_base_urls_are_config_errors_without_credentials(url):
    with pytest.raises(ConfigError) as info:
        TeacherClient(url)
    assert "pw-secret" not in str(info.value)


def test_unknown_transport_is_a_config_error():
    with pytest.raises(ConfigError, match="transport"):
        TeacherClient("http://127.0.0.1:9/v1", transport="httpx")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Self-signed certificates: `good` for 127.0.0.1/localhost, `wrong` for another name."""
    openssl = shutil.which("openssl")
    assert openssl, "the openssl command is needed to make test certificates"
    folder, out = tmp_path_factory.mktemp("tls"), {}
    for name, san in (("good", "DNS:localhost,IP:127.0.0.1"), ("wrong", "DNS:wrong.example")):
        cert, key = folder / f"{name}.pem", folder / f"{name}.key"
        subprocess.run(
            [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-days", "2", "-subj", f"/CN={name}", "-addext", f"subjectAltName={san}",
             "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        out[name] = (cert, key)
    return out


def ask_over_tls(certificates, served: str, **options) -> Reply:
    cert, key = certificates[served]
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert, key)

    async def run() -> Reply:
        fake = FakeTeacher()
        try:
            return await ask(await fake.start(tls=server_side), "Explain locks.", **options)
        finally:
            await fake.stop()

    return asyncio.run(run())


def test_tls_is_verified_by_default(certificates, transport):
    with pytest.raises(TLSFailure) as info:
        ask_over_tls(certificates, "good", transport=transport)
    assert isinstance(info.value, TEACHER_FATAL) and not info.value.retryable
    assert transport == "sdk" or "ca_bundle" in info.value.hint


def test_a_ca_bundle_or_ssl_cert_file_is_trusted(certificates, transport, monkeypatch):
    bundle = str(certificates["good"][0])
    assert "Explain locks" in ask_over_tls(certificates, "good", transport=transport, ca_bundle=bundle).text
    monkeypatch.setenv("SSL_CERT_FILE", bundle)
    assert "Explain locks" in ask_over_tls(certificates, "good", transport=transport).text


def test_the_hostname_is_checked(certificates):
    with pytest.raises(TLSFailure):
        ask_over_tls(certificates, "wrong", ca_bundle=str(certificates["wrong"][0]))


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
            await asyncio.sleep(0.3)
            with pytest.raises(InputError):
                await client.upload_batch_file(tmp_path / "missing.jsonl")
            return cancelling, (await client.get_batch(batch["id"]))["status"]

    assert asyncio.run(run()) == ("cancelling", "cancelled")


def test_only_the_client_imports_openai_and_nothing_imports_httpx2():
    root = Path(__file__).resolve().parents[1] / "imitate"
    imports = {p.relative_to(root).as_posix(): p.read_text().splitlines() for p in root.rglob("*.py")}

    def importers(module: str) -> set[str]:
        heads = (["import", module], ["from", module])
        return {path for path, lines in imports.items() if any(line.split()[:2] in heads for line in lines)}

    assert importers("openai") == {"teacher/client.py"}
    assert importers("httpx2") == set()  # the SDK brings its own HTTP client
