"""A real loopback OpenAI-compatible teacher for tests, the demo and benchmarks.

    python -m imitate.teacher.fake --port 8089 --rpm 600 --tpm 200000 --faults 500=0.02,reset=0.01

Speaks `POST /v1/chat/completions`, `GET /v1/models` and the Batch API (`/v1/files`, `/v1/batches`) over a
plain asyncio HTTP/1.1 server (keep-alive, Content-Length bodies). No framework sits between the socket and the
handler because this server is the ceiling every harvester benchmark is measured against.

- Answers are deterministic explanations built from the prompt: same messages -> same text. `[[len:N]]` in the
  last user turn asks for N body sentences; `max_tokens` truncates with `finish_reason="length"`.
- A judge prompt (one asking for `Rating: [[N]]` or `[[A]]`/`[[B]]`/`[[C]]`) gets a scripted verdict (`judge.py`:
  `[[fake-verdict:V]]` and `[[fake-score:N]]` markers, `judge_bias="A"` for a position-biased judge). `vary=True`
  makes a repeated prompt's k-th ask a different wording, as a teacher sampling at temperature > 0.
- Tokens are estimated (`estimate_tokens`): ceil(chars / 4) per message plus 4 per message.
- Rate limits are OpenAI-style token buckets: capacity = the per-minute limit, refilled continuously at
  limit/60 per second. A request costs 1 request and (prompt estimate + max_tokens) tokens, charged up front
  as OpenAI does; one that does not fit gets a 429 with `retry-after`/`retry-after-ms` and an OpenAI error
  body. Chat responses carry `x-ratelimit-*` headers unless `headers=False` (vLLM / llama.cpp behaviour).
- Faults: `[[fault:KIND]]` in the last user turn fails every attempt of that exact prompt, `[[fault:KINDxN]]`
  only the first N. Random faults: `faults={"500": 0.02, "reset": 0.01}`, drawn from `seed`. KIND is a 4xx/5xx
  code or a name in `NAMED_FAULTS`. In a batch, connection-level faults become a 500 for that line.
- Stats: `GET /fake/stats` or `FakeTeacher.stats()`; `POST /fake/reset` clears stats, buckets and attempts.

Run it (a) in the current loop with `await FakeTeacher(...).start()` (`start(tls=ssl_context)` serves HTTPS, for
certificate tests), (b) from sync code with `running_fake_teacher(process=True|False, **options)` /
`FakeTeacherServer`, (c) via `serve_forever(...)`. Every option is a `FakeConfig` field, defined there once.
"""

from imitate.teacher.fake.answers import (
    NAMED_FAULTS,
    FakeConfig,
    check_faults,
    estimate_tokens,
    fake_answer,
    parse_faults,
    prompt_tokens,
)
from imitate.teacher.fake.app import FakeTeacher, TokenBucket
from imitate.teacher.fake.runner import FakeTeacherServer, main, running_fake_teacher, serve, serve_forever

__all__ = [
    "FakeConfig",
    "FakeTeacher",
    "FakeTeacherServer",
    "NAMED_FAULTS",
    "TokenBucket",
    "check_faults",
    "estimate_tokens",
    "fake_answer",
    "main",
    "parse_faults",
    "prompt_tokens",
    "running_fake_teacher",
    "serve",
    "serve_forever",
]
