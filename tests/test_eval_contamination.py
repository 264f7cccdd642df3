"""The 13-gram overlap check: a planted duplicate is found (through formatting changes), near misses are not,
short items need their whole text, the training data streams from any format, and the adapter's recorded data
is found."""

from __future__ import annotations

import json

from train_fixtures import make_record, synthetic_records

from imitate.evaluate.contamination import NgramIndex, check, recorded_train_data, words
from imitate.evaluate.data import Item
from imitate.records import write_jsonl

LONG = Item(
    "q-long",
    "f:1",
    "A farmer plants seven rows of corn with twelve plants in each row and then waters every plant twice a day",
    ("168", "84"),
)
OTHER = Item(
    "q-other", "f:2", "Which gas do plants take from the air to make their food in sunlight every day?", ("CO2",)
)
SHORT = Item("q-short", "f:3", "What is the capital of France?", ("Paris", "Rome"))


def test_words_are_normalised():
    assert words("Hello, WORLD!  It's ﬁne_text 3.5") == ["hello", "world", "it", "s", "fine", "text", "3", "5"]


def test_planted_duplicate_is_found_through_formatting_changes():
    planted = make_record(
        "train-7",
        "Please solve: a FARMER plants seven rows of corn, with twelve plants in each row; and then waters every "
        "plant twice a day. Thanks!",
        "That is 168 plants.",
    )
    records = [*synthetic_records(30, seed=1), planted, *synthetic_records(30, seed=2)]
    index = NgramIndex.of([LONG, OTHER, SHORT])
    flagged, count = index.scan(records)
    assert flagged == {"q-long": "train-7"} and count == 61


def test_twelve_shared_words_are_not_thirteen():
    # 12 consecutive words of the question, then a different word
    near = make_record("r", "many rows of corn with twelve plants in each row and then waters some plants", "ok")
    assert NgramIndex.of([LONG]).scan([near])[0] == {}
    assert NgramIndex.of([LONG], n=12).scan([near])[0] == {"q-long": "r"}


def test_short_items_need_their_whole_text_in_order():
    index = NgramIndex.of([SHORT])
    assert index.scan([make_record("a", "Paris is lovely; Rome too.", "The capital of France is Paris.")])[0] == {}
    whole = make_record("b", "Quiz: what is the capital of France? Paris Rome", "Paris.")
    assert index.scan([whole])[0] == {"q-short": "b"}
    # the answer turn counts: the item's text may run from the question into the answer
    split = make_record("c", "What is the capital of France?", "Paris, Rome")
    assert index.scan([split])[0] == {"q-short": "c"}


def test_check_streams_any_format_and_counts(tmp_path):
    shards = tmp_path / "harvest"
    shards.mkdir()
    write_jsonl(shards / "shard-000.jsonl", synthetic_records(5, seed=3))
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(json.dumps({"instruction": OTHER.question, "input": "", "output": "CO2"}) + "\n")
    result = check([LONG, OTHER, SHORT], [str(shards), str(alpaca)])
    assert result["train_records"] == 6 and result["flagged"] == 1 and result["n"] == 3
    assert list(result["items"]) == ["q-other"] and result["ngram"] == 13


def test_recorded_train_data(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    assert recorded_train_data(adapter) is None
    (adapter / "config.yaml").write_text(f"# imitate train {data} --out {tmp_path / 'run'}\ntrain: {{}}\n")
    assert recorded_train_data(adapter) == str(data)
    data.unlink()
    assert recorded_train_data(adapter) is None  # moved away: the user is told to give --train-data
    assert recorded_train_data(None) is None
