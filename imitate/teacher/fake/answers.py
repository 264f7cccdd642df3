"""What the fake teacher says: its configuration, fault names and parsing, token estimates, and the
deterministic step-by-step answers built from the prompt (same messages -> same text). A prompt ending in an
open numbered task ("N. Instruction:", a Self-Instruct request) gets a list of tasks instead (`tasks.py`), and a
judge prompt (a `Rating: [[N]]` or `[[A]]`/`[[B]]` verdict asked for) a scripted verdict (`judge.py`)."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any

from imitate.errors import ConfigError
from imitate.teacher.fake.judge import fake_judgement, judge_kind
from imitate.teacher.fake.tasks import continues_task_list, fake_task_list

NAMED_FAULTS = {
    "reset": "close the connection without answering",
    "hang": "answer only after hang_s (tests client timeouts)",
    "slow": "send the body in pieces over slow_s",
    "malformed": "200 with invalid JSON",
    "empty": "200 with choices: []",
    "nomessage": "200 with a choice lacking its message",
    "length": "200, answer truncated, finish_reason length",
    "filter": "200, content null, finish_reason content_filter",
    "quota": "429 insufficient_quota",
    "context": "400 context_length_exceeded",
    "policy": "400 content_policy_violation",
    "auth": "401 invalid_api_key",
    "nomodel": "404 model_not_found",
    "redirect": "307 to another URL (clients must not follow a POST)",
    "endless": "200 with a chunked body that never ends",
    "bomb": "200 with a 1 MB gzip body that inflates to 1 GiB",
    "cut": "200 whose body stops halfway (connection reset)",
    "badgzip": "200 marked gzip whose body is not",
}
CONNECTION_FAULTS = {"reset", "hang", "slow", "malformed", "endless", "bomb", "cut", "badgzip"}  # batch: a 500
FAULT_MARK = re.compile(r"\[\[fault:([a-z]+|\d{3})(?:x(\d+))?\]\]")
_LEN_MARK = re.compile(r"\[\[len:(\d+)\]\]")
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9'-]{3,}")
_STOP = frozenset("what which when where that this with from does have about into your during there".split())  # noqa: SIM905


def _option(default: Any, help: str) -> Any:
    """A FakeConfig field with its help text: `python -m imitate.teacher.fake --help` is built from these."""
    if isinstance(default, dict):
        return dataclasses.field(default_factory=dict, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class FakeConfig:
    """Every option of the fake teacher, defined here once (FakeTeacher, FakeTeacherServer, `serve` and the
    command line all take these names)."""

    model: str = _option("fake-teacher", "model id reported by /v1/models and in answers")
    rpm: int | None = _option(None, "requests-per-minute token bucket (none: unlimited)")
    tpm: int | None = _option(None, "tokens-per-minute token bucket (none: unlimited)")
    headers: bool = _option(True, "send x-ratelimit-* and retry-after (off: like vLLM / llama.cpp)")
    faults: dict[str, float] = _option({}, "random faults, e.g. 500=0.02,reset=0.01 (a dict or that text)")
    seed: int = _option(0, "seed of the random faults and jitter")
    latency_s: float = _option(0.0, "seconds before every answer")
    jitter_s: float = _option(0.0, "extra uniform random seconds before every answer")
    sentences: int = _option(4, "body sentences per answer")
    list_items: int = _option(8, "tasks written when a prompt ends in an open 'N. Instruction:' (Self-Instruct)")
    judge_bias: str | None = _option(None, "A or B: every pairwise judge verdict picks that position (judge.py)")
    vary: bool = _option(False, "the k-th ask of the same messages gets answer variant k (a sampling teacher)")
    api_key: str | None = _option(None, "when set, requests must send `Authorization: Bearer <api_key>`")
    hang_s: float = _option(3600.0, "how long the hang fault waits")
    slow_s: float = _option(0.5, "how long the slow fault takes to send a body")
    retry_after_s: float = _option(0.05, "what a scripted 429 asks the client to wait")
    batch_delay_s: float = _option(0.05, "pause before each batch state change")
    default_max_tokens: int = _option(1024, "TPM charge for a request without max_tokens")

    def __post_init__(self) -> None:
        self.faults = parse_faults(self.faults) if isinstance(self.faults, str) else check_faults(self.faults)
        if self.judge_bias not in (None, "A", "B"):
            raise ConfigError(f"judge_bias {self.judge_bias!r}: expected A or B")


def parse_faults(text: str | None) -> dict[str, float]:
    """'500=0.02,reset=0.01' -> {'500': 0.02, 'reset': 0.01}; bad items raise one ConfigError naming each."""
    out, problems = {}, []
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        kind, _, prob = item.partition("=")
        try:
            out[kind.strip()] = float(prob)
        except ValueError:
            problems.append(f"{item!r}: expected KIND=PROBABILITY")
    if problems:
        raise ConfigError("bad --faults", problems=problems)
    return check_faults(out)


def check_faults(faults: dict[str, float]) -> dict[str, float]:
    problems = []
    for kind, prob in faults.items():
        if kind not in NAMED_FAULTS and not re.fullmatch(r"[45]\d\d", kind):
            problems.append(f"{kind!r}: unknown fault (a 4xx/5xx code or one of {', '.join(NAMED_FAULTS)})")
        elif not 0.0 <= prob <= 1.0:
            problems.append(f"{kind}={prob}: probability must be within 0..1")
    if sum(faults.values()) > 1.0 + 1e-9:
        problems.append("fault probabilities add up to more than 1")
    if problems:
        raise ConfigError("bad faults", problems=problems)
    return dict(faults)


# ---------------------------------------------------------------------------------------------- answers


def estimate_tokens(text: str | None) -> int:
    return (len(text) + 3) // 4 if text else 0


def _text(content: Any) -> str:
    if isinstance(content, list):  # content parts
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    return sum(estimate_tokens(_text(m.get("content"))) + 4 for m in messages)


def digest(messages: list[dict[str, Any]]) -> bytes:
    """A hash of roles and contents: cheaper than canonical JSON, and the answer depends on nothing else."""
    return hashlib.sha256(
        "\x00".join(f"{m.get('role')}\x01{_text(m.get('content'))}" for m in messages).encode()
    ).digest()


def last_user(messages: list[dict[str, Any]]) -> str:
    return next((_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")


_OPENERS = (
    "Let's work through this carefully.",
    "Here is how to think about it.",
    "Good question, so let's reason it out.",
    "We can answer this in a few steps.",
)
_STEPS = (
    "First, pin down what {a} means here and why it matters for the question.",
    "Next, relate {a} to {b}, because the answer depends on how the two interact.",
    "Take a concrete case: when {b} changes, {c} follows in a predictable way.",
    "Then check the assumption behind {c}; it holds because the question is really about {a}.",
    "Comparing {c} with {b} separates what is essential from what is incidental.",
    "Putting these together, {a} accounts for most of what we observe about {c}.",
)


def fake_answer(
    messages: list[dict[str, Any]],
    sentences: int = 4,
    list_items: int = 8,
    *,
    seed: int | None = None,
    judge_bias: str | None = None,
    variant: int = 0,
) -> str:
    """A deterministic step-by-step explanation that quotes the question and follows the system style (or, for
    a prompt ending in "N. Instruction:", `list_items` more numbered tasks; for a judge prompt, a verdict that
    may depend on the request's `seed`). `variant` k > 0 words the explanation differently (the k-th sample)."""
    system = " ".join(_text(m.get("content")) for m in messages if m.get("role") == "system").lower()
    question = last_user(messages)
    if (kind := judge_kind(question)) is not None:
        return fake_judgement(question, kind, seed=seed, bias=judge_bias)
    if (first := continues_task_list(question)) is not None:
        return fake_task_list(question, first, list_items, digest(messages))
    if marker := _LEN_MARK.search(question):
        sentences = int(marker.group(1))
    if "brief" in system or "concise" in system:
        sentences = min(sentences, 2)
    question = " ".join(_LEN_MARK.sub("", FAULT_MARK.sub("", question)).split())
    hashed = digest(messages)
    if variant:
        hashed = hashlib.sha256(hashed + variant.to_bytes(8, "big")).digest()
    words = list(dict.fromkeys(w for w in _WORD.findall(question) if w.lower() not in _STOP))
    words += ["the idea", "the details", "the result"][len(words) :]
    topic = question if len(question) <= 70 else question[:70].rsplit(" ", 1)[0]
    parts = [_OPENERS[hashed[0] % len(_OPENERS)], f'The question is "{topic.rstrip("?.! ")}".']
    if "child" in system or "simple" in system:
        parts.append("Think of it like explaining to a friend, one small idea at a time.")
    for i in range(sentences):
        a, b, c = (words[(hashed[(1 + i + j) % len(hashed)] + j) % len(words)] for j in range(3))
        step = _STEPS[(hashed[1] + i) % len(_STEPS)].format(a=a, b=b, c=c)
        parts.append(f"Step {i + 1}: {step}" if "step" in system else step)
    parts.append(f"So, in short: it comes down to {words[0]} and {words[1]}.")
    return " ".join(parts)
