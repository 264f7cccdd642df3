"""The pure half of talking to a teacher (`imitate/teacher/reply.py`): error statuses onto the error tree,
200 bodies into Replies, secrets scrubbed, rate-limit headers and durations parsed. No server, no loop."""

import json

import pytest

from imitate.errors import (
    AuthError,
    BadRequest,
    BadResponse,
    ContentFiltered,
    ContextTooLong,
    ModelNotFound,
    NetworkError,
    QuotaExhausted,
    RateLimited,
    ServerError,
)
from imitate.teacher.reply import (
    error_for_status,
    format_duration,
    parse_duration,
    parse_rate_headers,
    reply_from_body,
    scrub,
)

KEY = "sk-imitate-test-DO-NOT-LEAK-7f3a9c0e"


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
        (404, {"error": {"message": "The model `gpt-9` does not exist", "code": "model_not_found"}}, ModelNotFound),
        (404, {"object": "error", "message": "The model `x` does not exist.", "code": 404}, ModelNotFound),  # vLLM
        (404, {"error": 'model "llama9" not found, try pulling it first'}, ModelNotFound),  # Ollama
        (404, {"error": {"message": "No such batch: batch_1"}}, BadRequest),  # off the chat endpoint
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


def test_any_404_on_the_chat_endpoint_is_model_not_found():
    assert type(error_for_status(404, {}, "Not Found", chat=True)) is ModelNotFound
    assert type(error_for_status(404, {}, "Not Found")) is BadRequest


def test_error_for_status_scrubs_key_url_userinfo_and_key_like_strings():
    message = f"Incorrect API key provided: {KEY}. Also sk-proj-abcdefghijklmnop at http://bob:p@ss-word@host/v1."
    exc = error_for_status(401, {"x-request-id": f"req-{KEY}"}, {"error": {"message": message}}, api_key=KEY)
    for secret in (KEY, "abcdefghijklmnop", "p@ss-word", "bob"):
        assert secret not in str(exc) and secret not in (exc.request_id or "")
    assert "sk-proj-" in str(exc) and "http://***@host/v1" in str(exc)


def test_scrub_leaves_short_secrets_alone():
    assert scrub("a cat and a hat", "a", KEY) == "a cat and a hat"  # a 1-character "secret" would garble
    assert scrub(f"x {KEY} y", "pw", KEY) == "x *** y"


def test_reply_from_body_edge_cases():
    ok = {"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]}
    reply = reply_from_body(json.dumps(ok).encode(), {"x-ratelimit-remaining-requests": "5"}, 0.1)
    assert reply.text == "hi" and reply.usage.total_tokens == 0 and reply.rate.remaining_requests == 5
    echoed = reply_from_body(json.dumps(ok).encode(), {"x-request-id": f"id-{KEY}"}, 0.1, secrets=(KEY,))
    assert echoed.request_id == "id-***"
    no_content = {"choices": [{"message": {"content": None}, "finish_reason": "stop"}]}
    for bad in (b"{", b"[]", b'{"choices": []}', json.dumps(no_content).encode()):
        with pytest.raises(BadResponse):
            reply_from_body(bad, {}, 0.1)


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
