"""Curation gates: each looks at one Record and says keep (None) or drop (a one-line reason).

In the order `build_gates` runs them (cheap and stateless first; the indexes last, so they only ever hold rows
that every other gate kept):

    failed            status "failed" (the request never produced an answer)
    truncated         finish_reason "length" or record.truncated (the answer was cut off)
    empty             no words in the answer
    too_short         fewer than min_words words, or fewer than min_steps reasoning steps
    too_long          the whole conversation over max_tokens (student's tokenizer) or max_words
    refusal           a refusal near the start of an assistant turn, or an AI disclaimer anywhere in one
    language          the conversation's language not in `languages` (py3langid, imitate/dataset/language.py)
    exact_duplicate   the normalised text repeats a kept row's (dedup.py)
    near_duplicate    MinHash + LSH collision with a kept row (dedup.py; with select.per_cluster: no drop,
                      the row joins that row's cluster and selection caps the cluster instead)
    similar_instruction  ROUGE-L of the question above max_rouge against a kept question (similarity.py)

Stateless gates are plain functions `Record -> str | None`. The index gates are small classes with the same
`__call__` plus `commit(record)`, called once the row is kept by every gate: a row dropped later in the chain is
never indexed, so nothing is reported as a duplicate of a row that is not in the output.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from imitate.dataset.curate_config import GateConfig, TextField
from imitate.dataset.phrases import PhraseList, PhraseMatcher, read_extra_phrases
from imitate.errors import ConfigError
from imitate.records import Record

GATE_NAMES = (
    "failed",
    "truncated",
    "empty",
    "too_short",
    "too_long",
    "refusal",
    "language",
    "exact_duplicate",
    "near_duplicate",
    "similar_instruction",
)

# A reasoning step: a numbered line ("1." "2)" "Step 3:"), or a bulleted one ("- " "* " "• ").
_STEP = re.compile(r"^\s*(?:\d{1,3}[.)]\s|step\s+\d+\b|[-*\u2022]\s)", re.IGNORECASE | re.MULTILINE)


class Gate(Protocol):
    def __call__(self, record: Record) -> str | None: ...


@dataclass
class NamedGate:
    name: str
    check: Gate


# ---------------------------------------------------------------------------------------------- texts


def answer(record: Record) -> str:
    return record.response or ""


def assistant_texts(record: Record) -> list[str]:
    """Every assistant turn the student is trained on: earlier ones in `messages`, then the response."""
    return [m.content for m in record.messages if m.role == "assistant"] + [answer(record)]


def text_of(record: Record, field: TextField) -> str:
    """What a duplicate gate compares: the last question, the answer, or the conversation without the system
    message (shared boilerplate would make unrelated rows look alike)."""
    if field == "question":
        return record.query.question
    if field == "response":
        return answer(record)
    return "\n".join([*(m.content for m in record.messages if m.role != "system"), answer(record)])


def full_text(record: Record) -> str:
    """Everything the student reads and writes: all messages and the answer."""
    return "\n".join([*(m.content for m in record.messages), answer(record)])


def count_steps(text: str) -> int:
    return len(_STEP.findall(text))


# ---------------------------------------------------------------------------------------------- stateless gates


def failed(record: Record) -> str | None:
    if record.status == "failed":
        return f"request failed: {record.error_class or 'error'}: {(record.error_message or '')[:120]}".rstrip(": ")
    return None


def truncated(record: Record) -> str | None:
    if record.provenance.finish_reason == "length":
        return "finish_reason=length (cut by max_tokens)"
    if record.truncated:
        return "truncated answer"
    return None


def empty(record: Record) -> str | None:
    return None if answer(record).split() else "empty answer"


def too_short(min_words: int, min_steps: int) -> Gate:
    def gate(record: Record) -> str | None:
        words = len(answer(record).split())
        if words < min_words:
            return f"{words} words < min_words {min_words}"
        if min_steps and (steps := count_steps(answer(record))) < min_steps:
            return f"{steps} reasoning steps < min_steps {min_steps}"
        return None

    return gate


def too_long(limit: int, count: Callable[[str], int], unit: str) -> Gate:
    def gate(record: Record) -> str | None:
        n = count(full_text(record))
        return f"{n} {unit} > {limit}" if n > limit else None

    return gate


def refusal(matcher: PhraseMatcher) -> Gate:
    def gate(record: Record) -> str | None:
        for text in assistant_texts(record):
            if found := matcher.find(text):
                return f"{found[0]}: {found[1]!r}"
        return None

    return gate


def language(wanted: frozenset[str], min_confidence: float) -> Gate:
    from imitate.dataset.language import detect

    def gate(record: Record) -> str | None:
        lang, p = detect(text_of(record, "conversation")[:4000])
        if lang in wanted and p >= min_confidence:
            return None
        return f"language {lang} ({p:.2f}), want {','.join(sorted(wanted))} with p >= {min_confidence}"

    return gate


# ---------------------------------------------------------------------------------------------- token counts


def load_tokenizer_counter(path: str) -> Callable[[str], int]:
    """Token counts with the student's own tokenizer (`tokenizers`, imported only here): a tokenizer.json file,
    or a model folder holding one. Special tokens of the chat template are not counted."""
    from tokenizers import Tokenizer

    file = Path(path).expanduser()
    if file.is_dir():
        file = file / "tokenizer.json"
    if not file.is_file():
        raise ConfigError(f"tokenizer {path}: no tokenizer.json there", hint="give the student's tokenizer.json")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as exc:  # the Rust side raises a bare Exception for any unreadable file
        raise ConfigError(f"tokenizer {file}: cannot load ({str(exc).splitlines()[0]})") from exc
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)


def count_words(text: str) -> int:
    return len(text.split())


# ---------------------------------------------------------------------------------------------- index gates


class ExactDuplicateGate:
    def __init__(self, field: TextField):
        from imitate.dataset.dedup import ExactDuplicateIndex, text_hash

        self.field, self.index, self._hash = field, ExactDuplicateIndex(), text_hash
        self._pending = b""

    def __call__(self, record: Record) -> str | None:
        self._pending = self._hash(text_of(record, self.field))
        first = self.index.first(self._pending)
        return f"exact duplicate of {first}" if first is not None else None

    def commit(self, record: Record) -> None:
        self.index.add(self._pending, record.id)


class NearDuplicateGate:
    """Drops a row colliding with a kept row; in cluster mode keeps it and remembers its cluster (the key of the
    kept row it collides with, or its own id) for selection to cap."""

    def __init__(self, config, *, cluster_mode: bool = False):
        from imitate.dataset.dedup import NearDuplicateIndex

        self.field, self.cluster_mode = config.field, cluster_mode
        self.index = NearDuplicateIndex(config.threshold, config.num_perm, config.shingle, config.unit)
        self.cluster: str | None = None
        self._pending: tuple[str | None, list[int]] = (None, [])

    def __call__(self, record: Record) -> str | None:
        head, hashes = self.index.check(text_of(record, self.field))
        self._pending = (head, hashes)
        self.cluster = head if head is not None else record.id
        if head is not None and not self.cluster_mode:
            return f"near-duplicate of {head}"
        return None

    def commit(self, record: Record) -> None:
        head, hashes = self._pending
        if head is None:
            self.index.add(record.id, hashes)


class SimilarInstructionGate:
    def __init__(self, threshold: float):
        from imitate.dataset.similarity import RougeIndex

        self.threshold, self.index, self._ids = threshold, RougeIndex(), []

    def __call__(self, record: Record) -> str | None:
        score, pos = self.index.best(record.query.question, self.threshold)
        if score > self.threshold:
            return f"ROUGE-L {score:.3f} > {self.threshold} against the question of {self._ids[pos]}"
        return None

    def commit(self, record: Record) -> None:
        self.index.add(record.query.question)
        self._ids.append(record.id)


# ---------------------------------------------------------------------------------------------- the chain


def phrase_lists(cfg: GateConfig, shipped: PhraseList) -> tuple[list[str], list[str]]:
    """(refusals, disclaimers): the shipped lists, then `extra_phrases`, then the phrases file's."""
    refusals, disclaimers = list(shipped.refusals), [*shipped.disclaimers, *cfg.extra_phrases]
    if cfg.phrases_file:
        more_refusals, more_disclaimers = read_extra_phrases(cfg.phrases_file)
        refusals += more_refusals
        disclaimers += more_disclaimers
    return refusals, disclaimers


def build_gates(cfg: GateConfig, shipped: PhraseList, *, cluster_mode: bool = False) -> list[NamedGate]:
    """The enabled gates in GATE_NAMES order. With `cluster_mode` the near-duplicate gate runs even when
    disabled, to give selection its clusters, and drops nothing."""
    gates: list[NamedGate] = []

    def add(name: str, check: Gate) -> None:
        gates.append(NamedGate(name, check))

    if cfg.failed:
        add("failed", failed)
    if cfg.truncated:
        add("truncated", truncated)
    if cfg.min_words > 0:
        add("empty", empty)
    if cfg.min_words > 1 or cfg.min_steps > 0:
        add("too_short", too_short(cfg.min_words, cfg.min_steps))
    if cfg.max_tokens is not None and cfg.tokenizer is not None:
        add("too_long", too_long(cfg.max_tokens, load_tokenizer_counter(cfg.tokenizer), "tokens"))
    elif cfg.max_words is not None:
        add("too_long", too_long(cfg.max_words, count_words, "words"))
    if cfg.refusal:
        add("refusal", refusal(PhraseMatcher(*phrase_lists(cfg, shipped), cfg.refusal_window)))
    if cfg.languages:
        add("language", language(frozenset(c.strip().lower() for c in cfg.languages), cfg.min_language_confidence))
    if cfg.exact_dedup:
        add("exact_duplicate", ExactDuplicateGate(cfg.exact_field))
    if cfg.near_dup.enabled or cluster_mode:
        add("near_duplicate", NearDuplicateGate(cfg.near_dup, cluster_mode=cluster_mode))
    if cfg.max_rouge is not None:
        add("similar_instruction", SimilarInstructionGate(cfg.max_rouge))
    return gates
