"""`imitate curate IN --out DIR`: stream records through the gates, optionally select the best k, erase the
system prompt, and write what was kept, what was dropped and why, and a manifest.

    imitate curate data/runs/demo --out data/runs/demo-curated [--erase-system generic|none]
        [--min-words N] [--min-steps N] [--max-words N | --max-tokens N --tokenizer PATH]
        [--near-dup-threshold 0.8 --num-perm 128 --shingle 5 --shingle-unit word|char] [--no-near-dup]
        [--no-exact-dup] [--max-rouge 0.7] [--lang en] [--phrases FILE] [--keep-refusals]
        [--keep-truncated] [--keep-failed] [--top-k K [--score-field judge] [--per-cluster M | --per-collection M]]
        [--format auto|openorca|sharegpt|alpaca|messages|imitate] [--skip-bad-rows] [--config FILE] [--set k=v]

IN is anything `imitate.dataset.formats.read_records` reads (a harvest folder, JSONL/Parquet/CSV/JSON of any
supported format, a datasets folder, a Hub name). A harvest folder's failed rows (failures.jsonl, which the reader
skips) follow its answers through the gates, each failed request once and only while no run has answered it, so
the `failed` gate counts and keeps them. Output, each written under a temporary name and moved into
place only when the run succeeds:

    DIR/records.jsonl    the kept records (imitate records, input order)
    DIR/dropped.jsonl    {"gate", "reason", "record"} per dropped row
    DIR/manifest.json    input/output counts, counts per gate (zeros included), the settings, the phrase list
                         and generic system message (id, version, sha256), dedup parameters, timing

Memory: the gates stream; what grows is the dedup indexes (exact hashes, LSH bands, the ROUGE-L pool when
enabled) and, with selection, the k rows held. Erasure (Orca 2's prompt erasure) is applied to the rows written:
the system message is replaced by the generic one of prompts/curation.yaml (or removed), the answer is kept, and
`provenance.erased_system` says so while `system_prompt_id`/`sha256` keep naming what the teacher saw.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

from imitate import __version__
from imitate.dataset.curate_config import CurateConfig
from imitate.dataset.gates import NearDuplicateGate, build_gates, phrase_lists
from imitate.dataset.phrases import GenericSystem, load_curation, phrases_sha256
from imitate.errors import InputError
from imitate.records import Message, Record

RECORDS, DROPPED, MANIFEST = "records.jsonl", "dropped.jsonl", "manifest.json"
SELECT_GATES = ("unscored", "not_selected")

# Command-line flag -> config key (flags are applied last: they win over the file and --set).
FLAG_KEYS = {
    "erase_system": "curate.erase_system",
    "keep_failed": "curate.gates.failed",
    "keep_truncated": "curate.gates.truncated",
    "keep_refusals": "curate.gates.refusal",
    "phrases": "curate.gates.phrases_file",
    "min_words": "curate.gates.min_words",
    "min_steps": "curate.gates.min_steps",
    "max_words": "curate.gates.max_words",
    "max_tokens": "curate.gates.max_tokens",
    "tokenizer": "curate.gates.tokenizer",
    "no_exact_dup": "curate.gates.exact_dedup",
    "no_near_dup": "curate.gates.near_dup.enabled",
    "near_dup_threshold": "curate.gates.near_dup.threshold",
    "num_perm": "curate.gates.near_dup.num_perm",
    "shingle": "curate.gates.near_dup.shingle",
    "shingle_unit": "curate.gates.near_dup.unit",
    "max_rouge": "curate.gates.max_rouge",
    "lang": "curate.gates.languages",
    "top_k": "curate.select.k",
    "score_field": "curate.select.score",
    "per_cluster": "curate.select.per_cluster",
    "per_collection": "curate.select.per_collection",
}
_NEGATING = {"keep_failed", "keep_truncated", "keep_refusals", "no_exact_dup", "no_near_dup"}
_TEXT = {"erase_system", "phrases", "tokenizer", "shingle_unit", "score_field"}  # quoted: a path "123" stays text


def flag_overrides(**flags: Any) -> list[str]:
    """`--set`-style overrides for the flags given (None/False: not given). --keep-x / --no-x switch a gate off."""
    out = []
    for name, value in flags.items():
        if value is None or value is False:
            continue
        if name in _NEGATING:
            value = "false"
        elif name == "lang":
            value = json.dumps([c.strip() for c in str(value).split(",") if c.strip()])
        elif name in _TEXT:
            value = json.dumps(str(value))
        out.append(f"{FLAG_KEYS[name]}={value}")
    return out


def erase_system(record: Record, mode: str, generic: GenericSystem) -> Record:
    """Prompt erasure: the system message the teacher saw is replaced by the generic one (or removed) in the
    training conversation; the answer, the query and the provenance ids stay as they were."""
    rest = [m for m in record.messages if m.role != "system"]
    messages = [Message(role="system", content=generic.text), *rest] if mode == "generic" else rest
    provenance = record.provenance.model_copy(update={"erased_system": mode})
    return record.model_copy(update={"messages": messages, "provenance": provenance})


def check_out(input: str | Path, out: Path) -> None:
    """The output folder may not lie inside the input (a harvest folder would read records.jsonl as a shard)."""
    src = Path(str(input)).expanduser()
    if src.exists() and src.resolve() in (out.resolve(), *out.resolve().parents):
        raise InputError(f"--out {out}: inside the input {input}", hint="write the curated set to a new folder")


class _Sink:
    """Where rows go: kept ones (erased first, when asked) to records.jsonl, dropped ones with gate and reason
    to dropped.jsonl; counts both."""

    def __init__(self, kept_file, dropped_file, erase: str | None, generic: GenericSystem):
        self.kept_file, self.dropped_file, self.erase, self.generic = kept_file, dropped_file, erase, generic
        self.kept = 0
        self.counts: Counter[str] = Counter()

    def keep(self, record: Record) -> None:
        if self.erase:
            record = erase_system(record, self.erase, self.generic)
        self.kept_file.write(record.to_json() + "\n")
        self.kept += 1

    def drop(self, record: Record, gate: str, reason: str) -> None:
        self.counts[gate] += 1
        head = f'{{"gate":{json.dumps(gate)},"reason":{json.dumps(reason, ensure_ascii=False)},"record":'
        self.dropped_file.write(f"{head}{record.to_json()}}}\n")


def curate(
    input: str | Path,
    out: Path,
    cfg: CurateConfig,
    *,
    format: str = "auto",
    skip_bad_rows: bool = False,
    command: str | None = None,
) -> dict[str, Any]:
    """Run the gates (and selection, erasure) over `input`; write DIR's three files; return the manifest."""
    from imitate.dataset.formats import read_records
    from imitate.dataset.harvested import failed_now
    from imitate.dataset.io import ReadStats, atomic_path

    out = Path(out)
    check_out(input, out)
    started = time.monotonic()
    curation = load_curation()
    gates = build_gates(cfg.gates, curation.phrases, cluster_mode=cfg.select.per_cluster is not None)
    stats = ReadStats()
    out.mkdir(parents=True, exist_ok=True)
    with (
        atomic_path(out / RECORDS) as kept_path,
        atomic_path(out / DROPPED) as dropped_path,
        open(kept_path, "w", encoding="utf-8") as kept_file,
        open(dropped_path, "w", encoding="utf-8") as dropped_file,
    ):
        sink = _Sink(kept_file, dropped_file, cfg.erase_system, curation.generic_system)
        rows = read_records(input, format, skip_bad_rows=skip_bad_rows, stats=stats)
        if Path(input).is_dir():  # a harvest folder: its failed rows (failures.jsonl) meet the `failed` gate too
            rows = itertools.chain(rows, failed_now(Path(input)))
        seen = _run(rows, gates, cfg, sink)
    manifest = _manifest(input, cfg, curation, gates, sink, stats, seen, command, started)
    with atomic_path(out / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def _run(records, gates: list, cfg: CurateConfig, sink: _Sink) -> int:
    """The stream: each row through the gates in order (the first that objects drops it), the survivors
    committed to the indexes, then written or offered to the selection. Returns the number of rows read."""
    commits = [g.check.commit for g in gates if hasattr(g.check, "commit")]
    near = next((g.check for g in gates if isinstance(g.check, NearDuplicateGate)), None)
    by_cluster = cfg.select.per_cluster is not None
    selector, score = _selector(cfg, sink), _score(cfg)
    seen = 0
    for record in records:
        seen += 1
        for gate in gates:
            if (reason := gate.check(record)) is not None:
                sink.drop(record, gate.name, reason)
                break
        else:
            for commit in commits:
                commit(record)
            if selector is None:
                sink.keep(record)
            elif (value := score(record)) is None:
                sink.drop(record, "unscored", f"no numeric score {cfg.select.score!r} in record.scores")
            else:
                group = near.cluster if by_cluster and near else record.query.collection or "(none)"
                selector.offer(record, value, group)
    for record in selector.kept() if selector is not None else ():
        sink.keep(record)
    return seen


def _selector(cfg: CurateConfig, sink: _Sink):
    from imitate.dataset.select import TopK

    s = cfg.select
    if s.k is None:
        return None
    cap, name = (s.per_cluster, "cluster") if s.per_cluster is not None else (s.per_collection, "collection")
    return TopK(s.k, cap, lambda record, reason: sink.drop(record, "not_selected", reason), cap_name=name)


def _score(cfg: CurateConfig):
    from imitate.dataset.select import scorer

    raw = scorer(cfg.select)

    def score(record: Record) -> float | None:
        value = raw(record)
        return float(value) if isinstance(value, int | float) and math.isfinite(value) else None

    return score


def _manifest(input, cfg, curation, gates, sink, stats, seen, command, started) -> dict[str, Any]:
    order = [g.name for g in gates] + (list(SELECT_GATES) if cfg.select.k is not None else [])
    near = next((g.check for g in gates if isinstance(g.check, NearDuplicateGate)), None)
    return {
        "command": command,
        "imitate_version": __version__,
        "input": {
            "path": str(input),
            "rows": stats.rows,
            "read": seen,
            "bad_rows_skipped": stats.skipped,
            "bad_row_examples": stats.bad_examples,
            "formats": dict(stats.formats),
            "notes": dict(stats.notes),
        },
        "output": {
            "records": RECORDS,
            "dropped": DROPPED,
            "kept": sink.kept,
            "dropped_rows": sum(sink.counts.values()),
        },
        "gates": {name: sink.counts.get(name, 0) for name in order},
        "settings": cfg.model_dump(mode="json"),
        "phrases": _phrases(cfg, curation.phrases) if cfg.gates.refusal else None,
        "erase_system": (
            {"mode": cfg.erase_system, "id": curation.generic_system.id, "sha256": curation.generic_system.sha256}
            if cfg.erase_system == "generic"
            else {"mode": cfg.erase_system}
            if cfg.erase_system
            else None
        ),
        "near_dup": near.index.settings() | {"cluster_mode": near.cluster_mode} if near else None,
        "elapsed_s": round(time.monotonic() - started, 3),
    }


def _phrases(cfg: CurateConfig, shipped) -> dict[str, Any]:
    refusals, disclaimers = phrase_lists(cfg.gates, shipped)
    return {
        "id": shipped.id,
        "version": shipped.version,
        "sha256": shipped.sha256,
        "extra": len(refusals) + len(disclaimers) - len(shipped.refusals) - len(shipped.disclaimers),
        "effective_sha256": phrases_sha256(refusals, disclaimers),
    }
