"""report.md + report.json: what every eval writes, merged across eval commands into the same folder."""

from __future__ import annotations

import json

from imitate.evaluate.report import EVIDENCE, JUDGE_CAVEAT, Report, plot_accuracy

RESULT = {"accuracy": 0.6, "ci95": [0.3, 0.85], "correct": 6, "n": 10}


def _bench(report: Report, name: str = "general_mc") -> None:
    report.add_benchmark(
        name,
        kind="multiple_choice",
        data={"file": "data/eval/general_mc.jsonl", "sha256": "ab" * 32, "rows": 10},
        results={"student": RESULT, "base": {**RESULT, "accuracy": 0.4, "correct": 4}},
        paired={"diff": 0.2, "ci95": [-0.1, 0.5], "p_value": 0.375, "student_only": 3, "base_only": 1},
        contamination={"flagged": 2, "n": 10, "ngram": 13, "train_records": 50, "source": "--train-data",
                       "clean": {"student": {**RESULT, "n": 8}}},
    )  # fmt: skip


def test_report_has_models_benchmarks_contamination_and_the_evidence_sentence(tmp_path):
    report = Report.open(tmp_path)
    report.set_models(student={"model": "base.gguf", "adapter": "run/adapter"}, base={"model": "base.gguf"})
    _bench(report)
    report.add_run("imitate eval bench ...")
    md_path, json_path = report.save()
    md = md_path.read_text()
    assert "`base.gguf` + adapter `run/adapter`" in md
    assert "| general_mc | multiple_choice | 10 | 60.0 [30.0, 85.0] (6/10) | 40.0 [30.0, 85.0] (4/10) |" in md
    assert "+20.0 [-10.0, 50.0], McNemar p=0.375; right only for student 3, only for base 1" in md
    assert "2 of 10 items share a 13-gram with 50 training records" in md
    assert EVIDENCE in md and JUDGE_CAVEAT in md
    data = json.loads(json_path.read_text())
    assert data["benchmarks"]["general_mc"]["paired"]["p_value"] == 0.375
    assert data["models"]["student"]["adapter"] == "run/adapter" and data["runs"][0]["command"]


def test_a_second_eval_command_merges_instead_of_overwriting(tmp_path):
    first = Report.open(tmp_path)
    _bench(first)
    first.save()
    second = Report.open(tmp_path)  # e.g. imitate eval judge --out the same folder
    second.add_section("judge", "| | win | tie | loss |\n|---|---|---|---|\n| student vs base | 3 | 1 | 2 |", {"w": 3})
    second.save()
    third = Report.open(tmp_path)
    _bench(third, "arithmetic")  # a rerun of bench on another set keeps both
    third.save()
    data = json.loads((tmp_path / "report.json").read_text())
    assert set(data["benchmarks"]) == {"general_mc", "arithmetic"}
    assert data["sections"]["judge"]["data"] == {"w": 3}
    md = (tmp_path / "report.md").read_text()
    assert "## judge" in md and "| student vs base | 3 | 1 | 2 |" in md
    assert md.index("## judge") < md.rindex(JUDGE_CAVEAT)  # the caveat sits under the judge table too


def test_broken_report_json_starts_over(tmp_path):
    (tmp_path / "report.json").write_text("{not json")
    report = Report.open(tmp_path)
    assert report.data["benchmarks"] == {} and report.data["schema"] == 1


def test_accuracy_plot(tmp_path):
    report = Report.open(tmp_path)
    _bench(report)
    path = plot_accuracy(report.data["benchmarks"], tmp_path / "accuracy.png")
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report.add_plot("accuracy", path)
    assert report.data["plots"] == {"accuracy": "accuracy.png"}
    assert plot_accuracy({}, tmp_path / "none.png") is None
    perfect = {"all": {"results": {"student": {"accuracy": 1.0, "ci95": [0.7, 0.9999999999999999]}}}}
    assert plot_accuracy(perfect, tmp_path / "edge.png") is not None  # rounding never makes a negative error bar
