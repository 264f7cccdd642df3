"""The harvester end to end against the loopback fake teacher, in-process: every fault class becomes the right
record, resume never pays twice, budgets stop the run, several teachers route and fall back, batch mode."""

import json
import socket
import time
from pathlib import Path

import pytest

from imitate.cli import main
from imitate.config import load_config
from imitate.errors import BudgetExhausted, InputError, TeacherError
from imitate.harvest.batch import harvest_batch
from imitate.harvest.run import dry_run, harvest, status
from imitate.records import read_jsonl
from imitate.teacher.fake import FakeTeacher

pytestmark = pytest.mark.integration


def write_queries(path: Path, questions: list[str], collection: str = "flan") -> Path:
    with open(path, "w") as f:
        for i, q in enumerate(questions):
            f.write(json.dumps({"id": f"r{i}", "question": q, "collection": collection}) + "\n")
    return path


def rows(out: Path) -> list:
    out_rows = [r for s in sorted(out.glob("shard-*.jsonl")) for r in read_jsonl(s)]
    if (out / "failures.jsonl").exists():
        out_rows += list(read_jsonl(out / "failures.jsonl"))
    return out_rows


def cfg_for(base_url: str, *extra: str):
    return load_config(
        None,
        [
            f"harvest.teachers.0.base_url={base_url}",
            "harvest.teachers.0.name=fake",
            "harvest.retry.base_delay_s=0.01",
            "harvest.retry.max_delay_s=0.05",
            "harvest.retry.max_attempts=4",
            "harvest.teachers.0.timeout_s=2",
            "harvest.params.max_tokens=200",
            "harvest.fsync_every=4",
            *extra,
        ],
    )


@pytest.fixture
async def fake():
    async with FakeTeacher(retry_after_s=0.02) as server:
        yield server


async def test_every_fault_class_becomes_the_right_row(fake, tmp_path: Path):
    questions = {
        "plain": "Why is the sea salty?",
        "500x2": "Explain rain. [[fault:500x2]]",
        "429x2": "Explain snow. [[fault:429x2]]",
        "resetx1": "Explain wind. [[fault:resetx1]]",
        "malformedx1": "Explain hail. [[fault:malformedx1]]",
        "emptyx1": "Explain fog. [[fault:emptyx1]]",
        "context": "Explain clouds. [[fault:context]]",
        "filter": "Explain storms. [[fault:filter]]",
        "policy": "Explain thunder. [[fault:policy]]",
        "length": "Explain lightning. [[fault:length]]",
        "502": "Explain dew. [[fault:502]]",
    }
    src = write_queries(tmp_path / "q.jsonl", list(questions.values()))
    out = tmp_path / "out"
    outcome = await harvest(cfg_for(fake.base_url), str(src), out, progress="quiet")
    assert isinstance(outcome.error, TeacherError) and "1 rows failed for a transient reason" in outcome.error.message
    by_q = {r.query.question: r for r in rows(out)}
    assert len(by_q) == len(questions)

    def get(name):
        return by_q[questions[name]]

    assert get("plain").status == "ok" and get("plain").provenance.attempts == 1
    for name, attempts in [("500x2", 3), ("429x2", 3), ("resetx1", 2), ("malformedx1", 2), ("emptyx1", 2)]:
        r = get(name)
        assert r.status == "ok" and r.provenance.attempts == attempts, (name, r)
    for name, cls, attempts in [
        ("context", "ContextTooLong", 1),
        ("filter", "ContentFiltered", 1),
        ("policy", "ContentFiltered", 1),
        ("502", "ServerError", 4),
    ]:
        r = get(name)
        assert (r.status, r.error_class, r.provenance.attempts) == ("failed", cls, attempts), (name, r)
    assert get("length").status == "ok" and get("length").truncated
    m = outcome.manifest
    assert m["status"] == "partial" and m["totals"]["pending"] == 1  # the 502 row is asked again by a rerun
    assert (m["totals"]["ok"], m["totals"]["failed"], m["totals"]["retry_next_run"]) == (7, 3, 1)
    assert m["this_run"]["requests"] == sum(r.provenance.attempts for r in by_q.values())
    again = await harvest(cfg_for(fake.base_url), str(src), out, progress="quiet")
    assert again.manifest["this_run"]["requests"] == 4 and again.manifest["totals"]["billable"]["requests"] == 21 + 4


async def test_resume_never_pays_twice_and_changed_prompt_is_a_miss(fake, tmp_path: Path):
    src = write_queries(tmp_path / "q.jsonl", [f"Question number {i}?" for i in range(30)])
    out = tmp_path / "out"
    first = await harvest(cfg_for(fake.base_url), str(src), out, progress="quiet")
    assert first.manifest["this_run"]["ok"] == 30
    served = fake.stats()["completed"]
    again = await harvest(cfg_for(fake.base_url), str(src), out, progress="quiet")
    assert again.manifest["this_run"]["requests"] == 0 and again.manifest["this_run"]["skipped_done"] == 30
    assert fake.stats()["completed"] == served  # not one request sent
    changed = await harvest(cfg_for(fake.base_url, "harvest.preset=orca-t0"), str(src), out, progress="quiet")
    assert changed.manifest["this_run"]["ok"] == 30  # other system messages: other requests
    assert len(rows(out)) == 60
    st = status(out)
    assert (st["done"], st["failed"], st["pending"]) == (60, 0, 0)


@pytest.mark.parametrize(
    ("flag", "value", "limit_name"),
    [("max_requests", "7", "max_requests"), ("max_tokens", "3000", "max_tokens"), ("max_usd", "0.002", "max_usd")],
)
async def test_each_budget_stops_the_run(fake, tmp_path: Path, flag: str, value: str, limit_name: str):
    src = write_queries(tmp_path / "q.jsonl", [f"Tell me about topic {i}." for i in range(40)])
    out = tmp_path / "out"
    cfg = cfg_for(
        fake.base_url,
        f"harvest.budget.{flag}={value}",
        "prices.fake-teacher.input_per_mtok=1",
        "prices.fake-teacher.output_per_mtok=2",
    )
    outcome = await harvest(cfg, str(src), out, progress="quiet")
    assert isinstance(outcome.error, BudgetExhausted)
    assert limit_name in outcome.manifest["stop_reason"]
    t = outcome.manifest["totals"]
    assert 0 < t["ok"] < 40 and outcome.manifest["status"] == "partial"
    if flag == "max_requests":
        assert outcome.manifest["this_run"]["requests"] <= 7
    if flag == "max_tokens":
        assert t["tokens"] <= 3000
    if flag == "max_usd":
        assert t["spend_usd"] <= 0.002
    assert t["spend_usd"] == pytest.approx(sum(r.provenance.cost_usd for r in rows(out)))


@pytest.mark.parametrize("rpm", [None, 100_000])
async def test_max_requests_is_used_exactly_not_stopped_early(fake, tmp_path: Path, rpm):
    src = write_queries(tmp_path / "q.jsonl", [f"Budget row {i}." for i in range(100)])
    extra = [f"harvest.teachers.0.rpm={rpm}"] if rpm else []
    outcome = await harvest(cfg_for(fake.base_url, "harvest.budget.max_requests=37", *extra), str(src),
                            tmp_path / "out", progress="quiet")  # fmt: skip
    assert isinstance(outcome.error, BudgetExhausted)
    assert fake.stats()["requests"] == 37 and outcome.manifest["totals"]["ok"] == 37  # not 8, not 34


async def test_max_requests_counts_retries_across_runs(fake, tmp_path: Path):
    src = write_queries(tmp_path / "q.jsonl", [f"Flaky {i}. [[fault:500x1]]" for i in range(30)])
    out = tmp_path / "out"
    for _ in range(3):
        outcome = await harvest(cfg_for(fake.base_url, "harvest.budget.max_requests=37"), str(src), out,
                                progress="quiet")  # fmt: skip
        assert isinstance(outcome.error, BudgetExhausted)
    assert fake.stats()["requests"] == 37  # every attempt counted, in every run: never 60 for 37
    assert outcome.manifest["totals"]["billable"]["requests"] == 37 and outcome.manifest["this_run"]["requests"] == 0


async def test_max_usd_is_used_to_within_one_request_estimate(fake, tmp_path: Path):
    src = write_queries(tmp_path / "q.jsonl", [f"Spend row {i}." for i in range(200)])
    prices = ["prices.fake-teacher.input_per_mtok=1000", "prices.fake-teacher.output_per_mtok=1000"]
    outcome = await harvest(cfg_for(fake.base_url, "harvest.budget.max_usd=10", *prices), str(src), tmp_path / "out",
                            progress="quiet")  # fmt: skip
    assert isinstance(outcome.error, BudgetExhausted)
    spent = outcome.manifest["totals"]["spend_usd"]
    one_request = 200 * 1000 / 1e6 + 30 * 1000 / 1e6  # max_tokens 200 + a ~30-token prompt, at $1000/Mtok
    assert 10 - one_request < spent <= 10  # not stopped at an estimated $1.5 with $0.88 spent


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_a_teacher_that_cannot_be_reached_stops_early_and_the_rerun_sends_every_row(tmp_path: Path):
    port = _closed_port()
    src = write_queries(tmp_path / "q.jsonl", [f"Reach {i}?" for i in range(40)])
    out = tmp_path / "out"
    started = time.monotonic()
    outcome = await harvest(cfg_for(f"http://127.0.0.1:{port}/v1"), str(src), out, progress="quiet")
    assert time.monotonic() - started < 15
    assert isinstance(outcome.error, TeacherError) and outcome.error.exit_code == 4
    assert "down after" in outcome.error.message and "ConnectFailed" in outcome.error.message
    assert (
        outcome.manifest["totals"]["ok"] == 0 and outcome.manifest["totals"]["failed"] == 0
    )  # nothing failed for good
    async with FakeTeacher() as server:
        await server.stop()
        await server.start(port=port)  # the server comes back on the same address
        again = await harvest(cfg_for(server.base_url), str(src), out, progress="quiet")
    assert again.error is None and again.manifest["totals"]["ok"] == 40


@pytest.mark.parametrize(("fault", "cls"), [("auth", "AuthError"), ("nomodel", "ModelNotFound")])
async def test_a_teacher_refusing_every_request_stops_at_once_leaving_rows_pending(tmp_path: Path, fault, cls):
    async with FakeTeacher(faults={fault: 1.0}) as server:
        src = write_queries(tmp_path / "q.jsonl", [f"Refused {i}?" for i in range(40)])
        outcome = await harvest(cfg_for(server.base_url), str(src), tmp_path / "out", progress="quiet")
        assert isinstance(outcome.error, TeacherError) and cls in outcome.error.message
        assert outcome.error.exit_code == 4
        assert server.stats()["requests"] <= 16  # stopped on the first answers, not after 40 rows
        assert outcome.manifest["totals"]["failed"] == 0 and not (tmp_path / "out" / "failures.jsonl").exists()


async def test_an_empty_input_is_an_error_not_complete(fake, tmp_path: Path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    outcome = await harvest(cfg_for(fake.base_url), str(empty), tmp_path / "out", progress="quiet")
    assert isinstance(outcome.error, InputError) and "no rows" in outcome.error.message
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n[1, 2]\n")
    cfg = cfg_for(fake.base_url, "harvest.source.skip_bad_rows=true")
    outcome = await harvest(cfg, str(bad), tmp_path / "out2", progress="quiet")
    assert isinstance(outcome.error, InputError) and "every row was skipped" in outcome.error.message


async def test_quota_retires_the_teacher_and_fallback_takes_over(tmp_path: Path):
    async with FakeTeacher(faults={"quota": 1.0}) as broke, FakeTeacher(model="backup") as backup:
        src = write_queries(tmp_path / "q.jsonl", [f"Question {i}?" for i in range(20)])
        out = tmp_path / "out"
        alone = await harvest(cfg_for(broke.base_url), str(src), out, progress="quiet")
        assert isinstance(alone.error, TeacherError) and "no teacher left" in alone.manifest["stop_reason"]
        assert alone.manifest["totals"]["failed"] == 0  # a quota error is not the row's fault: it stays pending
        assert alone.manifest["this_run"]["resent_after_crash"] == 0
        cfg = cfg_for(
            broke.base_url,
            f"harvest.teachers.1.base_url={backup.base_url}",
            "harvest.teachers.1.name=backup",
            "harvest.teachers.1.model=backup",
            "harvest.teachers.1.fallback=true",
        )
        outcome = await harvest(cfg, str(src), out, progress="quiet")
        assert outcome.manifest["teachers"]["fake"]["dead"].startswith("QuotaExhausted")
        got = rows(out)
        assert len(got) == 20 and {r.provenance.teacher for r in got} == {"backup"}
        assert outcome.error is None and outcome.manifest["status"] == "complete"
        assert outcome.manifest["this_run"]["resent_after_crash"] == 0


async def test_subset_routing_and_samples(tmp_path: Path):
    async with FakeTeacher() as a, FakeTeacher(model="big") as b:
        src = write_queries(tmp_path / "q.jsonl", [f"Q{i}: why?" for i in range(40)])
        cfg = cfg_for(
            a.base_url,
            "harvest.samples_per_prompt=2",
            f"harvest.teachers.1.base_url={b.base_url}",
            "harvest.teachers.1.name=big",
            "harvest.teachers.1.model=big",
            "harvest.teachers.1.subset_fraction=0.25",
        )
        outcome = await harvest(cfg, str(src), tmp_path / "out", progress="quiet")
        got = rows(tmp_path / "out")
        n_big = sum(r.provenance.teacher == "big" for r in got)
        assert sum(r.provenance.teacher == "fake" for r in got) == 80
        assert n_big % 2 == 0 and 4 <= n_big <= 40
        assert outcome.manifest["status"] == "complete"


async def test_dry_run_sends_nothing(fake, tmp_path: Path):
    src = write_queries(tmp_path / "q.jsonl", [f"Q{i}?" for i in range(12)])
    cfg = cfg_for(fake.base_url, "harvest.teachers.0.rpm=6", "prices.fake-teacher.input_per_mtok=1")
    plan = dry_run(cfg, str(src), None)
    assert plan["requests"] == 12
    assert plan["teachers"]["fake"]["est_minutes_at_limits"] == 2.0
    assert plan["teachers"]["fake"]["est_usd_upper_bound"] > 0
    assert fake.stats()["requests"] == 0


async def test_batch_mode_end_to_end_resubmits_only_failures(fake, tmp_path: Path):
    questions = [f"Batch question {i}?" for i in range(9)] + ["Flaky [[fault:500x1]]", "Bad [[fault:context]]"]
    src = write_queries(tmp_path / "q.jsonl", questions)
    out = tmp_path / "out"
    outcome = await harvest_batch(cfg_for(fake.base_url), str(src), out, poll_s=0.02)
    got = {r.query.question: r for r in rows(out)}
    assert len(got) == 11
    assert got["Flaky [[fault:500x1]]"].status == "ok" and got["Flaky [[fault:500x1]]"].provenance.attempts == 2
    assert got["Bad [[fault:context]]"].error_class == "ContextTooLong"
    assert outcome.manifest["status"] == "complete"
    batches = outcome.manifest["batches"]
    assert len(batches) == 2 and [b["round"] for b in batches] == [0, 1]
    assert fake.stats()["batch_lines"] == 12  # 11 rows + 1 resubmitted: nothing else paid twice
    assert (outcome.manifest["this_run"]["requests"], outcome.manifest["this_run"]["batch_files"]) == (12, 2)
    again = await harvest_batch(cfg_for(fake.base_url), str(src), out, poll_s=0.02)
    assert again.manifest["this_run"]["requests"] == 0 and fake.stats()["batch_lines"] == 12


def test_batch_request_files_respect_line_and_byte_limits(tmp_path: Path):
    from imitate.harvest.batch import BatchState, _Writer
    from imitate.harvest.plan import Planned
    from imitate.records import Message, Query, Request

    def planned(qid: str, question: str) -> Planned:
        q = Query(id=qid, question=question)
        req = Request(
            query_id=q.id,
            teacher="t",
            model="m",
            base_url="http://b/v1",
            messages=[Message(role="user", content=q.question)],
        )
        return Planned(req, q, "main")

    state = BatchState(tmp_path)
    w = _Writer(state, "t", 0, max_lines=3, max_bytes=10_000)
    for i in range(7):
        w.add(planned(f"q{i}", "x" * 50))
    w.close()
    assert [len(p.read_text().splitlines()) for p, _ in w.files] == [3, 3, 1]
    small = _Writer(state, "t", 1, max_lines=100, max_bytes=600)
    for i in range(5):
        small.add(planned(f"s{i}", "y" * 100))
    small.close()
    assert all(p.stat().st_size <= 600 for p, _ in small.files) and len(small.files) > 1
    assert sum(len(p.read_text().splitlines()) for p, _ in small.files) == 5


def test_harvest_prints_a_settings_summary_and_the_whole_config_only_with_verbose(fake_teacher, tmp_path, capsys):
    src = tmp_path / "q.jsonl"
    src.write_text('{"id": "a", "question": "Why is the sky blue?"}\n')
    url = fake_teacher.base_url.replace("http://", "http://me:pw-31337@")
    args = ["harvest", str(src), "--base-url", url, "--max-usd", "2", "--rpm", "60", "--set", "harvest.preset=none"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "teacher  default: fake-teacher at http://***@127.0.0.1" in err and "rpm 60, tpm from headers" in err
    assert "budget   $2.0" in err and f"output   {tmp_path / 'a'}" in err
    assert "harvest:" not in err and "pw-31337" not in err  # the YAML config is not printed, the secret never
    assert main([*args, "--out", str(tmp_path / "b"), "--verbose"]) == 0
    err = capsys.readouterr().err
    assert "harvest:" in err and "teachers:" in err and "pw-31337" not in err


async def test_a_log_gets_plain_progress_lines(tmp_path: Path, capsys):
    """stderr that is not a terminal (make demo > log, CI) gets a plain status line per interval, not silence."""
    async with FakeTeacher(latency_s=0.1) as server:
        src = write_queries(tmp_path / "q.jsonl", [f"Why is {i} a number?" for i in range(12)])
        cfg = cfg_for(server.base_url, "harvest.teachers.0.max_concurrency=2")
        outcome = await harvest(cfg, str(src), tmp_path / "out", progress="lines", progress_interval=0.1)
    assert outcome.error is None
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("harvest ")]
    assert len(lines) >= 3, lines
    assert all(" ok" in x and "failed" in x and "req/min" in x and "$0.0000" in x for x in lines)
    done = [int(x.split()[1].split("/")[0]) for x in lines]
    assert done == sorted(done) and done[0] < done[-1] <= 12  # it moves while the harvest runs
