"""`imitate convert`: read one format, write another, with counts of what was read, skipped and written.

    imitate convert IN --to FORMAT --out PATH [--format IN_FORMAT] [--split NAME] [--skip-bad-rows]

IN is a file (JSON/JSONL/CSV/TSV/Parquet), a folder of record files (a harvest output), a `save_to_disk` folder or
a Hub dataset name; the output's suffix picks its container. The output is written under a temporary name and
moved into place at the end, so a failed conversion leaves nothing (and never a half file) at PATH.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from imitate.dataset.formats import read_records, write_records
from imitate.dataset.io import ReadStats


@dataclass
class Converted:
    read: ReadStats  # rows read, bad rows skipped, notes, formats detected
    written: ReadStats  # rows written (kept), records the target format cannot hold (skipped)
    out: Path
    to: str

    def summary(self) -> str:
        """One line: what came in, what went out, and every count of something left behind."""
        formats = ", ".join(f"{n} {f}" for f, n in self.read.formats.items()) or "none"
        parts = [f"read {self.read.rows} rows ({formats})", f"wrote {self.written.kept} {self.to} rows"]
        if self.read.skipped:
            parts.append(f"skipped {self.read.skipped} bad rows")
        if self.written.skipped:
            parts.append(f"skipped {self.written.skipped} records {self.to} cannot hold")
        parts += [f"{what}: {n}" for what, n in self.read.notes.items()]
        return "; ".join(parts) + f" -> {self.out}"

    def examples(self) -> list[str]:
        return self.read.bad_examples + self.written.bad_examples


def convert(
    source: str | Path,
    out: str | Path,
    to: str,
    *,
    format: str = "auto",
    split: str | None = None,
    skip_bad_rows: bool = False,
) -> Converted:
    result = Converted(ReadStats(), ReadStats(), Path(out), to)
    records = read_records(source, format, skip_bad_rows=skip_bad_rows, stats=result.read, split=split)
    write_records(records, out, to, skip_bad_rows=skip_bad_rows, stats=result.written)
    return result
