"""The common instruction-tuning formats in and out of imitate's `Record`s: one reader and one writer each.

    for record in read_records("orca.parquet"):  ...            # format detected from the first row's columns
    read_records("ShareGPT_V3.json", "sharegpt", skip_bad_rows=True, stats=stats)
    write_records(records, "out/alpaca.jsonl", "alpaca")        # suffix picks .json/.jsonl/.csv/.tsv/.parquet
    imitate convert IN --to FORMAT --out PATH [--format IN_FORMAT] [--skip-bad-rows]

Formats (`FORMAT_NAMES`) and how a row becomes a conversation (a list of system/user/assistant messages):
- openorca  `id`, `system_prompt` (may be empty: no system message), `question`, `response`.
- sharegpt  `{"id", "conversations": [{"from", "value"}, ...]}`, optional `model`; roles human/user → user,
            gpt/chatgpt/bard/bing/assistant → assistant, system (any case), written back as human/gpt/system (the
            spelling of a role is not kept, its meaning is). Text is kept as is (HTML cleaning is
            `imitate import sharegpt`).
- alpaca    `instruction`, `input` (may be empty), `output`. The user turn is the instruction, or, with an input,
            `instruction + "\\n\\n" + input` (what the student sees); the input is also kept in
            `Query.metadata["alpaca_input"]`, so writing alpaca splits the turn exactly where it was joined. A turn
            without that key (from any other source) is written as the instruction with an empty input.
- messages  OpenAI-style `{"messages": [{"role", "content"}, ...]}` (TRL/axolotl "conversational"), optional
            `id`; roles must be system/user/assistant and content a string.
- imitate   Record JSON (in CSV/Parquet: one `json` column holding it; nested Parquet columns are read too).
Detection (format "auto") looks at the first row's columns, in this order: imitate (`id`, `query`, `messages`,
`provenance`, or a lone `json`), sharegpt (`conversations`), messages (`messages`), openorca (`question` and
`response`), alpaca (`instruction` and `output`).

A foreign row becomes a Record as the contract says: messages = the conversation up to its last assistant turn,
response = that turn, query.question = the last user turn before it, query.turns = the turns between a leading
system turn and that question, query.system = the leading system turn. Turns after the last assistant turn
(an unanswered question at the end of a ShareGPT chat) are dropped and counted in `stats.notes`. The id is the
row's `id` (a number becomes a string), else `q-` + the sha256 of the conversation; provenance is
teacher "imported", the row's `model` or "unknown", base_url "", request_key the sha256 of the conversation and
`source` (uri, row, format, split). Columns `model` and `collection` fill provenance.model and query.collection;
every other column the format does not use goes to `query.metadata` (null cells, and blank CSV cells, are
absent). Keys of a turn other than role/content (from/value), such as SlimOrca's `weight`, are not kept.

Writing puts `id`, the format's columns, then `model` (unless "unknown"), `collection` and the metadata as extra
columns, so foreign → any → foreign keeps the id, conversation, model, collection and extra columns: A → B → A
is the same rows for every pair of formats, wherever B can hold the conversation. Where it cannot, writing that
record is an error naming it (or, with `skip_bad_rows`, it is skipped and counted), never a silent loss (so is
a metadata key that is also one of the target's columns):
- openorca holds one optional system prompt, one question and one response: no multi-turn conversation;
- alpaca holds one instruction (+ input) and one output: no multi-turn, and no system message (erase it first
  with `imitate curate --erase-system none`, which records the erasure);
- a failed record (no answer) can only be written as imitate records.
What a foreign format has no column for at all is dropped from imitate records written to it: provenance beyond
the model (teacher, params, usage, cost, finish reason, system prompt id), scores, tags and the truncated flag.
Read back, such a row is a new "imported" record. CSV holds only text: numbers come back as strings, and
list/dict cells (conversations, messages, nested extras) are JSON text, decoded again for the format's own columns.

Bad input is one line naming file:line (or `row N`) and the field: malformed JSON, a missing or mistyped field, a
non-UTF-8 file, an empty file, an unknown role, an undetectable format. `skip_bad_rows` skips and counts bad rows
in `stats` (a `ReadStats`) instead; an empty file or an undetectable format is never skipped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from imitate import __version__
from imitate.dataset.io import BadRow, RawRow, ReadStats, is_datasets_folder, open_rows
from imitate.dataset.writers import output_container, write_rows
from imitate.errors import InputError
from imitate.records import Message, Provenance, Query, Record, Source, canonical_json, sha256_text

FORMAT_NAMES = ("openorca", "sharegpt", "alpaca", "messages", "imitate")
_COLUMNS = {
    "openorca": ("system_prompt", "question", "response"),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "input", "output"),
    "messages": ("messages",),
}
_COMMON = ("id", "model", "collection")
_IMITATE_KEYS = {"id", "query", "messages", "provenance"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "system": "system"}  # lower-cased `from` -> role
SHAREGPT_ROLES |= dict.fromkeys(("gpt", "chatgpt", "bard", "bing", "assistant"), "assistant")
_SHAREGPT_OUT = {"user": "human", "assistant": "gpt", "system": "system"}
ALPACA_INPUT = "alpaca_input"
_SKIP_HINT = "fix the row, or skip bad rows (--skip-bad-rows) to drop and count them"
_RECORD_FILES = (".jsonl", ".ndjson", ".jsonl.gz", ".parquet")
_NOT_DATA = {"failures.jsonl", "dropped.jsonl"}  # failed rows (harvest) and dropped rows (curate, import)


def detect_format(columns: Iterable[str]) -> str | None:
    """The format a row with these columns is in, or None."""
    cols = set(columns)
    if cols >= _IMITATE_KEYS or cols == {"json"}:
        return "imitate"
    if "conversations" in cols:
        return "sharegpt"
    if "messages" in cols:
        return "messages"
    if {"question", "response"} <= cols:
        return "openorca"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    return None


def _undetectable(where: str, columns: Iterable[str]) -> InputError:
    return InputError(
        f"{where}: cannot detect the format from the columns ({', '.join(map(str, columns)) or 'none'})",
        hint="expected openorca (question, response), sharegpt (conversations), alpaca (instruction, output), "
        "messages (messages) or imitate records; or name it with --format",
    )


def record_files(folder: Path) -> list[Path]:
    """The data files of a folder of records (a harvest output: its shards, not failures.jsonl), in name order.
    A folder with a records.jsonl (written by curate, import, mix, self-instruct beside their side files:
    dropped.jsonl, rejected.jsonl, tasks.jsonl) is that one file."""
    if (folder / "records.jsonl").is_file():
        return [folder / "records.jsonl"]
    return sorted(p for p in folder.iterdir() if p.name.lower().endswith(_RECORD_FILES) and p.name not in _NOT_DATA)


def read_records(
    path_or_name: str | Path,
    format: str = "auto",
    *,
    skip_bad_rows: bool = False,
    stats: ReadStats | None = None,
    split: str | None = None,
    subset: str | None = None,
) -> Iterator[Record]:
    """Stream Records from a file, a folder of record files, a save_to_disk folder or a Hub dataset name.
    InputError (one line, file:line and field) for bad input; with `skip_bad_rows` bad rows are counted in
    `stats` instead. `split`/`subset` choose a split / configuration of a datasets folder or Hub dataset."""
    if format != "auto" and format not in FORMAT_NAMES:
        raise InputError(f"unknown format {format!r}", hint=f"one of: auto, {', '.join(FORMAT_NAMES)}")
    stats = stats if stats is not None else ReadStats()
    local = Path(os.path.expanduser(str(path_or_name)))
    before = stats.rows
    if local.is_dir() and not is_datasets_folder(local):
        files = record_files(local)
        if not files:
            raise InputError(f"{local}: no *.jsonl or *.parquet record files in this directory")
        for file in files:
            yield from _read_one(str(file), format, skip_bad_rows, stats, split, subset)
    else:
        yield from _read_one(str(path_or_name), format, skip_bad_rows, stats, split, subset)
    if stats.rows == before:
        raise InputError(f"{path_or_name}: empty (no rows)")


def _read_one(name: str, format: str, skip: bool, stats: ReadStats, split, subset) -> Iterator[Record]:
    fmt = None if format == "auto" else format

    def on_columns(where: str, names: list[str]) -> None:
        nonlocal fmt
        if fmt is None:
            fmt = detect_format(names)
            if fmt is None:
                raise _undetectable(where, names)

    reader = open_rows(name, split=split, subset=subset, on_columns=on_columns)
    for raw in reader:
        stats.rows += 1
        try:
            row = raw.value
            if isinstance(row, BadRow):
                raise row
            if not isinstance(row, dict):
                raise BadRow(f"expected an object, got {type(row).__name__}")
            if fmt is None:
                fmt = detect_format(row) or "unknown"
                if fmt == "unknown":
                    raise _undetectable(raw.where, row)
            if reader.container == "csv":  # a CSV cell cannot be absent: blank means absent
                row = {k: v for k, v in row.items() if v != ""}
            record = _read_imitate(row) if fmt == "imitate" else _foreign(row, fmt, raw, reader.path, stats)
        except BadRow as exc:
            stats.bad(f"{raw.where}: {exc}", skip=skip, hint=_SKIP_HINT)
            continue
        stats.kept += 1
        stats.formats[fmt] += 1
        yield record


# ---------------------------------------------------------------------------------------------- row → Record


def _text(row: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    value = row.get(name)
    if value is None:
        if required:
            raise BadRow(f"missing field {name!r}")
        return None
    if not isinstance(value, str):
        raise BadRow(f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def _label(row: dict[str, Any], name: str) -> str | None:
    """An optional id/model/collection column: a number becomes a string; blank means absent."""
    value = row.get(name)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if value is not None and not isinstance(value, str):
        raise BadRow(f"field {name!r} must be a string, got {type(value).__name__}")
    return value or None


def _items(row: dict[str, Any], name: str) -> list[Any]:
    value = row.get(name)
    if isinstance(value, str):  # CSV holds lists as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise BadRow(f"field {name!r}: invalid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})") from exc
    if value is None:
        raise BadRow(f"missing field {name!r}")
    if not isinstance(value, list):
        raise BadRow(f"field {name!r} must be a list of turns, got {type(value).__name__}")
    return value


def _turns(items: list[Any], name: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[Message]:
    out = []
    for i, turn in enumerate(items):
        at = f"{name}[{i}]"
        if not isinstance(turn, dict):
            raise BadRow(f"{at} must be an object, got {type(turn).__name__}")
        given = turn.get(role_key)
        if given is None:
            raise BadRow(f"{at}: missing field {role_key!r}")
        role = roles.get(given.lower()) if isinstance(given, str) else None
        if role is None:
            raise BadRow(f"{at}.{role_key}: unknown role {given!r} (expected {'/'.join(roles)})")
        text = turn.get(text_key)
        if not isinstance(text, str):
            raise BadRow(f"{at}.{text_key} must be a string, got {type(text).__name__}")
        out.append(Message(role=role, content=text))
    return out


def _conversation(row: dict[str, Any], fmt: str) -> tuple[list[Message], dict[str, Any]]:
    """The row's conversation, and metadata the format itself adds."""
    if fmt == "openorca":
        system = _text(row, "system_prompt", required=False)
        head = [Message(role="system", content=system)] if system else []
        question, response = _text(row, "question"), _text(row, "response")
        return [*head, Message(role="user", content=question), Message(role="assistant", content=response)], {}
    if fmt == "alpaca":
        instruction, output = _text(row, "instruction"), _text(row, "output")
        given = _text(row, "input", required=False)
        user = f"{instruction}\n\n{given}" if given else instruction
        turns = [Message(role="user", content=user), Message(role="assistant", content=output)]
        return turns, ({ALPACA_INPUT: given} if given else {})
    if fmt == "sharegpt":
        return _turns(_items(row, "conversations"), "conversations", "from", "value", SHAREGPT_ROLES), {}
    roles = {r: r for r in ("system", "user", "assistant")}
    return _turns(_items(row, "messages"), "messages", "role", "content", roles), {}


def _foreign(row: dict[str, Any], fmt: str, raw: RawRow, uri: str, stats: ReadStats) -> Record:
    msgs, added = _conversation(row, fmt)
    field = _COLUMNS[fmt][-1] if fmt in ("openorca", "alpaca") else _COLUMNS[fmt][0]
    last = max((i for i, m in enumerate(msgs) if m.role == "assistant"), default=None)
    if last is None:
        raise BadRow(f"{field}: no assistant turn (nothing to learn from)")
    if last < len(msgs) - 1:
        stats.notes["unanswered trailing turns dropped"] += len(msgs) - 1 - last
        msgs = msgs[: last + 1]
    prompt = msgs[:-1]
    users = [i for i, m in enumerate(prompt) if m.role == "user"]
    if not users:
        raise BadRow(f"{field}: no user turn before the answer")
    system = prompt[0].content if prompt[0].role == "system" else None
    conversation = canonical_json([m.model_dump() for m in msgs])
    rid = _label(row, "id") or "q-" + sha256_text(conversation)[:16]
    used = {*_COLUMNS[fmt], *_COMMON}
    metadata = {k: v for k, v in row.items() if k not in used and v is not None} | added
    query = Query(
        id=rid,
        question=prompt[users[-1]].content,
        system=system,
        collection=_label(row, "collection"),
        turns=prompt[1 if system is not None else 0 : users[-1]],
        metadata=metadata,
    )
    provenance = Provenance(
        teacher="imported",
        model=_label(row, "model") or "unknown",
        base_url="",
        request_key=sha256_text(conversation),
        imitate_version=__version__,
        source=Source(uri=uri, row=raw.index, format=fmt, split=raw.split),
    )
    return Record(id=rid, query=query, messages=prompt, response=msgs[-1].content, provenance=provenance)


def _read_imitate(row: dict[str, Any]) -> Record:
    try:
        if set(row) == {"json"}:
            return Record.from_json(row["json"])
        return Record.model_validate(_drop_none(row))  # Parquet: absent optional fields are nulls
    except ValueError as exc:
        errors = getattr(exc, "errors", None)
        if callable(errors) and errors():
            first = errors()[0]
            loc = ".".join(map(str, first["loc"]))
            raise BadRow(f"not a valid record ({'field ' + loc + ': ' if loc else ''}{first['msg']})") from exc
        raise BadRow(f"not a valid record ({str(exc).splitlines()[0]})") from exc


def _drop_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_drop_none(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------- Record → row


def _cannot_hold(fmt: str, convo: list[Message]) -> BadRow:
    users = sum(m.role == "user" for m in convo)
    answers = sum(m.role == "assistant" for m in convo)
    if fmt == "alpaca" and any(m.role == "system" for m in convo):
        return BadRow(
            "has a system message and alpaca has no place for one "
            "(erase it first: imitate curate --erase-system none; or write sharegpt, messages or openorca)"
        )
    return BadRow(
        f"has {users} user and {answers} assistant turns; {fmt} holds one question and one answer "
        "(write sharegpt or messages to keep multi-turn conversations)"
    )


def _body(record: Record, fmt: str, metadata: dict[str, Any]) -> dict[str, Any]:
    if record.response is None:
        raise BadRow(f"is a failed record (no answer); {fmt} rows need one (write imitate records to keep it)")
    convo = record.conversation()
    if fmt == "sharegpt":
        return {"conversations": [{"from": _SHAREGPT_OUT[m.role], "value": m.content} for m in convo]}
    if fmt == "messages":
        return {"messages": [m.model_dump() for m in convo]}
    has_system = convo[0].role == "system"
    rest = convo[1:] if has_system else convo
    if [m.role for m in rest] != ["user", "assistant"] or (has_system and fmt == "alpaca"):
        raise _cannot_hold(fmt, convo)
    system = convo[0].content if has_system else ""
    question, answer = rest[0].content, rest[1].content
    if fmt == "openorca":
        return {"system_prompt": system, "question": question, "response": answer}
    given = metadata.pop(ALPACA_INPUT, None)
    if isinstance(given, str) and given and question.endswith("\n\n" + given):
        return {"instruction": question[: -len(given) - 2], "input": given, "output": answer}
    return {"instruction": question, "input": "", "output": answer}


def _row(record: Record, fmt: str) -> dict[str, Any]:
    if fmt == "imitate":
        return record.model_dump(mode="json", exclude_none=True)
    metadata = dict(record.query.metadata)
    row: dict[str, Any] = {"id": record.id, **_body(record, fmt, metadata)}
    if record.provenance.model != "unknown":
        row["model"] = record.provenance.model
    if record.query.collection:
        row["collection"] = record.query.collection
    for key, value in metadata.items():
        if key in row or key in _COLUMNS[fmt]:
            raise BadRow(f"has metadata {key!r}, which is also a column of {fmt}")
        row[key] = value
    return row


def record_to_row(record: Record, format: str) -> dict[str, Any]:
    """One row of `format` holding the record; InputError naming the record if the format cannot hold it."""
    if format not in FORMAT_NAMES:
        raise InputError(f"unknown format {format!r}", hint=f"one of: {', '.join(FORMAT_NAMES)}")
    try:
        return _row(record, format)
    except BadRow as exc:
        raise InputError(f"record {record.id}: {exc}") from exc


def write_records(
    records: Iterable[Record],
    path: str | Path,
    format: str,
    *,
    skip_bad_rows: bool = False,
    stats: ReadStats | None = None,
) -> int:
    """Write records as `format` rows to `path` (suffix: .json array, .jsonl, .csv/.tsv, .parquet; `.gz` for the
    text ones) via a temporary name moved into place. A record the format cannot hold is an InputError, or with
    `skip_bad_rows` skipped and counted in `stats`. Returns the number of rows written."""
    if format not in FORMAT_NAMES:
        raise InputError(f"unknown format {format!r}", hint=f"one of: {', '.join(FORMAT_NAMES)}")
    tabular = output_container(path) in ("csv", "parquet")
    stats = stats if stats is not None else ReadStats()

    def rows() -> Iterator[dict[str, Any]]:
        for record in records:
            try:
                row = {"json": record.to_json()} if format == "imitate" and tabular else _row(record, format)
            except BadRow as exc:
                stats.bad(f"record {record.id}: {exc}", skip=skip_bad_rows, hint=_SKIP_HINT)
                continue
            stats.kept += 1
            yield row

    return write_rows(rows(), path)
