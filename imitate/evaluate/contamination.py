"""Contamination check: which eval items share a 13-gram of words with the student's training records.

    index = NgramIndex.of(items, n=13)                     # the eval side: the only thing held in memory
    flagged = index.scan(read_records("train.jsonl"))      # streams the training records once
    flagged: {item_id: first training record id that overlaps}

The GPT-3 paper's rule: an eval item is "dirty" when any 13-gram of its words also occurs in the training data.
Words are compared normalised (NFKC, case-folded, punctuation dropped, split on anything that is not a letter or
digit), so formatting does not hide a copy. An item's text is its question, then its choices (then the reference
answer, for generation items), as one run of words; a training record's text is every message of its conversation,
answer included, as one run of words (the student saw them in one sequence). An item shorter than n words is
flagged when all of its words occur in that order in one record (it has no 13-gram; its whole text is the
strictest test it can have — a bare short choice such as "Paris" is never tested on its own).

Memory is the eval n-gram set (a few thousand tuples for a few hundred items); the training data streams.
Candidate windows are tested only where the first word is the first word of some eval n-gram.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imitate.evaluate.data import Item
from imitate.records import Record

NGRAM = 13
_WORD = re.compile(r"[^\W_]+")


def words(text: str) -> list[str]:
    """Normalised words: NFKC, case-folded, runs of letters and digits (punctuation and `_` separate words)."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def item_text(item: Item) -> str:
    return "\n".join([item.question, *item.choices, *([item.reference] if item.reference else [])])


def record_text(record: Record) -> str:
    return "\n".join(m.content for m in record.conversation())


@dataclass
class NgramIndex:
    n: int
    grams: dict[tuple[str, ...], list[str]] = field(default_factory=dict)  # n-gram (or short item) → item ids
    lengths: set[int] = field(default_factory=set)  # window lengths to test (n, and short items' lengths)
    firsts: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, items: Iterable[Item], n: int = NGRAM) -> NgramIndex:
        index = cls(n)
        for item in items:
            ws = words(item_text(item))
            if not ws:
                continue
            grams = [tuple(ws)] if len(ws) < n else [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]
            for g in grams:
                ids = index.grams.setdefault(g, [])
                if item.id not in ids:
                    ids.append(item.id)
                index.lengths.add(len(g))
                index.firsts.add(g[0])
        return index

    def matches(self, text: str) -> set[str]:
        """Ids of the items with an n-gram (or, for a short item, its whole text) in `text`."""
        ws = words(text)
        found: set[str] = set()
        for i, w in enumerate(ws):
            if w not in self.firsts:
                continue
            for length in self.lengths:
                if i + length <= len(ws):
                    hit = self.grams.get(tuple(ws[i : i + length]))
                    if hit:
                        found.update(hit)
        return found

    def scan(self, records: Iterable[Record]) -> tuple[dict[str, str], int]:
        """{item id: id of the first training record that overlaps it}, and the number of records read."""
        flagged: dict[str, str] = {}
        count = 0
        for record in records:
            count += 1
            for item_id in self.matches(record_text(record)):
                flagged.setdefault(item_id, record.id)
        return flagged, count


def recorded_train_data(adapter: Path | None) -> str | None:
    """The DATA of the `imitate train DATA ...` command that made `adapter` (first line of its config.yaml), if
    that path still exists; None otherwise."""
    import shlex

    if adapter is None:
        return None
    config = Path(adapter) / "config.yaml"
    if not config.is_file():
        return None
    first = config.read_text(encoding="utf-8").split("\n", 1)[0]
    if not first.startswith("#"):
        return None
    try:
        argv = shlex.split(first.lstrip("# "))
    except ValueError:
        return None
    if len(argv) >= 3 and argv[:2] == ["imitate", "train"] and Path(argv[2]).expanduser().exists():
        return argv[2]
    return None


def check(items: Sequence[Item], sources: Sequence[str], n: int = NGRAM, fmt: str = "auto") -> dict[str, Any]:
    """Flag the items overlapping any of the training `sources` (files/folders read by `read_records`)."""
    from imitate.dataset.formats import read_records

    index = NgramIndex.of(items, n)
    flagged: dict[str, str] = {}
    total = 0
    for source in sources:
        found, count = index.scan(read_records(source, fmt))
        total += count
        for k, v in found.items():
            flagged.setdefault(k, v)
    order = [it.id for it in items if it.id in flagged]
    return {"ngram": n, "train_records": total, "flagged": len(order), "n": len(items),
            "items": {k: flagged[k] for k in order}}  # fmt: skip
