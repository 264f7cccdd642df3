"""Mixing record sets (Koala): `imitate mix IN[=WEIGHT|:COUNT] ... --out DIR [--seed S] [--total N]`.

    imitate mix data/runs/orca=0.7 data/import/sharegpt=0.3 --out data/runs/mixed --total 10000
    imitate mix data/runs/orca:500 alpaca.json:200 data/runs/extra --out data/runs/mixed --seed 1

Each input is any record set `imitate.dataset.formats.read_records` reads (a harvest output directory, an
OpenOrca/ShareGPT/Alpaca/messages file, a Hub dataset name), followed by how much of it to take:

- `IN:COUNT`  exactly COUNT records;
- `IN=WEIGHT` a share of the total: weights are normalised over the weighted sets, and they split what the counts
  leave of `--total`; without `--total`, the largest total every weighted set can supply in full;
- `IN`        every record of the set.

Sampling is **without replacement**: a set is never repeated to fill a count or a share (repeating rows would
duplicate ids and over-weight exact copies), so asking for more than a set holds is an InputError naming the
set, what it holds and what was asked. Only completed records (status ok) are mixed; failed ones are counted.

The choice is seeded and deterministic: a set's records are ranked by `unit_hash(seed, set name, record id)` and
the lowest k are taken, so the same inputs and seed always give the same mix, whatever the order of the rows.
Records are written set by set in their input order, unchanged but for two things: each gets the tag
`mix:<name>`, and an id already taken by an earlier record of the mix becomes `<name>/<id>` (counted per set in
the manifest as `renamed_ids`). Provenance is untouched.

Output: `DIR/records.jsonl` (imitate records) and `DIR/manifest.json` (per set: input, available, taken, share;
the seed and the command), each written to a temporary name and moved into place.
"""

from __future__ import annotations

import heapq
import json
import math
import re
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imitate import __version__
from imitate.errors import InputError
from imitate.records import Record, unit_hash

RECORDS = "records.jsonl"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class SetSpec:
    """One input of a mix: where it is, what to call it, and how much to take (weight, count, or all)."""

    input: str
    name: str
    weight: float | None = None
    count: int | None = None

    def describe(self) -> str:
        if self.count is not None:
            return f"count {self.count}"
        return f"weight {self.weight:g}" if self.weight is not None else "all"


@dataclass
class SetStats:
    spec: SetSpec
    available: int = 0
    skipped_failed: int = 0
    skipped_bad_rows: int = 0
    taken: int = 0
    renamed_ids: int = 0
    hashes: array = field(default_factory=lambda: array("d"), repr=False)


def _set_name(text: str) -> str:
    path = Path(text.rstrip("/"))
    name = path.stem if path.suffix in {".jsonl", ".json", ".csv", ".parquet"} else path.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "set"


def parse_specs(items: list[str]) -> list[SetSpec]:
    """`path=0.3` / `path:500` / `path` -> SetSpecs with unique names (`-2`, `-3` appended to repeats)."""
    out: list[SetSpec] = []
    used: set[str] = set()
    for item in items:
        weight = count = None
        source = item
        head, sep, tail = item.rpartition("=")
        if sep and head and not Path(item).exists():  # a file named `a=b.jsonl` is a file
            try:
                weight = float(tail)
            except ValueError:
                raise InputError(f"mix input {item!r}: the weight after '=' must be a number") from None
            if not (weight > 0 and math.isfinite(weight)):
                raise InputError(f"mix input {item!r}: the weight must be a positive number")
            source = head
        else:
            head, sep, tail = item.rpartition(":")
            if sep and head and tail.isdigit():
                count, source = int(tail), head
                if count < 1:
                    raise InputError(f"mix input {item!r}: the count must be at least 1")
        base = name = _set_name(source)
        n = 2
        while name in used:
            name, n = f"{base}-{n}", n + 1
        used.add(name)
        out.append(SetSpec(source, name, weight, count))
    if not out:
        raise InputError("imitate mix needs at least one input", hint="imitate mix A=0.7 B=0.3 --out DIR")
    return out


def largest_remainder(total: int, shares: list[float]) -> list[int]:
    """Split `total` into integers proportional to `shares` (summing to 1): floors, then the leftover units to
    the largest fractional parts (ties to the earlier set). Pure and deterministic."""
    quotas = [total * s for s in shares]
    counts = [math.floor(q + 1e-9) for q in quotas]
    left = total - sum(counts)
    order = sorted(range(len(shares)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: max(0, left)]:
        counts[i] += 1
    return counts


def plan_counts(specs: list[SetSpec], available: list[int], total: int | None) -> list[int]:
    """How many records to take from each set (pure). InputError when a set cannot supply what is asked."""
    fixed = {i: (s.count if s.count is not None else available[i]) for i, s in enumerate(specs) if s.weight is None}
    for i, n in fixed.items():
        if n > available[i]:
            raise InputError(
                f"mix input {specs[i].input!r}: asks for {n} records but the set has {available[i]} completed",
                hint="sampling is without replacement: lower the count",
            )
    weighted = [i for i, s in enumerate(specs) if s.weight is not None]
    counts = [fixed.get(i, 0) for i in range(len(specs))]
    if not weighted:
        if total is not None and total != sum(counts):
            raise InputError(
                f"--total {total}, but the counts and whole sets add up to {sum(counts)}",
                hint="drop --total, or give some sets a weight (IN=WEIGHT) to fill the rest",
            )
        return counts
    wsum = sum(specs[i].weight for i in weighted)  # type: ignore[misc]
    shares = [specs[i].weight / wsum for i in weighted]  # type: ignore[operator]
    if total is not None:
        rest = total - sum(counts)
        if rest < 0:
            raise InputError(f"--total {total} is smaller than the counts and whole sets ({sum(counts)})")
        split = largest_remainder(rest, shares)
        for i, n in zip(weighted, split, strict=True):
            if n > available[i]:
                raise InputError(
                    f"mix input {specs[i].input!r}: its weight asks for {n} of {rest} records but the set has "
                    f"{available[i]} completed",
                    hint="sampling is without replacement: lower --total or this set's weight",
                )
    else:  # the largest total every weighted set supplies in full
        rest = min(math.floor(available[i] / s + 1e-9) for i, s in zip(weighted, shares, strict=True))
        split = largest_remainder(rest, shares)
        while any(n > available[i] for i, n in zip(weighted, split, strict=True)):
            rest -= 1  # rounding gave one set a unit more than it has
            split = largest_remainder(rest, shares)
    for i, n in zip(weighted, split, strict=True):
        counts[i] = n
    return counts


def _read(spec: SetSpec, fmt: str, skip_bad_rows: bool, stats: Any = None) -> Iterator[Record]:
    from imitate.dataset.formats import read_records

    return read_records(spec.input, fmt, skip_bad_rows=skip_bad_rows, stats=stats)


def _survey(spec: SetSpec, seed: int, fmt: str, skip_bad_rows: bool) -> SetStats:
    """First pass over a set: count completed records and rank them by their seeded hash."""
    from imitate.dataset.io import ReadStats

    st, read = SetStats(spec), ReadStats()
    for rec in _read(spec, fmt, skip_bad_rows, read):
        if rec.status != "ok":
            st.skipped_failed += 1
            continue
        st.hashes.append(unit_hash(seed, spec.name, rec.id))
        st.available += 1
    st.skipped_bad_rows = read.skipped
    if st.available == 0:
        raise InputError(f"mix input {spec.input!r}: no completed (status ok) records")
    return st


def _chosen(hashes: array, k: int) -> set[int]:
    """The k positions with the lowest hash (ties to the earlier position)."""
    return set(heapq.nsmallest(k, range(len(hashes)), key=lambda i: (hashes[i], i)))


def _emit(st: SetStats, chosen: set[int], seen: set[str], fmt: str, skip_bad_rows: bool) -> Iterator[Record]:
    """Second pass: the chosen records of one set, tagged, ids made unique across the mix."""
    tag = f"mix:{st.spec.name}"
    pos = -1
    for rec in _read(st.spec, fmt, skip_bad_rows):  # bad rows skip the same way: positions line up
        if rec.status != "ok":
            continue
        pos += 1
        if pos not in chosen:
            continue
        if rec.id in seen:
            new, n = f"{st.spec.name}/{rec.id}", 2
            while new in seen:
                new, n = f"{st.spec.name}/{rec.id}#{n}", n + 1
            rec.id = new
            st.renamed_ids += 1
        seen.add(rec.id)
        if tag not in rec.tags:
            rec.tags.append(tag)
        yield rec


def _local_path(text: str) -> str | None:
    path = Path(text).expanduser()
    return str(path.resolve()) if path.exists() else None


def mix(
    specs: list[SetSpec],
    out_dir: Path,
    *,
    seed: int = 0,
    total: int | None = None,
    fmt: str = "auto",
    skip_bad_rows: bool = False,
    command: str = "imitate mix",
) -> dict[str, Any]:
    """Mix `specs` into `out_dir` (records.jsonl + manifest.json); returns the manifest."""
    from imitate.dataset.io import atomic_path

    if total is not None and total < 1:
        raise InputError(f"--total {total}: must be at least 1")
    started = time.time()
    sets = [_survey(s, seed, fmt, skip_bad_rows) for s in specs]
    counts = plan_counts(specs, [s.available for s in sets], total)
    out_dir.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    with atomic_path(out_dir / RECORDS) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for st, k in zip(sets, counts, strict=True):
            chosen = _chosen(st.hashes, k)
            st.hashes = array("d")  # the ranking is done: free it before the next set
            for rec in _emit(st, chosen, seen, fmt, skip_bad_rows):
                f.write(rec.to_json() + "\n")
                st.taken += 1
    written = sum(s.taken for s in sets)
    manifest = {
        "kind": "mix",
        "imitate_version": __version__,
        "command": command,
        "out": str(out_dir),
        "seed": seed,
        "total_requested": total,
        "records": written,
        "selection": "without replacement: the k lowest unit_hash(seed, set name, record id) of each set",
        "sets": [
            {
                "name": st.spec.name,
                "input": st.spec.input,
                "path": _local_path(st.spec.input),
                "spec": st.spec.describe(),
                "available": st.available,
                "skipped_failed": st.skipped_failed,
                "skipped_bad_rows": st.skipped_bad_rows,
                "taken": st.taken,
                "share": round(st.taken / written, 6) if written else 0.0,
                "renamed_ids": st.renamed_ids,
            }
            for st in sets
        ],
        "started_at": round(started, 3),
        "finished_at": round(time.time(), 3),
    }
    with atomic_path(out_dir / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
