"""ROUGE-L between instructions, as Self-Instruct and Alpaca filter generated tasks, and an index for a pool.

`rouge_l(a, b)` is the ROUGE-L F-measure that `rouge_score.RougeScorer(["rougeL"], use_stemmer=False)` reports:
text lower-cased, every run of characters other than a-z/0-9 a separator (so punctuation and non-ASCII letters
vanish), then the longest common subsequence (LCS) of the two token lists: P = lcs/len(b), R = lcs/len(a),
F = 2PR/(P+R), 0 when either side has no tokens. Self-Instruct rejects a new task when its F against any task in
the pool is > 0.7.

`RougeIndex` answers "what is the highest F of this text against the pool?" for pools of tens of thousands:
- tokens become small ints once, when added;
- the LCS of two token lists is the bit-parallel LCS (Allison-Dix, Hyyrö's form) on Python ints: the query's
  positions of each token are one bitmask, and one pass over the candidate's tokens costs a few big-int operations
  per token the two share — tokens the query lacks are skipped outright;
- candidates are pruned by an upper bound that needs no LCS: the LCS cannot exceed the multiset overlap of the
  two token lists, so F <= 2*overlap/(len_a + len_b). Overlaps against the whole pool come from an inverted index of
  (token, occurrence) keys — the k-th "the" of a text is its own key, so a set intersection of keys is the multiset
  intersection of tokens — counted with one `numpy.bincount`;
- candidates are visited in decreasing bound: without a threshold the search stops when no remaining bound can beat
  the best score; with one it stops at the first score above it, and never looks at a row bounded below it.
"""

from __future__ import annotations

import re
from array import array
from collections import Counter

import numpy as np

_SEPARATORS = re.compile(r"[^a-z0-9]+")
_SLACK = 1e-9  # bounds are compared with a little room so float rounding never prunes a true match


def tokenize(text: str) -> list[str]:
    """Lower-cased a-z/0-9 word tokens, the tokens rouge-score's default tokenizer keeps (no stemming)."""
    return _SEPARATORS.sub(" ", text.lower()).split()


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence of two sequences of hashable items (bit-parallel)."""
    if len(a) < len(b):
        a, b = b, a  # the bitmask runs over the longer side: fewer loop turns in Python
    masks = _position_masks(a)
    return _lcs_with_masks(masks, len(a), b)


def _position_masks(tokens: list) -> dict:
    masks: dict = {}
    for i, t in enumerate(tokens):
        masks[t] = masks.get(t, 0) | (1 << i)
    return masks


def _lcs_with_masks(masks: dict, m: int, other) -> int:
    full = (1 << m) - 1
    v = full
    get = masks.get
    for t in other:
        match = get(t)
        if match:
            u = v & match
            v = (v + u) | (v - u)
    return m - (v & full).bit_count()


def f_measure(lcs: int, len_a: int, len_b: int) -> float:
    """rouge-score's F-measure from an LCS length (computed the way it does, so ties at 0.7 agree)."""
    if lcs == 0 or len_a == 0 or len_b == 0:
        return 0.0
    precision, recall = lcs / len_b, lcs / len_a
    return 2 * precision * recall / (precision + recall)


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F-measure of `b` against `a` (symmetric), as Self-Instruct computed it with rouge-score."""
    ta, tb = tokenize(a), tokenize(b)
    if not ta or not tb:
        return 0.0
    return f_measure(lcs_length(ta, tb), len(ta), len(tb))


class RougeIndex:
    """A growing pool of texts; `max_score(text)` is the highest ROUGE-L F of `text` against any of them."""

    def __init__(self) -> None:
        self._vocab: dict[str, int] = {}
        self._keys: dict[tuple[int, int], int] = {}  # (token id, occurrence) -> posting list number
        self._postings: list[array] = []  # posting list number -> ids of the texts holding that key
        self._texts: list[tuple[int, ...]] = []  # token ids of each text in the pool
        self._lengths = array("i")

    def __len__(self) -> int:
        return len(self._texts)

    def _ids(self, text: str, grow: bool) -> list[int]:
        vocab = self._vocab
        if grow:
            return [vocab.setdefault(t, len(vocab)) for t in tokenize(text)]
        return [vocab.get(t, -1) for t in tokenize(text)]  # -1: a word no pool text has

    @staticmethod
    def _occurrences(ids: list[int]) -> list[tuple[int, int]]:
        seen: Counter[int] = Counter()
        out = []
        for t in ids:
            out.append((t, seen[t]))
            seen[t] += 1
        return out

    def add(self, text: str) -> int:
        """Add a text to the pool; returns its position (0, 1, ...)."""
        ids = self._ids(text, grow=True)
        doc = len(self._texts)
        for key in self._occurrences(ids):
            slot = self._keys.get(key)
            if slot is None:
                slot = self._keys[key] = len(self._postings)
                self._postings.append(array("i"))
            self._postings[slot].append(doc)
        self._texts.append(tuple(ids))
        self._lengths.append(len(ids))
        return doc

    def _bounds(self, ids: list[int]) -> np.ndarray:
        """Upper bound of F against every pool text, from the multiset overlap of tokens."""
        lists = [self._postings[s] for k in self._occurrences(ids) if (s := self._keys.get(k)) is not None]
        n = len(self._texts)
        if not lists:
            return np.zeros(n)
        hits = np.concatenate([np.frombuffer(p, dtype=np.int32) for p in lists])
        overlap = np.bincount(hits, minlength=n)
        return 2.0 * overlap / (len(ids) + np.frombuffer(self._lengths, dtype=np.int32))

    def best(self, text: str, threshold: float | None = None) -> tuple[float, int | None]:
        """(score, position) of the best match found. Without a threshold: the exact maximum. With one: stops
        at the first text scoring above it; the score returned is > threshold exactly when some pool text's is,
        but below the threshold it may be lower than the true maximum (rows bounded below it are not scored)."""
        ids = self._ids(text, grow=False)
        if not ids or not self._texts:
            return 0.0, None
        bounds = self._bounds(ids)
        floor = (threshold - _SLACK) if threshold is not None else _SLACK
        candidates = np.flatnonzero(bounds > floor)
        candidates = candidates[np.argsort(-bounds[candidates], kind="stable")]
        masks, m = _position_masks(ids), len(ids)
        best_score, best_doc = 0.0, None
        for doc in candidates.tolist():
            if bounds[doc] <= best_score:
                break  # sorted: nothing later can beat what we have
            other = self._texts[doc]
            score = f_measure(_lcs_with_masks(masks, m, other), m, len(other))
            if score > best_score:
                best_score, best_doc = score, doc
                if threshold is not None and score > threshold:
                    break
        return best_score, best_doc

    def max_score(self, text: str, threshold: float | None = None) -> float:
        """The highest ROUGE-L F of `text` against the pool (see `best` for what a threshold changes)."""
        return self.best(text, threshold)[0]
