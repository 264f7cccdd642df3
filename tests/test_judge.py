"""The LLM judge: pinned versioned prompts, verdict parsing on a table of messy replies, the both-orders rule;
against the fake teacher acting as a scripted judge: a position swap turns a win into the same win, a
position-biased judge yields ties (not wins), an unreadable verdict is re-asked a bounded number of times and
then recorded as unparsed (never scored), a failed request is counted, a rerun buys nothing; `imitate eval
judge` end to end on tiny models (answers cached, report section, chart); bad question files in one line."""

import json
import shutil
import struct
from pathlib import Path

import pytest
import yaml

from imitate.cli import main
from imitate.config import load_config
from imitate.errors import ConfigError, InputError
from imitate.evaluate.judge import (
    WinTable,
    combine,
    load_judge_prompts,
    mean_interval,
    paired_difference,
    parse_choice,
    parse_rating,
    with_max_tokens,
)
from imitate.evaluate.judge_eval import JudgeEval, JudgeOptions, read_questions
from imitate.evaluate.judging import JudgeItem, JudgeRunner
from imitate.records import Query
from imitate.teacher.fake import FakeTeacher
from imitate.teacher.fake.judge import fake_judgement, judge_kind, quality

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = REPO / "data" / "eval" / "judge_questions.jsonl"
PINNED = {  # judge records store these: bump on purpose only
    "single": "99cc604576fc4c8fd0e6341ff1465b276d3a1b359a0007a95144b92a5fabcd27",
    "pairwise": "7a62cec92a41721962a164b55101b315884ec163429b931d6c9bde749cd9fcd9",
}

# ---------------------------------------------------------------------------------------------- prompts


def test_shipped_judge_prompts_are_pinned_and_checked(tmp_path: Path):
    prompts = load_judge_prompts()
    assert {"single": prompts.single.sha256, "pairwise": prompts.pairwise.sha256} == PINNED
    assert prompts.single.params.temperature == 0 == prompts.pairwise.params.temperature
    assert "Rating: [[N]]" in prompts.single.template and "[[C]]" in prompts.pairwise.template
    data = yaml.safe_load((REPO / "prompts" / "judge.yaml").read_text())
    data["pairwise"]["template"] = data["pairwise"]["template"].replace("better", "nicer")
    edited = tmp_path / "judge.yaml"
    edited.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"pairwise: sha256 does not match the content \(it hashes to [0-9a-f]{64}"):
        load_judge_prompts(edited)
    data["single"]["template"] = "no answer here: {question}"
    edited.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"single.template needs \{answer\}"):
        load_judge_prompts(edited)
    data["single"]["author"] = "me"
    edited.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="single.author: Extra inputs"):
        load_judge_prompts(edited)


# ---------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("reply", "value", "reason"),
    [
        ("The answer is accurate and complete.\nRating: [[8]]", 8.0, None),
        ("**Rating:** [[ 7 ]]", 7.0, None),
        ("Solid.\n\nRating: [[6/10]]", 6.0, None),
        ("Rating: [[7.5]]", 7.5, None),
        ("I first thought [[3]] but on reflection\nRating: [[9]]", 9.0, None),  # the last verdict counts
        ("Rating: [[2]] ... wait, Rating: [[5]]", 5.0, None),
        ("Clear and correct. [[10]]", 10.0, None),  # brackets without the word
        ("Score: 4/10", 4.0, None),  # the loose form
        ("rating: 6", 6.0, None),
        ("Rating: [[11]]", None, "rating 11 is outside 1-10"),
        ("Rating: [[0]]", None, "rating 0 is outside 1-10"),
        ("Rating: [[N]]", None, "no rating found"),  # the template's placeholder echoed
        ("I would rather not grade this.", None, "no rating found"),
        ("", None, "empty reply"),
        (None, None, "empty reply"),
    ],
)
def test_rating_parsing(reply, value, reason):
    parsed = parse_rating(reply)
    assert (parsed.value, parsed.reason) == (value, reason)
    assert parsed.ok == (value is not None)


@pytest.mark.parametrize(
    ("reply", "value", "reason"),
    [
        ("Reply A explains the steps.\n[[A]]", "A", None),
        ("Final verdict: [[B]]", "B", None),
        ("[[ b ]]", "B", None),
        ("They are equally good. [[C]]", "C", None),
        ("[[Tie]]", "C", None),
        ("A is good ([[A]] territory) but\n\n[[A]]", "A", None),  # repeated, the same
        ("Between [[A]] and [[B]] I choose\n[[B]]", "B", None),  # several, but one on the last line
        ("[[A]] or [[B]], hard to say", None, "ambiguous verdict ([[A]] and [[B]])"),
        ("Reply A is better.\n[[A]] [[B]]", None, "ambiguous verdict ([[A]] and [[B]])"),
        ("After comparing both:\n**Verdict: B**", "B", None),  # loose, on the last line
        ("Winner: assistant A", "A", None),
        ("Both replies have merits.", None, "no verdict found"),
        ("I prefer A.", None, "no verdict found"),  # a preference in prose is not the asked-for verdict
        ("", None, "empty reply"),
    ],
)
def test_choice_parsing(reply, value, reason):
    parsed = parse_choice(reply)
    assert (parsed.value, parsed.reason) == (value, reason)


@pytest.mark.parametrize(
    ("x_first", "x_second", "outcome", "consistent"),
    [
        ("A", "B", "win", True),  # X preferred in both positions
        ("B", "A", "loss", True),
        ("A", "A", "tie", False),  # the position decided: inconsistent -> tie
        ("B", "B", "tie", False),
        ("C", "C", "tie", True),
        ("A", "C", "tie", False),  # a tie in either order: a tie
        ("C", "B", "tie", False),
        ("C", "A", "tie", False),
        (None, "B", "unparsed", False),
        ("A", None, "unparsed", False),
    ],
)
def test_both_orders_rule(x_first, x_second, outcome, consistent):
    assert combine(x_first, x_second) == (outcome, consistent)


def test_win_table_counts_position_verdicts_and_rates():
    t = WinTable("student", "base")
    for first, second in [("A", "B"), ("A", "A"), ("B", "A"), ("C", "C")]:
        t.add(combine(first, second)[0], first, second)
    t.add("unparsed", None, "B")
    t.add("failed")
    d = t.as_dict()
    assert (d["win"], d["tie"], d["loss"], d["unparsed"], d["failed"], d["scored"]) == (1, 2, 1, 1, 1, 4)
    assert d["win_rate"] == 0.25 and d["inconsistent"] == 1
    assert (d["position_a_verdicts"], d["position_b_verdicts"]) == (4, 3)


def test_mean_interval_is_seeded_and_brackets_the_mean():
    scores = [3.0, 7.0, 8.0, 5.0, 9.0, 6.0]
    mean, low, high = mean_interval(scores)
    assert mean == pytest.approx(38 / 6) and low < mean < high and (low, high) == mean_interval(scores)[1:]
    assert mean_interval([]) == (None, None, None) and mean_interval([4.0]) == (4.0, 4.0, 4.0)
    diff, low, high = paired_difference([5, 6, 7], [5, 6, 7])
    assert (diff, low, high) == (0, 0, 0)
    with pytest.raises(ValueError, match="same items"):
        paired_difference([1], [1, 2])


# ---------------------------------------------------------------------------------------------- the fake judge


def test_fake_judge_recognises_the_shipped_prompts_and_follows_its_script():
    p = load_judge_prompts()
    single = p.single.render(question="Q?", answer="fine [[fake-score:7]]")
    pair = p.pairwise.render(question="Q?", answer_a="x [[fake-score:3]]", answer_b="y [[fake-score:8]]")
    assert judge_kind(single) == "single" and judge_kind(pair) == "pairwise" and judge_kind("What is 2+2?") is None
    assert parse_rating(fake_judgement(single, "single")).value == 7
    assert parse_choice(fake_judgement(pair, "pairwise")).value == "B"
    assert parse_choice(fake_judgement(pair, "pairwise", bias="A")).value == "A"
    scripted = p.single.render(question="Q? [[fake-verdict:junk,6]]", answer="a")
    assert not parse_rating(fake_judgement(scripted, "single")).ok
    assert parse_rating(fake_judgement(scripted, "single", seed=1)).value == 6
    assert parse_rating(fake_judgement(scripted, "single", seed=9)).value == 6  # past the end: the last item
    assert 1 <= quality("anything") <= 10 and quality("anything") == quality("anything")


# ---------------------------------------------------------------------------------------------- through the engine


def cfg_for(base_url: str, *extra: str):
    return load_config(None, [f"harvest.teachers.0.base_url={base_url}", "harvest.retry.base_delay_s=0.01", *extra])


def _questions(n: int) -> list[Query]:
    return [Query(id=f"q{i}", question=f"Question number {i}?", collection="test") for i in range(n)]


async def _judge(fake, out: Path, answers: dict, mode: str = "both", **kw) -> tuple[JudgeEval, dict]:
    job = JudgeEval(cfg_for(fake.base_url), JudgeOptions(questions="scripted", out=out, mode=mode, **kw))
    questions = _questions(len(next(iter(answers.values()))))
    job.use(questions, {m: {f"q{i}": a for i, a in enumerate(texts)} for m, texts in answers.items()}, {})
    await job.judge()
    return job, job.finish()


async def test_pairwise_against_a_scripted_judge_survives_the_position_swap(tmp_path: Path):
    student = ["good [[fake-score:9]]", "poor [[fake-score:2]]", "same [[fake-score:5]]", "fine [[fake-score:6]]"]
    base = ["meh [[fake-score:4]]", "great [[fake-score:8]]", "same too [[fake-score:5]]", "bad [[fake-score:1]]"]
    async with FakeTeacher() as fake:
        job, result = await _judge(fake, tmp_path / "r", {"student": student, "base": base})
        asked = fake.stats()["requests"]
    table = result["summary"]["pairwise"]["student vs base"]
    assert (table["win"], table["tie"], table["loss"], table["inconsistent"]) == (2, 1, 1, 0)
    rows = [json.loads(line) for line in (tmp_path / "r" / "judge_scores.jsonl").read_text().splitlines()]
    pairs = {r["question_id"]: r for r in rows if r["kind"] == "pairwise"}
    assert pairs["q0"]["verdict_x_first"] == "A" and pairs["q0"]["verdict_x_second"] == "B"  # swapped, same winner
    assert [pairs[f"q{i}"]["outcome"] for i in range(4)] == ["win", "loss", "tie", "win"]
    single = {(r["model"], r["question_id"]): r["score"] for r in rows if r["kind"] == "single"}
    assert single[("student", "q0")] == 9 and single[("base", "q1")] == 8
    assert result["summary"]["single"]["student"]["mean"] == pytest.approx(5.5)
    assert asked == 4 * 2 + 4 * 2  # 8 grades, 4 pairs in 2 orders
    report = (tmp_path / "r" / "report.md").read_text()
    assert "## judge" in report and "does not show that the student knows more" in report
    assert "| student vs base | 2 | 1 | 1 |" in report
    assert (tmp_path / "r" / "judge.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "r" / "report.json").read_text())["sections"]["judge"]["data"]
    assert data["prompts"]["pairwise"]["sha256"] == PINNED["pairwise"]
    shard = next((tmp_path / "r" / "judge").glob("shard-*.jsonl"))
    judged = [json.loads(line) for line in shard.read_text().splitlines()]
    assert {r["provenance"]["teacher"] for r in judged} == {"judge"}  # the engine's records, with provenance
    assert {r["query"]["metadata"]["judge"]["prompt_sha256"] for r in judged} == set(PINNED.values())


async def test_a_position_biased_judge_yields_ties_not_wins(tmp_path: Path):
    student = [f"answer {i} [[fake-score:9]]" for i in range(5)]
    base = [f"other {i} [[fake-score:1]]" for i in range(5)]  # the student is better, but the judge looks at places
    async with FakeTeacher(judge_bias="A") as fake:
        _, result = await _judge(fake, tmp_path / "r", {"student": student, "base": base}, mode="pairwise")
    table = result["summary"]["pairwise"]["student vs base"]
    assert (table["win"], table["tie"], table["loss"]) == (0, 5, 0)
    assert table["inconsistent"] == 5 and (table["position_a_verdicts"], table["position_b_verdicts"]) == (10, 0)
    assert result["summary"]["single"] == {}  # pairwise mode asks for no grades


async def test_unreadable_verdicts_are_re_asked_then_recorded_never_scored(tmp_path: Path):
    student = ["[[fake-verdict:junk]] never readable", "[[fake-verdict:junk,7]] readable on the 2nd ask", "x"]
    async with FakeTeacher() as fake:
        job, result = await _judge(fake, tmp_path / "r", {"student": student}, mode="single", no_base=True)
        asked = fake.stats()["requests"]
        # A rerun replays: every reply is read back from the journal, the same items re-asked, nothing bought.
        _, again = await _judge(fake, tmp_path / "r", {"student": student}, mode="single", no_base=True)
        assert fake.stats()["requests"] == asked
    assert asked == 3 + 2 + 1  # q0: 1 ask + 2 re-asks; q1: 1 + 1; q2: 1
    lines = (tmp_path / "r" / "judge_scores.jsonl").read_text().splitlines()
    rows = {r["question_id"]: r for r in map(json.loads, lines)}
    assert rows["q0"]["status"] == "unparsed" and rows["q0"]["score"] is None
    assert rows["q0"]["reason"] == "no rating found" and len(rows["q0"]["asks"]) == 3
    assert [a["seed"] for a in rows["q0"]["asks"]] == [None, 1, 2]  # each re-ask a new request
    assert len({a["request_key"] for a in rows["q0"]["asks"]}) == 3
    assert rows["q1"]["status"] == "ok" and rows["q1"]["score"] == 7 and len(rows["q1"]["asks"]) == 2
    s = result["summary"]["single"]["student"]
    assert s["n"] == 2 and s["unparsed"] == 1 and s["mean"] == pytest.approx((7 + rows["q2"]["score"]) / 2)
    assert again["summary"] == result["summary"]


async def test_bounded_re_asks_and_failed_requests(tmp_path: Path):
    async with FakeTeacher() as fake:
        runner = JudgeRunner(cfg_for(fake.base_url), tmp_path / "j", load_judge_prompts(), max_reasks=0)
        results = await runner.run(
            [
                JudgeItem("junk", "single", "Q?", ("[[fake-verdict:junk,5]]",)),
                JudgeItem("long", "single", "Q?", ("[[fault:context]] an answer",)),
                JudgeItem("pair", "pairwise", "Q?", ("a [[fake-verdict:B]]", "b")),
            ]
        )
        assert fake.stats()["requests"] == 3  # max_reasks=0: asked once, not again
    assert results["junk"].status == "unparsed" and results["junk"].value is None
    assert results["long"].status == "failed" and results["long"].reason.startswith("ContextTooLong")
    assert results["pair"].status == "ok" and results["pair"].value == "B"
    with pytest.raises(ValueError, match="unique"):
        await runner.run([JudgeItem("k", "single", "Q", ("a",)), JudgeItem("k", "single", "Q", ("b",))])


async def test_another_judge_model_is_asked_anew_in_the_same_folder(tmp_path: Path):
    items = [JudgeItem(f"s{i}", "single", "Q?", (f"answer {i}",)) for i in range(3)]
    async with FakeTeacher() as fake:
        first = await JudgeRunner(cfg_for(fake.base_url), tmp_path / "j", load_judge_prompts()).run(items)
        cfg = cfg_for(fake.base_url, "harvest.teachers.0.model=another-judge")
        second = await JudgeRunner(cfg, tmp_path / "j", load_judge_prompts()).run(items)
        assert fake.stats()["requests"] == 6  # the first model's verdicts are not the second's
    for key in first:
        assert first[key].attempts[0]["request_key"] != second[key].attempts[0]["request_key"]


def test_a_budget_covers_the_judge_with_exit_5(fake_teacher, tmp_path: Path, capsys):
    """The judge's requests go through the harvest budget: --max-requests stops it, the rerun continues."""
    qs = tmp_path / "q.jsonl"
    qs.write_text("".join(json.dumps({"id": f"q{i}", "question": f"Why {i}?"}) + "\n" for i in range(4)))
    job = JudgeEval(cfg_for(fake_teacher.base_url, "harvest.budget.max_requests=3"),
                    JudgeOptions(questions=str(qs), out=tmp_path / "r", mode="single", no_base=True))  # fmt: skip
    job.use(read_questions(str(qs)), {"student": {f"q{i}": f"answer {i}" for i in range(4)}}, {})
    import asyncio

    from imitate.errors import BudgetExhausted

    with pytest.raises(BudgetExhausted):
        asyncio.run(job.judge())
    assert fake_teacher.stats()["requests"] == 3


# ---------------------------------------------------------------------------------------------- questions, CLI


def test_shipped_questions_and_their_licence_line():
    qs = read_questions(str(QUESTIONS))
    assert len(qs) == 20 and len({q.id for q in qs}) == 20
    assert {q.collection for q in qs} >= {"writing", "reasoning", "math", "coding", "extraction", "humanities"}
    assert "`judge_questions.jsonl`" in (QUESTIONS.parent / "README.md").read_text()


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('{"id": "a", "question": "Hi?"}\n{"id": "b", "question": \n', r"q.jsonl:2: "),
        ('{"id": "a", "prompt": "Hi?"}\n', r"q.jsonl:1: missing question field 'question'"),
        ('{"id": "a", "question": "Hi?"}\n{"id": "a", "question": "Again?"}\n', r"q.jsonl:2: .*id 'a'"),
        ("", r"no questions"),
    ],
)
def test_bad_question_files_are_one_line(tmp_path: Path, content: str, needle: str):
    path = tmp_path / "q.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=needle):
        read_questions(str(path))


@pytest.mark.integration
def test_eval_judge_cli_on_tiny_models_caches_answers_and_reports(fake_teacher, tmp_path: Path, capsys):
    from train_fixtures import tiny_model_dir

    student, base = tiny_model_dir(tmp_path / "student", seed=1), tmp_path / "base"
    shutil.copytree(student, base)  # the same weights: identical answers, so every pair must come out a tie
    out = tmp_path / "report"
    args = ["eval", "judge", "--model", str(student), "--base", str(base), "--questions", str(QUESTIONS),
            "--limit", "3", "--max-new-tokens", "6", "--judge-base-url", fake_teacher.base_url,
            "--judge-model", "judge-x", "--teacher-base-url", fake_teacher.base_url, "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "3 questions judged: student vs base: 0 win / 3 tie / 0 loss" in printed.out
    assert "generated 3/3 prompts" in printed.err
    result = json.loads((out / "judge.json").read_text())
    assert result["judge"] == {"base_url": fake_teacher.base_url, "model": "judge-x"}
    assert set(result["summary"]["pairwise"]) == {"student vs base", "student vs teacher"}
    assert result["summary"]["single"]["student"]["n"] == 3 and result["summary"]["single"]["teacher"]["n"] == 3
    rows = (out / "judge_scores.jsonl").read_text().splitlines()
    assert len(rows) == 3 * 3 + 3 * 2  # grades of 3 models, 2 pairs, per question
    assert (out / "judge.png").read_bytes()[:4] == b"\x89PNG"
    assert struct.unpack(">II", (out / "judge.png").read_bytes()[16:24])[0] > 100
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"student", "base", "teacher"} and report["plots"]["judge"] == "judge.png"
    bought = fake_teacher.stats()["requests"]
    assert main(args) == 0  # rerun: answers from the cache, verdicts from the journal
    assert "generated" not in capsys.readouterr().err and fake_teacher.stats()["requests"] == bought
    assert json.loads((out / "judge.json").read_text())["summary"] == result["summary"]


def test_cli_usage_and_one_line_errors(fake_teacher, tmp_path: Path, capsys):
    assert main(["eval", "judge", "--help"]) == 0
    assert main(["eval", "judge", "--out", str(tmp_path)]) == 2  # --questions is required
    capsys.readouterr()
    code = main(["eval", "judge", "--questions", str(QUESTIONS), "--out", str(tmp_path / "r"), "--mode", "most",
                 "--model", str(tmp_path / "missing"), "--judge-base-url", fake_teacher.base_url])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and "--mode 'most'" in err[0]
    code = main(["eval", "judge", "--questions", str(QUESTIONS), "--out", str(tmp_path / "r"),
                 "--model", str(tmp_path / "missing"), "--judge-base-url", fake_teacher.base_url])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and "does not exist" in err[0]
    code = main(["eval", "judge", "--questions", str(QUESTIONS), "--out", str(tmp_path / "r"), "--no-base",
                 "--judge-base-url", fake_teacher.base_url])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and "--mode both compares the student with a second model" in err[0]
    # an unset key variable is named before any model is looked at (or answers generated for minutes)
    code = main(["eval", "judge", "--questions", str(QUESTIONS), "--out", str(tmp_path / "r"), "--model",
                 str(tmp_path / "missing"), "--judge-base-url", fake_teacher.base_url,
                 "--api-key-env", "IMITATE_TEST_UNSET_KEY"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "IMITATE_TEST_UNSET_KEY" in err[0] and "is not set" in err[0], err
    assert fake_teacher.stats()["requests"] == 0  # every error came before any judge call


async def test_judge_max_tokens_caps_every_ask_and_is_recorded(tmp_path: Path):
    """--judge-max-tokens: the cap goes out with each request (re-asks included), keys the requests anew and is
    recorded; the pinned wording and its sha256 are unchanged."""
    student = ["[[fake-verdict:junk,7]] readable on the 2nd ask", "fine [[fake-score:6]]"]
    async with FakeTeacher() as fake:
        _, first = await _judge(fake, tmp_path / "r", {"student": student}, mode="single", no_base=True)
        asked = fake.stats()["requests"]
        _, capped = await _judge(fake, tmp_path / "r", {"student": student}, mode="single", no_base=True,
                                 judge_max_tokens=64)  # fmt: skip
        assert fake.stats()["requests"] == 2 * asked  # a different cap is a different request: asked anew
    shard = sorted((tmp_path / "r" / "judge").glob("shard-*.jsonl"))
    sent = [
        json.loads(line)["provenance"]["params"]["max_tokens"] for f in shard for line in f.read_text().splitlines()
    ]
    assert sorted(sent) == [64] * asked + [1024] * asked
    data = json.loads((tmp_path / "r" / "judge.json").read_text())
    assert data["prompts"]["single"] == {**data["prompts"]["single"], "max_tokens": 64, "sha256": PINNED["single"]}
    assert capped["summary"]["single"]["student"]["mean"] == first["summary"]["single"]["student"]["mean"]
    with pytest.raises(ValueError):
        with_max_tokens(load_judge_prompts(), 0)
