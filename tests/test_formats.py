"""Formats in and out (imitate/dataset/formats.py, io.py, writers.py): each format read and written, every ordered
pair converted both ways, detection, containers, and one line per bad input."""

from __future__ import annotations

import gzip
import io
import itertools
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from imitate.dataset.formats import (
    FORMAT_NAMES,
    SHAREGPT_ROLES,
    detect_format,
    read_records,
    record_to_row,
    write_records,
)
from imitate.dataset.io import ReadStats, atomic_path
from imitate.dataset.jsonarray import JsonArray
from imitate.dataset.writers import write_rows
from imitate.errors import InputError
from imitate.records import Message, Provenance, Query, Record, canonical_json, sha256_text

OPENORCA = [
    {"id": "niv.1", "system_prompt": "", "question": "Translate 'chat' to English.", "response": "Cat."},
    {"id": "cot.2", "system_prompt": "Think step by step.", "question": "2+3?", "response": "5", "src": "cot"},
]
SHAREGPT = [
    {
        "id": "sg1",
        "model": "gpt-4",
        "conversations": [
            {"from": "system", "value": "You are terse."},
            {"from": "Human", "value": "<p>Hi <b>there</b></p>"},
            {"from": "chatgpt", "value": "<div>Hello!</div>"},
            {"from": "user", "value": "And a joke?"},
            {"from": "bard", "value": "No."},
        ],
    },
    {
        "id": "sg2",
        "conversations": [{"from": "human", "value": "Capital of France?"}, {"from": "bing", "value": "Paris"}],
    },
    {"id": "sg3", "conversations": [{"from": "human", "value": "A?"}, {"from": "assistant", "value": "B"}]},
]
ALPACA = [
    {"instruction": "Give a synonym.", "input": "happy", "output": "Glad."},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Summarise.\n\nKeep it short.", "input": "Line one.\n\nLine two.", "output": "Two lines."},
]
MESSAGES = [
    {"id": "m1", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]},
    {
        "id": "m2",
        "messages": [
            {"role": "user", "content": "Count to two."},
            {"role": "assistant", "content": "1, 2"},
            {"role": "user", "content": "Now three."},
            {"role": "assistant", "content": "1, 2, 3"},
        ],
    },
    {
        "messages": [
            {"role": "system", "content": "Be exact."},
            {"role": "user", "content": "Pi?"},
            {"role": "assistant", "content": "3.14159"},
        ]
    },  # fmt: skip
]


def harvested(rid: str, question: str, answer: str, system: str | None = None, turns=()) -> Record:
    query = Query(id=rid, question=question, system=system, collection="cot", turns=list(turns), metadata={"k": "v"})
    return Record(
        id=rid,
        query=query,
        messages=query.messages(system),
        response=answer,
        provenance=Provenance(teacher="fake", model="gpt-x", base_url="http://127.0.0.1/v1", request_key=rid),
    )


IMITATE = [
    harvested("h1", "Why is the sky blue?", "Rayleigh scattering.", system="Explain like I'm five."),
    harvested("h2", "What is 6*7?", "42"),
    harvested(
        "h3", "And 7*7?", "49", turns=[Message(role="user", content="6*7?"), Message(role="assistant", content="42")]
    ),
]
ROWS = {
    "openorca": OPENORCA,
    "sharegpt": SHAREGPT,
    "alpaca": ALPACA,
    "messages": MESSAGES,
    "imitate": [r.model_dump(mode="json", exclude_none=True) for r in IMITATE],
}


def write_jsonl(path: Path, rows: list, extra_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    for at, text in (extra_lines or {}).items():
        lines.insert(at - 1, text)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------------- read


def test_openorca_reads_system_prompt_and_provenance(tmp_path):
    path = write_jsonl(tmp_path / "orca.jsonl", OPENORCA)
    a, b = read_records(path)
    assert [m.role for m in a.conversation()] == ["user", "assistant"] and a.query.system is None
    assert b.messages[0] == Message(role="system", content="Think step by step.") and b.response == "5"
    assert b.query.question == "2+3?" and b.query.system == "Think step by step." and b.query.metadata == {"src": "cot"}
    p = b.provenance
    assert (p.teacher, p.model, p.base_url) == ("imported", "unknown", "")
    assert p.source.model_dump() == {"uri": str(path), "row": 1, "format": "openorca", "split": None}
    convo = canonical_json([m.model_dump() for m in b.conversation()])
    assert p.request_key == sha256_text(convo) and b.id == "cot.2"


def test_sharegpt_multi_turn_messy_roles_text_kept(tmp_path):
    path = write_jsonl(tmp_path / "sg.jsonl", SHAREGPT)
    first = next(iter(read_records(path)))
    assert [m.role for m in first.conversation()] == ["system", "user", "assistant", "user", "assistant"]
    assert first.messages[1].content == "<p>Hi <b>there</b></p>"  # HTML is import sharegpt's business
    assert first.response == "No." and first.query.question == "And a joke?" and first.query.system == "You are terse."
    assert [m.content for m in first.query.turns] == ["<p>Hi <b>there</b></p>", "<div>Hello!</div>"]
    assert first.provenance.model == "gpt-4"


def test_sharegpt_json_array_and_unanswered_tail(tmp_path):
    rows = [{"id": "t", "conversations": [*SHAREGPT[1]["conversations"], {"from": "human", "value": "Why?"}]}]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    stats = ReadStats()
    (rec,) = read_records(path, stats=stats)
    assert rec.response == "Paris" and stats.notes == {"unanswered trailing turns dropped": 1}


def test_alpaca_join_is_documented_and_reversible(tmp_path):
    recs = list(read_records(write_jsonl(tmp_path / "a.jsonl", ALPACA)))
    assert recs[0].query.question == "Give a synonym.\n\nhappy" and recs[0].query.metadata == {"alpaca_input": "happy"}
    assert recs[1].query.question == "Name a colour." and recs[1].query.metadata == {}
    assert [record_to_row(r, "alpaca") for r in recs] == [
        {"id": r.id, **row} for r, row in zip(recs, ALPACA, strict=True)
    ]
    assert recs[0].id == "q-" + sha256_text(canonical_json([m.model_dump() for m in recs[0].conversation()]))[:16]


def test_messages_single_and_multi_turn(tmp_path):
    one, two, three = read_records(write_jsonl(tmp_path / "m.jsonl", MESSAGES))
    assert one.id == "m1" and one.response == "Hey"
    assert two.query.question == "Now three." and len(two.query.turns) == 2 and two.response == "1, 2, 3"
    assert three.id.startswith("q-") and three.query.system == "Be exact."


def test_imitate_records_keep_their_provenance(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", ROWS["imitate"])
    assert list(read_records(path)) == IMITATE


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_each_format_is_detected_and_can_be_forced(tmp_path, fmt):
    rows = ROWS[fmt]
    assert detect_format(rows[0]) == fmt
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    stats = ReadStats()
    assert len(list(read_records(path, fmt, stats=stats))) == len(rows) and stats.formats == {fmt: len(rows)}


# ---------------------------------------------------------------------------------------------- write


def test_records_written_as_each_format():
    rec = IMITATE[1]
    assert record_to_row(rec, "openorca") == {
        "id": "h2", "system_prompt": "", "question": "What is 6*7?", "response": "42",
        "model": "gpt-x", "collection": "cot", "k": "v",
    }  # fmt: skip
    assert record_to_row(rec, "sharegpt")["conversations"] == [
        {"from": "human", "value": "What is 6*7?"},
        {"from": "gpt", "value": "42"},
    ]
    assert record_to_row(rec, "messages")["messages"][1] == {"role": "assistant", "content": "42"}
    assert record_to_row(rec, "alpaca") | {"k": None} == {
        "id": "h2", "instruction": "What is 6*7?", "input": "", "output": "42",
        "model": "gpt-x", "collection": "cot", "k": None,
    }  # fmt: skip
    assert Record.model_validate(record_to_row(rec, "imitate")) == rec


@pytest.mark.parametrize(
    ("rec", "fmt", "reason"),
    [
        (IMITATE[0], "alpaca", "has a system message and alpaca has no place for one"),
        (IMITATE[2], "alpaca", "has 2 user and 2 assistant turns; alpaca holds one question"),
        (IMITATE[2], "openorca", "has 2 user and 2 assistant turns; openorca holds one question"),
    ],
)
def test_what_a_format_cannot_hold_is_an_error_or_counted(tmp_path, rec, fmt, reason):
    with pytest.raises(InputError, match=f"record {rec.id}: {reason}"):
        record_to_row(rec, fmt)
    out = tmp_path / "out.jsonl"
    with pytest.raises(InputError, match=reason):
        write_records([IMITATE[1], rec], out, fmt)
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-written, no temp left
    stats = ReadStats()
    assert write_records(IMITATE, out, fmt, skip_bad_rows=True, stats=stats) == len(IMITATE) - stats.skipped
    assert stats.skipped >= 1 and any(reason in e for e in stats.bad_examples)


def test_a_failed_record_is_only_written_as_imitate(tmp_path):
    failed = IMITATE[1].model_copy(update={"status": "failed", "response": None, "error_class": "ServerError"})
    with pytest.raises(InputError, match="record h2: is a failed record"):
        record_to_row(failed, "messages")
    write_records([failed], tmp_path / "f.jsonl", "imitate")
    assert list(read_records(tmp_path / "f.jsonl")) == [failed]


# ---------------------------------------------------------------------------------------------- round trips


def _fits(fmt: str, rec: Record) -> bool:
    roles = [m.role for m in rec.conversation()]
    if fmt == "openorca":
        return roles in (["user", "assistant"], ["system", "user", "assistant"])
    return roles == ["user", "assistant"] if fmt == "alpaca" else True


def _kept(rec: Record) -> tuple:
    """What every format holds: id, conversation, model, collection, extra columns."""
    meta = rec.query.metadata
    return rec.id, rec.conversation(), rec.provenance.model, rec.query.collection, meta


def _spelled(row: dict) -> dict:
    """ShareGPT roles as imitate writes them (human, gpt, system): the meaning of a role is kept, not its spelling."""
    if "conversations" not in row:
        return row
    spelled = {"user": "human", "assistant": "gpt", "system": "system"}
    turns = [{**t, "from": spelled[SHAREGPT_ROLES[t["from"].lower()]]} for t in row["conversations"]]
    return {**row, "conversations": turns}


@pytest.mark.parametrize(("a", "b"), list(itertools.permutations(FORMAT_NAMES, 2)))
def test_a_to_b_to_a_is_lossless_wherever_b_can_hold_it(tmp_path, a, b):
    source = list(read_records(write_jsonl(tmp_path / "a.jsonl", ROWS[a])))
    fitting = [r for r in source if _fits(b, r)]
    assert fitting, "every pair needs rows to carry"
    unfit = len(source) - len(fitting)
    stats = ReadStats()
    assert write_records(source, tmp_path / "b.jsonl", b, skip_bad_rows=True, stats=stats) == len(fitting)
    assert stats.skipped == unfit
    via_b = list(read_records(tmp_path / "b.jsonl", b))
    write_records(via_b, tmp_path / "back.jsonl", a)
    back = list(read_records(tmp_path / "back.jsonl", a))
    if a == "imitate":  # the foreign format had no column for teacher, params, usage...: those are new
        assert [_kept(r) for r in back] == [_kept(r) for r in fitting]
        assert {r.provenance.teacher for r in back} == {"imported"}
    else:
        fitting_rows = [record_to_row(r, a) for r in fitting]
        assert rows_of(tmp_path / "back.jsonl") == fitting_rows
        original = [_spelled(row) for row, rec in zip(ROWS[a], source, strict=True) if rec in fitting]
        assert [{k: v for k, v in row.items() if k != "id"} for row in fitting_rows] == [
            {k: v for k, v in row.items() if k != "id"} for row in original
        ]


# ---------------------------------------------------------------------------------------------- containers


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".jsonl.gz", ".csv", ".tsv", ".parquet", ".json.gz"])
@pytest.mark.parametrize("fmt", ["sharegpt", "alpaca", "imitate"])
def test_every_container_round_trips(tmp_path, suffix, fmt):
    recs = list(read_records(write_jsonl(tmp_path / "in.jsonl", ROWS[fmt])))
    out = tmp_path / f"out{suffix}"
    assert write_records(recs, out, fmt) == len(recs)
    back = list(read_records(out))
    assert [record_to_row(r, fmt) for r in back] == [record_to_row(r, fmt) for r in recs]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_csv_and_parquet_take_every_rows_columns(tmp_path):
    rows = [{"a": 1}, {"a": 2, "b": "x", "c": [1, 2]}, {"b": "y"}]
    write_rows(rows, tmp_path / "t.parquet", batch_rows=1)
    assert pq.read_table(tmp_path / "t.parquet").to_pylist() == [
        {"a": 1, "b": None, "c": None}, {"a": 2, "b": "x", "c": [1, 2]}, {"a": None, "b": "y", "c": None},
    ]  # fmt: skip
    write_rows(rows, tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text() == 'a,b,c\n1,,\n2,x,"[1, 2]"\n,y,\n'
    with pytest.raises(InputError, match="a column cannot hold every row's value"):
        write_rows([{"a": 1}, {"a": "text"}], tmp_path / "bad.parquet")
    assert not (tmp_path / "bad.parquet").exists()


def test_json_array_streams_across_chunk_boundaries():
    rows = [{"n": 12345678901234, "s": "x" * 50 + 'é\u2603\\"', "l": [1.5e-3, None, True]}, 7, "s", [], {}]
    text = "\ufeff [\n" + ",\n  ".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n"
    for chunk in (1, 3, 7, 64, 1 << 20):
        got = list(JsonArray(io.BytesIO(text.encode()), "f", chunk).elements())
        assert [v for _, v in got] == rows and [line for line, _ in got] == [2, 3, 4, 5, 6]


@pytest.mark.integration
def test_save_to_disk_folder_and_hub_code_path(tmp_path):
    import datasets

    rows = [{**r, "src": r.get("src", "niv")} for r in OPENORCA]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])})
    dd.save_to_disk(str(tmp_path / "dd"))
    recs = list(read_records(tmp_path / "dd"))
    assert len(recs) == 2 and recs[1].provenance.source.split == "train" and recs[1].query.metadata == {"src": "cot"}
    assert [r.provenance.source.split for r in read_records(tmp_path / "dd", split="test")] == ["test"]
    # load_dataset(..., streaming=True) on a local data folder: the Hub code path without any network.
    (tmp_path / "hub").mkdir()
    write_jsonl(tmp_path / "hub" / "train.jsonl", SHAREGPT)
    from imitate.dataset.io import open_rows

    rows = list(open_rows(tmp_path / "hub", "hub"))
    assert [r.value["id"] for r in rows] == ["sg1", "sg2", "sg3"] and rows[0].split == "train"


def test_a_harvest_folder_reads_its_shards_not_failures(tmp_path):
    write_jsonl(tmp_path / "shard-00000.jsonl", ROWS["imitate"][:2])
    write_jsonl(tmp_path / "shard-00001.jsonl", ROWS["imitate"][2:])
    (tmp_path / "failures.jsonl").write_text("not read\n")
    (tmp_path / "manifest.json").write_text("{}")
    assert list(read_records(tmp_path)) == IMITATE


# ---------------------------------------------------------------------------------------------- atomic output


def test_atomic_path_replaces_on_success_and_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "sub" / "out.jsonl"
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert not target.exists() and tmp.parent == target.parent
    assert target.read_text() == "new"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "new" and [p.name for p in target.parent.iterdir()] == ["out.jsonl"]
    folder = tmp_path / "folder"
    for text in ("one", "two"):
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            (tmp / "f").write_text(text)
    assert (folder / "f").read_text() == "two" and len(list(tmp_path.iterdir())) == 2


# ---------------------------------------------------------------------------------------------- bad input


OK = b'{"question": "q", "response": "r"}'
SG = b'{"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "r"}]}'
BAD_INPUT = [
    (
        "f.jsonl",
        OK + b'\n{"question": "q2", "resp\n',
        r"f\.jsonl:2: invalid JSON \(Unterminated string starting at column 20\)",
    ),
    ("f.json", b"[\n" + OK + b',\n{"question": \n]', r"f\.json:4: invalid JSON \(Expecting value\)"),
    ("f.jsonl", OK + b'\n\n{"question": "q2"}\n', r"f\.jsonl:3: missing field 'response'"),
    ("f.jsonl", b'{"question": "q", "response": 5}\n', r"f\.jsonl:1: field 'response' must be a string, got int"),
    ("f.jsonl", OK + b'\n{"question": "caf\xe9"}\n', r"f\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 18\)"),
    ("f.csv", b'question,response\nq,r\n"caf\xe9",r\n', r"f\.csv:3: not UTF-8 text \(byte 0xe9\)"),
    ("f.json", b"[" + OK + b',\n{"question": "caf\xe9", "response": "r"}]', r"f\.json:2: not UTF-8 text"),
    ("f.jsonl", b"", r"f\.jsonl: empty \(no rows\)"),
    ("f.json", b"[ ]", r"f\.json: empty \(no rows\)"),
    ("f.csv", b"question,response\n", r"f\.csv: empty \(no rows\)"),
    ("f.jsonl", SG + b"\n", r"f\.jsonl:1: conversations\[1\]\.from: unknown role 'robot'"),
    ("f.jsonl", b'{"messages": [{"role": "tool", "content": "x"}]}', r"f\.jsonl:1: messages\[0\]\.role: unknown role"),
    (
        "f.jsonl",
        b'{"prompt": "q", "completion": "r"}',
        r"f\.jsonl:1: cannot detect the format .*\(prompt, completion\)",
    ),
    (
        "f.csv",
        b"prompt,completion\nq,r\n",
        r"f\.csv:1: cannot detect the format from the columns \(prompt, completion\)",
    ),
    ("f.jsonl", b'{"messages": [{"role": "user", "content": "q"}]}', r"f\.jsonl:1: messages: no assistant turn"),
    ("f.jsonl", b'{"conversations": "[{not json"}', r"f\.jsonl:1: field 'conversations': invalid JSON"),
    (
        "f.jsonl",
        b'{"id": "x", "query": {}, "messages": [], "provenance": {}}',
        r"f\.jsonl:1: not a valid record \(field query\.id",
    ),
    ("f.txt", b"hello", r"f\.txt: cannot tell the format from the name"),
]


@pytest.mark.parametrize(("name", "content", "expected"), BAD_INPUT)
def test_each_bad_input_is_one_line_with_place_and_field(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match=expected) as info:
        list(read_records(path))
    assert "\n" not in info.value.one_line()


def test_skip_bad_rows_counts_and_keeps_examples(tmp_path):
    bad = {2: "{oops", 4: '{"question": "no answer"}', 5: '["not", "an", "object"]'}
    path = write_jsonl(tmp_path / "f.jsonl", [*OPENORCA, *OPENORCA], extra_lines=bad)
    stats = ReadStats()
    recs = list(read_records(path, skip_bad_rows=True, stats=stats))
    assert len(recs) == 4 and (stats.rows, stats.kept, stats.skipped) == (7, 4, 3)
    assert [e.split(": ", 1)[0] for e in stats.bad_examples] == [f"{path}:{n}" for n in (2, 4, 5)]
    assert "missing field 'response'" in stats.bad_examples[1] and "expected an object" in stats.bad_examples[2]
    with pytest.raises(InputError, match=r"f\.jsonl:2: invalid JSON"):
        list(read_records(path))


def test_unknown_format_names(tmp_path):
    with pytest.raises(InputError, match="unknown format 'orca'"):
        list(read_records(write_jsonl(tmp_path / "x.jsonl", OPENORCA), "orca"))
    with pytest.raises(InputError, match="unknown format 'csv'"):
        write_records(IMITATE, tmp_path / "x.csv", "csv")
    with pytest.raises(InputError, match="cannot tell the file type to write"):
        write_records(IMITATE, tmp_path / "x.txt", "messages")


def test_gzip_jsonl(tmp_path):
    with gzip.open(tmp_path / "m.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in MESSAGES)
    assert [r.id for r in read_records(tmp_path / "m.jsonl.gz")][:2] == ["m1", "m2"]
