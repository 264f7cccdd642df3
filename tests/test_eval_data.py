"""Eval set readers (MMLU, ARC, GSM8K, mapped columns; JSONL, JSON, CSV, Parquet), each bad input as one line
naming file:row and field (through the CLI, before any model loads), and the shipped eval sets checked."""

from __future__ import annotations

import ast
import json
import operator
import re
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imitate.cli import main
from imitate.errors import InputError
from imitate.evaluate.data import GENERATION, MULTIPLE_CHOICE, parse_columns, read_eval_set

REPO = Path(__file__).resolve().parents[1]
EVAL = REPO / "data" / "eval"


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_mmlu_arc_gsm8k_detected(tmp_path):
    mmlu = read_eval_set(_jsonl(tmp_path / "m.jsonl", [
        {"question": "Q1", "choices": ["a", "b", "c"], "answer": 2},
        {"question": "Q2", "choices": ["a", "b"], "answer": "B", "id": "x"},
        {"question": "Q3", "choices": ["a", "b"], "answer": "0"},
    ]))  # fmt: skip
    assert (mmlu.format, mmlu.kind, mmlu.rows) == ("mmlu", MULTIPLE_CHOICE, 3)
    assert [(it.id, it.answer, it.choices) for it in mmlu.items] == [
        ("row-0", 2, ("a", "b", "c")), ("x", 1, ("a", "b")), ("row-2", 0, ("a", "b"))
    ]  # fmt: skip
    assert mmlu.items[0].where.endswith("m.jsonl:1") and len(mmlu.sha256) == 64
    arc = read_eval_set(_jsonl(tmp_path / "a.jsonl", [
        {"id": "Mercury_1", "question": "Q", "choices": {"text": ["x", "y", "z"], "label": ["A", "B", "C"]},
         "answerKey": "C"},
        {"question": "Q", "choices": {"text": ["x", "y"], "label": ["1", "2"]}, "answerKey": "1"},
    ]))  # fmt: skip
    assert arc.format == "arc" and [it.answer for it in arc.items] == [2, 0]
    gsm = read_eval_set(_jsonl(tmp_path / "g.jsonl", [{"question": "Q", "answer": "2 + 2 = 4\n#### 4"}]))
    assert (gsm.format, gsm.kind, gsm.items[0].target) == ("gsm8k", GENERATION, "4")


def test_limit_reads_only_the_first_rows(tmp_path):
    rows = [{"question": f"Q{i}", "choices": ["a", "b"], "answer": 0} for i in range(5)] + ["{broken"]
    es = read_eval_set(_jsonl(tmp_path / "m.jsonl", rows), limit=2)
    assert [it.question for it in es.items] == ["Q0", "Q1"] and es.rows == 2


def test_column_mapping_csv_and_parquet(tmp_path):
    csv = tmp_path / "quiz.csv"
    csv.write_text('q,opts,gold\nWhat?,"[""red"", ""green""]",green\nWho?,"[""me"", ""you""]",1\n', encoding="utf-8")
    es = read_eval_set(csv, columns="question=q,choices=opts,answer=gold")
    assert es.format == "mc" and [(it.choices, it.answer) for it in es.items] == [
        (("red", "green"), 1), (("me", "you"), 1)
    ]  # fmt: skip
    table = pa.table({"prompt": ["2+2?", "Capital of Peru?"], "target": ["#### 4", "Lima"]})
    pq.write_table(table, tmp_path / "qa.parquet")
    qa = read_eval_set(tmp_path / "qa.parquet", columns="question=prompt,answer=target")
    assert qa.format == "qa" and [it.target for it in qa.items] == ["4", "lima"]
    mmlu = pa.table({"question": ["Q"], "choices": [["a", "b", "c"]], "answer": [1]})
    pq.write_table(mmlu, tmp_path / "mmlu.parquet")
    assert read_eval_set(tmp_path / "mmlu.parquet").items[0].answer == 1


def test_parse_columns():
    assert parse_columns("question=q, answer=a") == {"question": "q", "answer": "a"}
    for bad in ("question", "question=q", "prompt=q,answer=a", "question=,answer=a"):
        with pytest.raises(InputError):
            parse_columns(bad)


BAD = [
    (
        "missing column",
        [{"question": "Q", "answer": 0, "choices": ["a"]}, {"question": "Q", "answer": 1}],
        "mmlu",
        ":2: missing field 'choices'",
    ),
    (
        "index out of range",
        [{"question": "Q", "choices": ["a", "b"], "answer": 2}],
        "mmlu",
        ":1: field 'answer': index 2 out of range for 2 choices",
    ),
    (
        "letter out of range",
        [{"question": "Q", "choices": ["a", "b"], "answer": "D"}],
        "mmlu",
        ":1: field 'answer': letter D out of range",
    ),
    (
        "empty choice list",
        [{"question": "Q", "choices": [], "answer": 0}],
        "mmlu",
        ":1: field 'choices' is an empty list",
    ),
    (
        "empty choice",
        [{"question": "Q", "choices": ["a", " "], "answer": 0}],
        "mmlu",
        ":1: field 'choices': choice 1 is empty",
    ),
    (
        "gsm8k without ####",
        [{"question": "Q", "answer": "#### 3"}, {"question": "Q", "answer": "it is 4"}],
        "gsm8k",
        ":2: field 'answer' has no '#### <number>' final answer",
    ),
    (
        "malformed JSON",
        [{"question": "Q", "choices": ["a"], "answer": 0}, '{"question": "Q", "choices": ['],
        "auto",
        ":2: invalid JSON",
    ),
    (
        "ARC key not a label",
        [{"question": "Q", "choices": {"text": ["x"], "label": ["A"]}, "answerKey": "E"}],
        "arc",
        ":1: field 'answerKey': 'E' is not one of the labels",
    ),
    ("missing question", [{"choices": ["a"], "answer": 0}], "mmlu", ":1: missing field 'question'"),
    ("unknown shape", [{"prompt": "Q", "gold": 1}], "auto", ":1: cannot tell the eval format from the columns"),
]


@pytest.mark.parametrize(("what", "rows", "fmt", "needle"), BAD, ids=[b[0] for b in BAD])
def test_each_bad_input_is_one_line_naming_file_row_and_field(tmp_path, capsys, what, rows, fmt, needle):
    data = _jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "out"
    code = main(["eval", "bench", "--model", str(tmp_path / "never-loaded"), "--data", str(data),
                 "--format", fmt, "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == InputError.exit_code
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: InputError: ") and f"{data}{needle}" in err
    assert not out.exists()  # nothing written: the eval sets are checked before any model loads


def test_bad_options_are_one_line(tmp_path, capsys):
    data = EVAL / "general_mc.jsonl"
    for args, needle in [
        (["--format", "hellaswag"], "unknown eval format"),
        (["--extract", "biggest"], "unknown rule"),
        (["--columns", "prompt=q"], "--columns"),
        (["--prompt", "fancy"], "--prompt"),
    ]:
        code = main(["eval", "bench", "--data", str(data), "--out", str(tmp_path / "o"), *args])
        err = capsys.readouterr().err.strip()
        assert code == InputError.exit_code and len(err.splitlines()) == 1 and needle in err, err
    code = main(["eval", "bench", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")])
    assert code == InputError.exit_code and "no such file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- shipped sets

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
UNIT_CONSTANTS = {2, 3, 4, 7, 60, 100}  # double/back, thirds, quarters/square sides, week, hour, percent


def _calc(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _calc(node.body)
    if isinstance(node, ast.Constant):
        return Fraction(str(node.value))
    if isinstance(node, ast.BinOp):
        return _OPS[type(node.op)](_calc(node.left), _calc(node.right))
    raise AssertionError(f"unexpected expression {ast.dump(node)}")


def _operands(expr: str) -> list[Fraction]:
    return [Fraction(str(n.value)) for n in ast.walk(ast.parse(expr, mode="eval")) if isinstance(n, ast.Constant)]


def _numbers(text: str) -> set[Fraction]:
    return {Fraction(m.replace(",", "")) for m in re.findall(r"\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?", text)}


def test_shipped_arithmetic_answers_check_out():
    es = read_eval_set(EVAL / "arithmetic.jsonl")
    assert es.format == "gsm8k" and len(es.items) == 50
    assert len({it.id for it in es.items}) == 50 and len({it.question for it in es.items}) == 50
    for it in es.items:
        steps = re.findall(r"<<([^=>]+)=([^>]+)>>([^\s.]+(?:\.\d+)?)", it.reference)
        assert steps, it.id
        known = _numbers(it.question)
        for expr, value, shown in steps:
            assert _calc(ast.parse(expr, mode="eval")) == Fraction(value) == Fraction(shown), (it.id, expr)
            for x in _operands(expr):
                assert x in known or x in UNIT_CONSTANTS, f"{it.id}: {x} in {expr} comes from nowhere"
            known.add(Fraction(value))
        assert Fraction(it.target) == Fraction(steps[-1][1]), it.id


def test_shipped_multiple_choice_set():
    es = read_eval_set(EVAL / "general_mc.jsonl")
    assert es.format == "mmlu" and len(es.items) == 100
    assert len({it.id for it in es.items}) == 100 and len({it.question for it in es.items}) == 100
    assert all(len(it.choices) == 4 and len(set(it.choices)) == 4 for it in es.items)
    assert Counter(it.answer for it in es.items) == {0: 25, 1: 25, 2: 25, 3: 25}
    spot = {it.question: it.choices[it.answer] for it in es.items}
    assert spot["What is the capital of Australia?"] == "Canberra"
    assert spot["What is 7 times 8?"] == "56"
    assert spot["A farmer has 17 sheep and all but 9 run away. How many sheep does he have left?"] == "9"
    licence = (EVAL / "README.md").read_text(encoding="utf-8")
    assert "Apache-2.0" in licence and "written for imitate" in licence.lower()
