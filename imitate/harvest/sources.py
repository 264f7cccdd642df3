"""Input sources: stream `Query` objects lazily from JSONL, CSV/TSV, Parquet, a saved `datasets` folder or a
Hub dataset, with one field mapping (`SourceConfig.fields`) and one bad-row policy for all of them.

    src = open_source("data/questions.jsonl", cfg.harvest.source)
    for query in src: ...          # src.skipped / src.duplicates / src.bad_examples after (or during) the loop

Containers are read by `imitate/dataset/io.py` (shared with `imitate convert` and `imitate train`): JSONL, a JSON
array, CSV/TSV, Parquet, a saved `datasets` folder or a Hub dataset, picked from the suffix (`.gz` allowed for
JSON/JSONL/CSV; a folder is a saved `datasets` folder; a missing `owner/name` is a Hub dataset, but a missing name
that can only be a path — a data-file suffix, a leading `.`, `~` or `/`, more than one `/` — is an InputError at
once, not a Hub lookup that takes seconds and then blames the network; `~` is expanded). Nothing is ever loaded
whole, and `datasets` is imported only when one of its formats is used.

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

import hashlib
from collections.abc import Iterator
from typing import Any

from imitate.config import SourceConfig
from imitate.dataset.formats import SHAREGPT_ROLES
from imitate.dataset.io import MAX_BAD_EXAMPLES, BadRow, ReadStats, RowReader, detect_container, looks_local, open_rows
from imitate.errors import InputError
from imitate.records import Message, Query

__all__ = ["MAX_BAD_EXAMPLES", "BadRow", "QuerySource", "detect_format", "looks_local", "open_source", "to_query"]
_HINT = "set source.format"


def detect_format(path_or_name: str, cfg: SourceConfig) -> str:
    """The container (jsonl, json, csv, parquet, hf-disk, hub) of a source: `source.format`, or from the name."""
    return detect_container(path_or_name, cfg.format, hint=_HINT)


def open_source(path_or_name: str, cfg: SourceConfig | None = None) -> QuerySource:
    """Check the input exists and pick its format; nothing is read until iteration."""
    cfg = cfg or SourceConfig()
    reader = open_rows(
        path_or_name,
        cfg.format,
        split=cfg.split,
        subset=cfg.subset,
        on_columns=lambda where, names: _check_columns(where, names, cfg),
        hint=_HINT,
    )
    return QuerySource(reader, cfg)


class QuerySource:
    """Iterable of Query; each iteration re-reads the input and resets the counters."""

    def __init__(self, reader: RowReader, cfg: SourceConfig):
        self.reader, self.cfg = reader, cfg
        self.path, self.format = reader.path, reader.container
        self.stats = ReadStats()
        self.duplicates = 0

    @property
    def skipped(self) -> int:
        return self.stats.skipped

    @property
    def rows_read(self) -> int:
        return self.stats.rows

    @property
    def bad_examples(self) -> list[str]:
        return self.stats.bad_examples

    @property
    def position(self) -> int | None:
        """Bytes read from disk so far (JSONL/CSV while iterating; read-ahead included)."""
        return self.reader.position

    def count_hint(self, scan: bool = False) -> int | None:
        """Rows to expect: free for Parquet and `datasets` folders; JSONL/CSV lines are counted only if `scan`
        (a fast byte scan: blank lines and multi-line CSV cells make it approximate)."""
        n = self.reader.count_hint(scan)
        if n is not None and self.cfg.limit:
            n = min(n, self.cfg.limit)
        return n

    def __iter__(self) -> Iterator[Query]:
        self.stats, self.duplicates = ReadStats(), 0
        seen: set[int] = set()
        produced = 0
        for raw in self.reader:
            self.stats.rows += 1
            try:
                query, explicit = to_query(raw.value, self.cfg)
                key = int.from_bytes(hashlib.blake2b(query.id.encode(), digest_size=8).digest(), "big")
                if key in seen:
                    if not explicit:
                        self.duplicates += 1
                        continue
                    raise BadRow(f"id {query.id!r} repeats an earlier row's id")
                seen.add(key)
            except BadRow as exc:
                self.stats.bad(
                    f"{raw.where}: {exc}",
                    skip=self.cfg.skip_bad_rows,
                    hint="fix the row, or set source.skip_bad_rows: true to skip and count",
                )
                continue
            yield query
            produced += 1
            if self.cfg.limit and produced >= self.cfg.limit:
                return


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
        role = m.get("role", SHAREGPT_ROLES.get(str(m.get("from", "")).lower()))
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


def _check_columns(where: str, columns: list[str], cfg: SourceConfig) -> None:
    if cfg.fields.question not in columns:
        raise InputError(
            f"{where}: no column {cfg.fields.question!r} (columns: {', '.join(map(str, columns))})",
            hint="map it with source.fields.question",
        )
