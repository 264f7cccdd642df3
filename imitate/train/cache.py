"""Preprocessing cache: tokenised examples keyed by a content hash of everything that decides them.

Key = sha256 of (data hash, tokenizer vocabulary + specials + chat template + mask rule version, max length,
over-length policy). A hit skips rendering and tokenising; any change to data, tokenizer, template or policy is
a different key, so a stale cache cannot be read. Files are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from imitate.records import Record, canonical_json
from imitate.train.tokenize import ChatFormat, Example, OverLength, TokenizeSummary, tokenize


def cache_root(configured: str | None) -> Path:
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("IMITATE_CACHE_DIR", "~/.cache/imitate")).expanduser() / "tokenized"


def cache_key(data_digest: str, fmt: ChatFormat, max_length: int, over_length: str) -> str:
    payload = canonical_json([data_digest, fmt.fingerprint(), max_length, over_length])
    return hashlib.sha256(payload.encode()).hexdigest()


def cached_tokenize(
    records: list[Record],
    fmt: ChatFormat,
    *,
    max_length: int,
    over_length: OverLength,
    data_digest: str,
    root: Path,
) -> tuple[list[Example], TokenizeSummary, bool]:
    """(examples, summary, hit). Policy `error` raises before anything is written."""
    path = root / f"{cache_key(data_digest, fmt, max_length, over_length)}.jsonl"
    if path.exists():
        with open(path, encoding="utf-8") as f:
            summary = TokenizeSummary.from_dict(json.loads(f.readline()))
            examples = [Example(**json.loads(line)) for line in f]
        return examples, summary, True
    examples, summary = tokenize(records, fmt, max_length=max_length, over_length=over_length)
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(summary.to_dict()) + "\n")
        for ex in examples:
            f.write(json.dumps({"id": ex.id, "input_ids": ex.input_ids, "labels": ex.labels}) + "\n")
    os.replace(tmp, path)
    return examples, summary, False
