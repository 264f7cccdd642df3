"""Records in for training: imitate records (a harvest output dir, a folder or file of records) or any format
`imitate.dataset.formats` reads — OpenOrca, ShareGPT, Alpaca, OpenAI-style messages — from a JSON/JSONL/CSV/Parquet
file, a `save_to_disk` folder or a Hub dataset name, with no conversion step.

Only completed records (`status == "ok"`) train. A directory is read as every `*.jsonl` (except the harvester's
`failures.jsonl`) and `*.parquet` file in it, in name order. Also here: the per-stage selection (by teacher,
collection, tag), the eval split (by a hash of the record id, so it is stable as the data grows), and the data
hash stamped next to the adapter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from imitate.dataset.formats import read_records
from imitate.dataset.io import looks_local
from imitate.errors import InputError
from imitate.records import Record, canonical_json


def load_records(path: Path | str, format: str = "auto") -> list[Record]:
    """Every completed record under `path`, first occurrence of each id kept. InputError if there are none."""
    path = Path(path).expanduser()
    if not path.exists() and looks_local(str(path)):
        raise InputError(f"training data {path} does not exist")
    seen: set[str] = set()
    out: list[Record] = []
    for rec in read_records(path, format):
        if rec.status == "ok" and rec.id not in seen:
            seen.add(rec.id)
            out.append(rec)
    if not out:
        raise InputError(f"training data {path}: no completed (status ok) records")
    return out


def select(
    records: Iterable[Record],
    *,
    teachers: list[str] | None = None,
    collections: list[str] | None = None,
    tags: list[str] | None = None,
) -> list[Record]:
    """The records a stage trains on: each given filter must match (None = any)."""
    return [
        r
        for r in records
        if (teachers is None or r.provenance.teacher in teachers)
        and (collections is None or r.query.collection in collections)
        and (tags is None or any(t in r.tags for t in tags))
    ]


def is_eval(record_id: str, fraction: float) -> bool:
    """A record is in the eval split when its id hashes below `fraction`: stable as records are added."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(record_id.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def data_hash(records: Iterable[Record]) -> str:
    """Content hash of what training sees: ids, conversations and the truncation flag, in order."""
    h = hashlib.sha256()
    for r in records:
        row = {
            "id": r.id,
            "m": [m.model_dump() for m in r.conversation()],
            "t": r.truncated,
            "f": r.provenance.finish_reason,
        }
        h.update(canonical_json(row).encode())
        h.update(b"\n")
    return h.hexdigest()


def describe(records: list[Record]) -> dict[str, Any]:
    """Counts by teacher and collection, for the run summary."""
    by_teacher: dict[str, int] = {}
    by_collection: dict[str, int] = {}
    for r in records:
        by_teacher[r.provenance.teacher] = by_teacher.get(r.provenance.teacher, 0) + 1
        key = r.query.collection or "-"
        by_collection[key] = by_collection.get(key, 0) + 1
    return {"records": len(records), "by_teacher": by_teacher, "by_collection": by_collection}
