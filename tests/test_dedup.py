"""Exact and near-duplicate detection: normalisation, MinHash + LSH catching edited copies and sparing distinct
rows, the same duplicates as the plain datasketch recipe, and the compact band store across merges."""

from __future__ import annotations

import random

import pytest
from datasketch import MinHash, MinHashLSH

from imitate.dataset.dedup import (
    ExactDuplicateIndex,
    NearDuplicateIndex,
    _BandStore,
    normalize,
    shingles,
    text_hash,
)

VOCAB = [f"w{i}" for i in range(3000)]


def words(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(VOCAB) for _ in range(n)]


def edit(rng: random.Random, text: str, changes: int) -> str:
    w = text.split()
    for _ in range(changes):
        w[rng.randrange(len(w))] = rng.choice(VOCAB)
    return " ".join(w)


def test_normalisation_ignores_case_whitespace_and_punctuation():
    assert normalize("Hello,  World!\n") == "hello world"
    assert normalize("ﬁne_print — “quoted”") == "fine print quoted"  # NFKC folds the ligature
    assert normalize("STRASSE") == normalize("straße")  # casefold, not lower
    assert text_hash("It's 4 o'clock.") == text_hash("it's 4 O'CLOCK") == text_hash("it s 4 o clock")
    assert text_hash("It's 4 o'clock.") != text_hash("It's 5 o'clock.")


def test_exact_index_names_the_first_row():
    index = ExactDuplicateIndex()
    assert index.check_and_add("a", "The answer is 42.") is None
    assert index.check_and_add("b", "the answer is   42") == "a"
    assert index.check_and_add("c", "The answer is 43.") is None
    assert len(index) == 2 and "THE ANSWER IS 42" in index


def test_shingles():
    assert shingles("One two three four five six", 5) == [b"one two three four five", b"two three four five six"]
    assert shingles("Short text.", 5) == [b"short text"]
    assert shingles("  ?! ", 5) == []
    assert shingles("Abc-d", 3, "char") == [b"abc", b"bc ", b"c d"]


def test_minhash_is_datasketchs_own():
    rng = random.Random(0)
    text = " ".join(words(rng, 80))
    plain = MinHash(num_perm=128)
    for s in shingles(text):
        plain.update(s)
    assert (NearDuplicateIndex().minhash(text).hashvalues == plain.hashvalues).all()


def test_catches_edited_copies_and_spares_distinct_rows():
    rng = random.Random(1)
    originals = [" ".join(words(rng, 300)) for _ in range(200)]
    index = NearDuplicateIndex(threshold=0.8, num_perm=128, shingle=5)
    assert [index.check_and_add(f"o{i}", t) for i, t in enumerate(originals)] == [None] * 200
    # one word in 300 changed: Jaccard of the 5-word shingle sets 291/301; LSH misses such a pair ~1e-4 of the time
    assert [index.check_and_add(f"c{i}", edit(rng, t, 1)) for i, t in enumerate(originals[:50])] == [
        f"o{i}" for i in range(50)
    ]
    # a third of the words changed: Jaccard ~ 0.1, far below the threshold
    assert all(index.check_and_add(f"d{i}", edit(rng, t, 100)) is None for i, t in enumerate(originals[:50]))
    assert len(index) == 250 and index.settings()["bands"] * index.settings()["rows_per_band"] <= 128


def test_char_shingles_catch_a_reworded_copy():
    index = NearDuplicateIndex(threshold=0.7, shingle=4, unit="char")
    index.check_and_add("a", "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.")
    assert index.check_and_add("b", "Photosynthesis turns light, water & carbon dioxide into sugars and oxygen!") == "a"
    assert index.check_and_add("c", "Mitochondria release energy from sugar by respiration in the cell.") is None


def test_same_duplicates_as_the_plain_datasketch_recipe():
    rng = random.Random(2)
    rows, base = [], []
    for _ in range(700):
        if base and rng.random() < 0.3:
            rows.append(edit(rng, rng.choice(base), rng.randint(0, 4)))
        else:
            base.append(" ".join(words(rng, rng.randint(40, 120))))
            rows.append(base[-1])
    # a small band buffer: the sorted arrays are merged into many times on the way
    ours = NearDuplicateIndex(band_buffer=64)
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    plain_dups, our_dups = [], []
    for i, text in enumerate(rows):
        m = MinHash(num_perm=128)
        for s in shingles(text):
            m.update(s)
        found = lsh.query(m)
        if not found:
            lsh.insert(str(i), m)
        plain_dups.append(bool(found))
        our_dups.append(ours.check_and_add(str(i), text) is not None)
    assert our_dups == plain_dups
    # ~210 planted copies at 0-4 edits, many near the threshold (where agreement is the real test): 92 caught
    assert 50 < sum(our_dups) < 250


def test_band_store_across_merges():
    store = _BandStore(min_buffer=16)
    rng = random.Random(4)
    entries = {rng.getrandbits(64): row for row in range(5000)}
    for h, row in entries.items():
        store.add([h], row)
    assert len(store) == len(entries)
    for h, row in list(entries.items())[::37]:
        assert store.find([rng.getrandbits(64), h]) == row
    assert store.find([rng.getrandbits(64) for _ in range(9)]) is None
    assert store.find([2**64 - 1, 0]) is None  # both ends of the sorted array


@pytest.mark.parametrize(
    "kwargs", [{"threshold": 1.0}, {"threshold": 0.0}, {"shingle": 0}, {"unit": "token"}, {"num_perm": 0}]
)
def test_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        NearDuplicateIndex(**kwargs)
