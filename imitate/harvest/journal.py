"""The harvest journal: append-only JSONL shards are the truth, a SQLite index makes resume O(1) per request.

Layout of an output directory:

    shard-00000.jsonl ...   completed records (one `Record` JSON per line), a new shard per run and per N rows
    failures.jsonl          failed records (status "failed", error class and message)
    journal.sqlite          index: request key -> status, cost, tokens; committed byte offset of every file;
                            keys sent but not yet journaled (in flight)
    manifest.json           counts, usage, spend, timings, redacted config (rewritten atomically)

Crash safety, by construction: a line is written and fsynced *before* the index commit that covers it, and the
index stores how far each file is covered. On open, every file is re-read from its covered offset to the end: a
complete line there is a finished request whose index update was lost (it is indexed now, never re-sent); a torn
last line is cut off (that request was in flight and will be sent again). Keys that were marked in flight and
have no record are counted as re-sent after a crash. So a kill -9 loses at most the requests in flight.
The index holds 32-byte keys on disk, not a Python set: RSS stays flat however many rows a run has done.
Index rows and in-flight marks wait in small buffers until the next flush and go to SQLite in one `executemany`
each, just before the commit that would have made them durable anyway (lookups see the buffers).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from imitate.errors import InputError
from imitate.records import Record

FAILURES = "failures.jsonl"
INDEX = "journal.sqlite"
MANIFEST = "manifest.json"
SHARD_FMT = "shard-{:05d}.jsonl"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS done (key BLOB PRIMARY KEY, ok INTEGER NOT NULL, query_id TEXT,
    cost REAL NOT NULL, tokens INTEGER NOT NULL, attempts INTEGER NOT NULL, error_class TEXT) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS files (name TEXT PRIMARY KEY, offset INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS inflight (key BLOB PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class Totals:
    ok: int = 0
    failed: int = 0
    cost_usd: float = 0.0
    tokens: int = 0
    attempts: int = 0
    failed_by_class: dict[str, int] = field(default_factory=dict)


def _row_of(obj: dict[str, Any]) -> tuple[bytes, int, str | None, float, int, int, str | None]:
    prov = obj["provenance"]
    usage = prov.get("usage") or {}
    return (
        bytes.fromhex(prov["request_key"]),
        1 if obj.get("status", "ok") == "ok" else 0,
        obj.get("query", {}).get("id"),
        float(prov.get("cost_usd", 0.0)),
        int(usage.get("total_tokens", 0)),
        int(prov.get("attempts", 1)),
        obj.get("error_class"),
    )


class Journal:
    """Exactly-once bookkeeping for one output directory. Single writer (the harvest event loop)."""

    def __init__(self, out_dir: Path, *, shard_rows: int = 50_000, fsync_every: int = 64, readonly: bool = False):
        self.dir = Path(out_dir)
        self.shard_rows = shard_rows
        self.fsync_every = fsync_every
        self.readonly = readonly
        if not readonly:
            self.dir.mkdir(parents=True, exist_ok=True)
        elif not (self.dir / INDEX).exists() and not any(self.dir.glob("shard-*.jsonl")):
            raise InputError(f"{self.dir}: not a harvest output directory (no {INDEX}, no shards)")
        uri = f"file:{self.dir / INDEX}" + ("?mode=ro" if readonly and (self.dir / INDEX).exists() else "")
        self.db = sqlite3.connect(uri if readonly else self.dir / INDEX, uri=readonly, isolation_level=None)
        if not readonly:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_SCHEMA)
        self.resent_after_crash = 0
        self.recovered_rows = 0
        self.torn_bytes = 0
        self._files: dict[str, IO[bytes]] = {}
        self._shard_name: str | None = None
        self._shard_lines = 0
        self._unflushed = 0
        self._last_flush = time.monotonic()
        self._in_tx = False
        # written at the next flush, in this order: clears, marks, index rows (see `_write_pending`)
        self._pending_rows: dict[bytes, tuple] = {}
        self._pending_marks: set[bytes] = set()
        self._pending_clears: set[bytes] = set()
        if not readonly:
            self._recover()

    # ------------------------------------------------------------------------------------------ recovery

    def _covered(self, name: str) -> int:
        row = self.db.execute("SELECT offset FROM files WHERE name=?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def _journal_files(self) -> list[Path]:
        files = sorted(self.dir.glob("shard-*.jsonl"))
        if (self.dir / FAILURES).exists():
            files.append(self.dir / FAILURES)
        return files

    def _recover(self) -> None:
        """Index complete lines past each file's covered offset; cut a torn tail; count lost in-flight keys."""
        self._begin()
        for path in self._journal_files():
            start = self._covered(path.name)
            good_end = start
            with open(path, "rb") as f:
                f.seek(start)
                for raw in f:
                    if not raw.endswith(b"\n"):
                        break
                    try:
                        row = _row_of(json.loads(raw))
                    except (ValueError, KeyError, TypeError):
                        break
                    self._index(row)
                    self.recovered_rows += 1
                    good_end += len(raw)
            size = path.stat().st_size
            if size > good_end:
                self.torn_bytes += size - good_end
                with open(path, "r+b") as f:
                    f.truncate(good_end)
                    os.fsync(f.fileno())
            self.db.execute("INSERT OR REPLACE INTO files VALUES (?, ?)", (path.name, good_end))
        (n,) = self.db.execute("SELECT count(*) FROM inflight WHERE key NOT IN (SELECT key FROM done)").fetchone()
        self.resent_after_crash = int(n)
        self.db.execute("DELETE FROM inflight")
        self._commit()

    # ------------------------------------------------------------------------------------------ queries

    def status_of(self, key: str) -> int | None:
        """1 = completed, 0 = failed (recorded), None = never finished."""
        raw = bytes.fromhex(key)
        pending = self._pending_rows.get(raw)
        if pending is not None:
            return pending[1]
        row = self.db.execute("SELECT ok FROM done WHERE key=?", (raw,)).fetchone()
        return None if row is None else int(row[0])

    def totals(self) -> Totals:
        self._write_pending()
        t = Totals()
        for ok, n, cost, tokens, attempts in self.db.execute(
            "SELECT ok, count(*), sum(cost), sum(tokens), sum(attempts) FROM done GROUP BY ok"
        ):
            if ok:
                t.ok = int(n)
            else:
                t.failed = int(n)
            t.cost_usd += float(cost or 0)
            t.tokens += int(tokens or 0)
            t.attempts += int(attempts or 0)
        for cls, n in self.db.execute("SELECT error_class, count(*) FROM done WHERE ok=0 GROUP BY error_class"):
            t.failed_by_class[str(cls)] = int(n)
        return t

    def get_meta(self, name: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, name: str, value: str) -> None:
        self._begin()
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))

    # ------------------------------------------------------------------------------------------ writing

    def _begin(self) -> None:
        if not self._in_tx:
            self.db.execute("BEGIN")
            self._in_tx = True

    def _commit(self) -> None:
        if self._in_tx:
            self.db.execute("COMMIT")
            self._in_tx = False

    def _index(self, row: tuple) -> None:
        self.db.execute("INSERT OR REPLACE INTO done VALUES (?, ?, ?, ?, ?, ?, ?)", row)

    def mark_inflight(self, key: str) -> None:
        self._pending_marks.add(bytes.fromhex(key))

    def clear_inflight(self, key: str) -> None:
        """The request was given up without being answered (e.g. quota): it is pending, not lost in a crash."""
        raw = bytes.fromhex(key)
        self._pending_marks.discard(raw)
        self._pending_clears.add(raw)

    def _write_pending(self) -> None:
        """Buffered index rows and marks into the open transaction (clears first, so a key cleared and marked
        again since the last flush ends up marked)."""
        if self.readonly or not (self._pending_rows or self._pending_marks or self._pending_clears):
            return
        self._begin()
        if self._pending_clears:
            self.db.executemany("DELETE FROM inflight WHERE key=?", ((k,) for k in self._pending_clears))
        if self._pending_marks:
            self.db.executemany("INSERT OR IGNORE INTO inflight VALUES (?)", ((k,) for k in self._pending_marks))
        if self._pending_rows:
            self.db.executemany("INSERT OR REPLACE INTO done VALUES (?, ?, ?, ?, ?, ?, ?)", self._pending_rows.values())
        self._pending_clears.clear()
        self._pending_marks.clear()
        self._pending_rows.clear()

    def _file(self, name: str) -> IO[bytes]:
        f = self._files.get(name)
        if f is None:
            f = open(self.dir / name, "ab")  # noqa: SIM115 — kept open for the run, closed in close()
            self._files[name] = f
        return f

    def _next_shard(self) -> str:
        existing = [int(p.stem.split("-")[1]) for p in self.dir.glob("shard-*.jsonl") if p.stem[6:].isdigit()]
        return SHARD_FMT.format(max(existing, default=-1) + 1)

    def append(self, record: Record) -> None:
        """Journal one finished request. Durable after the next flush (at most `fsync_every` rows later)."""
        if record.status == "ok":
            if self._shard_name is None or self._shard_lines >= self.shard_rows:
                self._flush_files()
                self._shard_name = self._next_shard()
                self._shard_lines = 0
            name = self._shard_name
            self._shard_lines += 1
        else:
            name = FAILURES
        self._file(name).write(record.to_json().encode("utf-8") + b"\n")
        row = self._row_of_record(record)
        self._pending_rows.pop(row[0], None)  # a later record of the same key supersedes: keep write order
        self._pending_rows[row[0]] = row
        self._pending_marks.discard(row[0])
        self._pending_clears.add(row[0])
        self._unflushed += 1
        if self._unflushed >= self.fsync_every or time.monotonic() - self._last_flush > 1.0:
            self.flush()

    @staticmethod
    def _row_of_record(r: Record) -> tuple:
        p = r.provenance
        return (
            bytes.fromhex(p.request_key),
            1 if r.status == "ok" else 0,
            r.query.id,
            float(p.cost_usd),
            int(p.usage.total_tokens),
            int(p.attempts),
            r.error_class,
        )

    def _flush_files(self) -> None:
        for name, f in self._files.items():
            f.flush()
            os.fsync(f.fileno())
            self.db.execute("INSERT OR REPLACE INTO files VALUES (?, ?)", (name, f.tell()))

    def flush(self) -> None:
        """fsync data first, then commit the index that covers it (the order is what makes recovery exact)."""
        if self.readonly:
            return
        self._begin()
        self._flush_files()
        self._write_pending()
        self._commit()
        self._unflushed = 0
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if not self.readonly:
            self.flush()
        for f in self._files.values():
            f.close()
        self._files.clear()
        self.db.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
