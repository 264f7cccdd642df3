"""`imitate mix`: input specs, the pure count plan, and mixes end to end (weights, counts, seeds, provenance,
tags, id collisions, the manifest, one-line errors, nothing written half)."""

import json
import random
from pathlib import Path

import pytest

from imitate.cli import main
from imitate.dataset.mix import SetSpec, largest_remainder, mix, parse_specs, plan_counts
from imitate.errors import InputError
from imitate.records import Provenance, Query, Record, Usage, read_jsonl, write_jsonl


def record(i: int, prefix: str, *, status: str = "ok", teacher: str = "t1") -> Record:
    ok = status == "ok"
    return Record(
        id=f"{prefix}{i}",
        query=Query(id=f"q{i}", question=f"question {prefix}{i}?"),
        messages=[{"role": "user", "content": f"question {prefix}{i}?"}],
        response=f"answer {i}" if ok else None,
        status=status,
        error_class=None if ok else "BadRequest",
        provenance=Provenance(
            teacher=teacher,
            model="m-" + teacher,
            base_url="http://h/v1",
            request_key=f"k{prefix}{i}",
            system_prompt_id=str(i % 3),
            usage=Usage(prompt_tokens=i, completion_tokens=2 * i),
            cost_usd=i / 1000,
        ),
        tags=["orig"],
    )


def records_file(path: Path, n: int, prefix: str, **kw) -> Path:
    write_jsonl(path, [record(i, prefix, **kw) for i in range(n)])
    return path


@pytest.fixture
def sets(tmp_path: Path) -> dict[str, Path]:
    a = records_file(tmp_path / "a.jsonl", 40, "a")
    b = records_file(tmp_path / "b.jsonl", 20, "b", teacher="t2")
    alpaca = tmp_path / "alp.json"
    alpaca.write_text(json.dumps([{"instruction": f"Say {i}", "input": "", "output": f"{i}"} for i in range(30)]))
    return {"a": a, "b": b, "alpaca": alpaca}


# ------------------------------------------------------------------ pure parts


def test_specs_weights_counts_and_whole_sets_with_unique_names(tmp_path: Path):
    specs = parse_specs(["runs/orca=0.7", "x/alpaca.json:500", "runs/orca", "owner/name=2"])
    assert [(s.input, s.name, s.weight, s.count) for s in specs] == [
        ("runs/orca", "orca", 0.7, None),
        ("x/alpaca.json", "alpaca", None, 500),
        ("runs/orca", "orca-2", None, None),
        ("owner/name", "name", 2.0, None),
    ]
    odd = tmp_path / "a=b.jsonl"
    odd.write_text("")
    assert parse_specs([str(odd)])[0].name == "a-b"  # an existing file with '=' in its name is a file


@pytest.mark.parametrize(
    ("item", "needle"),
    [
        ("a=x", "must be a number"),
        ("a=0", "positive"),
        ("a=-1", "positive"),
        ("a:0", "at least 1"),
        ("a=nan", "positive"),
    ],
)
def test_bad_specs_are_input_errors(item: str, needle: str):
    with pytest.raises(InputError, match=needle):
        parse_specs([item])


def test_largest_remainder_sums_exactly_and_is_stable():
    assert largest_remainder(10, [1 / 3, 1 / 3, 1 / 3]) == [4, 3, 3]
    assert largest_remainder(7, [0.5, 0.25, 0.25]) == [3, 2, 2]  # 3.5, 1.75, 1.75: the .75s win
    for total in range(50):
        assert sum(largest_remainder(total, [0.2, 0.45, 0.35])) == total


def specs(*pairs) -> list[SetSpec]:
    return [SetSpec(f"s{i}", f"s{i}", weight=w, count=c) for i, (w, c) in enumerate(pairs)]


def test_plan_weights_with_a_total_and_without():
    assert plan_counts(specs((0.7, None), (0.3, None)), [1000, 1000], 100) == [70, 30]
    # without --total: the largest mix every weighted set supplies in full (b limits it: 30 / 0.3 = 100)
    assert plan_counts(specs((0.7, None), (0.3, None)), [1000, 30], None) == [70, 30]
    assert plan_counts(specs((1, None), (1, None), (1, None)), [5, 100, 100], None) == [5, 5, 5]


def test_plan_counts_whole_sets_and_weights_share_the_rest():
    # a count of 10, a whole set of 7, weights split the other 83 of 100
    assert plan_counts(specs((None, 10), (None, None), (3, None), (1, None)), [50, 7, 500, 500], 100) == [
        10,
        7,
        62,
        21,
    ]


@pytest.mark.parametrize(
    ("pairs", "available", "total", "needle"),
    [
        (((None, 11),), [10], None, "asks for 11 records but the set has 10"),
        (((0.5, None), (0.5, None)), [100, 10], 40, "its weight asks for 20 of 40 records but the set has 10"),
        (((None, 5), (None, 5)), [10, 10], 12, "the counts and whole sets add up to 10"),
        (((None, 30), (1, None)), [30, 10], 20, "smaller than the counts"),
    ],
)
def test_plan_refuses_what_a_set_cannot_supply(pairs, available, total, needle):
    with pytest.raises(InputError, match=needle):
        plan_counts(specs(*pairs), available, total)


# ------------------------------------------------------------------ mixes end to end


def test_weights_take_shares_tag_sets_and_keep_provenance(sets, tmp_path: Path):
    out = tmp_path / "mix"
    m = mix(parse_specs([f"{sets['a']}=0.5", f"{sets['b']}=0.25", f"{sets['alpaca']}=0.25"]), out, total=40)
    got = list(read_jsonl(out / "records.jsonl"))
    assert len(got) == m["records"] == 40
    by_set = {s["name"]: s for s in m["sets"]}
    assert {k: (v["available"], v["taken"], v["share"]) for k, v in by_set.items()} == {
        "a": (40, 20, 0.5),
        "b": (20, 10, 0.25),
        "alp": (30, 10, 0.25),
    }
    originals = {r.id: r for r in [*read_jsonl(sets["a"]), *read_jsonl(sets["b"])]}
    tags = [r.tags for r in got]
    assert tags.count(["orig", "mix:a"]) == 20 and tags.count(["orig", "mix:b"]) == 10
    assert tags.count(["mix:alp"]) == 10
    for r in got:
        if r.id in originals:  # unchanged but for the tag
            assert r.provenance == originals[r.id].provenance
            assert r.model_dump(exclude={"tags"}) == originals[r.id].model_dump(exclude={"tags"})
        else:  # read through formats: imported provenance says where it came from
            assert r.provenance.teacher == "imported" and r.provenance.source.format == "alpaca"
            assert r.provenance.source.uri == str(sets["alpaca"])
    assert m["seed"] == 0 and m["total_requested"] == 40 and by_set["a"]["path"] == str(sets["a"].resolve())


def test_same_seed_same_bytes_other_seed_other_choice_row_order_irrelevant(sets, tmp_path: Path):
    def run(name: str, source: Path, seed: int) -> list[str]:
        mix(parse_specs([f"{source}:15"]), tmp_path / name, seed=seed)
        return [r.id for r in read_jsonl(tmp_path / name / "records.jsonl")]

    first, again, other = run("m1", sets["a"], 1), run("m2", sets["a"], 1), run("m3", sets["a"], 2)
    assert (tmp_path / "m1" / "records.jsonl").read_bytes() == (tmp_path / "m2" / "records.jsonl").read_bytes()
    assert first == again and set(first) != set(other) and len(set(first)) == 15
    shuffled = [record(i, "a") for i in range(40)]
    random.Random(5).shuffle(shuffled)
    write_jsonl(tmp_path / "a.jsonl", shuffled)  # same rows, another order: the same records are chosen
    assert set(run("m4", tmp_path / "a.jsonl", 1)) == set(first)


def test_colliding_ids_get_the_set_prefix_and_are_counted(sets, tmp_path: Path):
    out = tmp_path / "mix"
    m = mix(parse_specs([str(sets["a"]), str(sets["a"]), f"{sets['b']}:5"]), out)
    ids = [r.id for r in read_jsonl(out / "records.jsonl")]
    assert len(ids) == len(set(ids)) == 85
    assert sum(i.startswith("a-2/a") for i in ids) == 40
    assert [s["renamed_ids"] for s in m["sets"]] == [0, 40, 0]


def test_failed_records_are_not_mixed_but_counted(tmp_path: Path):
    src = tmp_path / "mixed.jsonl"
    write_jsonl(src, [record(i, "x", status="failed" if i % 4 == 0 else "ok") for i in range(12)])
    m = mix(parse_specs([str(src)]), tmp_path / "mix")
    assert (m["sets"][0]["available"], m["sets"][0]["skipped_failed"], m["records"]) == (9, 3, 9)
    assert all(r.status == "ok" for r in read_jsonl(tmp_path / "mix" / "records.jsonl"))


def test_bad_rows_are_skipped_and_counted_when_asked(sets, tmp_path: Path):
    src = tmp_path / "dirty.jsonl"
    lines = sets["a"].read_text().splitlines()
    src.write_text("\n".join([lines[0], "{not json", *lines[1:10], '{"id": 3}']) + "\n")
    with pytest.raises(InputError, match=r"dirty.jsonl:2"):
        mix(parse_specs([str(src)]), tmp_path / "mix")
    m = mix(parse_specs([f"{src}:6"]), tmp_path / "mix", skip_bad_rows=True)
    assert (m["sets"][0]["available"], m["sets"][0]["skipped_bad_rows"], m["records"]) == (10, 2, 6)
    valid = {r.id for r in read_jsonl(sets["a"])}
    assert {r.id for r in read_jsonl(tmp_path / "mix" / "records.jsonl")} <= valid


def test_cli_prints_the_summary_and_errors_are_one_line_with_nothing_written(sets, tmp_path: Path, capsys):
    out = tmp_path / "mix"
    assert main(["mix", f"{sets['a']}=3", f"{sets['b']}=1", "--out", str(out), "--seed", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # no --total: 53 is the most a (40 records at 3/4) allows; 39.75 + 13.25 rounds to 40 + 13
    assert lines == [
        "a: 40 of 40 (75.5%, weight 3)",
        "b: 13 of 20 (24.5%, weight 1)",
        f"53 records -> {out / 'records.jsonl'}",
    ]
    before = (out / "records.jsonl").read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"].startswith("imitate mix ") and manifest["seed"] == 4

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for args, needle in [
        ([f"{sets['b']}:21"], "asks for 21 records but the set has 20 completed"),
        ([str(empty)], "empty"),
        ([str(tmp_path / "nope.jsonl")], "no such file"),
        ([f"{sets['a']}=x"], "must be a number"),
    ]:
        assert main(["mix", *args, "--out", str(out)]) == 3
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: InputError") and needle in err[0], err
    assert (out / "records.jsonl").read_bytes() == before  # a failed mix leaves the earlier one whole
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "records.jsonl"]  # no temp files left
