"""The harvest journal: append-only JSONL shards are the truth, a SQLite index makes resume O(1) per request.

Layout of an output directory:

    shard-00000.jsonl ...   completed records (one `Record` JSON per line); a rerun appends to the last shard
                            until it holds `shard_rows` lines
    failures.jsonl          failed records (status "failed", error class and message)
    ledger.bin              every attempt the teacher may bill, written before it is sent (`ledger.py`)
    journal.sqlite          index: request key -> status, cost, tokens, file and offset of its line; committed
                            byte offset of every file; the ledger's checkpoint
    manifest.json           counts, usage, spend, timings, redacted config (rewritten atomically)

Durability. Each record is appended with one unbuffered `write`: once the collector counts a row as done, its
line is in the kernel, so a kill -9 of the harvester cannot lose it (only the requests truly in flight are sent
again). An fsync of every file, then the index commit that covers it, happens every `fsync_every` rows or second:
a power cut or kernel crash can lose up to that window, never more. The index stores how far each file is
covered; on open, every file is re-read from its covered offset to the end (a complete line there is a finished
request whose index update was lost: indexed now, never re-sent) and a torn or garbled tail is cut off.

Damage. The last line under the covered offset is checked too: garbled (bit rot, a hand edit, a file cut short),
it is cut off and its row is dropped from the index, so the rerun asks for it again instead of calling the run
complete. An index that SQLite cannot read (truncated, garbage, another version) is moved aside and rebuilt from
the shards and the ledger. A write that fails (disk full, read-only) is cut back to the last whole line and raised
as `StorageError`: the collector stops at once rather than buy answers it cannot store.

Failed rows. A failure of a class that a later attempt may cure (429, 5xx, network, bad response: the error's
`retryable`) is written to failures.jsonl for the record but indexed as "retry next run"; a permanent one (context
too long, bad request, content filter) is done. The index holds 32-byte keys on disk, not a Python set: RSS stays
flat however many rows a run has done.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imitate import errors
from imitate.errors import InputError, StorageError
from imitate.harvest.ledger import Ledger, Spent, storage_error
from imitate.records import Record

FAILURES = "failures.jsonl"
INDEX = "journal.sqlite"
MANIFEST = "manifest.json"
SHARD_FMT = "shard-{:05d}.jsonl"
SCHEMA_VERSION = 2
OK, FAILED, RETRY = 1, 0, 2  # `done.ok`: answered; failed for good; failed, to be asked again by the next run

_SCHEMA = """
CREATE TABLE IF NOT EXISTS done (key BLOB PRIMARY KEY, ok INTEGER NOT NULL, query_id TEXT,
    cost REAL NOT NULL, tokens INTEGER NOT NULL, attempts INTEGER NOT NULL, error_class TEXT,
    file TEXT NOT NULL, offset INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS files (name TEXT PRIMARY KEY, offset INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class Totals:
    ok: int = 0
    failed: int = 0  # for good
    retry: int = 0  # failed for a transient reason: the next run asks again
    cost_usd: float = 0.0
    tokens: int = 0
    attempts: int = 0
    failed_by_class: dict[str, int] = field(default_factory=dict)


def _status(record: Record) -> int:
    if record.status == "ok":
        return OK
    cls = getattr(errors, record.error_class or "", None)
    return RETRY if getattr(cls, "retryable", False) else FAILED


def _index_row(record: Record, file: str, offset: int) -> tuple:
    """The one place a record becomes its index row (appending and recovery alike)."""
    p = record.provenance
    return (
        bytes.fromhex(p.request_key),
        _status(record),
        record.query.id,
        float(p.cost_usd),
        int(p.usage.total_tokens),
        int(p.attempts),
        record.error_class,
        file,
        offset,
    )


def _parse_line(raw: bytes) -> Record | None:
    if not raw.endswith(b"\n"):
        return None
    try:
        return Record.model_validate_json(raw)
    except ValueError:  # pydantic's ValidationError is a ValueError; so is bad JSON / UTF-8
        return None


class Journal:
    """Exactly-once bookkeeping for one output directory. Single writer (the harvest event loop)."""

    def __init__(self, out_dir: Path, *, shard_rows: int = 50_000, fsync_every: int = 64, readonly: bool = False):
        self.dir = Path(out_dir)
        self.shard_rows = shard_rows
        self.fsync_every = fsync_every
        self.readonly = readonly
        self.recovered_rows = 0  # lines found past the index (its commit was lost): indexed, not re-sent
        self.dropped_rows = 0  # indexed rows whose line was garbled or gone: asked again
        self.torn_bytes = 0
        self.resent_after_crash = 0  # rows the last run had in flight when it died, sent again by this one
        self.rebuilt: str | None = None  # why the index was rebuilt, if it was
        if readonly:
            if not (self.dir / INDEX).exists() and not any(self.dir.glob("shard-*.jsonl")):
                raise InputError(f"{self.dir}: not a harvest output directory (no {INDEX}, no shards)")
        else:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise storage_error(self.dir, exc) from exc
        self.db = self._open_index()
        self._fds: dict[str, int] = {}
        self._offsets: dict[str, int] = {}
        self._shard_name: str | None = None
        self._shard_lines = 0
        self._unflushed = 0
        self._last_flush = time.monotonic()
        self._pending_rows: dict[bytes, tuple] = {}  # index rows written at the next flush (lookups see them)
        if not readonly:
            self._guard(self._recover)
        checkpoint = self.get_meta("ledger")
        self.ledger = Ledger(self.dir, json.loads(checkpoint) if checkpoint else None, readonly=readonly)
        if not self.ledger.existed:  # outputs older than the ledger: what the records say was spent
            t = self.totals()
            self.ledger.spent = Spent(t.attempts, t.cost_usd, t.tokens)

    # ------------------------------------------------------------------------------------------ the index

    def _connect(self) -> sqlite3.Connection:
        path = self.dir / INDEX
        if self.readonly:
            if not path.exists():
                return sqlite3.connect(":memory:", isolation_level=None)
            return sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        return sqlite3.connect(path, isolation_level=None)

    def _open_index(self) -> sqlite3.Connection:
        db = self._connect()
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if tables and version != SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"index version {version}, expected {SCHEMA_VERSION}")
            (check,) = db.execute("PRAGMA quick_check(1)").fetchone()
            if check != "ok":
                raise sqlite3.DatabaseError(check)
            if self.readonly:
                if not tables:
                    db.executescript(_SCHEMA)
                return db
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            return db
        except sqlite3.DatabaseError as exc:
            db.close()
            if self.readonly:
                raise InputError(
                    f"{self.dir / INDEX}: unreadable index ({exc})", hint="run the harvest again: it rebuilds the index"
                ) from exc
            self.rebuilt = str(exc)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for suffix in ("", "-wal", "-shm"):
                old = self.dir / (INDEX + suffix)
                if old.exists():
                    os.replace(old, old.with_name(f"{old.name}.damaged-{stamp}"))
            return self._open_index()

    def _guard(self, fn: Any, *args: Any) -> Any:
        """Run an index/file operation; a full or read-only disk becomes StorageError."""
        try:
            return fn(*args)
        except sqlite3.OperationalError as exc:
            raise storage_error(self.dir / INDEX, OSError(str(exc))) from exc
        except StorageError:
            raise
        except OSError as exc:
            raise storage_error(Path(exc.filename or self.dir), exc) from exc

    # ------------------------------------------------------------------------------------------ recovery

    def _covered(self, name: str) -> int:
        row = self.db.execute("SELECT offset FROM files WHERE name=?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def _journal_files(self) -> list[Path]:
        files = sorted(self.dir.glob("shard-*.jsonl"))
        if (self.dir / FAILURES).exists():
            files.append(self.dir / FAILURES)
        return files

    @staticmethod
    def _last_good_end(path: Path, end: int) -> int:
        """`end`, or less: the end of the last line before `end` that parses, walking back over garbled ones."""
        with open(path, "rb") as f:
            while end > 0:
                start = end - 1
                while start > 0:  # back to the newline before this line, in blocks
                    f.seek(max(0, start - 65536))
                    block = f.read(start - max(0, start - 65536))
                    nl = block.rfind(b"\n")
                    if nl >= 0:
                        start = max(0, start - 65536) + nl + 1
                        break
                    start = max(0, start - 65536)
                f.seek(start)
                if _parse_line(f.read(end - start)) is not None:
                    return end
                end = start
        return 0

    def _recover(self) -> None:
        """Check each file's covered tail, index complete lines past it, cut torn or garbled bytes."""
        self._begin()
        for path in self._journal_files():
            size = path.stat().st_size
            covered = self._covered(path.name)
            start = self._last_good_end(path, min(covered, size))
            if start < covered:  # indexed rows whose lines are gone or garbled: ask for them again
                cur = self.db.execute("DELETE FROM done WHERE file=? AND offset>=?", (path.name, start))
                self.dropped_rows += cur.rowcount
            good_end = start
            with open(path, "rb") as f:
                f.seek(start)
                for raw in f:
                    record = _parse_line(raw)
                    if record is None:
                        break
                    self.db.execute("INSERT OR REPLACE INTO done VALUES (?,?,?,?,?,?,?,?,?)",
                                    _index_row(record, path.name, good_end))  # fmt: skip
                    self.recovered_rows += 1
                    good_end += len(raw)
            if size > good_end:
                self.torn_bytes += size - good_end
                with open(path, "r+b") as f:
                    f.truncate(good_end)
                    os.fsync(f.fileno())
            self.db.execute("INSERT OR REPLACE INTO files VALUES (?, ?)", (path.name, good_end))
        self._commit()

    def note_send(self, key: str) -> None:
        """A first attempt for `key` is going out: count it if the last run died with this key in flight."""
        if self.ledger.crashed and self.ledger.was_open_at_crash(key):
            self.resent_after_crash += 1

    # ------------------------------------------------------------------------------------------ queries

    def status_of(self, key: str) -> int | None:
        """1 = completed, 0 = failed for good, None = to be asked (never finished, or failed transiently)."""
        raw = bytes.fromhex(key)
        pending = self._pending_rows.get(raw)
        if pending is not None:
            status = pending[1]
        else:
            row = self.db.execute("SELECT ok FROM done WHERE key=?", (raw,)).fetchone()
            status = None if row is None else int(row[0])
        return None if status == RETRY else status

    def totals(self) -> Totals:
        self._guard(self._write_pending)
        t = Totals()
        for ok, n, cost, tokens, attempts in self.db.execute(
            "SELECT ok, count(*), sum(cost), sum(tokens), sum(attempts) FROM done GROUP BY ok"
        ):
            if ok == OK:
                t.ok = int(n)
            elif ok == RETRY:
                t.retry = int(n)
            else:
                t.failed = int(n)
            t.cost_usd += float(cost or 0)
            t.tokens += int(tokens or 0)
            t.attempts += int(attempts or 0)
        for cls, n in self.db.execute("SELECT error_class, count(*) FROM done WHERE ok!=1 GROUP BY error_class"):
            t.failed_by_class[str(cls)] = int(n)
        return t

    def get_meta(self, name: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, name: str, value: str) -> None:
        self._begin()
        self._guard(self.db.execute, "INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))

    # ------------------------------------------------------------------------------------------ writing

    def _begin(self) -> None:
        if not self.db.in_transaction:
            self.db.execute("BEGIN")

    def _commit(self) -> None:
        if self.db.in_transaction:
            self.db.execute("COMMIT")

    def _write_pending(self) -> None:
        if self.readonly or not self._pending_rows:
            return
        self._begin()
        self.db.executemany("INSERT OR REPLACE INTO done VALUES (?,?,?,?,?,?,?,?,?)", self._pending_rows.values())
        self._pending_rows.clear()

    def _fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            path = self.dir / name
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError as exc:
                raise storage_error(path, exc) from exc
            self._fds[name] = fd
            self._offsets[name] = os.fstat(fd).st_size
        return fd

    def _write_line(self, name: str, data: bytes) -> int:
        """Append one whole line (one unbuffered write); returns its offset. A failed write is cut back."""
        fd = self._fd(name)
        offset = self._offsets[name]
        try:
            n = os.write(fd, data)
        except OSError as exc:
            os.ftruncate(fd, offset)
            raise storage_error(self.dir / name, exc) from exc
        if n != len(data):
            os.ftruncate(fd, offset)
            raise storage_error(self.dir / name, OSError(28, "short write (disk full?)"))
        self._offsets[name] = offset + n
        return offset

    def _shard_for_next_row(self) -> str:
        if self._shard_name is None:  # continue the last shard of an earlier run while it has room
            shards = sorted(p for p in self.dir.glob("shard-*.jsonl") if p.stem[6:].isdigit())
            if shards:
                with open(shards[-1], "rb") as f:
                    lines = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
                if lines < self.shard_rows:
                    self._shard_name, self._shard_lines = shards[-1].name, lines
        if self._shard_name is None or self._shard_lines >= self.shard_rows:
            existing = [int(p.stem[6:]) for p in self.dir.glob("shard-*.jsonl") if p.stem[6:].isdigit()]
            self._shard_name = SHARD_FMT.format(max(existing, default=-1) + 1)
            self._shard_lines = 0
        self._shard_lines += 1
        return self._shard_name

    def append(self, record: Record) -> None:
        """Journal one finished request: in the kernel on return (a kill -9 cannot lose it), durable against
        power loss after the next flush (at most `fsync_every` rows or a second later)."""
        name = self._shard_for_next_row() if record.status == "ok" else FAILURES
        offset = self._write_line(name, record.to_json().encode("utf-8") + b"\n")
        row = _index_row(record, name, offset)
        self._pending_rows.pop(row[0], None)  # a later record of the same key supersedes: keep write order
        self._pending_rows[row[0]] = row
        self._unflushed += 1
        if self._unflushed >= self.fsync_every or time.monotonic() - self._last_flush > 1.0:
            self.flush()

    def flush(self) -> None:
        """fsync data first, then commit the index that covers it (the order is what makes recovery exact)."""
        if not self.readonly:
            self._guard(self._flush)

    def _flush(self) -> None:
        self._begin()
        for name, fd in self._fds.items():
            os.fsync(fd)
            self.db.execute("INSERT OR REPLACE INTO files VALUES (?, ?)", (name, self._offsets[name]))
        self._write_pending()
        self.ledger.sync()
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('ledger', ?)", (json.dumps(self.ledger.checkpoint()),))
        self._commit()
        self._unflushed = 0
        self._last_flush = time.monotonic()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self.ledger.close()
            if self.db.in_transaction:  # a flush that failed (disk full): nothing of it counts
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
            self.db.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise storage_error(path, exc) from exc
