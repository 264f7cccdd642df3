"""`imitate eval bench` end to end on tiny models: a trained adapter beside the base it records, both shipped-shape
sets, contamination from the training data the adapter records, the report written and merged."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from train_fixtures import make_record, synthetic_records, tiny_model_dir

from imitate.cli import main
from imitate.evaluate.report import Report
from imitate.records import write_jsonl
from imitate.train.commands import train_command

pytestmark = pytest.mark.integration
EVAL = Path(__file__).resolve().parents[1] / "data" / "eval"
PLANTED = "A farmer plants seven rows of corn with twelve plants in each row. How many plants are there in all?"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny base folder, an adapter trained 2 steps on records that include one eval question (planted)."""
    root = tmp_path_factory.mktemp("bench")
    model = tiny_model_dir(root / "model")
    data = root / "train.jsonl"
    write_jsonl(data, [*synthetic_records(8, seed=4), make_record("planted", PLANTED, "84 plants.")])
    sets = [f"train.cache_dir={root / 'cache'}", "train.lr=3e-2", "train.max_steps=2", "train.threads=1"]
    console = Console(file=io.StringIO(), width=200)
    train_command(data, root / "run", model=str(model), overrides=sets, console=console)
    mc = root / "mc.jsonl"
    mc.write_text("".join(line + "\n" for line in (EVAL / "general_mc.jsonl").read_text().splitlines()[:6]))
    gsm = root / "arith.jsonl"
    rows = [json.loads(x) for x in (EVAL / "arithmetic.jsonl").read_text().splitlines()[:3]]
    rows.append({"id": "planted", "question": PLANTED, "answer": "7 * 12 = <<7*12=84>>84\n#### 84"})
    gsm.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_bench_student_and_base_side_by_side(run, tmp_path, capsys):
    out = tmp_path / "report"
    pre = Report.open(out)
    pre.add_section("judge", "| student vs base | 1 | 0 | 0 |", {"kept": True})
    pre.save()
    adapter, sets = str(run / "run" / "adapter"), ["--data", str(run / "mc.jsonl"), "--data", str(run / "arith.jsonl")]
    code = main(
        ["eval", "bench", "--model", adapter, *sets, "--out", str(out), "--max-new-tokens", "6", "--batch-size", "3"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "student" in captured.out and "base" in captured.out  # the comparison table on stdout
    report = json.loads((out / "report.json").read_text())
    assert report["models"]["student"]["adapter"] == str(run / "run" / "adapter")
    assert report["models"]["base"] == {"model": str(run / "model"), "adapter": None}
    mc, arith = report["benchmarks"]["mc"], report["benchmarks"]["arith"]
    assert mc["kind"] == "multiple_choice" and arith["kind"] == "generation"
    for bench, n in ((mc, 6), (arith, 4)):
        assert set(bench["results"]) == {"student", "base"}
        for r in bench["results"].values():
            assert r["n"] == n and 0 <= r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] <= 1
        p = bench["paired"]
        assert p["n"] == n and p["both"] + p["student_only"] + p["base_only"] + p["neither"] == n
    assert set(mc["results"]["student"]["metrics"]) == {"acc", "acc_per_token"} and mc["metric"] == "acc_norm"
    # contamination from the data recorded in the adapter's config.yaml: the planted question is flagged
    assert arith["contamination"]["items"] == {"planted": "planted"} and arith["contamination"]["flagged"] == 1
    assert arith["contamination"]["train_records"] == 9 and arith["contamination"]["source"].endswith("config.yaml")
    assert arith["contamination"]["clean"]["student"]["n"] == 3 and mc["contamination"]["flagged"] == 0
    items = [json.loads(x) for x in (out / "items" / "arith.jsonl").read_text().splitlines()]
    assert [it["id"] for it in items] == ["arith-01", "arith-02", "arith-03", "planted"]
    assert items[3]["contaminated_by"] == "planted" and "text" in items[3]["student"]
    mc_items = [json.loads(x) for x in (out / "items" / "mc.jsonl").read_text().splitlines()]
    assert all(len(it["base"]["logprob"]) == 4 for it in mc_items)
    # the student's adapter changed the scores: student and base are really two models
    assert any(it["student"]["logprob"] != it["base"]["logprob"] for it in mc_items)
    md = (out / "report.md").read_text()
    assert "| mc | multiple_choice | 6 |" in md and "| arith | generation | 4 |" in md
    assert "## judge" in md and report["sections"]["judge"]["data"] == {"kept": True}  # merged, not overwritten
    assert (out / "accuracy.png").exists() and report["plots"]["accuracy"] == "accuracy.png"


def test_bench_student_alone_and_plain_prompt(run, tmp_path, capsys):
    out = tmp_path / "alone"
    code = main(["eval", "bench", "--model", str(run / "model"), "--data", str(run / "mc.jsonl"), "--out", str(out),
                 "--prompt", "plain", "--limit", "2"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "evaluated alone" in captured.err
    report = json.loads((out / "report.json").read_text())
    mc = report["benchmarks"]["mc"]
    assert set(mc["results"]) == {"student"} and mc["paired"] is None and mc["prompt"] == "plain"
    assert mc["results"]["student"]["n"] == 2 and mc["contamination"] is None


def test_which_base_a_student_is_compared_with(tmp_path):
    from imitate.evaluate.generate import base_source, split_spec

    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    assert base_source(str(merged)) is None  # a plain folder records no base: evaluated alone
    (merged / "imitate.json").write_text(json.dumps({"base_model": "/models/base.gguf"}))
    assert base_source(str(merged)) == "/models/base.gguf"  # what `imitate merge` copies in
    assert base_source(str(merged), base="other") == "other"  # --base wins
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (adapter / "imitate.json").write_text(json.dumps({"base_model": str(base)}))
    assert split_spec(str(adapter), None) == (None, adapter)  # --model naming an adapter folder
    assert base_source(str(adapter)) == str(base)
    assert base_source(str(merged), adapter) == str(merged)  # --model is the adapter's base when both are given
