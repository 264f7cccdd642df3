"""Rows in: the one place imitate reads rows from data files (harvest sources, `imitate convert`, `imitate train`);
and `atomic_path`, the one way outputs are written (a temporary name, moved into place).

    reader = open_rows("data/orca.parquet")          # checks it exists and picks the container
    for raw in reader: raw.where, raw.index, raw.value, raw.split
    with atomic_path("out/data.csv") as tmp: ...     # temp name in the same folder; os.replace on success

Containers (from the suffix, `.gz` allowed for JSON/JSONL/CSV; `.json` is sniffed: `[` first means a JSON array,
anything else JSONL): a JSON array, JSONL (`.jsonl`/`.ndjson`), CSV/TSV, Parquet, a `datasets.save_to_disk`
folder (a Dataset, or a DatasetDict of which one split is read) and a Hub dataset name (`owner/name`, read with
`datasets.load_dataset(..., streaming=True)`; `datasets` is imported only for these two). Nothing is loaded whole:
JSONL/CSV line by line, a JSON array element by element (stdlib `raw_decode` over a growing buffer, which, unlike
an event parser, knows the line each element starts on), Parquet by record batch, `load_from_disk` memory-maps.

Each row comes as a `RawRow`: `where` names it for messages (`file:line` for JSON/JSONL/CSV, `file:row N` with a
0-based N otherwise), `index` is its 0-based row number (blank lines not counted) and `value` is the parsed row
— or a `BadRow` saying why it could not be parsed (invalid JSON, a line that is not UTF-8, a CSV row with the
wrong number of cells), so the caller's bad-row policy (`ReadStats.bad`) decides whether to stop or skip. Damage
that leaves no next row to resume at is an `InputError` at once, whatever the policy: malformed JSON inside a
JSON array, undecodable bytes in a CSV or JSON array file, an unreadable Parquet file.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import os
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from imitate.dataset.jsonarray import UTF8_HINT, JsonArray
from imitate.errors import InputError

MAX_BAD_EXAMPLES = 5
CONTAINERS = ("json", "jsonl", "csv", "parquet", "hf-disk", "hub")
_HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_SUFFIX = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "csv"}
_SUFFIX |= {".parquet": "parquet", ".pq": "parquet"}
_FILE_SUFFIXES = {*_SUFFIX, ".gz", ".txt", ".arrow", ".zip", ".bz2", ".xz", ".zst", ".xlsx"}
_DISK_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
_BOM = b"\xef\xbb\xbf"


class BadRow(ValueError):
    """A row that cannot be used; the message says why and names the field (the caller adds the location)."""


@dataclass
class RawRow:
    where: str  # "file:line" or "file:row N": for messages
    index: int  # 0-based row number (Provenance.source.row)
    value: Any  # the parsed row (normally a dict), or a BadRow
    split: str | None = None  # the dataset split, for a save_to_disk DatasetDict or a Hub dataset


@dataclass
class ReadStats:
    """What a read did: rows seen, rows skipped as bad (first few messages kept), and notes (named counts, e.g.
    unanswered trailing turns dropped). One policy for every reader: `bad` raises unless told to skip."""

    rows: int = 0
    kept: int = 0
    skipped: int = 0
    bad_examples: list[str] = field(default_factory=list)
    notes: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)  # rows kept, by the format they were read as

    def bad(self, message: str, *, skip: bool, hint: str | None = None) -> None:
        if not skip:
            raise InputError(message, hint=hint)
        self.skipped += 1
        if len(self.bad_examples) < MAX_BAD_EXAMPLES:
            self.bad_examples.append(message)


def looks_local(name: str) -> bool:
    """A name only a local path can have: Hub names are `owner/name` of letters, digits and `-_.` (a version
    like `OpenHermes-2.5` is fine), never with a data-file suffix, a leading `.`/`~`/`/`, a second `/` or `\\`."""
    return (
        name.startswith((".", "~", "/"))
        or "\\" in name
        or name.count("/") > 1
        or Path(name).suffix.lower() in _FILE_SUFFIXES
    )


def is_datasets_folder(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in _DISK_MARKERS)


def detect_container(path_or_name: str, container: str = "auto", *, hint: str | None = None) -> str:
    """The container of a file, folder or Hub name (`container` other than auto is taken as given)."""
    if container != "auto":
        return container
    p = Path(path_or_name)
    if p.is_dir():
        if is_datasets_folder(p):
            return "hf-disk"
        raise InputError(f"{p}: a folder, but not one written by datasets' save_to_disk")
    found = suffix_container(p)
    if found == "json" and p.is_file():
        return _sniff_json(p)
    if found:
        return found
    if p.exists():
        raise InputError(
            f"{p}: cannot tell the format from the name", hint=hint or "use .json, .jsonl, .csv, .tsv or .parquet"
        )
    if looks_local(path_or_name):
        raise InputError(f"{path_or_name}: no such file or folder")
    if _HUB_NAME.match(path_or_name) and "/" in path_or_name:
        return "hub"
    raise InputError(f"{path_or_name}: no such file, and not a Hub dataset name (owner/name)")


def suffix_container(path: str | Path) -> str | None:
    """The container a file name says (`.gz` looked through), or None. `.json` says "json" (array or JSONL)."""
    suffixes = [s.lower() for s in Path(path).suffixes if s.lower() != ".gz"]
    return _SUFFIX.get(suffixes[-1]) if suffixes else None


def _sniff_json(path: Path) -> str:
    """`.json` files are JSON arrays or, often enough, JSONL under the wrong name: the first character tells."""
    with open(path, "rb") as raw, _maybe_gunzip(str(path), raw) as f:
        head = f.read(4096).removeprefix(_BOM).lstrip()
    return "json" if head.startswith(b"[") else "jsonl"


def open_rows(
    path_or_name: str | Path,
    container: str = "auto",
    *,
    split: str | None = None,
    subset: str | None = None,
    on_columns: Callable[[str, list[str]], None] | None = None,
    hint: str | None = None,
) -> RowReader:
    """Check the input exists and pick its container; nothing is read until iteration. `split` picks a split of
    a DatasetDict or Hub dataset (None: "train" if there is one, else the only split); `on_columns(where,
    names)` is called before the first row when the container declares its columns (CSV, Parquet, datasets)."""
    name = os.path.expanduser(str(path_or_name))  # a quoted '~/q.jsonl' is not expanded by the shell
    found = detect_container(name, container, hint=hint)
    if found != "hub" and not Path(name).exists():
        raise InputError(f"{name}: no such file or folder")
    return RowReader(name, found, split=split, subset=subset, on_columns=on_columns)


class RowReader:
    """Iterable of RawRow; each iteration re-reads the input."""

    def __init__(self, path: str, container: str, *, split=None, subset=None, on_columns=None):
        self.path, self.container, self.split, self.subset = path, container, split, subset
        self.on_columns = on_columns or (lambda where, names: None)
        self._file: BinaryIO | None = None

    @property
    def position(self) -> int | None:
        """Bytes read from disk so far (JSON/JSONL/CSV while iterating; read-ahead included)."""
        if self._file is None or self._file.closed:
            return None
        return os.lseek(self._file.fileno(), 0, os.SEEK_CUR)

    def count_hint(self, scan: bool = False) -> int | None:
        """Rows to expect: free for Parquet and `datasets` folders; JSONL/CSV lines are counted only if `scan`
        (a fast byte scan: blank lines and multi-line CSV cells make it approximate)."""
        if self.container == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(self.path).metadata.num_rows
        if self.container == "hf-disk":
            return len(self._load_disk()[0])
        if scan and self.container in ("jsonl", "csv"):
            with open(self.path, "rb") as raw, _maybe_gunzip(self.path, raw) as f:
                n = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
            return n - (self.container == "csv")
        return None

    def __iter__(self) -> Iterator[RawRow]:
        readers = {
            "json": self._json_array_rows,
            "jsonl": self._jsonl_rows,
            "csv": self._csv_rows,
            "parquet": self._parquet_rows,
            "hf-disk": self._disk_rows,
            "hub": self._hub_rows,
        }
        if self.container not in readers:
            raise InputError(f"{self.path}: unknown container {self.container!r} (one of: {', '.join(CONTAINERS)})")
        return readers[self.container]()

    def _jsonl_rows(self) -> Iterator[RawRow]:
        with open(self.path, "rb") as self._file, _maybe_gunzip(self.path, self._file) as f:
            index = 0
            for lineno, line in enumerate(f, 1):
                if lineno == 1:
                    line = line.removeprefix(_BOM)
                if not line.strip():
                    continue
                yield RawRow(f"{self.path}:{lineno}", index, _parse_line(line))
                index += 1

    def _json_array_rows(self) -> Iterator[RawRow]:
        with open(self.path, "rb") as self._file, _maybe_gunzip(self.path, self._file) as f:
            for index, (line, value) in enumerate(JsonArray(f, self.path).elements()):
                yield RawRow(f"{self.path}:{line}", index, value)

    def _csv_rows(self) -> Iterator[RawRow]:
        csv.field_size_limit(2**31 - 1)  # long prompts are normal; the default 128 KiB cell limit is not
        delimiter = "\t" if ".tsv" in [s.lower() for s in Path(self.path).suffixes] else ","
        with open(self.path, "rb") as self._file, _maybe_gunzip(self.path, self._file) as raw:
            reader = csv.reader(_utf8_lines(raw, self.path), delimiter=delimiter)
            try:
                header = next(reader, None)
                if header is None:
                    return
                self.on_columns(f"{self.path}:{reader.line_num}", header)
                index = 0
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
                    yield RawRow(f"{self.path}:{start}", index, row)
                    index += 1
            except csv.Error as exc:
                raise InputError(f"{self.path}:{reader.line_num + 1}: unreadable CSV ({exc})") from exc

    def _parquet_rows(self) -> Iterator[RawRow]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{self.path}: not a readable Parquet file ({exc})") from exc
        try:
            self.on_columns(self.path, pf.schema_arrow.names)
            index = 0
            for batch in pf.iter_batches(batch_size=1024):
                for row in batch.to_pylist():
                    yield RawRow(f"{self.path}:row {index}", index, row)
                    index += 1
        finally:
            pf.close()

    def _load_disk(self) -> tuple[Any, str | None]:
        import datasets

        try:
            ds = datasets.load_from_disk(self.path)
        except (OSError, ValueError) as exc:
            raise InputError(f"{self.path}: not a readable datasets folder ({exc})") from exc
        if isinstance(ds, datasets.DatasetDict):
            split = pick_split(self.path, list(ds), self.split)
            return ds[split], split
        return ds, (str(ds.split) if ds.split is not None else None)

    def _disk_rows(self) -> Iterator[RawRow]:
        ds, split = self._load_disk()
        self.on_columns(self.path, list(ds.column_names))
        index = 0
        for batch in ds.iter(batch_size=1000):
            columns = list(batch)
            for values in zip(*(batch[c] for c in columns), strict=True):
                yield RawRow(f"{self.path}:row {index}", index, dict(zip(columns, values, strict=True)), split)
                index += 1

    def _hub_rows(self) -> Iterator[RawRow]:
        import datasets

        split = self.split or "train"
        try:
            ds = datasets.load_dataset(self.path, self.subset, split=split, streaming=True)
        except (OSError, ValueError) as exc:  # DatasetNotFoundError and offline errors are OSError subclasses
            raise InputError(
                f"{self.path}: cannot open Hub dataset ({exc})", hint="check the name, split and network"
            ) from exc
        for index, row in enumerate(ds):
            yield RawRow(f"{self.path}:row {index}", index, row, split)


def pick_split(where: str, splits: list[str], wanted: str | None) -> str:
    """The split asked for; without one, "train" if there is one, else the only split."""
    if wanted is None and len(splits) == 1:
        return splits[0]
    wanted = wanted or "train"
    if wanted not in splits:
        raise InputError(f"{where}: no split {wanted!r} (splits: {', '.join(splits)})", hint="choose a split")
    return wanted


def _parse_line(line: bytes) -> Any:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return BadRow(f"not UTF-8 text (byte 0x{line[exc.start]:02x} at column {exc.start + 1})")
    try:
        return json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as exc:
        return BadRow(f"invalid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})")


def _utf8_lines(raw: BinaryIO, path: str) -> Iterator[str]:
    """Decoded lines for the csv module, each with its ending (what `newline=""` would give), so a bad byte is
    reported on its own line rather than somewhere in a read-ahead block."""
    for lineno, line in enumerate(raw, 1):
        if lineno == 1:
            line = line.removeprefix(_BOM)
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError as exc:
            where = f"{path}:{lineno}"
            raise InputError(f"{where}: not UTF-8 text (byte 0x{line[exc.start]:02x})", hint=UTF8_HINT) from exc


def _maybe_gunzip(path: str, f: BinaryIO) -> BinaryIO:
    return gzip.GzipFile(fileobj=f, mode="rb") if path.lower().endswith(".gz") else f  # type: ignore[return-value]


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """A temporary path next to `target` (same folder, so same file system), moved onto it with os.replace only
    when the block succeeds, and removed when it fails: nothing is ever written half. Works for a file or a
    folder (an existing folder at `target` is replaced whole)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if tmp.is_dir() and target.is_dir():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
