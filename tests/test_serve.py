"""`imitate serve` against real clients: the openai SDK (chat, n > 1, streaming, errors, 429), raw sockets
(disconnects), `imitate harvest` through the CLI, and the batch itself against one-at-a-time runs.

A tiny random LLaMA (SmolLM2's tokenizer and chat template, weights drawn with a wide init so that greedy text
depends on the context) is saved to a folder once per module and served from threads on free ports: `server`
(max batch 4, queue 8) for most tests, `small` (max batch 1, queue 0, an API key) for auth, full queue and
disconnects.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import openai
import pytest
import torch
from train_fixtures import smol_tokenizer

from imitate.cli import main
from imitate.records import Message, read_jsonl
from imitate.serve.batch import Batch
from imitate.serve.engine import Engine, Params, Request
from imitate.serve.protocol import ApiError, parse_request, scan_stop
from imitate.serve.run import ServerThread, load_model_parts

pytestmark = pytest.mark.integration
KEY = "sekret-test-key"


def tiny_model(dest: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smol_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.2,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine two threads wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("serve") / "tiny-chat")


@pytest.fixture(scope="module")
def parts(model_dir):
    return load_model_parts(str(model_dir))


@pytest.fixture(scope="module")
def server(parts):
    with ServerThread(parts, max_batch=4, queue=8, threads=1) as s:
        yield s


@pytest.fixture(scope="module")
def small(model_dir):
    with ServerThread(load_model_parts(str(model_dir)), max_batch=1, queue=0, api_key=KEY, threads=1) as s:
        yield s


def client(s: ServerThread, key: str = "unused", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=s.base_url, api_key=key, max_retries=0, timeout=60, **kw)


def stats(s: ServerThread) -> dict:
    with socket.create_connection(("127.0.0.1", s.port)) as sock:
        sock.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b"".join(iter(lambda: sock.recv(65536), b""))
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def reference(parts, messages: list[dict], max_new: int) -> str:
    """One-at-a-time greedy generation with transformers' own generate, on the same rendered prompt."""
    text = parts.fmt.render([Message(**m) for m in messages], generation_prompt=True)
    ids = torch.tensor([parts.tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        out = parts.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
            eos_token_id=parts.fmt.eot_id, pad_token_id=parts.fmt.eot_id,
        )  # fmt: skip
    return parts.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---------------------------------------------------------------------------------------------- the batch


def test_batch_logits_equal_one_at_a_time_as_rows_join_and_leave(parts):
    """Five sequences joining and leaving at different steps, through reallocations from a tiny buffer, give the
    same logits at every step as each sequence run alone in one forward."""
    model = parts.model
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (5, 30, 3, 70, 12)]
    feeds = [torch.randint(0, 1000, (40,), generator=g).tolist() for _ in prompts]
    join, leave = [0, 2, 3, 3, 9], [20, 6, 25, 15, 30]
    batch = Batch(model, max_rows=4, capacity=8)
    rows: list[int] = []
    got: list[list[torch.Tensor]] = [[] for _ in prompts]
    grown = 8
    with torch.inference_mode():
        for step in range(32):
            for r in range(len(rows) - 1, -1, -1):
                if step >= leave[rows[r]]:
                    batch.remove(r)
                    rows[r] = rows[-1]
                    rows.pop()
            for i, p in enumerate(prompts):
                if join[i] == step and len(rows) < 4:
                    cache, logits = batch.prefill(p)
                    got[i].append(logits)
                    batch.add(cache, len(p))
                    rows.append(i)
            if rows:
                logits = batch.decode([feeds[i][len(got[i]) - 1] for i in rows])
                for r, i in enumerate(rows):
                    got[i].append(logits[r])
            grown = max(grown, batch.geo.capacity)
        assert grown > 8  # it did reallocate
        for i, p in enumerate(prompts):
            assert len(got[i]) > 3
            alone = model(input_ids=torch.tensor([p + feeds[i][: len(got[i]) - 1]])).logits[0, len(p) - 1 :]
            torch.testing.assert_close(torch.stack(got[i]), alone.float(), atol=1e-4, rtol=1e-4)
        # All left: the grown buffers are given back, and the next sequence starts from the initial capacity.
        assert batch.rows == 0 and batch.geo.capacity == 8
        assert all(layer.k is None and layer.keys is None for layer in batch.layers)
        p, feed = prompts[3], feeds[3][:12]
        cache, first = batch.prefill(p)
        batch.add(cache, len(p))
        steps = [first] + [batch.decode([t])[0] for t in feed]
        alone = model(input_ids=torch.tensor([p + feed])).logits[0, len(p) - 1 :]
        torch.testing.assert_close(torch.stack(steps), alone.float(), atol=1e-4, rtol=1e-4)


def test_engine_stop_token_and_stop_string_and_length(parts):
    tok = parts.tokenizer
    prompt = tok(parts.fmt.render([Message(role="user", content="hello")], True), add_special_tokens=False)["input_ids"]
    free = Engine(parts.model, tok, set(), max_batch=2, max_model_len=512)
    request = Request(prompt, Params(max_tokens=12, temperature=0.0))
    text = "".join(d.text for _, d in _run(free, request))
    tokens = request.sequences[0].tokens
    assert request.sequences[0].finish == "length" and len(tokens) == 12
    assert text == tok.decode(tokens, skip_special_tokens=True)
    # the third token declared a stop token: "stop" after 3 tokens, its text not added
    stopping = Engine(parts.model, tok, {tokens[2]}, max_batch=2, max_model_len=512)
    request = Request(prompt, Params(max_tokens=12, temperature=0.0))
    deltas = [d for _, d in _run(stopping, request)]
    assert deltas[-1].finish == "stop" and deltas[-1].tokens == 3
    assert "".join(d.text for d in deltas) == tok.decode(tokens[:2], skip_special_tokens=True)
    # a stop string in the middle of the text: cut before it, never streamed
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    request = Request(prompt, Params(max_tokens=12, temperature=0.0, stop=(stop,)))
    deltas = [d for _, d in _run(free, request)]
    assert "".join(d.text for d in deltas) == text[: text.index(stop)] and deltas[-1].finish == "stop"
    # the context limit ends it with "length" too
    short = Engine(parts.model, tok, set(), max_batch=2, max_model_len=len(prompt) + 2)
    request = Request(prompt, Params(max_tokens=100, temperature=0.0))
    assert [d for _, d in _run(short, request)][-1].finish == "length" and len(request.sequences[0].tokens) == 2


def _run(engine: Engine, request: Request) -> list:
    out, admitted = [], [request]
    while admitted or engine.rows:
        out += engine.step(admitted)
        admitted = []
    return out


def test_scan_stop_holds_back_what_may_start_a_stop_string():
    assert scan_stop("hello wor", ["world"], 0) == (None, 6)
    assert scan_stop("hello world!", ["world"], 0) == (6, 6)
    assert scan_stop("abc", ["x", "cd"], 0) == (None, 2)
    assert scan_stop("abc", ["zz"], 0) == (None, 3)
    assert scan_stop("aXbX", ["X"], 2) == (3, 3)  # an earlier hit before `start` was already handled


@pytest.mark.parametrize(
    ("body", "needle", "param"),
    [
        ({}, "messages: Field required", "messages"),
        ({"messages": []}, "messages: List should have at least 1 item", "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", "messages.0.role"),
        ({"messages": ask("x"), "n": 0}, "n: Input should be greater than or equal to 1", "n"),
        ({"messages": ask("x"), "temperature": 3}, "temperature: Input should be less than or equal to 2", None),
        ({"messages": ask("x"), "stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop sequences", "stop"),
        ({"messages": ask("x"), "tools": [{"type": "function"}]}, "tools is not supported", "tools"),
        ([1, 2], "must be a JSON object", None),
    ],
)
def test_bad_requests_name_the_field(body, needle, param):
    with pytest.raises(ApiError) as err:
        parse_request(body)
    assert err.value.status == 400 and needle in err.value.message
    assert param is None or err.value.param == param


# ---------------------------------------------------------------------------------------------- the API


def test_chat_usage_finish_and_models(server, parts):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["tiny-chat"]
    r = c.chat.completions.create(model="tiny-chat", messages=ask("Name three colours."), max_tokens=7, temperature=0)
    prompt = parts.tokenizer(parts.fmt.render([Message(role="user", content="Name three colours.")], True))
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(prompt["input_ids"])
    assert r.usage.completion_tokens == 7 and r.usage.total_tokens == r.usage.prompt_tokens + 7
    assert r.choices[0].message.content == reference(parts, ask("Name three colours."), 7)
    # no system message: the template's default system turn is not there (rendered as in training)
    assert "You are a helpful" not in parts.fmt.render([Message(role="user", content="x")], True)


def test_continuous_batching_equals_one_at_a_time_greedy(server, parts):
    """Eight requests of different prompts and lengths (and one with n=2) at once: rows join and leave the
    running batch at different steps; every text equals transformers' one-at-a-time greedy generate."""
    c = client(server)
    before = stats(server)
    jobs = [(ask(f"Question {i}: " + "why? " * (i * 3)), 5 + 4 * i, 2 if i == 3 else 1) for i in range(8)]
    results: dict[int, list[str]] = {}

    def run(i: int) -> None:
        messages, max_tokens, n = jobs[i]
        r = c.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=max_tokens, temperature=0, n=n)
        results[i] = [ch.message.content for ch in sorted(r.choices, key=lambda ch: ch.index)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    after = stats(server)
    for i, (messages, max_tokens, n) in enumerate(jobs):
        assert results[i] == [reference(parts, messages, max_tokens)] * n, i
    rows_per_step = (after["generated_tokens"] - before["generated_tokens"]) / (after["steps"] - before["steps"])
    assert rows_per_step > 1.5  # they really ran together


def test_streaming_n2_with_usage_matches_the_plain_answer(server):
    c = client(server)
    plain = c.chat.completions.create(model="tiny-chat", messages=ask("Stream me."), max_tokens=9, temperature=0)
    stream = c.chat.completions.create(
        model="tiny-chat", messages=ask("Stream me."), max_tokens=9, temperature=0, n=2, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    texts, finishes, usage = ["", ""], [None, None], None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
            finishes[ch.index] = ch.finish_reason or finishes[ch.index]
    assert texts == [plain.choices[0].message.content] * 2 and finishes == ["length", "length"]
    assert usage.completion_tokens == 18 and usage.prompt_tokens == plain.usage.prompt_tokens


def test_stop_strings_cut_in_stream_and_plain(server):
    c = client(server)
    full = c.chat.completions.create(model="tiny-chat", messages=ask("Stop me."), max_tokens=20, temperature=0)
    text = full.choices[0].message.content
    stop = text[8:11]
    r = c.chat.completions.create(
        model="tiny-chat", messages=ask("Stop me."), max_tokens=20, temperature=0, stop=[stop, "\u2603"]
    )
    assert r.choices[0].message.content == text[: text.index(stop)] and r.choices[0].finish_reason == "stop"
    chunks = c.chat.completions.create(
        model="tiny-chat", messages=ask("Stop me."), max_tokens=20, temperature=0, stop=stop, stream=True
    )
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == r.choices[0].message.content


def test_seed_reproduces_a_sample_whatever_runs_beside_it(server):
    c = client(server)

    def sample(seed: int) -> str:
        r = c.chat.completions.create(
            model="tiny-chat", messages=ask("Tell me."), max_tokens=12, temperature=1.0, top_p=0.9, seed=seed
        )
        return r.choices[0].message.content

    alone = sample(7)
    noise = [threading.Thread(target=sample, args=(100 + i,)) for i in range(3)]
    for t in noise:
        t.start()
    busy = sample(7)
    for t in noise:
        t.join(60)
    assert busy == alone
    assert len({sample(s) for s in (1, 2, 3)} | {alone}) == 4
    two = c.chat.completions.create(
        model="tiny-chat", messages=ask("Tell me."), max_tokens=12, temperature=1.0, n=2, seed=7
    )
    assert two.choices[0].message.content != two.choices[1].message.content


def test_http_errors_are_openai_shaped(server):
    c = client(server)
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="tiny-chat", messages=ask("x"), max_tokens=600)
    body = err.value.body
    assert body["code"] == "context_length_exceeded" and "maximum context length is 512" in body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="tiny-chat", messages=[{"role": "tool", "content": "x"}])
    assert err.value.body["type"] == "invalid_request_error" and err.value.body["param"] == "messages.0.role"
    with pytest.raises(openai.BadRequestError, match="at most 4"):
        c.chat.completions.create(model="tiny-chat", messages=ask("x"), n=5)
    with pytest.raises(openai.NotFoundError) as err:
        c.chat.completions.create(model="gpt-4o", messages=ask("x"))
    assert err.value.body["code"] == "model_not_found" and "serves `tiny-chat`" in err.value.body["message"]
    status, raw = _raw(server.port, b"POST /v1/chat/completions", b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(raw)["error"]["message"]
    status, raw = _raw(server.port, b"GET /v1/nothing", b"")
    assert status == 404 and json.loads(raw)["error"]["message"].startswith("GET /v1/nothing")


def _raw(port: int, head: bytes, body: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            head + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        data = b"".join(iter(lambda: sock.recv(65536), b""))
    return int(data.split(b" ", 2)[1]), data.split(b"\r\n\r\n", 1)[1]


def test_api_key_is_required_when_configured(small):
    with pytest.raises(openai.AuthenticationError) as err:
        client(small, "wrong").models.list()
    assert err.value.body["code"] == "invalid_api_key"
    status, _ = _raw(small.port, b"GET /v1/models", b"")
    assert status == 401
    assert [m.id for m in client(small, KEY).models.list().data] == ["tiny-chat"]


def test_full_queue_gets_429_with_retry_after_and_a_stream_disconnect_frees_the_slot(small):
    c = client(small, KEY)
    done_before = stats(small)
    stream = c.chat.completions.create(
        model="tiny-chat", messages=ask("Go on."), max_tokens=480, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    next(iter(stream))  # it is running: the only row is taken and the queue is 0
    with pytest.raises(openai.RateLimitError) as err:
        c.chat.completions.create(model="tiny-chat", messages=ask("me too"), max_tokens=4)
    headers = err.value.response.headers
    assert int(headers["retry-after"]) >= 1 and int(headers["retry-after-ms"]) > 0
    assert headers["x-ratelimit-remaining-requests"] == "0" and headers["x-ratelimit-reset-requests"].endswith("s")
    assert err.value.body["code"] == "rate_limit_exceeded"
    stream.close()  # the client leaves mid-stream
    wait_for(lambda: stats(small)["running"] == 0)
    after = stats(small)
    assert after["cancelled"] == done_before["cancelled"] + 1 and after["rejected"] == done_before["rejected"] + 1
    r = c.chat.completions.create(model="tiny-chat", messages=ask("now?"), max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason == "length"  # the slot was freed, the server still answers


def test_a_plain_request_whose_client_leaves_frees_its_slot(small):
    before = stats(small)
    body = json.dumps({"messages": ask("long"), "max_tokens": 480, "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", small.port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )  # fmt: skip
    wait_for(lambda: stats(small)["running"] == 1)
    sock.close()
    wait_for(lambda: stats(small)["running"] == 0)
    after = stats(small)
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"]


def test_imitate_harvest_against_the_server(server, tmp_path: Path):
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"id": f"q{i}", "question": f"Why is {i} odd?"}) + "\n" for i in range(6)))
    out = tmp_path / "out"
    code = main(
        ["harvest", str(queries), "--out", str(out), "--base-url", server.base_url, "--model", "tiny-chat",
         "--preset", "orca", "--set", "harvest.params.max_tokens=16", "--quiet"]
    )  # fmt: skip
    assert code == 0
    records = [r for shard in sorted(out.glob("shard-*.jsonl")) for r in read_jsonl(shard)]
    assert sorted(r.query.id for r in records) == [f"q{i}" for i in range(6)]
    for r in records:
        assert r.status == "ok" and r.provenance.model == "tiny-chat"
        assert r.provenance.usage.completion_tokens <= 16 and r.provenance.finish_reason in {"stop", "length"}
        assert r.messages[0].role == "system"  # the orca preset's system message went through the template


def test_harvest_backs_off_on_429_and_completes(small, tmp_path: Path, monkeypatch):
    """One row and no queue: a harvest's concurrent requests are mostly refused with 429 + Retry-After at first;
    imitate's limiter pauses and narrows, and every row is answered."""
    monkeypatch.setenv("SERVE_TEST_KEY", KEY)
    before = stats(small)
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"id": f"q{i}", "question": f"Why {i}?"}) + "\n" for i in range(8)))
    out = tmp_path / "out"
    code = main(
        ["harvest", str(queries), "--out", str(out), "--base-url", small.base_url, "--model", "tiny-chat",
         "--api-key-env", "SERVE_TEST_KEY", "--preset", "none", "--set", "harvest.params.max_tokens=8", "--quiet"]
    )  # fmt: skip
    assert code == 0
    records = [r for shard in sorted(out.glob("shard-*.jsonl")) for r in read_jsonl(shard)]
    assert len(records) == 8 and all(r.status == "ok" for r in records)
    assert stats(small)["rejected"] > before["rejected"]  # it was pushed back, and came back


def test_dtype_auto_is_bf16_only_where_the_cpu_has_it():
    from imitate.errors import ConfigError
    from imitate.serve.run import pick_dtype

    assert pick_dtype("auto", "fpu avx2 avx512f avx512_bf16 fma") == "bfloat16"
    assert pick_dtype("auto", "fpu avx2 amx_bf16") == "bfloat16"
    assert pick_dtype("auto", "fpu avx2 avx512f") == "float32"
    assert pick_dtype("float32", "avx512_bf16") == "float32"
    with pytest.raises(ConfigError, match="--dtype half"):
        pick_dtype("half")


@pytest.mark.slow
def test_smollm2_continuous_batching_equals_one_at_a_time_greedy():
    """The real student (SmolLM2-135M GGUF, fp32): six requests at once, different prompts and lengths, each
    answer equal to transformers' one-at-a-time greedy generate of the same rendered prompt."""
    from train_fixtures import require_gguf

    parts = load_model_parts(str(require_gguf()), dtype="float32")
    questions = [
        "What is the capital of France?", "Explain photosynthesis in two sentences.", "Write a haiku about rain.",
        "List three prime numbers.", "Why is the sky blue?", "Give me a tip for learning Python.",
    ]  # fmt: skip
    lengths = [12, 40, 24, 16, 48, 32]
    results: dict[int, str] = {}
    with ServerThread(parts, max_batch=6, queue=0) as s:
        c = client(s)

        def run(i: int) -> None:
            r = c.chat.completions.create(
                model=parts.name, messages=ask(questions[i]), max_tokens=lengths[i], temperature=0
            )
            results[i] = r.choices[0].message.content

        threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert stats(s)["completed"] == 6
    for i, q in enumerate(questions):
        assert results[i] == reference(parts, ask(q), lengths[i]), q


def test_the_command_binds_loopback_announces_and_stops_on_ctrl_c(model_dir, tmp_path: Path):
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "SERVE_KEY": KEY}
    cmd = [sys.executable, "-m", "imitate.cli", "serve", str(model_dir), "--port", "0", "--api-key-env", "SERVE_KEY"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("imitate serve: `tiny-chat` listening on http://127.0.0.1:"), line + proc.stderr.read()
        base_url = line.split(" listening on ", 1)[1].split()[0]
        c = openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0)
        r = c.chat.completions.create(model="tiny-chat", messages=ask("hi"), max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in err, err


def test_a_missing_key_variable_is_one_line_before_loading(model_dir, capsys, monkeypatch):
    monkeypatch.delenv("SERVE_NOPE", raising=False)
    assert main(["serve", str(model_dir), "--api-key-env", "SERVE_NOPE"]) == 2
    assert "ConfigError: environment variable SERVE_NOPE (--api-key-env) is not set" in capsys.readouterr().err


def test_the_429_headers_read_as_imitate_s_limiter_reads_them():
    from imitate.serve.protocol import busy_error
    from imitate.teacher.reply import parse_rate_headers

    err = busy_error(32, 2.5, 120)
    assert err.status == 429 and err.body()["error"]["code"] == "rate_limit_exceeded"
    rate = parse_rate_headers(err.headers)
    assert (rate.retry_after_s, rate.limit_requests, rate.remaining_requests, rate.reset_requests_s) == (
        2.5, 120, 0, 2.5,
    )  # fmt: skip
    assert err.headers["retry-after"] == "3"  # whole seconds, rounded up, for clients that read only that
    assert "x-ratelimit-limit-requests" not in busy_error(32, 1.0, None).headers  # no pace measured yet


def test_an_adapter_is_served_merged(model_dir, parts, tmp_path: Path):
    """MODEL may be an adapter folder: its base (from imitate.json) plus the LoRA weights, merged in memory; the
    served logits are base + adapter's, not the base's."""
    from peft import LoraConfig, get_peft_model

    base = load_model_parts(str(model_dir)).model
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    adapter = tmp_path / "my-adapter"
    lora.save_pretrained(adapter)
    parts.tokenizer.save_pretrained(adapter)
    (adapter / "imitate.json").write_text(json.dumps({"base_model": str(model_dir)}))
    served = load_model_parts(str(adapter))
    assert served.name == "my-adapter" and not hasattr(served.model, "merge_and_unload")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        expected = lora(input_ids=ids).logits
        got = served.model(input_ids=ids).logits
        assert (expected - parts.model(input_ids=ids).logits).abs().max() > 1e-2  # the adapter changes the model
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    engine = Engine(served.model, served.tokenizer, set(), max_batch=1, max_model_len=512)
    request = Request([1, 2, 3, 4, 5], Params(max_tokens=3, temperature=0.0))
    assert len(_run(engine, request)) >= 1 and request.sequences[0].tokens[0] == int(expected[0, -1].argmax())
