"""The data contract every stage reads and writes: Message, Query, GenerationParams, Request, Usage, Provenance, Record.

A `Query` is what the user wants answered (one question, or a multi-turn conversation ending in a user turn).
A `Request` is one concrete call to one teacher (system message chosen, params fixed, sample index); its
`key()` is the stable content hash used as cache and resume key. A `Record` is the outcome of a request —
completed or failed — with full provenance. Records serialise to one JSON line each.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Role = Literal["system", "user", "assistant"]
Status = Literal["ok", "failed"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the same content always hashes the same."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def unit_hash(*parts: object) -> float:
    """A stable number in [0, 1) from the parts (routing, subsets, system-message draws): the same parts always
    land in the same place; nothing else (no order, no global RNG) goes in."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class Message(_Model):
    role: Role
    content: str


class Query(_Model):
    """One input row. `turns` holds earlier turns of a multi-turn conversation (before `question`)."""

    id: str
    question: str
    system: str | None = None
    collection: str | None = None
    turns: list[Message] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @staticmethod
    def stable_id(question: str, system: str | None = None, turns: Iterable[Message] = ()) -> str:
        """An id derived from content, for inputs that carry none: the same row always gets the same id."""
        payload = canonical_json(
            {"q": question, "s": system, "t": [m.model_dump() for m in turns]},
        )
        return "q-" + sha256_text(payload)[:16]

    def messages(self, system: str | None) -> list[Message]:
        """The chat to send: system turn only when the system message is non-empty, then turns, then question."""
        out = [Message(role="system", content=system)] if system else []
        out.extend(self.turns)
        out.append(Message(role="user", content=self.question))
        return out


class GenerationParams(_Model):
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(1024, ge=1)
    seed: int | None = None
    stop: list[str] | None = None

    def api_kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class Request(_Model):
    """One call to one teacher. `key()` covers exactly what changes the answer (and nothing that does not)."""

    query_id: str
    teacher: str
    model: str
    base_url: str
    messages: list[Message]
    params: GenerationParams = Field(default_factory=GenerationParams)
    sample_index: int = 0
    system_prompt_id: str | None = None
    system_prompt_sha256: str | None = None

    def key(self) -> str:
        payload = {
            "model": self.model,
            "base_url": self.base_url.rstrip("/"),
            "messages": [m.model_dump() for m in self.messages],
            "params": self.params.api_kwargs(),
            "sample_index": self.sample_index,
        }
        return sha256_text(canonical_json(payload))


class Usage(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            total_tokens=self.total_tokens + other.total_tokens,
        )


class Source(_Model):
    """Where a row that imitate did not harvest itself came from (an imported file, folder or Hub dataset)."""

    uri: str  # the file or folder path as given, or the Hub dataset name
    row: int  # 0-based row index in that file/dataset (for JSONL: the 0-based line's row, blank lines not counted)
    format: str  # the format it was read as: openorca, sharegpt, alpaca, messages, imitate
    split: str | None = None  # the dataset split, for a Hub dataset or a save_to_disk DatasetDict


class Provenance(_Model):
    """Where a row came from. Never holds secrets: the API key is not in the request or here.

    A record made from foreign data (`imitate convert`, `imitate import`, `imitate train` on an OpenOrca file...)
    has `teacher="imported"`, `model` the model named in the row (ShareGPT's `model` field) or "unknown",
    `base_url=""`, `request_key` the sha256 of its conversation, and `source` saying where it was read.
    `erased_system` is set when `imitate curate --erase-system` replaced the system message the teacher saw
    (`system_prompt_id`/`system_prompt_sha256` keep naming the original).
    For a teacher with several servers (`base_urls`), `base_url` names the teacher (the URL its cache key uses,
    whichever server answered) and `replica` the server that answered (of a failed row: the last one asked).
    """

    teacher: str
    model: str
    base_url: str
    request_key: str
    system_prompt_id: str | None = None
    system_prompt_sha256: str | None = None
    params: GenerationParams = Field(default_factory=GenerationParams)
    sample_index: int = 0
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float = 0.0
    finish_reason: str | None = None
    attempts: int = 1
    latency_s: float = 0.0
    request_id: str | None = None
    created_at: float | None = None
    imitate_version: str | None = None
    source: Source | None = None
    erased_system: Literal["generic", "none"] | None = None
    replica: str | None = None  # the server of a fleet teacher that answered (redacted URL); None: one server


class Record(_Model):
    """The outcome of one request: a completed answer (status ok) or a recorded failure (status failed)."""

    id: str
    query: Query
    messages: list[Message]
    response: str | None = None
    status: Status = "ok"
    truncated: bool = False
    error_class: str | None = None
    error_message: str | None = None
    provenance: Provenance
    scores: dict[str, float] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Record:
        if self.status == "ok" and self.response is None:
            raise ValueError("a completed record needs a response")
        if self.status == "failed" and not self.error_class:
            raise ValueError("a failed record needs an error_class")
        return self

    def conversation(self) -> list[Message]:
        """The full chat for training: prompt messages plus the answer (when there is one)."""
        if self.response is None:
            return list(self.messages)
        return [*self.messages, Message(role="assistant", content=self.response)]

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)

    @classmethod
    def from_json(cls, line: str) -> Record:
        return cls.model_validate_json(line)


def write_jsonl(path: Path, records: Iterable[Record]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(r.to_json() + "\n")
            n += 1
    return n


def read_jsonl(path: Path) -> Iterator[Record]:
    """Stream records; a bad line raises InputError naming file:line."""
    from imitate.errors import InputError

    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield Record.from_json(line)
            except ValueError as exc:
                first = str(exc).splitlines()[0]
                raise InputError(f"{path}:{lineno}: not a valid record ({first})") from exc
