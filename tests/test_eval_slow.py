"""`imitate eval bench` on the real student (SmolLM2-135M-Instruct from the local GGUF) with the shipped sets, a
few items each; packed scoring equals one forward per choice on the real model (`make test-all`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_fixtures import require_gguf

from imitate.cli import main

pytestmark = pytest.mark.slow
EVAL = Path(__file__).resolve().parents[1] / "data" / "eval"


def test_smollm2_on_the_shipped_sets(tmp_path, capsys):
    gguf = require_gguf()
    out = tmp_path / "eval"
    code = main(["eval", "bench", "--model", str(gguf), "--base", str(gguf), "--data", str(EVAL / "general_mc.jsonl"),
                 "--data", str(EVAL / "arithmetic.jsonl"), "--limit", "12", "--max-new-tokens", "96",
                 "--out", str(out), "--threads", "1"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    mc, arith = report["benchmarks"]["general_mc"], report["benchmarks"]["arithmetic"]
    student = mc["results"]["student"]
    # general knowledge a 135M instruct model has: clearly above the 25 % of guessing
    assert student["n"] == 12 and student["correct"] >= 6
    # the same model as its own base: identical answers, a difference of exactly 0
    assert mc["results"]["base"]["correct"] == student["correct"]
    assert (mc["paired"]["student_only"], mc["paired"]["base_only"], mc["paired"]["p_value"]) == (0, 0, 1.0)
    items = [json.loads(x) for x in (out / "items" / "arithmetic.jsonl").read_text().splitlines()]
    assert len(items) == 12 and all(it["student"]["text"] for it in items)
    assert sum(it["student"]["extracted"] is not None for it in items) >= 10  # answers carry a number
    assert "<|im_end|>" not in "".join(it["student"]["text"] for it in items)
    assert arith["results"]["student"]["n"] == 12 and "general_mc" in captured.out


def test_packed_scoring_equals_plain_forwards_on_smollm2():
    from imitate.evaluate import scoring
    from imitate.evaluate.data import read_eval_set
    from imitate.evaluate.generate import load_student
    from imitate.records import Message

    loaded = load_student(str(require_gguf()))
    items = read_eval_set(EVAL / "general_mc.jsonl", limit=6).items
    requests = [
        scoring.encode_chat(loaded.tokenizer, loaded.fmt, [Message(role="user", content=it.question)], it.choices)
        for it in items
    ]
    got = scoring.score(loaded.model, requests, batch_size=6, pad_id=loaded.fmt.eot_id)
    for g, r in zip(got, requests, strict=True):
        assert g == pytest.approx(scoring.reference_scores(loaded.model, r), abs=1e-4)
