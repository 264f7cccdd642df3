"""ROUGE-L as Self-Instruct scored instructions (rouge-score's tokens and F-measure), checked against values worked
out by hand, a plain dynamic-programming LCS, and a brute-force maximum over a pool."""

from __future__ import annotations

import random

import pytest

from imitate.dataset.similarity import RougeIndex, f_measure, lcs_length, rouge_l, tokenize


def test_tokens_are_rouge_scores_default_tokens():
    assert tokenize("Hello, World! It's 42.") == ["hello", "world", "it", "s", "42"]
    assert tokenize("café au lait") == ["caf", "au", "lait"]  # non-ASCII letters are separators there too
    assert tokenize("  ...!?  ") == []


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        # LCS "the cat on the mat" = 5 of 6 and 6 tokens: F = 2*5/12
        ("the cat sat on the mat", "the cat lay on the mat", 10 / 12),
        # LCS "police the gunman" = 3 of 4 and 4
        ("police killed the gunman", "police kill the gunman", 0.75),
        # word order matters: LCS "police killed" (or "the gunman") = 2 of 4 and 4
        ("police killed the gunman", "the gunman police killed", 0.5),
        # LCS 3; P = 3/3, R = 3/6: F = 2 * 1 * 0.5 / 1.5
        ("a b c d e f", "a c f", 2 / 3),
        # case and punctuation do not count
        ("Write a Poem about the SEA.", "write a poem about the sea", 1.0),
        ("", "anything at all", 0.0),
        ("!!!", "???", 0.0),
        ("completely different words", "nothing shared here", 0.0),
    ],
)
def test_hand_computed_values(a, b, expected):
    assert rouge_l(a, b) == pytest.approx(expected, abs=1e-12)
    assert rouge_l(b, a) == pytest.approx(expected, abs=1e-12)


def _dp_lcs(a, b) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def test_bit_parallel_lcs_equals_the_dynamic_programme():
    rng = random.Random(7)
    for _ in range(400):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 40))]
        b = [rng.choice("abcdef") for _ in range(rng.randint(0, 90))]  # longer than 64: several machine words
        assert lcs_length(a, b) == _dp_lcs(a, b)


def test_f_measure_matches_rouge_scores_formula():
    assert f_measure(0, 5, 5) == 0.0
    assert f_measure(3, 4, 6) == pytest.approx(2 * (3 / 6) * (3 / 4) / ((3 / 6) + (3 / 4)))


WORDS = [
    "write",
    "explain",
    "list",
    "give",
    "find",
    "make",
    "summary",
    "poem",
    "story",
    "code",
    "python",
    "why",
    "how",
    "what",
    "the",
    "a",
    "of",
    "to",
]


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 14))) + rng.choice(["", ".", "?"])


def test_index_max_is_the_brute_force_max_and_thresholds_are_exact():
    rng = random.Random(3)
    pool = [_text(rng) for _ in range(400)]
    index = RougeIndex()
    for i, text in enumerate(pool):
        assert index.add(text) == i
    assert len(index) == 400
    for _ in range(150):
        q = _text(rng)
        scores = [rouge_l(p, q) for p in pool]
        exact = max(scores)
        assert index.max_score(q) == exact
        score, pos = index.best(q)
        assert score == exact and (pos is None or scores[pos] == exact)
        for threshold in (0.5, 0.7, 0.9):
            assert (index.max_score(q, threshold) > threshold) == (exact > threshold)


def test_index_edge_cases():
    index = RougeIndex()
    assert index.max_score("anything") == 0.0
    index.add("Give three tips for staying healthy.")
    assert index.best("give three tips for staying healthy") == (1.0, 0)
    assert index.max_score("") == 0.0
    assert index.max_score("unrelated words entirely") == 0.0
    # repeated words: the bound counts each occurrence once; LCS 1 of 4 and 6 tokens
    assert index.max_score("tips tips tips tips") == pytest.approx(2 / 10)
