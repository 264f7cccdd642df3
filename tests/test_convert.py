"""`imitate convert IN --to FORMAT --out PATH`: counts on stdout, one-line errors, nothing written half."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from imitate.cli import main

ORCA = [
    {"id": "o1", "system_prompt": "", "question": "2+2?", "response": "4"},
    {"id": "o2", "system_prompt": "Be brief.", "question": "Capital of Peru?", "response": "Lima"},
]
CHATS = [
    {"id": "c1", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    {
        "id": "c2",
        "conversations": [
            {"from": "human", "value": "One?"},
            {"from": "gpt", "value": "1"},
            {"from": "human", "value": "Two?"},
            {"from": "gpt", "value": "2"},
            {"from": "human", "value": "left unanswered"},
        ],
    },
]


def jsonl(path: Path, rows: list, *raw: str) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(line + "\n" for line in raw))
    return path


def test_openorca_to_sharegpt_json_array(tmp_path, capsys):
    src, out = jsonl(tmp_path / "orca.jsonl", ORCA), tmp_path / "out" / "chats.json"
    assert main(["convert", str(src), "--to", "sharegpt", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"read 2 rows (2 openorca); wrote 2 sharegpt rows -> {out}"
    rows = json.loads(out.read_text())
    assert rows[1] == {
        "id": "o2",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Capital of Peru?"},
            {"from": "gpt", "value": "Lima"},
        ],
    }
    back = tmp_path / "orca.parquet"
    assert main(["convert", str(out), "--to", "openorca", "--out", str(back), "--format", "sharegpt"]) == 0
    assert pq.read_table(back).to_pylist() == ORCA


def test_a_bad_row_is_one_line_and_nothing_is_written(tmp_path, capsys):
    src = jsonl(tmp_path / "orca.jsonl", ORCA, "{broken")
    out = tmp_path / "out.jsonl"
    out.write_text("the previous output\n")
    assert main(["convert", str(src), "--to", "messages", "--out", str(out)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: InputError: {src}:3: invalid JSON" in err and "--skip-bad-rows" in err
    assert out.read_text() == "the previous output\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "orca.jsonl",
        "out.jsonl",
    ]


def test_skip_bad_rows_counts_both_sides(tmp_path, capsys):
    src = jsonl(tmp_path / "chats.jsonl", CHATS, '{"conversations": [{"from": "robot", "value": "?"}]}')
    out = tmp_path / "alpaca.csv"
    assert main(["convert", str(src), "--to", "alpaca", "--out", str(out)]) == 3
    assert "record c2: has 2 user and 2 assistant turns; alpaca holds one question" in capsys.readouterr().err
    assert not out.exists()
    assert main(["convert", str(src), "--to", "alpaca", "--out", str(out), "--skip-bad-rows"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == (
        "read 3 rows (2 sharegpt); wrote 1 alpaca rows; skipped 1 bad rows; skipped 1 records alpaca cannot hold; "
        f"unanswered trailing turns dropped: 1 -> {out}"
    )
    assert f"skipped: {src}:3: conversations[0].from: unknown role 'robot'" in captured.err
    assert "skipped: record c2: has 2 user" in captured.err
    assert out.read_text() == "id,instruction,input,output\nc1,Hi,,Hello\n"


def test_harvest_folder_to_messages_and_usage_errors(tmp_path, capsys):
    harvest = tmp_path / "run"
    harvest.mkdir()
    jsonl(tmp_path / "orca.jsonl", ORCA)
    assert (
        main(["convert", str(tmp_path / "orca.jsonl"), "--to", "imitate", "--out", str(harvest / "shard-00000.jsonl")])
        == 0
    )
    (harvest / "failures.jsonl").write_text("not data\n")
    out = tmp_path / "m.jsonl"
    capsys.readouterr()
    assert main(["convert", str(harvest), "--to", "messages", "--out", str(out)]) == 0
    assert "read 2 rows (2 imitate)" in capsys.readouterr().out
    assert [r["id"] for r in map(json.loads, out.read_text().splitlines())] == ["o1", "o2"]

    for args, target, message in [
        (["--to", "orca"], "x.jsonl", "unknown format 'orca'"),
        (["--to", "messages", "--format", "csv"], "x.jsonl", "unknown format 'csv'"),
        (["--to", "messages"], "x.txt", "cannot tell the file type to write"),
        (["--to", "messages"], "x.jsonl", "missing.jsonl: no such file or folder"),
    ]:
        source = tmp_path / "missing.jsonl" if "missing" in message else out
        assert main(["convert", str(source), *args, "--out", str(tmp_path / target)]) == 3
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
        assert not (tmp_path / target).exists()
