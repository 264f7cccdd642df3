"""Duplicate detection for curation and import: exact (normalised hash) and near (MinHash + LSH, datasketch).

    normalize(text)          casefold, NFKC, punctuation and underscores to spaces, whitespace collapsed
    ExactDuplicateIndex      check_and_add(key, text) -> key of an earlier row with the same normalised text
    NearDuplicateIndex       check_and_add(key, text) -> key of an earlier row sharing an LSH band, or None

Near-duplicates are found the way the plain datasketch recipe finds them — `MinHash` over the text's shingles
(word or character n-grams of the normalised text), then a `MinHashLSH` query and, when nothing is found, an
insert — and give the same answer row for row: the signatures are datasketch's own (`MinHash.update_batch` with
its default hash and permutations), and the bands are the (b, r) that `MinHashLSH` picks for the threshold.
Only the band store differs, because datasketch's in-memory store keeps a bytes key and a set per band per row
(gigabytes at a million rows). Ours keeps one 64-bit hash (band number included) and a row number per band:
recent inserts in a dict, older ones in a sorted numpy array merged in bulk, looked up with one `searchsorted`
for all bands. A million rows with 128 permutations at threshold 0.8 (9 bands) cost ~110 MB plus their keys.

Only rows that are *not* duplicates are inserted, so each stored row heads its own cluster and a duplicate names
the first kept row it collides with. LSH is probabilistic: pairs above the threshold are caught with high
probability and pairs far below it almost never, exactly as with `MinHashLSH`.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Literal

import numpy as np
from datasketch import MinHash, MinHashLSH

ShingleUnit = Literal["word", "char"]

_NON_WORD = re.compile(r"[\W_]+")


def normalize(text: str) -> str:
    """The form exact duplicates are compared in: "Hello,  World!" and "hello world" are the same text."""
    if not text.isascii():  # NFKC leaves ASCII as it is: skip the call for the common case
        text = unicodedata.normalize("NFKC", text)
    return _NON_WORD.sub(" ", text.casefold()).strip()


def text_hash(text: str) -> bytes:
    """16-byte digest of the normalised text (a collision would need ~2**64 distinct texts)."""
    return hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=16).digest()


class ExactDuplicateIndex:
    """Normalised-text hashes of the rows kept so far (~100 bytes per row, the key included)."""

    def __init__(self) -> None:
        self._first: dict[bytes, str] = {}

    def __len__(self) -> int:
        return len(self._first)

    def first(self, digest: bytes) -> str | None:
        """The key of the kept row with this `text_hash`, if any."""
        return self._first.get(digest)

    def add(self, digest: bytes, key: str) -> None:
        self._first.setdefault(digest, key)

    def check_and_add(self, key: str, text: str) -> str | None:
        """The key of an earlier row with the same normalised text, or None (and this row is remembered)."""
        digest = text_hash(text)
        first = self._first.get(digest)
        if first is None:
            self._first[digest] = key
        return first

    def __contains__(self, text: str) -> bool:
        return text_hash(text) in self._first


def shingles(text: str, size: int = 5, unit: ShingleUnit = "word") -> list[bytes]:
    """The set members MinHash sees: `size`-word (or -character) windows of the normalised text, UTF-8 encoded.
    A text shorter than one window is one shingle; an empty text has none."""
    norm = normalize(text)
    if not norm:
        return []
    if unit == "word":
        words = norm.split(" ")
        if len(words) <= size:
            return [norm.encode()]
        return [" ".join(words[i : i + size]).encode() for i in range(len(words) - size + 1)]
    if len(norm) <= size:
        return [norm.encode()]
    return [norm[i : i + size].encode() for i in range(len(norm) - size + 1)]


def sha1_hash32_all(items: list[bytes]) -> list[int]:
    """datasketch's default `sha1_hash32` (the first 4 bytes of SHA-1, little-endian) of every item, converted in
    one numpy call instead of one `struct.unpack` each."""
    digests = b"".join([hashlib.sha1(item).digest() for item in items])
    return np.frombuffer(digests, dtype="<u4")[::5].tolist()


def _as_is(value: int) -> int:
    return value


class _BandStore:
    """A map from 64-bit band hashes to row numbers, compact at millions of entries: a dict for recent inserts,
    merged into a sorted (hashes, rows) pair of numpy arrays when it reaches a quarter of their size."""

    def __init__(self, min_buffer: int = 1 << 16) -> None:
        self.min_buffer = min_buffer
        self._hashes = np.empty(0, dtype=np.uint64)
        self._rows = np.empty(0, dtype=np.int32)
        self._recent: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._hashes) + len(self._recent)

    def find(self, hashes: list[int]) -> int | None:
        recent = self._recent
        for h in hashes:
            row = recent.get(h)
            if row is not None:
                return row
        if not len(self._hashes):
            return None
        wanted = np.array(hashes, dtype=np.uint64)
        pos = np.minimum(np.searchsorted(self._hashes, wanted), len(self._hashes) - 1)
        hit = np.flatnonzero(self._hashes[pos] == wanted)
        return int(self._rows[pos[hit[0]]]) if len(hit) else None

    def add(self, hashes: list[int], row: int) -> None:
        for h in hashes:
            self._recent[h] = row
        if len(self._recent) >= max(self.min_buffer, len(self._hashes) // 4):
            self._merge()

    def _merge(self) -> None:
        new = np.fromiter(self._recent.keys(), dtype=np.uint64, count=len(self._recent))
        rows = np.fromiter(self._recent.values(), dtype=np.int32, count=len(self._recent))
        order = np.argsort(new)
        new, rows = new[order], rows[order]
        at = np.searchsorted(self._hashes, new)
        self._hashes = np.insert(self._hashes, at, new)
        self._rows = np.insert(self._rows, at, rows)
        self._recent = {}


class NearDuplicateIndex:
    """MinHash + LSH near-duplicate index (see the module docstring). `threshold` is the Jaccard similarity of
    shingle sets that LSH is tuned for; `num_perm` the MinHash size; `shingle` the window in `unit`s; `seed` picks
    datasketch's permutations; `band_buffer` band entries are held in a dict before a merge into the arrays."""

    def __init__(
        self,
        threshold: float = 0.8,
        num_perm: int = 128,
        shingle: int = 5,
        unit: ShingleUnit = "word",
        seed: int = 1,
        band_buffer: int = 1 << 16,
    ):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        if shingle < 1:
            raise ValueError(f"shingle must be >= 1, got {shingle}")
        if unit not in ("word", "char"):
            raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)  # its (bands, rows) choice for the threshold
        self.threshold, self.num_perm, self.shingle, self.unit, self.seed = threshold, num_perm, shingle, unit, seed
        self.bands, self.rows = lsh.b, lsh.r
        template = MinHash(num_perm=num_perm, seed=seed)
        self._scheme, self._permutations = template.scheme, template.permutations
        self._band_salts = [i.to_bytes(2, "little") for i in range(self.bands)]
        self._store = _BandStore(band_buffer)
        self._keys: list[str] = []

    def __len__(self) -> int:
        return len(self._keys)

    def settings(self) -> dict:
        return {
            "threshold": self.threshold,
            "num_perm": self.num_perm,
            "shingle": self.shingle,
            "unit": self.unit,
            "seed": self.seed,
            "bands": self.bands,
            "rows_per_band": self.rows,
        }

    def minhash(self, text: str) -> MinHash:
        """datasketch's MinHash of the text's shingles (the one a plain `MinHash().update(...)` loop builds)."""
        m = MinHash(
            num_perm=self.num_perm,
            seed=self.seed,
            permutations=self._permutations,
            scheme=self._scheme,
            hashfunc=_as_is,
        )
        m.update_batch(sha1_hash32_all(shingles(text, self.shingle, self.unit)))
        return m

    def _band_hashes(self, signature: np.ndarray) -> list[int]:
        raw = signature.tobytes()
        width = len(raw) // len(signature) * self.rows
        return [
            int.from_bytes(hashlib.blake2b(raw[i * width : (i + 1) * width], digest_size=8, salt=salt).digest())
            for i, salt in enumerate(self._band_salts)
        ]

    def check(self, text: str) -> tuple[str | None, list[int]]:
        """(key of a kept row this text collides with in some LSH band, or None; the text's band hashes, which
        `add` takes so that a row checked first is not hashed twice)."""
        hashes = self._band_hashes(self.minhash(text).hashvalues)
        row = self._store.find(hashes)
        return (self._keys[row] if row is not None else None), hashes

    def add(self, key: str, hashes: list[int]) -> None:
        self._store.add(hashes, len(self._keys))
        self._keys.append(key)

    def check_and_add(self, key: str, text: str) -> str | None:
        """The key of a kept row this text collides with in some LSH band, or None (and it is added)."""
        head, hashes = self.check(text)
        if head is None:
            self.add(key, hashes)
        return head
