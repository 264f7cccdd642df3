"""Reading harvest output directories from outside the harvester (for `imitate generate`, which drives several
harvests and reads their records back as they are appended):

    tail = Tail(out_dir); for record, shard, offset in tail.new(): ...   # each line once, in journal order
    is_final(record)          # answered, or failed for good (a transient failure is asked again next run)
    failed_now(out_dir)       # the failed rows as they stand: each failed request once, none answered later
    ledger_spent(out_dir)     # what the teacher may have billed there, every run included
    copy_records(out_dir, [(shard, offset), ...], target, tags)   # chosen records, tagged, written whole
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from imitate import errors
from imitate.dataset.io import atomic_path
from imitate.harvest.journal import FAILURES, INDEX, OK, Journal
from imitate.harvest.ledger import Spent
from imitate.records import Record


def is_final(record: Record) -> bool:
    """Answered, or failed for good (the journal asks a retryable failure again, so it is not final)."""
    if record.status == "ok":
        return True
    return not getattr(getattr(errors, record.error_class or "", None), "retryable", False)


class Tail:
    """The records of one harvest output directory, each line read once as the journal appends them. A torn or
    garbled line ends the read of its file: the next harvest into the directory cuts it off and writes from
    there, which is where the next read starts."""

    def __init__(self, root: Path):
        self.root = root
        self._offsets: dict[str, int] = {}

    def new(self) -> Iterator[tuple[Record, str, int]]:
        if not self.root.is_dir():
            return
        files = sorted(self.root.glob("shard-*.jsonl"))
        if (self.root / FAILURES).exists():
            files.append(self.root / FAILURES)
        for path in files:
            offset = self._offsets.get(path.name, 0)
            with open(path, "rb") as f:
                f.seek(offset)
                for raw in f:
                    if not raw.endswith(b"\n"):
                        break
                    try:
                        record = Record.model_validate_json(raw)
                    except ValueError:
                        break
                    yield record, path.name, offset
                    offset += len(raw)
                    self._offsets[path.name] = offset


def failed_now(root: Path) -> Iterator[Record]:
    """The harvest's failed rows as they stand now (for `imitate curate`, whose `failed` gate drops and counts
    them): each failed request once, by the line the index points to (its last failure), and none that a later
    run answered (failures.jsonl keeps every failure line ever written). Read without writing; O(1) memory."""
    if not (root / FAILURES).exists() or not (root / INDEX).exists():
        return
    journal = Journal(root, readonly=True)
    try:
        with open(root / FAILURES, "rb") as f:
            offset = 0
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # a torn last line: the next harvest cuts it off
                try:
                    record = Record.model_validate_json(raw)
                except ValueError:
                    break
                row = journal.db.execute(
                    "SELECT ok, file, offset FROM done WHERE key=?", (bytes.fromhex(record.provenance.request_key),)
                ).fetchone()
                if row is not None and row[0] != OK and row[1] == FAILURES and row[2] == offset:
                    yield record
                offset += len(raw)
    finally:
        journal.close()


def ledger_spent(root: Path) -> Spent:
    """What the teacher may have billed for this output so far (a killed run's open attempts at their estimate),
    read without writing: the next harvest into it must still see a crash as a crash (`resent_after_crash`)."""
    if not (root / INDEX).exists():
        return Spent()
    journal = Journal(root, readonly=True)
    try:
        s = journal.ledger.spent
        return Spent(s.requests, s.usd, s.tokens)
    finally:
        journal.close()


def copy_records(root: Path, where: Iterable[tuple[str, int]], target: Path, tags: list[str]) -> int:
    """The records at (shard, offset) in `root`, in that order, with `tags` added, written to `target` through a
    temporary file moved into place (a crash leaves the previous file whole). Returns how many."""
    n = 0
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(stack.enter_context(atomic_path(target)), "w", encoding="utf-8"))
        shards: dict[str, BinaryIO] = {}
        for shard, offset in where:
            if shard not in shards:
                shards[shard] = stack.enter_context(open(root / shard, "rb"))
            shards[shard].seek(offset)
            record = Record.model_validate_json(shards[shard].readline())
            record.tags = [*record.tags, *(t for t in tags if t not in record.tags)]
            out.write(record.to_json() + "\n")
            n += 1
    return n
