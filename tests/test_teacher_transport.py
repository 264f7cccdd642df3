"""The aiohttp transport's guarantees, against real loopback servers: TLS verified (hostname included) with a CA
bundle or SSL_CERT_FILE, proxies from the environment used and NO_PROXY honoured, the same request as the SDK
(the key as bearer, never URL userinfo), header values scrubbed, bad base URLs refused, and the decoded response
capped with memory bounded under 256 endless or decompression-bomb answers."""

import asyncio
import json
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from teacher_fixtures import KEY, OK_BODY, PARAMS, TRANSPORTS, Recorder, ask, ask_error

from imitate.errors import TEACHER_FATAL, ConfigError, ResponseTooLarge, ServerError, TeacherError, TLSFailure
from imitate.records import GenerationParams, Message
from imitate.teacher.client import TeacherClient
from imitate.teacher.fake import FakeTeacher
from imitate.teacher.reply import Reply


@pytest.fixture(params=TRANSPORTS)
def transport(request) -> str:
    return request.param


# ---------------------------------------------------------------------------------------------- size cap, memory


def test_an_answer_over_the_cap_fails_its_row_without_retry(fake_teacher):
    big = "Explain sand. [[len:400]]"  # ~40 KB of answer
    assert asyncio.run(ask(fake_teacher.base_url, big, params={"max_tokens": None}, max_response_bytes=1 << 20)).text
    exc = ask_error(fake_teacher.base_url, big, params={"max_tokens": None}, max_response_bytes=4096)
    assert type(exc) is ResponseTooLarge and not exc.retryable and exc.status == 200
    assert "max_response_bytes=4096" in exc.message and "max_response_bytes" in exc.hint


@pytest.mark.parametrize("fault", ["endless", "bomb"])
def test_endless_and_inflating_bodies_stop_at_the_cap(fake_teacher, fault):
    exc = ask_error(fake_teacher.base_url, f"Explain sand. [[fault:{fault}]]", max_response_bytes=1 << 20)
    assert type(exc) is ResponseTooLarge and not exc.retryable and "max_response_bytes=1048576" in exc.message


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
    assert {type(r) for r in results} == {ResponseTooLarge}
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
