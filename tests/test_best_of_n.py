"""Best-of-n rejection sampling: the pick rule on a table; teacher samples scored by the fake teacher acting as a
judge keep the highest score, write preference pairs, and are taken as they are by `imitate curate --score-field`
and `load_records`; a kill -9 in the middle of judging (and of local student sampling) resumes without buying or
generating again what was done; the student sampled locally and scored by a tiny reward model; the reward model's
batched scores equal one-at-a-time scores; bad options in one line."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_fixtures import smol_tokenizer, tiny_model_dir

from imitate.cli import main
from imitate.errors import InputError
from imitate.evaluate.answers import PromptJournal
from imitate.evaluate.bestofn import pick
from imitate.records import Message, Provenance, Query, Record, read_jsonl
from imitate.teacher.fake import FakeTeacherServer
from imitate.train.data import load_records

REPO = Path(__file__).resolve().parents[1]


def sample(i: int) -> Record:
    q = Query(id="q", question="Q?")
    prov = Provenance(teacher="t", model="m", base_url="", request_key=str(i), sample_index=i)
    return Record(id=f"q/t/{i}", query=q, messages=q.messages(None), response=f"answer {i}", provenance=prov)


@pytest.mark.parametrize(
    ("scores", "keep", "best", "worst"),
    [
        ([3.0, 9.0, 5.0], "best", 1, None),
        ([3.0, 9.0, 5.0], "best-worst", 1, 0),
        ([7.0, 7.0, 2.0, 2.0], "best-worst", 0, 3),  # ties: the best at the lower index, the worst at the higher
        ([None, 4.0, None], "best-worst", 1, None),  # one scored sample: no pair
        ([6.0, 6.0], "best-worst", 0, None),  # all equal: nothing to prefer
        ([None, None], "best", None, None),  # nothing scored: nothing kept
        ([None, 2.0, 8.0], "best", 2, None),  # an unscored sample is never picked
    ],
)
def test_pick(scores, keep, best, worst):
    samples = [(sample(i), s) for i, s in enumerate(scores)]
    b, w = pick(samples, keep)
    assert (b and b.provenance.sample_index, w and w.provenance.sample_index) == (best, worst)


def test_prompt_journal_cuts_a_torn_tail(tmp_path: Path):
    path = tmp_path / "j.jsonl"
    j = PromptJournal(path)
    j.append("k1", "q1", ["a", "b"])
    with open(path, "a") as f:
        f.write('{"key": "k2", "id": "q2", "val')  # killed in the middle of a write
    again = PromptJournal(path)
    assert again.get("k1") == ["a", "b"] and again.get("k2") is None
    again.append("k2", "q2", [1.5])
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["k1", "k2"]


def prompts_file(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "question": f"Explain topic number {i}."}) + "\n"
                            for i in range(n)))  # fmt: skip
    return path


def by_prompt(records: list[Record]) -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = {}
    for r in records:
        out.setdefault(r.query.id, []).append(r)
    return out


@pytest.mark.integration
def test_teacher_samples_judged_keep_the_best_and_feed_curate_and_train(make_fake_teacher, tmp_path: Path, capsys):
    fake = make_fake_teacher(vary=True)  # n asks of one prompt give n different answers, like sampling
    out, prompts = tmp_path / "bon", prompts_file(tmp_path, 8)
    args = ["generate", "best-of-n", str(prompts), "--out", str(out), "--n", "4", "--base-url", fake.base_url,
            "--preset", "none", "--keep", "best-worst", "--quiet"]  # fmt: skip
    assert main(args) == 0
    assert "8 of 8 prompts kept their best of 4 (teacher samples, judge scores): 32 samples" in capsys.readouterr().out
    kept = list(read_jsonl(out / "records.jsonl"))
    samples = by_prompt(list(read_jsonl(out / "samples.jsonl")))
    assert len(kept) == 8 and all(r.tags == ["best-of-n"] for r in kept)
    spread = 0
    for r in kept:
        scores = [s.scores["judge"] for s in samples[r.query.id]]
        assert len(scores) == 4 and len({s.response for s in samples[r.query.id]}) == 4
        assert r.scores["judge"] == max(scores) and r.provenance.sample_index == scores.index(max(scores))
        assert r.provenance.teacher == "default" and r.provenance.params.temperature == 0.7
        spread += max(scores) > min(scores)
    assert spread >= 6  # the choice was a real one
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == spread
    for p in pairs:
        mine = {s.id: s for s in samples[p["id"]]}
        assert p["chosen"] == mine[p["chosen_id"]].response and p["rejected"] == mine[p["rejected_id"]].response
        assert p["score_chosen"] == max(s.scores["judge"] for s in mine.values()) > p["score_rejected"]
        assert p["prompt"] == f"Explain topic number {p['id'][1:]}." and p["scorer"] == "judge"
    m = json.loads((out / "manifest.json").read_text())
    assert m["billable"]["samples"]["requests"] == 32 == m["billable"]["judge"]["requests"]
    assert m["judge"]["prompt"]["id"] == "judge-single"

    bought = fake.stats()["requests"]
    assert main(args) == 0 and fake.stats()["requests"] == bought  # a rerun buys nothing
    assert (out / "records.jsonl").read_text() == "".join(r.to_json() + "\n" for r in kept)

    assert [r.id for r in load_records(out)] == [r.id for r in kept]  # imitate train reads the folder as it is
    assert main(["curate", str(out), "--out", str(tmp_path / "top"), "--top-k", "3", "--score-field", "judge"]) == 0
    top = list(read_jsonl(tmp_path / "top" / "records.jsonl"))
    assert sorted(r.scores["judge"] for r in top) == sorted(r.scores["judge"] for r in kept)[-3:]


def _lines(path: Path) -> int:
    files = sorted(path.glob("shard-*.jsonl")) if path.is_dir() else [path] if path.exists() else []
    return sum(p.read_bytes().count(b"\n") for p in files)


def _kill_when(args: list[str], ready, timeout: float = 90) -> None:
    p = subprocess.Popen([sys.executable, "-m", "imitate.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + timeout
    while not ready() and p.poll() is None:
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)
    p.kill()
    _, err = p.communicate(timeout=30)
    assert p.returncode == -9, err


@pytest.mark.integration
def test_kill_9_while_judging_rebuys_only_what_was_in_flight(tmp_path: Path, capsys):
    out, n_prompts, n, concurrency = tmp_path / "bon", 20, 2, 4
    prompts = prompts_file(tmp_path, n_prompts)
    with FakeTeacherServer(process=True, vary=True, latency_s=0.03, jitter_s=0.03) as fake:
        args = ["generate", "best-of-n", str(prompts), "--out", str(out), "--n", str(n), "--base-url",
                fake.base_url, "--preset", "none", "--quiet",
                "--set", f"harvest.teachers.0.max_concurrency={concurrency}"]  # fmt: skip
        _kill_when(args, lambda: _lines(out / "judge") >= 8)
        judged = _lines(out / "judge")
        assert 8 <= judged < n_prompts * n and not (out / "manifest.json").exists()
        assert main(args) == 0
        served = fake.stats()["completed"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["kept"] == n_prompts and len(list(read_jsonl(out / "records.jsonl"))) == n_prompts
    assert m["this_run"]["sample_requests"] == 0  # every sample was bought before the kill
    assert m["billable"]["samples"]["requests"] == n_prompts * n
    resent = m["this_run"]["judge"]["resent_after_crash"]
    assert m["billable"]["judge"]["requests"] - n_prompts * n == resent <= concurrency  # only what was in flight
    assert m["this_run"]["judge"]["requests"] == n_prompts * n - judged  # those in flight at the kill among them
    assert served <= m["billable"]["samples"]["requests"] + m["billable"]["judge"]["requests"]


# ---------------------------------------------------------------------------------------------- student, reward


def tiny_reward_model(dest: Path, seed: int = 0, labels: int = 1) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = smol_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      num_labels=labels, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)  # fmt: skip
    torch.manual_seed(seed)
    LlamaForSequenceClassification(cfg).save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random student and a tiny random reward model, saved once for the tests that use them."""
    root = tmp_path_factory.mktemp("models")
    return tiny_model_dir(root / "student"), tiny_reward_model(root / "rm")


@pytest.mark.integration
def test_reward_model_scores_in_batches_as_one_at_a_time(models, tmp_path: Path):
    from imitate.evaluate.reward import RewardModel

    rm = RewardModel(models[1], batch_size=3)
    user = [Message(role="user", content="Why is the sea salty?")]
    pairs = [(user, "Rivers carry dissolved minerals."), (user, "No idea."), (user, "Salt " * 40), (user, "")]
    batched = rm.score(pairs)
    single = [rm.score([p])[0] for p in pairs]
    assert batched == pytest.approx(single, abs=1e-5) and len(set(batched)) == 4
    with pytest.raises(InputError, match="has 2 outputs; a reward model has one"):
        RewardModel(tiny_reward_model(tmp_path / "two", labels=2))
    with pytest.raises(InputError, match="not a model folder"):
        RewardModel(tmp_path)


@pytest.mark.integration
def test_student_samples_scored_by_a_reward_model(models, tmp_path: Path, capsys):
    from imitate.evaluate.reward import RewardModel

    student, rm = models
    out, prompts = tmp_path / "bon", prompts_file(tmp_path, 3)
    args = ["generate", "best-of-n", str(prompts), "--out", str(out), "--n", "3", "--source", "student",
            "--student-model", str(student), "--temperature", "1.0", "--max-new-tokens", "8", "--scorer", "reward",
            "--reward-model", str(rm), "--keep", "best-worst", "--quiet"]  # fmt: skip
    assert main(args) == 0
    samples = by_prompt(list(read_jsonl(out / "samples.jsonl")))
    kept = list(read_jsonl(out / "records.jsonl"))
    scorer = RewardModel(rm)
    for r in kept:
        mine = samples[r.query.id]
        assert len({s.response for s in mine}) == 3  # sampled, not greedy
        expected = scorer.score([(s.messages, s.response) for s in mine])
        assert [s.scores["reward"] for s in mine] == pytest.approx(expected, abs=1e-5)
        assert r.scores["reward"] == max(s.scores["reward"] for s in mine)
        assert r.provenance.teacher == "student" and r.provenance.params.temperature == 1.0
    assert len((out / "pairs.jsonl").read_text().splitlines()) == 3
    m = json.loads((out / "manifest.json").read_text())
    assert m["this_run"]["student_prompts_generated"] == 3 and m["this_run"]["reward_prompts_scored"] == 3
    assert main(args) == 0  # a rerun generates and scores nothing again
    m = json.loads((out / "manifest.json").read_text())
    assert m["this_run"]["student_prompts_generated"] == 0 and m["this_run"]["reward_prompts_scored"] == 0
    assert list(read_jsonl(out / "records.jsonl")) == kept


@pytest.mark.integration
def test_kill_9_while_sampling_the_student_resumes_at_the_next_prompt(models, tmp_path: Path):
    student, rm = models
    out, prompts = tmp_path / "bon", prompts_file(tmp_path, 16)
    journal = out / "student_samples.jsonl"
    args = ["generate", "best-of-n", str(prompts), "--out", str(out), "--n", "2", "--source", "student",
            "--student-model", str(student), "--max-new-tokens", "4", "--scorer", "reward",
            "--reward-model", str(rm), "--quiet"]  # fmt: skip
    _kill_when(args, lambda: _lines(journal) >= 2)
    done = len(PromptJournal(journal).rows)  # a torn last line is not a done prompt
    assert 2 <= done < 16 and not (out / "manifest.json").exists()
    assert main(args) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["this_run"]["student_prompts_generated"] == 16 - done and m["kept"] == 16


def test_bad_options_are_one_line(tmp_path: Path, capsys):
    prompts = prompts_file(tmp_path, 2)
    base = ["generate", "best-of-n", str(prompts), "--out", str(tmp_path / "o"), "--n", "2", "--quiet"]
    for extra, needle in [
        (["--scorer", "reward"], "--scorer reward needs --reward-model DIR"),
        (["--source", "student", "--temperature", "0"], "--temperature 0 makes the student's n answers identical"),
        (["--keep", "worst"], "--keep 'worst': expected best or best-worst"),
        # unset key variables are named before any prompt is sampled or model loaded
        (["--api-key-env", "IMITATE_TEST_UNSET_KEY"], "IMITATE_TEST_UNSET_KEY (teacher 'default'"),
        (
            [
                "--source",
                "student",
                "--student-model",
                str(tmp_path / "missing"),
                "--judge-api-key-env",
                "IMITATE_TEST_UNSET_KEY",
            ],
            "IMITATE_TEST_UNSET_KEY (teacher 'judge'",
        ),
    ]:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ConfigError") and needle in err[0], err
    assert main(["generate", "best-of-n", "--help"]) == 0
