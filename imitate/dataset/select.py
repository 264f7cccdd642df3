"""LIMA-style selection: score each row, keep the k best, at most m from any one group (a near-duplicate cluster,
or a Query.collection), in memory O(k) however long the stream.

Scores. `heuristic_score` rewards what LIMA's curators looked for in an answer, each part in [0, 1] and weighted:
length (log of the word count, saturating at 1,000 words), Markdown structure (how many of headings, lists, code
blocks, tables and emphasis it uses) and reasoning steps (numbered or bulleted lines, saturating at 8). Or a
numeric field of `Record.scores` (`--score-field judge`): a judge's grade, a reward model's score.

What is kept. Exactly what the offline greedy keeps: sort every row by score (ties: the earlier row first), walk
down, take a row unless its group already has m taken rows, stop at k. Equivalently: the top k of U, where U is the
top m rows of each group.

How it streams. `TopK` holds the current top k of U (over the rows seen so far) in a min-heap, plus a min-heap per
group with a row in it. A new row x of group g:
  1. g already holds m kept rows: x enters U only by beating g's weakest kept row w, which leaves U. Then x
     replaces w (w is dropped for good: m better rows of its group now exist); else x is dropped.
  2. g holds fewer than m: every other row of g in U is kept, so U gains x and loses nothing kept. With room, x is
     kept; when full, x replaces the global weakest if it beats it, else x is dropped.
The kept set never shrinks once it has k rows, and its weakest score only rises, so a row dropped (below that
weakest, or beaten within its capped group) can never come back: dropped rows are final and are written out at
once. Removal from the heaps is lazy (entries marked dead), and a heap is rebuilt when dead entries outnumber
live ones, so memory stays O(k).

One cap at a time: with caps on clusters *and* collections a later row can un-block an earlier one (it takes
a collection's last slot from a row that was filling a cluster's), so no bounded buffer gives the greedy's answer;
`SelectConfig` accepts one of them.
"""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from imitate.dataset.curate_config import SelectConfig
from imitate.dataset.gates import answer, count_steps
from imitate.records import Record

_MARKDOWN = {
    "heading": re.compile(r"^#{1,6}\s", re.MULTILINE),
    "list": re.compile(r"^\s*(?:[-*+]|\d{1,3}[.)])\s", re.MULTILINE),
    "code": re.compile(r"^\s*```", re.MULTILINE),
    "table": re.compile(r"^\s*\|.*\|\s*$", re.MULTILINE),
    "emphasis": re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__"),
}


def structure(text: str) -> float:
    """Share of the Markdown element kinds (heading, list, code, table, emphasis) the text uses."""
    return sum(1 for pattern in _MARKDOWN.values() if pattern.search(text)) / len(_MARKDOWN)


def heuristic_score(record: Record, cfg: SelectConfig) -> float:
    text = answer(record)
    length = min(math.log1p(len(text.split())) / math.log1p(1000), 1.0)
    steps = min(count_steps(text) / 8, 1.0)
    return cfg.length_weight * length + cfg.structure_weight * structure(text) + cfg.steps_weight * steps


def scorer(cfg: SelectConfig) -> Callable[[Record], float | None]:
    """The configured score of a row; None when the row lacks the score field it names."""
    if cfg.score == "heuristic":
        return lambda record: heuristic_score(record, cfg)
    name = cfg.score
    return lambda record: record.scores.get(name)


@dataclass(order=True)
class _Entry:
    score: float
    newer_first: int  # -seq: among equal scores the later row is the weaker one
    seq: int = field(compare=False)
    group: object = field(compare=False)
    record: Record = field(compare=False)
    alive: bool = field(default=True, compare=False)


class TopK:
    """Streaming top-k with at most `cap` rows per group (None: no cap). `on_drop(record, reason)` is called for
    every row that is dropped, as soon as it is certain; `kept()` returns the selection in input order."""

    def __init__(self, k: int, cap: int | None, on_drop: Callable[[Record, str], None], cap_name: str = "group"):
        self.k, self.cap, self.on_drop, self.cap_name = k, cap, on_drop, cap_name
        self._heap: list[_Entry] = []
        self._groups: dict[object, list[_Entry]] = {}
        self._count: dict[object, int] = {}
        self._live = 0
        self._seq = 0

    def __len__(self) -> int:
        return self._live

    def offer(self, record: Record, score: float, group: object = None) -> None:
        x = _Entry(score, -self._seq, self._seq, group, record)
        self._seq += 1
        if self.cap is not None and self._count.get(group, 0) >= self.cap:
            weakest = self._weakest(self._groups[group])
            if x > weakest:
                self._remove(weakest, f"{self.cap} better rows in its {self.cap_name} {group}")
                self._add(x)
            else:
                self.on_drop(record, f"score {score:.4g}: {self.cap} better rows in its {self.cap_name} {group}")
            return
        if self._live < self.k:
            self._add(x)
            return
        weakest = self._weakest(self._heap)
        if x > weakest:
            self._remove(weakest, f"not in the top {self.k} (score {weakest.score:.4g})")
            self._add(x)
        else:
            self.on_drop(record, f"not in the top {self.k} (score {score:.4g})")

    def kept(self) -> list[Record]:
        live = sorted((e for e in self._heap if e.alive), key=lambda e: e.seq)
        return [e.record for e in live]

    @staticmethod
    def _weakest(heap: list[_Entry]) -> _Entry:
        while not heap[0].alive:
            heapq.heappop(heap)
        return heap[0]

    def _add(self, x: _Entry) -> None:
        heapq.heappush(self._heap, x)
        heapq.heappush(self._groups.setdefault(x.group, []), x)
        self._count[x.group] = self._count.get(x.group, 0) + 1
        self._live += 1

    def _remove(self, e: _Entry, reason: str) -> None:
        e.alive = False
        self._live -= 1
        self._count[e.group] -= 1
        if not self._count[e.group]:
            del self._count[e.group], self._groups[e.group]
        elif len(self._groups[e.group]) > 2 * self._count[e.group] + 8:
            self._groups[e.group] = _compact(self._groups[e.group])
        if len(self._heap) > 2 * self._live + 64:
            self._heap = _compact(self._heap)
        self.on_drop(e.record, reason)


def _compact(heap: list[_Entry]) -> list[_Entry]:
    live = [e for e in heap if e.alive]
    heapq.heapify(live)
    return live
