"""Eval set readers: the common benchmark shapes, and a column mapping for any other, to `EvalSet`s of `Item`s.

    read_eval_set("data/eval/general_mc.jsonl")                       # shape detected from the first row
    read_eval_set("arc.parquet", format="arc", limit=100)
    read_eval_set("quiz.csv", columns="question=q,choices=opts,answer=gold")

Shapes (`FORMATS`):
- mmlu   `question`, `choices` (a list of strings), `answer` (the 0-based index; a letter A.. or a digit string
         is read too). Multiple choice.
- arc    `question`, `choices: {text: [...], label: [...]}`, `answerKey` (one of the labels). Multiple choice.
- gsm8k  `question`, `answer` (a worked answer ending in `#### <number>`). Generation, exact match on the number.
- mc     a mapped multiple-choice set: `answer` is an index, a letter, or the text of the right choice.
- qa     a mapped generation set: `answer` is the final answer (a `####` in it is read as in gsm8k).
`--columns question=q,choices=opts,answer=gold[,id=key]` renames the file's columns to these names first;
without `--format`, a mapping with `choices` is `mc`, else `qa`. Detection ("auto") looks at the first row:
`answerKey` → arc, `choices` → mmlu, `question` + `answer` → gsm8k. An optional `id` column names the items.

Files are read through `imitate.dataset.io` (JSONL, JSON array, CSV/TSV, Parquet, datasets folders); in CSV a
list or dict cell is JSON text. Bad input stops the read with one line naming file:row and the field: malformed
JSON, a missing column, an empty choice list or an empty choice, an answer index out of range or a label not
among the choices, a GSM8K answer without `####`. An eval set is never silently shortened.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imitate.dataset.io import BadRow, RawRow, open_rows
from imitate.errors import InputError
from imitate.evaluate.extract import gold_number, normalise_answer

FORMATS = ("mmlu", "arc", "gsm8k", "mc", "qa")
MULTIPLE_CHOICE, GENERATION = "multiple_choice", "generation"
_KEYS = ("question", "choices", "answer", "answerKey", "id")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Item:
    id: str
    where: str  # file:line, for messages
    question: str
    choices: tuple[str, ...] = ()  # multiple choice: the choices, in order
    answer: int | None = None  # multiple choice: index of the right choice
    target: str | None = None  # generation: the normalised final answer
    reference: str = ""  # generation: the worked answer as given


@dataclass
class EvalSet:
    name: str
    path: str
    format: str
    items: list[Item] = field(default_factory=list)
    sha256: str = ""
    rows: int = 0  # rows read (all of the file unless --limit stopped the read early)

    @property
    def kind(self) -> str:
        return GENERATION if self.format in ("gsm8k", "qa") else MULTIPLE_CHOICE

    def describe(self) -> dict[str, Any]:
        return {"file": self.path, "sha256": self.sha256, "format": self.format, "rows": self.rows}


def parse_columns(spec: str | None) -> dict[str, str]:
    """`question=q,choices=opts,answer=gold` → {"question": "q", ...} (our name → the file's column)."""
    if not spec:
        return {}
    mapping: dict[str, str] = {}
    for part in spec.split(","):
        ours, sep, theirs = part.partition("=")
        ours, theirs = ours.strip(), theirs.strip()
        if not sep or not theirs or ours not in _KEYS:
            raise InputError(f"--columns {spec!r}: bad entry {part!r}", hint=f"NAME=COLUMN with NAME in {_KEYS}")
        mapping[ours] = theirs
    if "question" not in mapping or "answer" not in mapping and "answerKey" not in mapping:
        raise InputError(f"--columns {spec!r}: map at least question and answer")
    return mapping


def detect(row: dict[str, Any], mapping: dict[str, str]) -> str | None:
    if mapping:
        return "mc" if "choices" in mapping else "qa"
    if "answerKey" in row and "choices" in row:
        return "arc"
    if "choices" in row:
        return "mmlu"
    if "question" in row and "answer" in row:
        return "gsm8k"
    return None


def read_eval_set(
    path: str | Path, format: str = "auto", *, columns: str | None = None, limit: int | None = None
) -> EvalSet:
    """Read an eval set whole (first `limit` items); InputError in one line for the first bad row."""
    if format not in ("auto", *FORMATS):
        raise InputError(f"--format {format!r}: unknown eval format", hint=f"one of: auto, {', '.join(FORMATS)}")
    mapping = parse_columns(columns)
    name = str(path)
    es = EvalSet(name=Path(name).stem or name, path=name, format=format)
    for raw in _rows(name, limit):
        es.rows += 1
        try:
            row = _mapped(raw, mapping)
            if es.format == "auto":
                es.format = detect(row, mapping) or ""
                if not es.format:
                    raise BadRow(f"cannot tell the eval format from the columns ({', '.join(row) or 'none'})")
            es.items.append(_READERS[es.format](row, raw))
        except BadRow as exc:
            hint = "name it with --format mmlu|arc|gsm8k, or map columns with --columns" if not es.format else None
            raise InputError(f"{raw.where}: {exc}", hint=hint) from None
    if not es.items:
        raise InputError(f"{name}: empty eval set (no rows)")
    es.sha256 = _sha256(name)
    return es


def _rows(name: str, limit: int | None) -> Iterator[RawRow]:
    for raw in open_rows(name, hint="an eval set is .jsonl, .json, .csv, .tsv or .parquet"):
        if limit is not None and raw.index >= limit:
            return
        yield raw


def _sha256(name: str) -> str:
    p = Path(name)
    if not p.is_file():
        return ""
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _mapped(raw: RawRow, mapping: dict[str, str]) -> dict[str, Any]:
    row = raw.value
    if isinstance(row, BadRow):
        raise row
    if not isinstance(row, dict):
        raise BadRow(f"expected an object, got {type(row).__name__}")
    if not mapping:
        return row
    out = {k: v for k, v in row.items() if k not in mapping.values()}
    for ours, theirs in mapping.items():
        if theirs not in row:
            raise BadRow(f"missing column {theirs!r} (mapped to {ours})")
        out[ours] = row[theirs]
    return out


# ---------------------------------------------------------------------------------------------- one row → Item


def _field(row: dict[str, Any], name: str) -> Any:
    if name not in row or row[name] is None or row[name] == "":
        raise BadRow(f"missing field {name!r}")
    return row[name]


def _text(row: dict[str, Any], name: str) -> str:
    value = _field(row, name)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise BadRow(f"field {name!r} must be text, got {type(value).__name__}")
    return value


def _json_cell(value: Any) -> Any:
    """CSV cells hold lists and dicts as JSON text."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except ValueError as exc:
            raise BadRow(f"field 'choices': invalid JSON text ({exc})") from None
    return value


def _choice_list(value: Any, name: str = "choices") -> tuple[str, ...]:
    value = _json_cell(value)
    if hasattr(value, "tolist"):  # a numpy array from Parquet via datasets
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise BadRow(f"field {name!r} must be a list of choices, got {type(value).__name__}")
    if not value:
        raise BadRow(f"field {name!r} is an empty list")
    out = []
    for k, c in enumerate(value):
        if isinstance(c, (int, float)) and not isinstance(c, bool):
            c = str(c)
        if not isinstance(c, str) or not c.strip():
            raise BadRow(f"field {name!r}: choice {k} is empty or not text")
        out.append(c)
    return tuple(out)


def _index(value: Any, choices: tuple[str, ...], name: str, *, by_text: bool) -> int:
    """An answer given as an index, a digit string, a letter, or (for mapped sets) the right choice's text."""
    n = len(choices)
    if isinstance(value, bool):
        raise BadRow(f"field {name!r} must be an index or a letter, got a boolean")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, int):
        if not 0 <= value < n:
            raise BadRow(f"field {name!r}: index {value} out of range for {n} choices (0..{n - 1})")
        return value
    if isinstance(value, str):
        text = value.strip()
        if len(text) == 1 and text.upper() in LETTERS:
            k = LETTERS.index(text.upper())
            if k >= n:
                raise BadRow(f"field {name!r}: letter {text} out of range for {n} choices (A..{LETTERS[n - 1]})")
            return k
        if by_text and text in choices:
            return choices.index(text)
        raise BadRow(f"field {name!r}: {value!r} is not an index, a letter" + (" or a choice" if by_text else ""))
    raise BadRow(f"field {name!r} must be an index or a letter, got {type(value).__name__}")


def _id(row: dict[str, Any], raw: RawRow) -> str:
    value = row.get("id")
    return str(value) if value not in (None, "") else f"row-{raw.index}"


def _mmlu(row: dict[str, Any], raw: RawRow, *, by_text: bool = False) -> Item:
    question = _text(row, "question")
    choices = _choice_list(_field(row, "choices"))
    answer = _index(_field(row, "answer"), choices, "answer", by_text=by_text)
    return Item(_id(row, raw), raw.where, question, choices, answer)


def _arc(row: dict[str, Any], raw: RawRow) -> Item:
    question = _text(row, "question")
    block = _json_cell(_field(row, "choices"))
    if not isinstance(block, dict) or "text" not in block or "label" not in block:
        raise BadRow("field 'choices' must be {text: [...], label: [...]}")
    texts = _choice_list(block["text"], "choices.text")
    labels = [str(x) for x in (block["label"].tolist() if hasattr(block["label"], "tolist") else block["label"])]
    if len(labels) != len(texts):
        raise BadRow(f"field 'choices': {len(texts)} texts but {len(labels)} labels")
    key = str(_field(row, "answerKey")).strip()
    if key not in labels:
        raise BadRow(f"field 'answerKey': {key!r} is not one of the labels {labels}")
    return Item(_id(row, raw), raw.where, question, texts, labels.index(key))


def _gsm8k(row: dict[str, Any], raw: RawRow) -> Item:
    question = _text(row, "question")
    answer = _text(row, "answer")
    target = gold_number(answer)
    if target is None:
        raise BadRow("field 'answer' has no '#### <number>' final answer")
    return Item(_id(row, raw), raw.where, question, target=target, reference=answer)


def _qa(row: dict[str, Any], raw: RawRow) -> Item:
    question = _text(row, "question")
    answer = _text(row, "answer")
    target = gold_number(answer) if "####" in answer else normalise_answer(answer)
    if not target:
        raise BadRow("field 'answer' is empty")
    return Item(_id(row, raw), raw.where, question, target=target, reference=answer)


_READERS = {
    "mmlu": _mmlu,
    "arc": _arc,
    "gsm8k": _gsm8k,
    "mc": lambda row, raw: _mmlu(row, raw, by_text=True),
    "qa": _qa,
}
