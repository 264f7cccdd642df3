"""`imitate import sharegpt IN --out DIR [--lang en,...] [--max-tokens N] [--tokenizer PATH]
[--near-dup-threshold 0.9] [--skip-bad-rows]` — ShareGPT exports cleaned into multi-turn imitate records.

IN is what ShareGPT exported (a JSON array or JSONL of `{"id", "conversations": [{"from", "value"}...]}`,
optional `model`), or any container imitate.dataset.io reads (CSV, Parquet, a save_to_disk folder, a Hub name).
Each row is cleaned by imitate/dataset/sharegpt.py (roles, HTML to Markdown, empty/malformed turns, shape), then:

- `--lang en,de`: kept only if the users' words (code blocks left out) are in one of these languages. Short
  texts are judged unreliably, so a label below `lang_min_confidence` (0.5) is re-judged on the whole
  conversation, and a conversation still below it is kept (counted as `und`, undetermined);
- exact duplicates (normalised text of the whole conversation) and near-duplicates (MinHash + LSH over word
  5-shingles at `--near-dup-threshold`), both from imitate/dataset/dedup.py, are dropped; the first one seen stays;
- `--max-tokens N`: longer conversations are split at turn boundaries (ids `<id>_<part>`, from 0), counted with
  the tokenizer's own tokens when `--tokenizer` gives a tokenizer.json (or a model folder holding one), else
  estimated from words and characters (sharegpt.estimate_tokens).

Out: DIR/records.jsonl (Records), DIR/dropped.jsonl (each dropped row with `reason`, `detail` and the row as
read), DIR/manifest.json (every drop reason and turn rule counted, languages seen, settings). Each file is written
to a temporary name and moved into place when the run succeeds: a failed run leaves DIR as it was.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from imitate import __version__
from imitate.dataset import sharegpt as sg
from imitate.dataset.dedup import ExactDuplicateIndex, NearDuplicateIndex
from imitate.dataset.io import BadRow, RawRow, ReadStats, atomic_path, open_rows
from imitate.errors import ConfigError, InputError
from imitate.records import Message, Record, Source

DROP_REASONS = ("bad_row", "no_exchange", "not_alternating", "language", "duplicate", "near_duplicate", "over_budget")
TURN_RULES = ("malformed", "empty", "leading_assistant", "trailing_user", "over_budget")
ESTIMATE = "estimate: max(4/3 per word, 1 per 4 characters) + 6 per turn"
_USED_COLUMNS = ("id", "conversations", "model", "collection")
_SKIP_HINT = "fix the row, or skip bad rows (--skip-bad-rows) to drop and count them"


@dataclass(frozen=True)
class ImportSettings:
    languages: tuple[str, ...] = ()  # ISO 639-1 codes; empty: no language filter
    lang_min_confidence: float = 0.5
    max_tokens: int | None = None  # token budget per record; None: no splitting
    tokenizer: str | None = None  # tokenizer.json or a folder holding one; None: estimate
    near_dup_threshold: float = 0.9
    num_perm: int = 128
    shingle: int = 5
    skip_bad_rows: bool = False

    def check(self) -> None:
        if not 0.0 < self.near_dup_threshold < 1.0:
            raise ConfigError(
                f"--near-dup-threshold must be between 0 and 1 (exclusive), got {self.near_dup_threshold}"
            )
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"--max-tokens must be at least 1, got {self.max_tokens}")


@dataclass
class ImportSummary:
    rows: int = 0
    conversations: int = 0  # conversations kept (before splitting)
    records: int = 0
    split: int = 0  # conversations split into more than one record
    renamed_ids: int = 0  # records whose id was taken already (ShareGPT repeats ids): `_row<N>` appended
    dropped: Counter = field(default_factory=Counter)
    counts: sg.Counts = field(default_factory=sg.Counts)
    languages: Counter = field(default_factory=Counter)

    def lines(self) -> list[str]:
        drops = ", ".join(f"{k} {v}" for k, v in self.dropped.most_common()) or "none"
        return [
            f"{self.records} records from {self.conversations} conversations ({self.split} split) of {self.rows} rows",
            f"dropped: {drops}",
        ]


def token_counter(path: str | None) -> tuple[Callable[[str], int], str]:
    """Counting function and its description: the tokenizer's tokens (no special tokens) or the estimate.
    The `tokenizers` library is imported only here, only when a tokenizer is given."""
    if path is None:
        return sg.estimate_tokens, ESTIMATE
    given = Path(path).expanduser()
    file = given / "tokenizer.json" if given.is_dir() else given
    if not file.is_file():
        raise InputError(f"{path}: no tokenizer.json there", hint="give a tokenizer.json or a model folder with one")
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise InputError("--tokenizer needs the tokenizers package", hint="pip install 'imitate[train]'") from exc
    try:
        text = file.read_text(encoding="utf-8")
        json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{file}: not a tokenizer.json ({exc})") from exc
    try:
        tok = Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises plain Exception (from Rust) for a file it cannot use
        raise InputError(f"{file}: not a tokenizer.json tokenizers can load ({exc})") from exc
    return (lambda s: len(tok.encode(s, add_special_tokens=False).ids)), f"tokenizer: {file} + 6 per turn"


class _Importer:
    """One run's state: settings, indexes, counts and the two open output files."""

    def __init__(self, uri: str, settings: ImportSettings, records, dropped):
        self.uri, self.settings, self.records_out, self.dropped_out = uri, settings, records, dropped
        self.count_tokens, self.token_note = token_counter(settings.tokenizer)
        self.exact = ExactDuplicateIndex()
        self.near = NearDuplicateIndex(settings.near_dup_threshold, settings.num_perm, settings.shingle)
        self.summary = ImportSummary()
        self.stats = ReadStats()
        self.ids: set[str] = set()

    def row(self, raw: RawRow) -> None:
        self.summary.rows += 1
        try:
            if isinstance(raw.value, BadRow):
                raise raw.value
            records = self._records(raw)
        except BadRow as exc:
            self.stats.bad(f"{raw.where}: {exc}", skip=self.settings.skip_bad_rows, hint=_SKIP_HINT)
            self._drop(raw, "bad_row", str(exc))
            return
        except sg.Dropped as drop:
            self._drop(raw, drop.reason, drop.detail, drop.of)
            return
        self.summary.conversations += 1
        self.summary.split += len(records) > 1
        for record in records:
            self.records_out.write(record.to_json() + "\n")
        self.summary.records += len(records)

    def _records(self, raw: RawRow) -> list[Record]:
        row = raw.value
        turns = sg.shape(sg.normalise_turns(sg.conversation_of(row), self.summary.counts), self.summary.counts)
        base = sg.row_id(row, turns)
        metadata = {k: v for k, v in row.items() if k not in _USED_COLUMNS and v is not None}
        if self.settings.languages:
            lang = self._language(turns)
            metadata["language"] = lang
        text = "\n".join(m.content for m in turns)
        for reason, index in (("duplicate", self.exact), ("near_duplicate", self.near)):
            first = index.check_and_add(base, text)
            if first is not None:
                raise sg.Dropped(reason, f"same conversation as {first}", of=first)
        parts = sg.split_by_budget(turns, self.settings.max_tokens, self.count_tokens, self.summary.counts)
        source = Source(uri=self.uri, row=raw.index, format="sharegpt", split=raw.split)
        collection = row.get("collection") if isinstance(row.get("collection"), str) else None
        return [
            sg.to_record(
                part,
                record_id=self._unique(base if len(parts) == 1 else f"{base}_{i}", raw.index),
                model=sg.row_model(row),
                source=source,
                collection=collection,
                metadata=metadata | ({"part": i, "parts": len(parts)} if len(parts) > 1 else {}),
            )
            for i, part in enumerate(parts)
        ]

    def _language(self, turns: list[Message]) -> str:
        from imitate.dataset.language import UNDETERMINED, detect

        floor = self.settings.lang_min_confidence
        lang, confidence = detect(sg.user_text(turns))
        if confidence < floor:  # too little to judge by: the answers are (nearly always) in the same language
            lang, confidence = max((lang, confidence), detect("\n".join(m.content for m in turns)), key=_second)
        if confidence < floor:
            lang = UNDETERMINED
        self.summary.languages[lang] += 1
        if lang != UNDETERMINED and lang not in self.settings.languages:
            raise sg.Dropped("language", f"{lang} ({confidence:.2f})")
        return lang

    def _unique(self, rid: str, row: int) -> str:
        if rid in self.ids:
            rid = f"{rid}_row{row}"
            self.summary.renamed_ids += 1
        self.ids.add(rid)
        return rid

    def _drop(self, raw: RawRow, reason: str, detail: str, of: str | None = None) -> None:
        self.summary.dropped[reason] += 1
        value = None if isinstance(raw.value, BadRow) else raw.value
        line: dict[str, Any] = {"reason": reason, "detail": detail, "where": raw.where}
        line |= {"duplicate_of": of} if of else {}
        line["source"] = Source(uri=self.uri, row=raw.index, format="sharegpt", split=raw.split).model_dump(
            exclude_none=True
        )
        line["row"] = value
        self.dropped_out.write(json.dumps(line, ensure_ascii=False) + "\n")


def _second(pair: tuple[str, float]) -> float:
    return pair[1]


def import_sharegpt(source: str | Path, out: Path, settings: ImportSettings | None = None) -> ImportSummary:
    """Read, clean, filter, dedup and split `source`; write DIR/records.jsonl, dropped.jsonl, manifest.json."""
    settings = settings or ImportSettings()
    settings.check()

    def on_columns(where: str, names: list[str]) -> None:
        if "conversations" not in names:
            raise InputError(f"{where}: not ShareGPT: no `conversations` column (columns: {', '.join(names)})")

    reader = open_rows(source, on_columns=on_columns)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory", hint="choose a directory for the output")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(
            f"--out {out}: cannot write there ({exc.strerror})", hint="choose a writable directory"
        ) from exc
    started = time.time()
    with atomic_path(out / "records.jsonl") as rec_tmp, atomic_path(out / "dropped.jsonl") as drop_tmp:
        with open(rec_tmp, "w", encoding="utf-8") as rec_f, open(drop_tmp, "w", encoding="utf-8") as drop_f:
            importer = _Importer(reader.path, settings, rec_f, drop_f)
            for raw in reader:
                importer.row(raw)
        if importer.summary.rows == 0:
            raise InputError(f"{source}: empty (no rows)")
    summary = importer.summary
    manifest = _manifest(reader.path, settings, importer.token_note, importer.near.settings(), summary, started)
    with atomic_path(out / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary


def _manifest(uri: str, settings: ImportSettings, tokens: str, near: dict, s: ImportSummary, started: float) -> dict:
    return {
        "command": "imitate import sharegpt",
        "imitate_version": __version__,
        "input": uri,
        "created_at": started,
        "seconds": round(time.time() - started, 3),
        "settings": asdict(settings) | {"token_count": tokens, "near_duplicates": near},
        "html_to_markdown": f"markdownify {version('markdownify')}",
        "rows": s.rows,
        "conversations": s.conversations,
        "records": s.records,
        "split_conversations": s.split,
        "renamed_ids": s.renamed_ids,
        "dropped": {reason: s.dropped.get(reason, 0) for reason in DROP_REASONS},
        "turns_removed": {rule: s.counts.turns.get(rule, 0) for rule in TURN_RULES},
        "html_turns": s.counts.html_turns,
        "languages": dict(s.languages.most_common()),
        "outputs": {"records": "records.jsonl", "dropped": "dropped.jsonl"},
    }
