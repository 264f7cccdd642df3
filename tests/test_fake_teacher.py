"""The loopback fake teacher at the HTTP level: deterministic answers, token estimates, OpenAI-style token
buckets and headers, scripted and random faults (hostile ones included), stats, the three ways to run it, its
options defined once and its modules free of import cycles. The client here is the standard library's."""

import ast
import asyncio
import dataclasses
import http.client
import json
import os
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from imitate.errors import ConfigError
from imitate.teacher.fake import (
    FakeConfig,
    FakeTeacher,
    TokenBucket,
    estimate_tokens,
    fake_answer,
    parse_faults,
    prompt_tokens,
    running_fake_teacher,
)
from imitate.teacher.fake.runner import _parser
from imitate.teacher.reply import parse_duration


@dataclasses.dataclass
class Response:
    status_code: int
    headers: dict[str, str]  # lowercase names
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode()

    def json(self) -> Any:
        return json.loads(self.content)


_dumps = json.dumps  # `json` is also Client.request's keyword, as in requests/httpx


class Client:
    """One keep-alive HTTP/1.1 connection to the fake (http.client), with paths relative to its base URL."""

    def __init__(self, base_url: str, timeout: float = 5):
        parts = urlsplit(base_url)
        self.prefix = parts.path
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.close()

    def request(self, method: str, path: str, *, json: Any = None, content: bytes | None = None) -> Response:
        body = content if json is None else _dumps(json).encode()
        self.conn.request(method, self.prefix + path, body=body, headers={"content-type": "application/json"})
        response = self.conn.getresponse()
        return Response(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())

    def get(self, path: str) -> Response:
        return self.request("GET", path)

    def post(self, path: str, **kw: Any) -> Response:
        return self.request("POST", path, **kw)


def chat(http: Client, question: str, system: str | None = None, **body) -> Response:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return http.post("/chat/completions", json={"model": "fake-teacher", "messages": messages, **body})


def client(server) -> Client:
    return Client(server.base_url)


def answer(response: Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_answers_are_deterministic_and_follow_the_prompt(fake_teacher):
    with client(fake_teacher) as http:
        first = answer(chat(http, "Why do leaves change colour?", "Explain step by step."))
        assert first == answer(chat(http, "Why do leaves change colour?", "Explain step by step."))
        assert "Why do leaves change colour" in first and "Step 1:" in first and "Step 4:" in first
        assert answer(chat(http, "Why do stars twinkle?", "Explain step by step.")) != first
        plain = answer(chat(http, "Why do leaves change colour?"))
        assert "Step 1:" not in plain and plain != first
        brief = answer(chat(http, "Why do leaves change colour?", "Be brief."))
        longer = answer(chat(http, "Why do leaves change colour? [[len:9]]"))
        assert len(brief) < len(plain) < len(longer) and "[[len" not in longer


def test_usage_is_the_documented_estimate(fake_teacher):
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "What is a prime number?"}]
    with client(fake_teacher) as http:
        body = http.post("/chat/completions", json={"model": "m", "messages": messages}).json()
    text = body["choices"][0]["message"]["content"]
    assert text == fake_answer(messages)
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens(messages),
        "completion_tokens": estimate_tokens(text),
        "total_tokens": prompt_tokens(messages) + estimate_tokens(text),
    }
    assert prompt_tokens(messages) == (8 + 3) // 4 + 4 + (23 + 3) // 4 + 4


def test_max_tokens_truncates(fake_teacher):
    with client(fake_teacher) as http:
        body = chat(http, "Explain magnets.", max_tokens=7).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 7 and len(body["choices"][0]["message"]["content"]) == 28


def test_rpm_bucket_holds_capacity_then_429_with_retry_after_then_refills(make_fake_teacher):
    fake = make_fake_teacher(rpm=60)
    with client(fake) as http:
        remaining = [int(chat(http, f"q{i}").headers["x-ratelimit-remaining-requests"]) for i in range(60)]
        assert remaining == list(range(59, -1, -1))
        limited = chat(http, "one too many")
    assert limited.status_code == 429
    assert limited.json()["error"]["type"] == "requests"
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert limited.headers["retry-after"] == "1"
    assert 500 < int(limited.headers["retry-after-ms"]) <= 1000
    assert limited.headers["x-ratelimit-limit-requests"] == "60"
    assert parse_duration(limited.headers["x-ratelimit-reset-requests"]) == pytest.approx(60, abs=1)
    assert fake.stats()["rate_limited"] == 1 and fake.stats()["by_status"] == {200: 60, 429: 1}
    with client(fake) as http:
        time.sleep(int(limited.headers["retry-after-ms"]) / 1000 + 0.02)  # continuous refill: 1 per second
        assert chat(http, "after the wait").status_code == 200
        assert chat(http, "again at once").status_code == 429


def test_token_bucket_with_injected_clock():
    bucket = TokenBucket(600, now=0.0)  # capacity 600, 10 per second
    bucket.level -= 600
    bucket.refill(0.5)
    assert bucket.level == pytest.approx(5.0) and bucket.wait_for(8) == pytest.approx(0.3)
    assert bucket.reset_s() == pytest.approx(59.5)
    bucket.refill(1000.0)
    assert bucket.level == 600 and bucket.wait_for(601) == float("inf")


def test_tpm_charges_prompt_plus_max_tokens(make_fake_teacher):
    fake = make_fake_teacher(tpm=1000)
    with client(fake) as http:
        first = chat(http, "Explain tokens.", max_tokens=600)
        cost = 1000 - int(first.headers["x-ratelimit-remaining-tokens"])
        assert first.status_code == 200 and cost == prompt_tokens([{"content": "Explain tokens."}]) + 600
        second = chat(http, "Explain tokens.", max_tokens=600)
        too_big = chat(http, "Explain tokens.", max_tokens=5000)
    assert second.status_code == 429 and second.json()["error"]["type"] == "tokens"
    assert float(second.headers["retry-after-ms"]) / 1000 == pytest.approx((cost - (1000 - cost)) / (1000 / 60), 0.1)
    assert too_big.status_code == 429 and "too large" in too_big.json()["error"]["message"]
    assert "retry-after" not in too_big.headers


def test_headers_false_sends_no_rate_headers_but_still_limits(make_fake_teacher):
    fake = make_fake_teacher(rpm=1, headers=False)
    with client(fake) as http:
        ok, limited = chat(http, "a"), chat(http, "b")
    assert ok.status_code == 200 and limited.status_code == 429
    for response in (ok, limited):
        assert not [h for h in response.headers if h.startswith(("x-ratelimit", "retry-after"))]
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"


def test_scripted_faults_count_attempts_per_exact_prompt(fake_teacher):
    with client(fake_teacher) as http:
        assert [chat(http, "Explain rain. [[fault:503x2]]").status_code for _ in range(4)] == [503, 503, 200, 200]
        assert chat(http, "Explain snow. [[fault:503x2]]").status_code == 503  # its own counter
        assert [chat(http, "Explain hail. [[fault:500]]").status_code for _ in range(3)] == [500, 500, 500]
        fake_teacher.reset()
        assert chat(http, "Explain rain. [[fault:503x2]]").status_code == 503
        assert chat(http, "Explain x. [[fault:bogus]]").status_code == 400
    assert fake_teacher.stats()["faults"] == {"503": 1, "bogus": 1}


def test_random_faults_follow_the_seed(make_fake_teacher):
    sequences = []
    for _ in range(2):
        fake = make_fake_teacher(faults={"500": 0.3, "429": 0.2}, seed=7)
        with client(fake) as http:
            sequences.append([chat(http, f"q{i}").status_code for i in range(40)])
    assert sequences[0] == sequences[1]
    assert {200, 429, 500} == set(sequences[0])


def test_stats_and_reset(fake_teacher):
    with client(fake_teacher) as http:
        answer(chat(http, "Explain sand."))
        chat(http, "Explain glass. [[fault:quota]]")
        http.get("/models")
        stats = fake_teacher.stats()
        assert stats["requests"] == 3 and stats["completed"] == 1 and stats["rate_limited"] == 1
        assert stats["by_status"] == {200: 2, 429: 1}
        assert stats["connections"] == 2  # ours, kept alive, and the one asking for stats
        assert stats["tokens_served"] == stats["prompt_tokens"] + stats["completion_tokens"] > 0
    with client(fake_teacher) as http:
        reset = http.post("/fake/reset")
    assert reset.json()["requests"] == 0 and fake_teacher.stats()["requests"] == 0


def test_latency_is_concurrent_not_serial():
    async def run() -> tuple[float, dict]:
        async with FakeTeacher(latency_s=0.2) as fake, aiohttp.ClientSession(fake.base_url + "/") as http:
            start = time.perf_counter()
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            responses = await asyncio.gather(*(http.post("chat/completions", json=body) for _ in range(8)))
            assert {r.status for r in responses} == {200}
            return time.perf_counter() - start, fake.stats()

    elapsed, stats = asyncio.run(run())
    assert 0.2 <= elapsed < 0.6 and stats["max_in_flight"] == 8 and stats["in_flight"] == 0


def test_models_unknown_paths_and_malformed_requests(fake_teacher):
    with client(fake_teacher) as http:
        assert http.get("/models").json()["data"][0]["id"] == "fake-teacher"
        missing = http.get("/nothing/here")
        assert missing.status_code == 404 and "error" in missing.json()
        bad = http.post("/chat/completions", content=b"{not json")
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    host, port = fake_teacher.base_url.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=2) as sock:
        sock.sendall(b"NONSENSE\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 400")
        assert sock.recv(4096) == b""  # closed after a malformed request


def test_parse_faults():
    assert parse_faults("500=0.02, reset=0.01") == {"500": 0.02, "reset": 0.01}
    assert parse_faults("") == {} and parse_faults(None) == {}
    with pytest.raises(ConfigError) as info:
        parse_faults("500=x,reset")
    assert "'500=x'" in str(info.value) and "'reset'" in str(info.value)
    for bad, named in (("bogus=0.1", "bogus"), ("600=0.1", "600"), ("500=1.5", "500=1.5"), ("500=0.6,429=0.6", "1")):
        with pytest.raises(ConfigError, match=named):
            parse_faults(bad)
    with pytest.raises(ConfigError):
        FakeTeacher(faults={"nope": 0.1})


def test_runs_in_its_own_process(make_fake_teacher):
    fake = make_fake_teacher(process=True, rpm=5, model="proc-model")
    assert fake.pid != os.getpid()
    with client(fake) as http:
        response = chat(http, "Explain processes.")
        assert response.headers["x-ratelimit-limit-requests"] == "5"
        assert http.get("/models").json()["data"][0]["id"] == "proc-model"
    assert fake.stats()["by_status"] == {200: 2}


def test_running_fake_teacher_in_a_thread():
    with running_fake_teacher(process=False, sentences=1) as base_url, Client(base_url) as http:
        assert answer(chat(http, "Explain threads.")).count("Step") == 0


def test_cli_rejects_bad_faults_with_one_line():
    cmd = [sys.executable, "-m", "imitate.teacher.fake", "--port", "0", "--faults", "bogus=0.1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    assert done.returncode == 2 and "bogus" in done.stderr and "Traceback" not in done.stderr


def test_cli_serves_until_terminated():
    cmd = [sys.executable, "-m", "imitate.teacher.fake", "--port", "0", "--rpm", "3", "--faults", "500=0.5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        base_url = proc.stdout.readline().split()[-1]
        with Client(base_url) as http:
            assert chat(http, "hi").headers["x-ratelimit-limit-requests"] == "3"
    finally:
        proc.terminate()
        assert proc.wait(timeout=5) == 0
        proc.stdout.close()


def post_stream(server, fault: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """A chat request whose answer is read by the caller, piece by piece."""
    parts = urlsplit(server.base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    body = {"model": "m", "messages": [{"role": "user", "content": f"Explain. [[fault:{fault}]]"}]}
    conn.request("POST", parts.path + "/chat/completions", body=_dumps(body))
    return conn, conn.getresponse()


def test_hostile_faults_redirect_missing_model_endless_body_and_gzip_bomb(fake_teacher):
    with client(fake_teacher) as http:
        moved = chat(http, "Explain. [[fault:redirect]]")
        assert moved.status_code == 307
        assert moved.headers["location"] == fake_teacher.base_url + "/moved/chat/completions"
        missing = chat(http, "Explain. [[fault:nomodel]]")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    conn, endless = post_stream(fake_teacher, "endless")
    assert endless.status == 200 and endless.getheader("transfer-encoding") == "chunked"
    assert endless.read(8 << 20).strip() == b""  # 8 MiB in and still going
    conn.close()
    conn, bomb = post_stream(fake_teacher, "bomb")
    compressed = bomb.read()
    conn.close()
    assert bomb.getheader("content-encoding") == "gzip" and len(compressed) < 2 << 20
    inflate, inflated, rest = zlib.decompressobj(31), 0, compressed
    while rest:  # in bounded steps: the point of a bomb is that doing it at once would not fit
        inflated += len(inflate.decompress(rest, 16 << 20))
        rest = inflate.unconsumed_tail
    assert inflated == 1 << 30
    assert fake_teacher.stats()["faults"] == {"redirect": 1, "nomodel": 1, "endless": 1, "bomb": 1}


def test_options_are_defined_once_in_fake_config():
    fields = {field.name for field in dataclasses.fields(FakeConfig)}
    flags = {action.dest for action in _parser()._actions} - {"help", "host", "port", "config_json"}
    assert flags == fields
    argv = ["--rpm", "5", "--no-headers", "--faults", "500=0.5", "--latency", "0.1", "--api-key", "k"]
    given = {k: v for k, v in vars(_parser().parse_args(argv)).items() if k in fields}
    expected = FakeConfig(rpm=5, headers=False, faults={"500": 0.5}, latency_s=0.1, api_key="k")
    assert FakeConfig(**given) == expected


def test_the_fake_has_no_import_cycle():
    folder = Path(FakeTeacher.__module__.replace(".", "/")).parent
    modules = [p for p in (Path(__file__).resolve().parents[1] / folder).glob("*.py") if not p.stem.startswith("__")]
    graph = {
        path.stem: {
            node.module.rsplit(".", 1)[1]
            for node in ast.walk(ast.parse(path.read_text()))  # TYPE_CHECKING imports count too
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("imitate.teacher.fake.")
        }
        for path in modules
    }

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(dep == goal or (dep not in seen and reaches(dep, goal, seen | {dep})) for dep in graph[start])

    assert graph["http"] == set() and "app" not in graph["batches"] | graph["answers"]
    assert not [module for module in graph if reaches(module, module, set())]
