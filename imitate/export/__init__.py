"""Export a record set as a Hub dataset folder, with its provenance card, and optionally push it to the Hub.

    imitate export data/runs/demo --out data/runs/demo-hub --format openorca --licence cc-by-4.0
    imitate export data/runs/mixed --out data/runs/mixed-hub --hub user/name --private

The folder holds what the Hub's dataset viewer and `datasets.load_dataset(FOLDER)` read:

    README.md                              dataset card: YAML metadata (license, language, task_categories,
                                           size_categories, tags, configs/data_files) + provenance (card.py)
    data/train-00000-of-0000N.parquet      rows in the chosen format (`formats.record_to_row`)
    data/test-00000-of-0000N.parquet       with --test-fraction: a held-out split chosen by a hash of the id
    manifest.json                          what was exported: input, format, rows, skips, files with sha256

Only completed records are exported (failed ones are counted on the card). Rows are written in the format's
columns; the `imitate` format is one `json` column holding the whole Record (provenance included), as
`imitate convert` writes it to Parquet. Extra columns (query metadata) are text: a non-string value is stored
as its JSON, so every shard has the same schema whatever the rows hold.

Secrets: every value `lineage.known_secrets` names (teacher API keys from the environment, the HF token, any
secret-named environment variable) is masked in every file written, URL credentials are stripped from the rows'
provenance, and the card and manifests go through `imitate.config.redact`. The whole folder is built under a
temporary name and moved into place only when complete; an existing `--out` is replaced only if it is empty
or an earlier export.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imitate import __version__
from imitate.config import redact_url
from imitate.errors import InputError
from imitate.export import card, lineage
from imitate.records import Record, unit_hash

FORMATS = ("openorca", "sharegpt", "alpaca", "messages", "imitate")
_TURN_COLUMNS = ("conversations", "messages")  # every other column of a format is text
_LICENCE = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")


@dataclass
class ExportResult:
    folder: Path
    rows: dict[str, int]
    files: dict[str, list[str]]
    skipped: dict[str, int] = field(default_factory=dict)


def _split_of(rec: Record, test_fraction: float) -> str:
    return "test" if test_fraction and unit_hash("export-test", rec.id) < test_fraction else "train"


def _row(rec: Record, fmt: str, secrets: list[str]) -> dict[str, Any]:
    from imitate.dataset.formats import record_to_row

    rec.provenance.base_url = redact_url(rec.provenance.base_url)
    if fmt == "imitate":
        return {"json": lineage.scrub_values(rec.to_json(), secrets)}
    row = record_to_row(rec, fmt)
    for key, value in row.items():  # extras (query metadata) as text: one schema for every shard
        if key not in _TURN_COLUMNS and value is not None and not isinstance(value, str):
            row[key] = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return lineage.scrub_values(row, secrets)


class _ShardWriter:
    """Rows of one split into Parquet shards of `shard_rows`; renamed `-of-N` once N is known. Each shard's
    schema is inferred from its rows and all shards are cast to their unified schema at the end (a column that
    is all null in one shard gets the type it has in the others)."""

    def __init__(self, folder: Path, split: str, shard_rows: int):
        self.folder, self.split, self.shard_rows = folder, split, shard_rows
        self.rows: list[dict[str, Any]] = []
        self.paths: list[Path] = []
        self.schemas: list[Any] = []
        self.count = 0

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.count += 1
        if len(self.rows) >= self.shard_rows:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.rows:
            return
        table = pa.Table.from_pylist(self.rows)
        path = self.folder / f".{self.split}-{len(self.paths):05d}.parquet"
        pq.write_table(table, path)
        self.paths.append(path)
        self.schemas.append(table.schema)
        self.rows = []

    def close(self) -> list[str]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._flush()
        unified = pa.unify_schemas(self.schemas, promote_options="permissive")
        names = []
        for i, (path, schema) in enumerate(zip(self.paths, self.schemas, strict=True)):
            final = self.folder / f"{self.split}-{i:05d}-of-{len(self.paths):05d}.parquet"
            if schema == unified:
                path.rename(final)
            else:  # a column missing or all-null here: the others' type (nulls where absent), the same order
                table = pq.read_table(path)
                columns = [
                    table[f.name].cast(f.type) if f.name in schema.names else pa.nulls(len(table), f.type)
                    for f in unified
                ]
                pq.write_table(pa.Table.from_arrays(columns, schema=unified), final)
                path.unlink()
            names.append(f"data/{final.name}")
        return names


def _records(src: Path, stats: Any, skip_bad_rows: bool) -> Iterator[Record]:
    from imitate.dataset.formats import read_records

    return read_records(src, "auto", skip_bad_rows=skip_bad_rows, stats=stats)


def _check_out(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory", hint="choose a folder for the export")
    if any(out.iterdir()) and lineage.stage_kind(_json(out / lineage.MANIFEST)) != "export":
        raise InputError(
            f"--out {out}: exists and is not an earlier imitate export",
            hint="choose a new or empty folder; only an earlier export is replaced",
        )


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_options(src: Path, out: Path, fmt: str, licence: str, test_fraction: float, shard_rows: int) -> None:
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: unknown", hint=f"one of: {', '.join(FORMATS)}")
    if not _LICENCE.match(licence):
        raise InputError(f"--licence {licence!r}: not a Hub licence id", hint="e.g. apache-2.0, cc-by-4.0, other")
    if not 0 <= test_fraction < 1:
        raise InputError(f"--test-fraction {test_fraction}: must be in [0, 1)")
    if shard_rows < 1:
        raise InputError(f"--shard-rows {shard_rows}: must be at least 1")
    if not src.exists():
        raise InputError(f"{src}: no such file or folder")
    _check_out(out)


def _write_rows(
    src: Path, tmp: Path, fmt: str, secrets: list[str], *, test_fraction: float, shard_rows: int, skip_bad_rows: bool
) -> tuple[card.CardStats, dict[str, list[str]], Counter]:
    """Every completed record of `src` as a row in its split's shards; the card's figures on the way."""
    from imitate.dataset.io import ReadStats

    stats, read, skipped = card.CardStats(), ReadStats(), Counter()
    writers: dict[str, _ShardWriter] = {}
    for rec in _records(src, read, skip_bad_rows):
        if rec.status != "ok":
            skipped["failed records (no answer)"] += 1
            continue
        try:
            row = _row(rec, fmt, secrets)
        except InputError as exc:
            if not skip_bad_rows:
                hint = "export another --format, or --skip-bad-rows to leave such records out (counted on the card)"
                raise InputError(exc.message, hint=hint) from exc
            skipped[f"not expressible as {fmt}"] += 1
            continue
        split = _split_of(rec, test_fraction)
        writers.setdefault(split, _ShardWriter(tmp, split, shard_rows)).add(row)
        stats.add(rec, split)
    if stats.rows == 0:
        raise InputError(f"{src}: no completed (status ok) records to export")
    skipped["bad input rows"] = read.skipped
    files = {s: writers[s].close() for s in ("train", "test") if s in writers}
    return stats, files, Counter({k: v for k, v in skipped.items() if v})


def export(
    src: Path,
    out: Path,
    *,
    fmt: str = "messages",
    licence: str = "unknown",
    languages: tuple[str, ...] = ("en",),
    pretty_name: str | None = None,
    test_fraction: float = 0.0,
    shard_rows: int = 100_000,
    skip_bad_rows: bool = False,
    command: str = "imitate export",
    extra_secrets: list[str] | None = None,
    load_name: str | None = None,
) -> ExportResult:
    """Write the dataset folder `out` from the records in `src` (see the module docstring)."""
    from imitate.dataset.io import atomic_path

    _check_options(src, out, fmt, licence, test_fraction, shard_rows)
    stages = lineage.find_manifests(src)
    secrets = lineage.known_secrets(stages, extra_secrets)
    with atomic_path(out) as tmp:
        (tmp / "data").mkdir(parents=True)
        stats, files, skipped = _write_rows(
            src,
            tmp / "data",
            fmt,
            secrets,
            test_fraction=test_fraction,
            shard_rows=shard_rows,
            skip_bad_rows=skip_bad_rows,
        )
        meta = card.metadata(
            stats,
            licence=licence,
            languages=list(languages),
            pretty_name=pretty_name or src.resolve().name,
            fmt=fmt,
            splits=list(files),
        )
        text = card.render(stats, stages, meta=meta, fmt=fmt, files=files, load_name=load_name, skipped=skipped)
        (tmp / "README.md").write_text(lineage.scrub(text, secrets), encoding="utf-8")
        manifest = {
            "kind": "export",
            "imitate_version": __version__,
            "command": command,
            "input": str(src),
            "format": fmt,
            "licence": licence,
            "rows": dict(stats.splits),
            "skipped": dict(skipped),
            "files": {
                p: {"sha256": _sha256(tmp / p), "bytes": (tmp / p).stat().st_size}
                for names in files.values()
                for p in names
            },
        }
        text = json.dumps(lineage.scrub(manifest, secrets), indent=2) + "\n"
        (tmp / lineage.MANIFEST).write_text(text, encoding="utf-8")
    return ExportResult(out, dict(stats.splits), files, dict(skipped))
