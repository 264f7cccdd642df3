"""Dict rows out to a file, the container picked by the suffix, written under a temporary name and moved into
place (`imitate.dataset.io.atomic_path`): JSON array, JSONL, CSV/TSV (`.gz` compresses these) and Parquet (in
record batches). Rows may differ in their columns (extra metadata columns often do): a table needs them all up
front, so CSV/Parquet rows are first spooled to a temporary JSONL file next to the output while the columns (and
for Parquet the unified Arrow schema) are collected, then written; memory stays at one batch. A missing cell is
empty (CSV) or null (Parquet); list/dict cells are JSON text in CSV; a column whose values have incompatible types
(a number here, text there) cannot be one Parquet column and is an InputError naming it.
"""

from __future__ import annotations

import csv
import gzip
import json
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from imitate.dataset.io import atomic_path, suffix_container
from imitate.errors import InputError


def output_container(path: str | Path) -> str:
    found = suffix_container(path)
    if found is None:
        raise InputError(
            f"{path}: cannot tell the file type to write from the name",
            hint="use .json, .jsonl, .csv, .tsv or .parquet",
        )
    return found


def write_rows(rows: Iterable[dict[str, Any]], path: str | Path, *, batch_rows: int = 1000) -> int:
    """Write dict rows to `path`, the container picked by its suffix (`.gz` compresses JSON/JSONL/CSV), via a
    temporary name moved into place. Returns the row count."""
    container = output_container(path)
    with atomic_path(path) as tmp:
        if container in ("csv", "parquet"):
            with tempfile.TemporaryFile(dir=tmp.parent, prefix=".spool-") as spool:
                columns, schema, n = _spool(rows, spool, batch_rows, parquet=container == "parquet")
                spool.seek(0)
                if container == "parquet":
                    return _write_parquet(_batches(spool, batch_rows), tmp, schema, n)
                delimiter = "\t" if ".tsv" in [s.lower() for s in Path(path).suffixes] else ","
                with _open_text(path, tmp) as f:
                    return _write_csv((json.loads(line) for line in spool), f, columns, delimiter)
        with _open_text(path, tmp) as f:
            return _write_json(rows, f, array=container == "json")


def _open_text(path: str | Path, tmp: Path) -> Any:
    opener = gzip.open if str(path).lower().endswith(".gz") else open
    return opener(tmp, "wt", encoding="utf-8", newline="")  # type: ignore[operator]


def _dumps(row: dict[str, Any], n: int) -> str:
    try:
        return json.dumps(row, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"output row {n}: cannot be written ({exc})") from exc


def _write_json(rows: Iterable[dict[str, Any]], f: Any, *, array: bool) -> int:
    n = 0
    for row in rows:
        line = _dumps(row, n)
        f.write(("[\n" if n == 0 else ",\n") + line if array else line + "\n")
        n += 1
    if array:
        f.write("\n]\n" if n else "[]\n")
    return n


def _spool(rows: Iterable[dict[str, Any]], spool: Any, batch_rows: int, *, parquet: bool):
    """Rows to JSONL in `spool`; returns (columns in first-seen order, unified Arrow schema or None, count)."""
    columns: dict[str, None] = {}
    schema, n, batch = None, 0, []
    for row in rows:
        spool.write(_dumps(row, n).encode() + b"\n")
        columns.update(dict.fromkeys(row))
        n += 1
        if parquet:
            batch.append(row)
            if len(batch) >= batch_rows:
                schema, batch = _unify(schema, batch, n), []
    if parquet and (batch or schema is None):
        schema = _unify(schema, batch, n)
    return list(columns), schema, n


def _unify(schema: Any, batch: list[dict[str, Any]], n: int) -> Any:
    import pyarrow as pa

    try:
        keys = list(dict.fromkeys(k for row in batch for k in row))  # from_pylist looks at the first row's only
        found = pa.Table.from_pylist([{k: row.get(k) for k in keys} for row in batch]).schema
        return found if schema is None else pa.unify_schemas([schema, found], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InputError(f"output rows up to {n}: a column cannot hold every row's value ({exc})") from exc


def _batches(spool: Any, batch_rows: int) -> Iterator[list[dict[str, Any]]]:
    batch = []
    for line in spool:
        batch.append(json.loads(line))
        if len(batch) >= batch_rows:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_csv(rows: Iterable[dict[str, Any]], f: Any, columns: list[str], delimiter: str) -> int:
    writer, n = csv.writer(f, delimiter=delimiter, lineterminator="\n"), 0
    if columns:
        writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
        n += 1
    return n


def _cell(value: Any) -> Any:
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return "" if value is None else value


def _write_parquet(batches: Iterable[list[dict[str, Any]]], tmp: Path, schema: Any, n: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pq.ParquetWriter(tmp, schema) as writer:
        for batch in batches:
            try:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise InputError(f"output rows: a value does not fit the Parquet schema ({exc})") from exc
    return n
