"""Input sources: every format streams Queries with one field mapping and one bad-row policy."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imitate.config import FieldMap, SourceConfig
from imitate.errors import InputError
from imitate.harvest.sources import detect_format, open_source
from imitate.records import Query

ROWS = [
    {"id": "a", "question": "What is 2+2?", "collection": "cot", "answer": "4"},
    {"id": "b", "question": "Name a prime.", "system": "Be brief.", "collection": "t0", "answer": "7"},
]


def write_jsonl(path: Path, rows: list, raw_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    for at, text in (raw_lines or {}).items():
        lines.insert(at - 1, text)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_maps_fields_and_keeps_the_rest_as_metadata(tmp_path):
    qs = list(open_source(str(write_jsonl(tmp_path / "in.jsonl", ROWS))))
    assert [q.id for q in qs] == ["a", "b"]
    assert qs[0].collection == "cot" and qs[0].system is None and qs[0].metadata == {"answer": "4"}
    assert qs[1].system == "Be brief."


def test_custom_field_map_and_stable_ids(tmp_path):
    rows = [{"prompt": "Why is the sky blue?", "src": "flan"}, {"prompt": "Why is grass green?"}]
    cfg = SourceConfig(fields=FieldMap(question="prompt", id=None, collection="src"))
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    first = list(open_source(str(path), cfg))
    again = list(open_source(str(path), cfg))
    assert [q.id for q in first] == [q.id for q in again] == [Query.stable_id(r["prompt"]) for r in rows]
    assert first[0].collection == "flan" and first[0].metadata == {}


def test_bad_row_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "file.jsonl", ROWS, raw_lines={3: "{not json"})
    with pytest.raises(InputError, match=r"file\.jsonl:3: invalid JSON"):
        list(open_source(str(path)))


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"id": "x"}, "missing question"),
        ({"id": "x", "question": "  "}, "empty question"),
        ({"id": "x", "question": 42}, "must be a string or a chat"),
        ([1, 2], "expected an object"),
        ({"id": "x", "question": "q", "system": 3}, "system must be a string"),
        ({"id": "a", "question": "other"}, "repeats an earlier row's id"),
    ],
)
def test_bad_rows_raise_or_are_skipped_and_counted(tmp_path, row, reason):
    path = write_jsonl(tmp_path / "in.jsonl", [*ROWS, row])
    with pytest.raises(InputError, match=rf"in\.jsonl:3: .*{reason}"):
        list(open_source(str(path)))
    src = open_source(str(path), SourceConfig(skip_bad_rows=True))
    assert [q.id for q in src] == ["a", "b"]
    assert src.skipped == 1 and reason in src.bad_examples[0]


def test_repeated_content_without_ids_is_dropped_once(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"question": "same"}, {"question": "same"}, {"question": "new"}])
    src = open_source(str(path))
    assert len(list(src)) == 2 and src.duplicates == 1 and src.skipped == 0


def test_chat_question_becomes_turns(tmp_path):
    chat = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "old answer, asked anew"},
    ]
    sharegpt = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}, {"from": "human", "value": "?"}]
    path = write_jsonl(tmp_path / "in.jsonl", [{"question": chat}, {"question": sharegpt}, {"question": chat[:1]}])
    src = open_source(str(path), SourceConfig(skip_bad_rows=True))
    q1, q2 = list(src)
    assert q1.question == "Tell me a joke." and q1.system == "Be kind."
    assert [m.role for m in q1.turns] == ["user", "assistant"]
    assert q1.id == Query.stable_id("Tell me a joke.", "Be kind.", q1.turns)
    assert q2.question == "?" and [m.content for m in q2.turns] == ["Hi", "Yo"]
    assert src.skipped == 1 and "no non-empty user turn" in src.bad_examples[0]


def test_limit_and_gzip(tmp_path):
    path = tmp_path / "in.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": str(i), "question": f"q{i}"}) + "\n" for i in range(10))
    src = open_source(str(path), SourceConfig(limit=3))
    assert [q.id for q in src] == ["0", "1", "2"]
    assert src.count_hint() is None and src.count_hint(scan=True) == 3


def test_csv_and_tsv(tmp_path):
    path = tmp_path / "in.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "question", "system", "collection", "note"])
        w.writerow(["1", "Multi\nline question?", "", "niv2", "x"])
        w.writerow(["2", "", "", "", ""])
        w.writerow(["3", "Fine?", "Sys", "", "y"])
    src = open_source(str(path), SourceConfig(skip_bad_rows=True))
    qs = list(src)
    assert [q.id for q in qs] == ["1", "3"]
    assert qs[0].question == "Multi\nline question?" and qs[0].system is None and qs[0].metadata == {"note": "x"}
    assert qs[1].system == "Sys" and qs[1].collection is None
    assert src.bad_examples == [f"{path}:4: empty question field 'question'"]

    tsv = tmp_path / "in.tsv"
    tsv.write_text("question\tlabel\nA tab-separated question?\t1\n", encoding="utf-8")
    (q,) = open_source(str(tsv))
    assert q.question == "A tab-separated question?" and q.metadata == {"label": "1"}


def test_missing_question_column_is_an_error_up_front(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text("prompt,id\nhello,1\n", encoding="utf-8")
    with pytest.raises(InputError, match="no column 'question'"):
        list(open_source(str(path), SourceConfig(skip_bad_rows=True)))


def test_parquet_streams_batches_and_counts_from_metadata(tmp_path):
    path = tmp_path / "in.parquet"
    rows = [{"id": str(i), "question": f"q{i}" if i != 1500 else "", "n": i} for i in range(3000)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=700)
    src = open_source(str(path))
    assert src.count_hint() == 3000
    with pytest.raises(InputError, match=r"in\.parquet:row 1500: empty question"):
        list(src)
    skipping = open_source(str(path), SourceConfig(skip_bad_rows=True))
    qs = list(skipping)
    assert len(qs) == 2999 and qs[-1].metadata == {"n": 2999} and skipping.skipped == 1


@pytest.mark.integration
def test_saved_datasets_folder(tmp_path):
    import datasets

    folder = tmp_path / "ds"
    rows = [{"system": None, **r} for r in ROWS] + [
        {"id": "c", "question": "Third?", "system": None, "collection": None}
    ]
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    src = open_source(str(folder))
    assert src.format == "hf-disk" and src.count_hint() == 3
    qs = list(src)
    assert [q.id for q in qs] == ["a", "b", "c"] and qs[1].system == "Be brief." and qs[2].collection is None

    dd = tmp_path / "dd"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(dd))
    assert len(list(open_source(str(dd), SourceConfig(split="test")))) == 2
    with pytest.raises(InputError, match="no split 'train'"):
        list(open_source(str(dd)))


def test_format_detection(tmp_path):
    cfg = SourceConfig()
    assert detect_format("tatsu-lab/alpaca", cfg) == "hub"
    assert detect_format(str(tmp_path / "x.PARQUET"), cfg) == "parquet"
    with pytest.raises(InputError, match="no such file"):
        open_source(str(tmp_path / "missing.jsonl"))
    with pytest.raises(InputError, match="not one written by datasets"):
        open_source(str(tmp_path))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(InputError, match="cannot tell the format"):
        open_source(str(tmp_path / "x.txt"))


@pytest.mark.parametrize(
    "name",
    [
        "./questions",
        "../data/questions",
        "data/runs/questions",
        "owner/questions.txt",
        "owner/questions.jsonl.zst",
        "questions.csv",
        "~/imitate-no-such-questions",
        "C:\\data\\questions",
        "/no/such/questions",
    ],
)
def test_a_missing_path_is_an_input_error_not_a_hub_lookup(name: str):
    with pytest.raises(InputError, match="no such file or folder") as err:
        open_source(name)
    assert "Hub" not in str(err.value)


@pytest.mark.parametrize("name", ["tatsu-lab/alpaca", "teknium/OpenHermes-2.5", "Open-Orca/SlimOrca-Dedup"])
def test_hub_names_stay_hub_names(name: str):
    assert detect_format(name, SourceConfig()) == "hub"


def test_a_tilde_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_jsonl(tmp_path / "q.jsonl", ROWS)
    assert [q.id for q in open_source("~/q.jsonl")] == ["a", "b"]


@pytest.mark.integration
def test_hub_path_streams_with_load_dataset(tmp_path):
    # load_dataset(..., streaming=True) on a local data folder: the Hub code path without any network.
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "train.jsonl", [*ROWS, {"id": "c", "question": "Third?"}])
    src = open_source(str(tmp_path / "d"), SourceConfig(format="hub", limit=2))
    assert [q.id for q in src] == ["a", "b"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="cannot open Hub dataset"):
        next(iter(open_source(str(tmp_path / "empty"), SourceConfig(format="hub"))))


def test_large_jsonl_is_streamed_not_materialised(tmp_path):
    path = tmp_path / "big.jsonl"
    line = json.dumps({"question": "x" * 40}) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(line.replace('"x', f'"{i}x', 1) for i in range(200_000))
    size = path.stat().st_size
    src = open_source(str(path))
    it = iter(src)
    first = next(it)
    assert first.question.startswith("0x")
    assert src.rows_read == 1
    assert src.position is not None and src.position < 256 * 1024 < size
    it.close()
    assert src.position is None
