"""Self-Instruct: parsing messy numbered lists, the filters, the seed file (published shape and plain rows), the
versioned prompt, deterministic rounds; against the fake teacher: exactly N unique filtered tasks answered, a
rerun that buys nothing, a larger target that continues the same pool, a budget across both steps, and a
kill -9 in the middle of the answers that re-buys only what was in flight."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from imitate.cli import main
from imitate.config import load_config
from imitate.dataset.formats import record_to_row
from imitate.dataset.selfinstruct import (
    FilterPolicy,
    SelfInstructPrompt,
    Task,
    TaskFilter,
    load_prompt,
    parse_task_list,
    read_seeds,
    render_prompt,
    round_queries,
    rule_violation,
)
from imitate.dataset.selfinstruct_run import self_instruct
from imitate.dataset.similarity import rouge_l
from imitate.errors import ConfigError, InputError, TeacherError
from imitate.records import read_jsonl
from imitate.teacher.fake import FakeTeacher, FakeTeacherServer
from imitate.teacher.fake.tasks import continues_task_list

REPO = Path(__file__).resolve().parents[1]
SEEDS = REPO / "data" / "seeds" / "seed_tasks.jsonl"
PROMPT_SHA256 = "bc38aa3b5e5c40c598282c1ec13fcde2ec0fc4fb223b53e210c7acad73aa4506"  # bump on purpose only
POLICY = load_prompt().filters

# ---------------------------------------------------------------------------------------------- parsing


def test_parse_alpaca_layout_continuing_the_open_item():
    text = (
        " Write a haiku about the sea.\n4. Input:\n<noinput>\n###\n"
        "5. Instruction: Sort the list in alphabetical order.\n5. Input:\n1. pear\n2. apple\n3. fig\n###\n"
        "6. Instruction: Is the statement true or false?\n6. Input:\nThe moon is a planet.\n6. Output:\nFalse\n###"
    )
    tasks = parse_task_list(text, 4)
    assert [(t.number, t.instruction, t.input) for t in tasks] == [
        (4, "Write a haiku about the sea.", ""),
        (5, "Sort the list in alphabetical order.", "1. pear\n2. apple\n3. fig"),  # a list inside an input stays
        (6, "Is the statement true or false?", "The moon is a planet."),
    ]
    assert tasks[2].output == "False" and tasks[0].output is None


def test_parse_drops_a_preamble_and_reads_odd_numbering_and_markdown():
    text = (
        "Sure! Here are some more tasks:\n\n"
        "**4. Instruction:** Name three   rivers in\n  South America.\nInput: None\n\n"
        "5) Instruction: Convert the recipe to metric units.\n**Input:** 2 cups flour, 1 stick butter\n---\n"
        "Task 6: Instruction: Suggest a title for the essay.\n- Input: N/A\n"
    )
    tasks = parse_task_list(text, 4)
    assert [(t.number, t.instruction, t.input) for t in tasks] == [
        (4, "Name three rivers in South America.", ""),
        (5, "Convert the recipe to metric units.", "2 cups flour, 1 stick butter"),
        (6, "Suggest a title for the essay.", ""),
    ]


def test_parse_plain_numbered_lines_unnumbered_blocks_and_truncation():
    plain = "Continue the story in one paragraph.\n5. Give two synonyms for 'happy'.\n6. Explain what a prime is."
    tasks = parse_task_list(plain, 4)  # the next number is first + 1: the text before it is item 4
    assert [t.instruction for t in tasks] == [
        "Continue the story in one paragraph.",
        "Give two synonyms for 'happy'.",
        "Explain what a prime is.",
    ]
    blocks = "Instruction: Spell the word backwards.\nInput: orange\n\nInstruction: Write a motto for a bakery."
    assert [(t.instruction, t.input) for t in parse_task_list(blocks)] == [
        ("Spell the word backwards.", "orange"),
        ("Write a motto for a bakery.", ""),
    ]
    cut = "1. Instruction: List four fruits.\n1. Input:\n<noinput>\n###\n2. Instruction: Describe how to tie a"
    assert [t.instruction for t in parse_task_list(cut, truncated=True)] == ["List four fruits."]
    assert parse_task_list("", 4) == [] and parse_task_list("I cannot help with that.", 4) == []


# ---------------------------------------------------------------------------------------------- filters


@pytest.mark.parametrize(
    ("instruction", "reason"),
    [
        ("   ", "empty"),
        ("Summarise this.", "too_short"),
        (" ".join(["word"] * 151), "too_long"),
        ('"Quote" the first line of the poem.', "starts_with_punctuation"),
        ("Écris une phrase sur la mer.", "starts_non_ascii"),
        ("Draw a cat sitting on a fence.", "blacklisted"),
        ("Create a flowchart for making tea.", "blacklisted"),
        ("Plot the monthly sales figures.", "blacklisted"),
        ("Explain how a bank withdrawal works.", None),  # "draw" inside a word is not the word
        ("Describe what a map projection distorts.", "blacklisted"),
        ("Give three tips for a job interview.", None),
    ],
)
def test_rule_violations(instruction: str, reason: str | None):
    assert rule_violation(instruction, POLICY) == reason


def test_similarity_filter_against_the_pool_counts_reasons():
    f = TaskFilter(FilterPolicy(min_words=3, rouge_threshold=0.7, blacklist=["image"]))
    f.add("Write a short poem about the sea at night.")
    assert f.admit("Write a short poem about the sea at dawn.") == "similar"  # F = 8/9 > 0.7
    assert rouge_l("Explain why the sky is blue.", "Write a short poem about the sea at night.") <= 0.7
    assert f.admit("Explain why the sky is blue.") is None
    assert f.admit("Explain why the sky is blue today.") == "similar"  # the kept task is in the pool now
    assert f.admit("Describe this image.") == "blacklisted"
    assert f.rejected == {"similar": 2, "blacklisted": 1}
    assert len(f.index) == 2


# ---------------------------------------------------------------------------------------------- prompt, seeds


def test_shipped_prompt_is_pinned_and_checked(tmp_path: Path):
    spec = load_prompt()
    assert spec.sha256 == PROMPT_SHA256 == spec.content_sha256()
    assert {"image", "graph", "file", "draw", "plot", "go to", "video", "music", "diagram"} <= set(
        spec.filters.blacklist
    )
    data = yaml.safe_load((REPO / "prompts" / "self_instruct.yaml").read_text())
    data["filters"]["min_words"] = 2
    edited = tmp_path / "self_instruct.yaml"
    edited.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="sha256 does not match"):
        load_prompt(edited)
    data["template"] = "no placeholders"
    with pytest.raises(ValueError, match="template needs"):
        SelfInstructPrompt.model_validate(data)


def test_shipped_seed_file_has_the_published_shape():
    rows = [json.loads(line) for line in SEEDS.read_text().splitlines()]
    assert 25 <= len(rows) <= 40
    for row in rows:
        assert set(row) == {"id", "name", "instruction", "instances", "is_classification"}
        assert isinstance(row["is_classification"], bool) and row["instances"]
        assert set(row["instances"][0]) == {"input", "output"}
    assert len({r["id"] for r in rows}) == len(rows)
    assert (SEEDS.parent / "README.md").read_text().count("Licence") == 1
    seeds = read_seeds(str(SEEDS))
    assert [s.instruction for s in seeds] == [r["instruction"] for r in rows]
    assert all(rule_violation(s.instruction, POLICY) is None for s in seeds)


def test_plain_rows_read_like_the_published_shape(tmp_path: Path):
    published = tmp_path / "seeds.jsonl"
    published.write_text(
        json.dumps({"id": "s1", "name": "n", "instruction": "Add the numbers.", "is_classification": False,
                    "instances": [{"input": "2, 3", "output": "5"}]}) + "\n"
    )  # fmt: skip
    plain = tmp_path / "seeds.csv"
    plain.write_text('id,instruction,input,output\ns1,Add the numbers.,"2, 3",5\n')
    assert read_seeds(str(published)) == read_seeds(str(plain))
    assert read_seeds(str(plain))[0] == Task(id="s1", instruction="Add the numbers.", input="2, 3", output="5",
                                             origin="seed")  # fmt: skip


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('{"id": "s1", "instruction": "Hi there you.", "instances": []}', "seed 's1' (row 1): instances"),
        ('{"id": "s1", "instruction": "Hi there you.", "input": 3}', "seed 's1' (row 1): input must be a string"),
        ('{"id": "s1", "prompt": "Hi there you."}', r"seeds.jsonl:1: missing question field 'instruction'"),
        ("", "no seed tasks"),
    ],
)
def test_bad_seeds_are_one_line(tmp_path: Path, line: str, needle: str):
    path = tmp_path / "seeds.jsonl"
    path.write_text(line + "\n" if line else "")
    with pytest.raises(InputError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        read_seeds(str(path))


def test_rounds_are_deterministic_and_mix_seed_and_generated_tasks():
    spec, seeds = load_prompt(), read_seeds(str(SEEDS))
    gen = [Task(id=f"g{i}", instruction=f"Generated task number {i} here.") for i in range(5)]

    def ids(pool, state="s", used=None):
        qs = round_queries(
            spec, seeds, pool, round_no=1, per_round=4, state=state, used=set() if used is None else used
        )
        return [q.id for q in qs], qs

    first, qs = ids([])
    assert first == ids([])[0] and first != ids([], state="t")[0]
    assert len(set(first)) == 4 and all(len(q.metadata["self_instruct"]["demos"]) == 3 for q in qs)
    assert all(continues_task_list(q.question) == 4 for q in qs)  # ends in the open item the fake continues
    _, later = ids(gen)
    for q in later:
        demos = q.metadata["self_instruct"]["demos"]
        assert sum(d.startswith("g") for d in demos) == 1 and len(demos) == 3
    used: set[str] = set()
    a, _ = ids([], used=used)
    assert ids([], used=used)[0] != a  # a prompt already asked is drawn again
    two = [Task(id="a", instruction="Say hello politely."), Task(id="b", instruction="Count to three now.")]
    assert render_prompt(spec, two).rstrip().endswith("3. Instruction:")


# ---------------------------------------------------------------------------------------------- end to end


def cfg_for(base_url: str, *extra: str):
    return load_config(None, [f"harvest.teachers.0.base_url={base_url}", "harvest.preset=none",
                              "harvest.retry.base_delay_s=0.01", *extra])  # fmt: skip


def records(out: Path) -> list:
    return list(read_jsonl(out / "records.jsonl"))


@pytest.fixture
async def fake():
    async with FakeTeacher() as server:
        yield server


async def test_n_unique_filtered_tasks_answered_and_a_rerun_buys_nothing(fake, tmp_path: Path):
    out, n = tmp_path / "si", 25
    outcome = await self_instruct(cfg_for(fake.base_url), str(SEEDS), out, target=n, per_round=2)
    assert outcome.error is None
    m = outcome.manifest
    got = records(out)
    assert len(got) == n == m["answered"] and m["status"] == "complete" and m["rounds"] >= 2
    assert all(r.status == "ok" and r.tags == ["self-instruct"] for r in got)
    tasks = [json.loads(line) for line in (out / "tasks.jsonl").read_text().splitlines()]
    assert len(tasks) == m["kept"] and len({t["id"] for t in tasks}) == len(tasks)
    assert m["generated"] == m["kept"] + sum(v for k, v in m["rejected"].items() if k != "truncated")
    assert {"similar", "blacklisted"} <= set(m["rejected"])  # the fake writes repeats and misfits too
    by_id = {t["id"]: t for t in tasks}
    answered = [by_id[r.query.metadata["self_instruct"]["task_id"]] for r in got]
    assert [t["id"] for t in answered] == [t["id"] for t in tasks[:n]]  # the first N kept, in order
    pool = [s.instruction for s in read_seeds(str(SEEDS))]
    for t in tasks:
        assert rule_violation(t["instruction"], POLICY) is None
        assert max(rouge_l(t["instruction"], p) for p in pool) <= 0.7
        pool.append(t["instruction"])
    origin = got[0].query.metadata["self_instruct"]
    assert origin["generation_request_key"] == answered[0]["generation_request_key"]
    assert origin["instruction"] == answered[0]["instruction"] and origin["round"] == 0
    with_input = next(i for i, t in enumerate(answered) if t["input"])
    row = record_to_row(got[with_input], "alpaca")  # exported as alpaca, the task splits back as it was
    assert (row["instruction"], row["input"]) == (answered[with_input]["instruction"], answered[with_input]["input"])
    assert fake.stats()["requests"] == m["billable"]["total"]["requests"] == m["prompts"] + n

    before = fake.stats()["requests"]
    again = await self_instruct(cfg_for(fake.base_url), str(SEEDS), out, target=n, per_round=2)
    assert again.error is None and fake.stats()["requests"] == before  # everything was bought already
    assert [r.id for r in records(out)] == [r.id for r in got]
    assert again.manifest["this_run"]["answer"] == {} and again.manifest["kept"] == m["kept"]


async def test_a_larger_target_continues_the_same_pool(fake, tmp_path: Path):
    small, big = tmp_path / "small", tmp_path / "big"
    await self_instruct(cfg_for(fake.base_url), str(SEEDS), small, target=5, per_round=1)
    first = (small / "tasks.jsonl").read_text()
    more = await self_instruct(cfg_for(fake.base_url), str(SEEDS), small, target=12, per_round=1)
    assert more.error is None and len(records(small)) == 12
    fresh = await self_instruct(cfg_for(fake.base_url), str(SEEDS), big, target=12, per_round=1)
    assert fresh.error is None
    assert (small / "tasks.jsonl").read_text() == (big / "tasks.jsonl").read_text()  # deterministic pool
    assert (small / "tasks.jsonl").read_text().startswith(first)


async def test_transient_failures_stop_the_run_and_the_rerun_asks_again(fake, tmp_path: Path):
    out = tmp_path / "si"
    async with FakeTeacher(faults={"500": 1.0}) as broken:
        cfg = cfg_for(broken.base_url, "harvest.retry.max_attempts=2")
        failed = await self_instruct(cfg, str(SEEDS), out, target=5, per_round=2)
    assert isinstance(failed.error, TeacherError) and failed.error.exit_code == 4
    assert failed.manifest["status"] == "partial" and failed.manifest["kept"] == 0
    assert len(list(read_jsonl(out / "generate" / "failures.jsonl"))) == 2
    healed = await self_instruct(cfg_for(fake.base_url), str(SEEDS), out, target=5, per_round=2)
    assert healed.error is None and len(records(out)) == 5
    assert healed.manifest["this_run"]["generate"]["requests"] == 2  # the same two prompts, asked again


def test_a_budget_stops_both_steps_together_with_exit_5(fake_teacher, tmp_path: Path, capsys):
    out = tmp_path / "si"
    args = ["generate", "self-instruct", str(SEEDS), "--out", str(out), "--target", "20", "--per-round", "3",
            "--base-url", fake_teacher.base_url, "--preset", "none", "--quiet", "--max-requests", "7"]  # fmt: skip
    assert main(args) == 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_requests 7 requests sent of 7 (generation and answers together)" in err[0]
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "partial" and m["billable"]["total"]["requests"] == 7 == fake_teacher.stats()["requests"]
    assert m["billable"]["generate"]["requests"] == 3 and len(records(out)) == 4
    assert main([*args[:-1], "9"]) == 5  # two more requests, across runs: still never crossed
    assert fake_teacher.stats()["requests"] == 9 and len(records(out)) == 6
    assert main(args[:-2]) == 0 and len(records(out)) == 20


def test_cli_help_and_usage():
    assert main(["generate", "self-instruct", "--help"]) == 0
    assert main(["generate", "self-instruct", str(SEEDS), "--out", "x"]) == 2  # --target is required


# ---------------------------------------------------------------------------------------------- kill -9


def _lines(folder: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in folder.glob("shard-*.jsonl"))


def test_kill_9_during_answers_rebuys_only_what_was_in_flight(tmp_path: Path):
    out, n, concurrency = tmp_path / "si", 30, 4
    with FakeTeacherServer(process=True, latency_s=0.05, jitter_s=0.05) as fake:
        args = [sys.executable, "-m", "imitate.cli", "generate", "self-instruct", str(SEEDS), "--out", str(out),
                "--target", str(n), "--per-round", "2", "--base-url", fake.base_url, "--preset", "none", "--quiet",
                "--set", f"harvest.teachers.0.max_concurrency={concurrency}"]  # fmt: skip
        p = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while _lines(out / "answer") < 8 and p.poll() is None:
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.01)
        p.kill()
        p.communicate(timeout=30)
        assert p.returncode == -9 and 8 <= _lines(out / "answer") < n
        assert not (out / "manifest.json").exists()
        again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
        served = fake.stats()["completed"]
    m = json.loads((out / "manifest.json").read_text())
    got = records(out)
    assert len(got) == n and len({r.query.id for r in got}) == n
    resent = m["this_run"]["answer"].get("resent_after_crash", 0)
    assert m["billable"]["answer"]["requests"] - n == resent <= concurrency  # only answers in flight re-bought
    assert served <= m["billable"]["total"]["requests"]
    assert os.path.getsize(out / "answer" / "ledger.bin") % 40 == 0
