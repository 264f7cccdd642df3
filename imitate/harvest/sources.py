"""Input sources: stream `Query` objects lazily from JSONL, CSV/TSV, Parquet, a saved `datasets` folder or a
Hub dataset, with one field mapping (`SourceConfig.fields`) and one bad-row policy for all of them.

    src = open_source("data/questions.jsonl", cfg.harvest.source)
    for query in src: ...          # src.skipped / src.duplicates / src.bad_examples after (or during) the loop

Formats (auto-detected from the suffix, `.gz` allowed for JSONL/CSV; a folder is a saved `datasets` folder;
a missing `owner/name` is a Hub dataset, but a missing name that can only be a path — a data-file suffix, a
leading `.`, `~` or `/`, more than one `/` — is an InputError at once, not a Hub lookup that takes seconds
and then blames the network; `~` is expanded): nothing is ever loaded whole —
JSONL/CSV are read line by line, Parquet record batch by record batch, `load_from_disk` memory-maps and the
Hub is read with `streaming=True`. `datasets` is imported only when one of its formats is used.

Rows:
- The question column holds a string, or a chat (a list of `{"role", "content"}` — or ShareGPT
  `{"from", "value"}` — messages): the last user turn is the question, earlier turns go to `Query.turns`, a
  leading system turn becomes `Query.system` (unless the system column has one), and trailing assistant turns
  are dropped (the teacher is asked to write them anew).
- The id column may be absent: the id is then `Query.stable_id` of the content. Empty system/id/collection
  values (a blank CSV cell) count as absent. Every other column goes to `Query.metadata`.
- A bad row (invalid JSON, not an object, missing/empty/non-string question, malformed chat) raises
  `InputError` naming `file:line` (the line for JSONL/CSV, `file:row N` with a 0-based row index otherwise),
  or, with `skip_bad_rows`, is skipped and counted in `.skipped`, the first few messages in `.bad_examples`.
- Duplicate ids: a repeated *derived* id is the same content twice, so the later row is dropped and counted in
  `.duplicates`; a repeated *explicit* id is a bad row (the journal resumes by id, so keeping both would
  silently lose one). Seen ids are kept as 64-bit hashes (about 70 bytes per row).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from imitate.config import SourceConfig
from imitate.errors import InputError
from imitate.records import Message, Query

MAX_BAD_EXAMPLES = 5
_HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_SUFFIX_FORMAT = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "csv"}
_SUFFIX_FORMAT |= {".parquet": "parquet", ".pq": "parquet"}
_FILE_SUFFIXES = {*_SUFFIX_FORMAT, ".gz", ".txt", ".arrow", ".zip", ".bz2", ".xz", ".zst", ".xlsx"}
_SHAREGPT_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class BadRow(ValueError):
    """A row that cannot become a Query; the message says why (the location is added by the caller)."""


def detect_format(path_or_name: str, cfg: SourceConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    p = Path(path_or_name)
    if p.is_dir():
        if any((p / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
            return "hf-disk"
        raise InputError(f"{p}: a folder, but not one written by datasets' save_to_disk")
    suffixes = [s.lower() for s in p.suffixes if s.lower() != ".gz"]
    fmt = _SUFFIX_FORMAT.get(suffixes[-1]) if suffixes else None
    if fmt:
        return fmt
    if p.exists():
        raise InputError(f"{p}: cannot tell the format from the name", hint="set source.format")
    if looks_local(path_or_name):
        raise InputError(f"{path_or_name}: no such file or folder")
    if _HUB_NAME.match(path_or_name) and "/" in path_or_name:
        return "hub"
    raise InputError(f"{path_or_name}: no such file, and not a Hub dataset name (owner/name)")


def looks_local(name: str) -> bool:
    """A name only a local path can have: Hub names are `owner/name` of letters, digits and `-_.` (a version
    like `OpenHermes-2.5` is fine), never with a data-file suffix, a leading `.`/`~`/`/`, a second `/` or `\\`."""
    return (
        name.startswith((".", "~", "/"))
        or "\\" in name
        or name.count("/") > 1
        or Path(name).suffix.lower() in _FILE_SUFFIXES
    )


def open_source(path_or_name: str, cfg: SourceConfig | None = None) -> QuerySource:
    """Check the input exists and pick its format; nothing is read until iteration."""
    cfg = cfg or SourceConfig()
    path_or_name = os.path.expanduser(str(path_or_name))  # a quoted '~/q.jsonl' is not expanded by the shell
    fmt = detect_format(path_or_name, cfg)
    if fmt != "hub" and not Path(path_or_name).exists():
        raise InputError(f"{path_or_name}: no such file or folder")
    return QuerySource(str(path_or_name), cfg, fmt)


class QuerySource:
    """Iterable of Query; each iteration re-reads the input and resets the counters."""

    def __init__(self, path_or_name: str, cfg: SourceConfig, fmt: str):
        self.path, self.cfg, self.format = path_or_name, cfg, fmt
        self.skipped = 0
        self.duplicates = 0
        self.rows_read = 0
        self.bad_examples: list[str] = []
        self._file: BinaryIO | None = None

    @property
    def position(self) -> int | None:
        """Bytes read from disk so far (JSONL/CSV while iterating; read-ahead included)."""
        if self._file is None or self._file.closed:
            return None
        return os.lseek(self._file.fileno(), 0, os.SEEK_CUR)

    def count_hint(self, scan: bool = False) -> int | None:
        """Rows to expect: free for Parquet and `datasets` folders; JSONL/CSV lines are counted only if `scan`
        (a fast byte scan: blank lines and multi-line CSV cells make it approximate)."""
        n: int | None = None
        if self.format == "parquet":
            import pyarrow.parquet as pq

            n = pq.ParquetFile(self.path).metadata.num_rows
        elif self.format == "hf-disk":
            n = len(_load_disk(self.path, self.cfg))
        elif scan and self.format in ("jsonl", "csv"):
            with open(self.path, "rb") as raw, _maybe_gunzip(self.path, raw) as f:
                n = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
            n -= self.format == "csv"
        if n is not None and self.cfg.limit:
            n = min(n, self.cfg.limit)
        return n

    def __iter__(self) -> Iterator[Query]:
        self.skipped = self.duplicates = self.rows_read = 0
        self.bad_examples = []
        seen: set[int] = set()
        produced = 0
        for loc, row in self._rows():
            self.rows_read += 1
            try:
                query, explicit = to_query(row, self.cfg)
                key = int.from_bytes(hashlib.blake2b(query.id.encode(), digest_size=8).digest(), "big")
                if key in seen:
                    if not explicit:
                        self.duplicates += 1
                        continue
                    raise BadRow(f"id {query.id!r} repeats an earlier row's id")
                seen.add(key)
            except BadRow as exc:
                self._bad(f"{loc}: {exc}")
                continue
            yield query
            produced += 1
            if self.cfg.limit and produced >= self.cfg.limit:
                return

    def _bad(self, message: str) -> None:
        if not self.cfg.skip_bad_rows:
            raise InputError(message, hint="fix the row, or set source.skip_bad_rows: true to skip and count")
        self.skipped += 1
        if len(self.bad_examples) < MAX_BAD_EXAMPLES:
            self.bad_examples.append(message)

    def _rows(self) -> Iterator[tuple[str, Any]]:
        if self.format == "jsonl":
            yield from self._jsonl_rows()
        elif self.format == "csv":
            yield from self._csv_rows()
        elif self.format == "parquet":
            yield from _parquet_rows(self.path, self.cfg)
        elif self.format == "hf-disk":
            yield from _dataset_rows(self.path, _load_disk(self.path, self.cfg), self.cfg)
        else:
            yield from _hub_rows(self.path, self.cfg)

    def _jsonl_rows(self) -> Iterator[tuple[str, Any]]:
        with open(self.path, "rb") as self._file, _maybe_gunzip(self.path, self._file) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]
                try:
                    row: Any = json.loads(line)
                except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
                    row = BadRow(f"invalid JSON ({getattr(exc, 'msg', None) or exc.__class__.__name__})")
                yield f"{self.path}:{lineno}", row

    def _csv_rows(self) -> Iterator[tuple[str, Any]]:
        csv.field_size_limit(2**31 - 1)  # long prompts are normal; the default 128 KiB cell limit is not
        delimiter = "\t" if ".tsv" in [s.lower() for s in Path(self.path).suffixes] else ","
        with (
            open(self.path, "rb") as self._file,
            _maybe_gunzip(self.path, self._file) as raw,
            io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as text,
        ):
            reader = csv.reader(text, delimiter=delimiter)
            try:
                header = next(reader, None)
                if header is None:
                    return
                _check_columns(self.path, header, self.cfg)
                while True:
                    start = reader.line_num + 1
                    cells = next(reader, None)
                    if cells is None:
                        return
                    if not any(c.strip() for c in cells):
                        continue
                    row: Any = dict(zip(header, cells, strict=False))
                    if len(cells) != len(header):
                        row = BadRow(f"{len(cells)} cells, the header has {len(header)}")
                    yield f"{self.path}:{start}", row
            except (csv.Error, UnicodeDecodeError) as exc:
                raise InputError(f"{self.path}:{reader.line_num + 1}: unreadable CSV ({exc})") from exc


# ---------------------------------------------------------------------------------------------- row → Query


def _text(row: dict[str, Any], column: str | None, numbers: bool = False) -> str | None:
    """An optional string column (numbers allowed for ids); blank means absent."""
    if column is None or row.get(column) is None:
        return None
    value = row[column]
    if numbers and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise BadRow(f"{column} must be a string, got {type(value).__name__}")
    return value if value.strip() else None


def _chat(value: list[Any]) -> tuple[str, list[Message], str | None]:
    msgs = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise BadRow(f"chat turn {i} is not an object")
        role = m.get("role", _SHAREGPT_ROLE.get(str(m.get("from", "")).lower()))
        content = m.get("content", m.get("value"))
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise BadRow(f"chat turn {i} needs a role (system/user/assistant) and string content")
        msgs.append(Message(role=role, content=content))
    while msgs and msgs[-1].role == "assistant":
        msgs.pop()
    system = msgs.pop(0).content if msgs and msgs[0].role == "system" else None
    if not msgs or msgs[-1].role != "user" or not msgs[-1].content.strip():
        raise BadRow("chat has no non-empty user turn to answer")
    if any(m.role == "system" for m in msgs):
        raise BadRow("chat has a system turn after the first turn")
    return msgs[-1].content, msgs[:-1], system


def to_query(row: Any, cfg: SourceConfig) -> tuple[Query, bool]:
    """One raw row → (Query, whether its id came from the input). Raises BadRow."""
    if isinstance(row, BadRow):
        raise row
    if not isinstance(row, dict):
        raise BadRow(f"expected an object, got {type(row).__name__}")
    f = cfg.fields
    value = row.get(f.question)
    if value is None:
        raise BadRow(f"missing question field {f.question!r}")
    turns: list[Message] = []
    chat_system = None
    if isinstance(value, list):
        question, turns, chat_system = _chat(value)
    elif isinstance(value, str):
        question = value
    else:
        raise BadRow(f"question field {f.question!r} must be a string or a chat, got {type(value).__name__}")
    if not question.strip():
        raise BadRow(f"empty question field {f.question!r}")
    system = _text(row, f.system) or chat_system
    given_id = _text(row, f.id, numbers=True)
    used = {f.question, f.system, f.id, f.collection}
    query = Query(
        id=given_id or Query.stable_id(question, system, turns),
        question=question,
        system=system,
        collection=_text(row, f.collection),
        turns=turns,
        metadata={k: v for k, v in row.items() if k not in used},
    )
    return query, given_id is not None


# ---------------------------------------------------------------------------------------------- readers


def _maybe_gunzip(path: str, f: BinaryIO) -> BinaryIO:
    return gzip.GzipFile(fileobj=f, mode="rb") if path.lower().endswith(".gz") else f  # type: ignore[return-value]


def _check_columns(where: str, columns: list[str], cfg: SourceConfig) -> None:
    if cfg.fields.question not in columns:
        raise InputError(
            f"{where}: no column {cfg.fields.question!r} (columns: {', '.join(map(str, columns))})",
            hint="map it with source.fields.question",
        )


def _parquet_rows(path: str, cfg: SourceConfig) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable Parquet file ({exc})") from exc
    try:
        _check_columns(path, pf.schema_arrow.names, cfg)
        index = 0
        for batch in pf.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield f"{path}:row {index}", row
                index += 1
    finally:
        pf.close()


def _load_disk(path: str, cfg: SourceConfig) -> Any:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable datasets folder ({exc})") from exc
    if isinstance(ds, datasets.DatasetDict):
        if cfg.split not in ds:
            raise InputError(f"{path}: no split {cfg.split!r} (splits: {', '.join(ds)})", hint="set source.split")
        ds = ds[cfg.split]
    return ds


def _dataset_rows(where: str, ds: Any, cfg: SourceConfig) -> Iterator[tuple[str, Any]]:
    _check_columns(where, list(ds.column_names), cfg)
    index = 0
    for batch in ds.iter(batch_size=1000):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns), strict=True):
            yield f"{where}:row {index}", dict(zip(columns, values, strict=True))
            index += 1


def _hub_rows(name: str, cfg: SourceConfig) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, cfg.subset, split=cfg.split, streaming=True)
    except (OSError, ValueError) as exc:  # DatasetNotFoundError and offline errors are OSError subclasses
        raise InputError(f"{name}: cannot open Hub dataset ({exc})", hint="check the name, split and network") from exc
    for index, row in enumerate(ds):
        yield f"{name}:row {index}", row
