"""`imitate curate`: each gate on crafted rows (and the drop file naming the reason), LIMA selection against the
offline greedy, prompt erasure, the manifest, the versioned phrase data, and one-line CLI errors."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from imitate.cli import main
from imitate.config import load_config
from imitate.dataset.curate import curate
from imitate.dataset.curate_config import CurateConfig, GateConfig, SelectConfig
from imitate.dataset.gates import build_gates, count_steps, failed, too_short, truncated
from imitate.dataset.phrases import PhraseMatcher, load_curation
from imitate.dataset.select import TopK, heuristic_score, structure
from imitate.errors import ConfigError
from imitate.prompts import PROMPTS_DIR_ENV, default_prompts_dir
from imitate.records import Message, Provenance, Query, Record, write_jsonl

REPO = Path(__file__).resolve().parents[1]
# Editing prompts/curation.yaml must fail here until these pins are bumped on purpose (manifests name them).
PHRASES_SHA = "7b9ae8ff561545955eff3abfd994667cdbd4e6c900bcb9c1608206b2575b74eb"
GENERIC_SHA = "bffffd1fa587608636eece3f254a2830331ba7474b1e51c2c8bc61d875a07531"
LOREM = (
    "Rivers carve valleys over thousands of years while wind shapes dunes and glaciers grind mountains into "
    "gravel so the landscape we see today is a snapshot of slow forces acting on rock soil and water"
)


def rec(i, answer="Paris is the capital of France.", question=None, *, system="Be thorough.", **kw) -> Record:
    question = question or f"Question number {i}?"
    prov = Provenance(
        teacher="t",
        model="m",
        base_url="http://x",
        request_key=f"k{i}",
        system_prompt_id="6",
        system_prompt_sha256="e" * 64,
        finish_reason=kw.pop("finish_reason", "stop"),
    )
    query = Query(id=f"q{i}", question=question, collection=kw.pop("collection", None))
    messages = [Message(role="system", content=system)] if system else []
    messages.append(Message(role="user", content=question))
    return Record(id=f"r{i}", query=query, messages=messages, response=answer, provenance=prov, **kw)


def run(tmp_path: Path, rows: list[Record], **cfg) -> tuple[dict, list[Record], list[dict]]:
    src = tmp_path / "in.jsonl"
    write_jsonl(src, rows)
    out = tmp_path / "out"
    manifest = curate(src, out, CurateConfig.model_validate(cfg))
    kept = [Record.from_json(line) for line in (out / "records.jsonl").read_text().splitlines()]
    dropped = [json.loads(line) for line in (out / "dropped.jsonl").read_text().splitlines()]
    assert manifest == json.loads((out / "manifest.json").read_text())
    return manifest, kept, dropped


def drops(dropped: list[dict]) -> dict[str, tuple[str, str]]:
    return {d["record"]["id"]: (d["gate"], d["reason"]) for d in dropped}


# ---------------------------------------------------------------------------------------------- gates


def test_every_default_gate_on_crafted_rows(tmp_path):
    rows = [
        rec(1, LOREM),
        Record(
            id="r2",
            query=Query(id="q2", question="x"),
            messages=[Message(role="user", content="x")],
            status="failed",
            error_class="ServerError",
            error_message="HTTP 500",
            provenance=Provenance(teacher="t", model="m", base_url="", request_key="k2"),
        ),
        rec(3, "The answer stops in the midd", finish_reason="length"),
        rec(4, "   "),
        rec(5, "I\u2019m sorry, but I can\u2019t help with that request."),  # curly apostrophes
        rec(6, "Sure. " + LOREM + " As an AI language model I have no views on rivers."),
        rec(7, LOREM.upper() + "!!!", question="Question number 1?"),  # same conversation as r1 once normalised
        rec(8, LOREM.replace("and water", "and ice"), question="Question   number 1?"),  # last word changed
        rec(9, "A fine, distinct answer about something else entirely, with enough words in it."),
    ]
    manifest, kept, dropped = run(tmp_path, rows)
    assert [r.id for r in kept] == ["r1", "r9"]
    assert drops(dropped) == {
        "r2": ("failed", "request failed: ServerError: HTTP 500"),
        "r3": ("truncated", "finish_reason=length (cut by max_tokens)"),
        "r4": ("empty", "empty answer"),
        "r5": ("refusal", "refusal: \"i'm sorry, but i can't\""),
        "r6": ("refusal", "disclaimer: 'as an ai language model'"),
        "r7": ("exact_duplicate", "exact duplicate of r1"),
        "r8": ("near_duplicate", "near-duplicate of r1"),
    }
    assert manifest["gates"] == {
        "failed": 1,
        "truncated": 1,
        "empty": 1,
        "refusal": 2,
        "exact_duplicate": 1,
        "near_duplicate": 1,
    }
    assert (
        manifest["input"]["read"] == 9 and manifest["output"]["kept"] == 2 and manifest["output"]["dropped_rows"] == 7
    )
    # a dropped row is kept whole, so nothing is lost
    assert Record.model_validate(dropped[0]["record"]).id == "r2"


def test_switching_gates_off_and_thresholds(tmp_path):
    rows = [
        rec(1, "Short answer.", finish_reason="length"),
        rec(2, "1. Mix the flour.\n2. Add water.\n3. Knead.\nStep 4: bake it."),
        rec(3, "1. a\n2. b\n3. c\n" + "word " * 50),
    ]
    cfg = {"gates": {"truncated": False, "min_words": 3, "min_steps": 3, "max_words": 40}}
    manifest, kept, dropped = run(tmp_path, rows, **cfg)
    assert [r.id for r in kept] == ["r2"]
    assert drops(dropped) == {
        "r1": ("too_short", "2 words < min_words 3"),
        "r3": ("too_long", "61 words > 40"),  # the whole conversation: system (2), question (3) and answer
    }
    assert "truncated" not in manifest["gates"] and manifest["gates"]["too_short"] == 1


def test_min_steps_counts_numbered_and_bulleted_lines():
    assert count_steps("1. a\n2) b\n- c\n* d\n\u2022 e\nStep 6 f\nnot 7. here") == 6
    gate = too_short(1, 2)
    assert gate(rec(1, "Just one line.")) == "0 reasoning steps < min_steps 2"
    assert gate(rec(1, "1. first\n2. second")) is None


def test_pure_gates():
    assert failed(rec(1)) is None and truncated(rec(1)) is None
    assert truncated(rec(1, truncated=True)) == "truncated answer"


def test_too_long_by_the_students_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # "a,b" is 3 tokens but 1 word
    tok.save(str(tmp_path / "tokenizer.json"))
    rows = [rec(1, "a,b,c,d,e", system=None, question="q"), rec(2, "abcde", system=None, question="q2")]
    cfg = {"gates": {"max_tokens": 5, "tokenizer": str(tmp_path)}}  # a model folder holding tokenizer.json
    manifest, kept, dropped = run(tmp_path, rows, **cfg)
    assert [r.id for r in kept] == ["r2"]
    assert drops(dropped) == {"r1": ("too_long", "10 tokens > 5")}
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        build_gates(GateConfig(max_tokens=5, tokenizer=str(tmp_path / "nope")), load_curation().phrases)


def test_refusal_window_and_extra_phrases(tmp_path):
    matcher = PhraseMatcher(["i can't help"], ["as an ai"], window=20)
    assert matcher.find("I can't help with that.") == ("refusal", "i can't help")
    assert matcher.find("Here is a long preamble first. I can't help it, I love rivers.") is None
    assert matcher.find("Long answer... and AS AN  AI, I note") == ("disclaimer", "as an ai")
    extra = tmp_path / "phrases.yaml"
    extra.write_text("refusals: ['no way, friend']\ndisclaimers: ['beep boop']\n")
    lines = tmp_path / "phrases.txt"
    lines.write_text("# my list\nrobot voice\n\n")
    rows = [rec(1, "No way, friend. " + LOREM), rec(2, LOREM + " beep boop"), rec(3, "I speak in a Robot voice.")]
    manifest, kept, dropped = run(tmp_path, rows, gates={"phrases_file": str(extra)})
    assert set(drops(dropped)) == {"r1", "r2"}
    assert manifest["phrases"]["id"] == "curation-phrases" and manifest["phrases"]["extra"] == 2
    assert manifest["phrases"]["effective_sha256"] != manifest["phrases"]["sha256"] == PHRASES_SHA
    _, kept, dropped = run(tmp_path, rows, gates={"phrases_file": str(lines), "extra_phrases": ["beep boop"]})
    assert set(drops(dropped)) == {"r2", "r3"}


def test_language_gate(tmp_path):
    rows = [
        rec(1, "The weather is lovely today and we are going to walk along the river.", question="How is it?"),
        rec(2, "Das Wetter ist heute schön und wir gehen am Fluss spazieren.", question="Wie ist das Wetter?"),
    ]
    manifest, kept, dropped = run(tmp_path, rows, gates={"languages": ["en"]})
    assert [r.id for r in kept] == ["r1"]
    gate, reason = drops(dropped)["r2"]
    assert gate == "language" and reason.startswith("language de (")


def test_rouge_gate_and_only_kept_rows_are_indexed(tmp_path):
    rows = [
        rec(1, LOREM, question="Write a short poem about the sea."),
        rec(
            2,
            "Waves and salt and distant gulls, a quiet poem of the tide.",
            question="Write a short poem about the sea!",
        ),
        # the same answer as r2, which was dropped: r3 must not be called a duplicate of a row not in the output
        rec(3, "Waves and salt and distant gulls, a quiet poem of the tide.", question="List three prime numbers."),
    ]
    # duplicates judged on the answer alone: r3 repeats r2's answer exactly
    gates = {"max_rouge": 0.7, "exact_field": "response", "near_dup": {"field": "response"}}
    manifest, kept, dropped = run(tmp_path, rows, gates=gates)
    assert [r.id for r in kept] == ["r1", "r3"]
    gate, reason = drops(dropped)["r2"]
    assert gate == "similar_instruction" and reason == "ROUGE-L 1.000 > 0.7 against the question of r1"


def test_other_formats_stream_in(tmp_path):
    src = tmp_path / "alpaca.jsonl"
    rows = [
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Name a colour.", "input": "", "output": "blue"},
        {"instruction": "Say hi.", "input": "", "output": "As an AI language model, hi."},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = curate(src, tmp_path / "out", CurateConfig())
    assert manifest["input"]["formats"] == {"alpaca": 3}
    assert manifest["gates"]["exact_duplicate"] == 1 and manifest["gates"]["refusal"] == 1
    assert manifest["output"]["kept"] == 1


# ---------------------------------------------------------------------------------------------- selection


def greedy(items: list[tuple[float, object]], k: int, cap: int | None) -> list[int]:
    """The offline definition: best first (earlier first among ties), skip a row whose group is full."""
    order = sorted(range(len(items)), key=lambda i: (-items[i][0], i))
    taken, per = [], {}
    for i in order:
        g = items[i][1]
        if cap is not None and per.get(g, 0) >= cap:
            continue
        taken.append(i)
        per[g] = per.get(g, 0) + 1
        if len(taken) == k:
            break
    return sorted(taken)


def test_streaming_top_k_is_the_offline_greedy():
    rng = random.Random(11)
    for _ in range(300):
        n, k = rng.randint(0, 80), rng.randint(1, 12)
        cap = rng.choice([None, 1, 2, 3])
        items = [(float(rng.randint(0, 9)), rng.randint(0, 5)) for _ in range(n)]  # many ties
        records = [rec(i) for i in range(n)]
        dropped: list[str] = []
        top = TopK(k, cap, lambda r, reason, dropped=dropped: dropped.append(r.id))
        for r, (score, group) in zip(records, items, strict=True):
            top.offer(r, score, group)
            assert len(top._heap) <= 2 * k + 64  # memory O(k), dead entries included
        want = greedy(items, k, cap)
        assert [r.id for r in top.kept()] == [f"r{i}" for i in want]
        assert sorted(dropped) == sorted(f"r{i}" for i in range(n) if i not in want)  # each once, all final


def test_top_k_memory_stays_bounded_on_a_long_stream():
    top = TopK(5, 2, lambda r, reason: None)
    record = rec(0)
    for i in range(20000):
        top.offer(record, float(i % 997), i % 13)
    assert len(top) == 5 and len(top._heap) <= 2 * 5 + 64
    assert sum(len(h) for h in top._groups.values()) <= 5 * 2 + 8 * len(top._groups)


def test_heuristic_score_prefers_long_structured_stepwise_answers():
    cfg = SelectConfig(k=1)
    plain = rec(1, "Yes.")
    rich = rec(
        2, "## Plan\n\n1. **Measure** the room.\n2. Buy paint.\n3. Paint.\n\n```\ncode\n```\n| a | b |\n" + LOREM
    )
    assert structure(rich.response) == 1.0 and structure("plain") == 0.0
    assert heuristic_score(rich, cfg) > heuristic_score(plain, cfg)


def test_lima_selection_with_a_judge_score_and_a_collection_cap(tmp_path):
    rows = [rec(i, f"Answer {i}: {LOREM[: 20 + i]}", collection="ab"[i % 2]) for i in range(8)]
    for i, r in enumerate(rows):
        r.scores = {"judge": float(i)}
    rows[5].scores = {}  # unscored
    select = {"k": 3, "score": "judge", "per_collection": 2}
    manifest, kept, dropped = run(tmp_path, rows, gates={"near_dup": {"enabled": False}}, select=select)
    # by judge: 7(b) 6(a) 4(a) 3(b) ...; 5 has no score; a cap of 2 per collection does not bind before k=3
    assert [r.id for r in kept] == ["r4", "r6", "r7"]
    assert manifest["gates"]["unscored"] == 1 and manifest["gates"]["not_selected"] == 4
    assert drops(dropped)["r5"] == ("unscored", "no numeric score 'judge' in record.scores")
    _, kept, _ = run(tmp_path, rows, gates={"near_dup": {"enabled": False}}, select=select | {"per_collection": 1})
    assert [r.id for r in kept] == ["r6", "r7"]  # one per collection, only two collections


def test_per_cluster_keeps_the_best_of_each_near_duplicate_cluster(tmp_path):
    other = "Completely different text about baking bread with flour water salt and yeast in a hot oven today"
    rows = [
        rec(1, LOREM, question="q"),
        rec(2, LOREM + " Also glaciers.", question="q"),  # near-duplicate of r1, longer: scores higher
        rec(3, other, question="q3"),
        rec(4, other + " Really.", question="q3"),
    ]
    manifest, kept, dropped = run(tmp_path, rows, select={"k": 10, "per_cluster": 1})
    assert [r.id for r in kept] == ["r2", "r4"]
    assert manifest["gates"]["near_duplicate"] == 0 and manifest["gates"]["not_selected"] == 2
    assert manifest["near_dup"]["cluster_mode"] is True
    assert "better rows in its cluster r1" in drops(dropped)["r1"][1]


def test_selection_config_is_checked():
    with pytest.raises(ValueError, match="not both"):
        SelectConfig(k=3, per_cluster=1, per_collection=1)
    with pytest.raises(ValueError, match="needs k"):
        SelectConfig(per_cluster=1)


# ---------------------------------------------------------------------------------------------- erasure


def test_prompt_erasure_generic_and_none(tmp_path):
    rows = [rec(1, LOREM), rec(2, "Another good answer here about rivers.", system=None)]
    manifest, kept, _ = run(tmp_path, rows, erase_system="generic")
    generic = load_curation().generic_system
    for r in kept:
        assert r.messages[0] == Message(role="system", content=generic.text)
        assert [m.role for m in r.messages] == ["system", "user"]
        assert r.provenance.erased_system == "generic"
    assert kept[0].provenance.system_prompt_id == "6" and kept[0].provenance.system_prompt_sha256 == "e" * 64
    assert kept[0].response == LOREM and kept[0].query.question == "Question number 1?"
    assert manifest["erase_system"] == {"mode": "generic", "id": "generic-system", "sha256": GENERIC_SHA}
    _, kept, _ = run(tmp_path, rows, erase_system="none")
    assert all([m.role for m in r.messages] == ["user"] and r.provenance.erased_system == "none" for r in kept)


# ---------------------------------------------------------------------------------------------- data and CLI


def test_shipped_curation_data_is_pinned():
    curation = load_curation()
    assert curation.phrases.sha256 == PHRASES_SHA and curation.generic_system.sha256 == GENERIC_SHA
    assert curation.phrases.content_sha256() == PHRASES_SHA
    assert all(p == p.lower() for p in curation.phrases.refusals + curation.phrases.disclaimers)


def test_an_edited_phrase_list_needs_a_new_hash(tmp_path, monkeypatch):
    shutil.copytree(default_prompts_dir(), tmp_path / "p")
    f = tmp_path / "p" / "curation.yaml"
    f.write_text(f.read_text().replace('"i must decline"', '"i shall decline"'))
    monkeypatch.setenv(PROMPTS_DIR_ENV, str(tmp_path / "p"))
    with pytest.raises(ConfigError, match="phrases.sha256 does not match"):
        load_curation()


def test_config_section_and_flags_layer():
    cfg = load_config(None, ["curate.gates.near_dup.threshold=0.9", "curate.select.k=5"])
    assert cfg.curate.gates.near_dup.threshold == 0.9 and cfg.curate.select.k == 5
    with pytest.raises(ConfigError, match="curate.gates.near_dup.shingles: unknown key"):
        load_config(None, ["curate.gates.near_dup.shingles=3"])


def test_cli_curates_and_prints_a_summary(tmp_path, capsys):
    rows = [rec(1, LOREM), rec(2, LOREM + ".", question="Question number 1?"), rec(3, "I cannot comply with this.")]
    write_jsonl(tmp_path / "in.jsonl", rows)
    code = main(["curate", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o"), "--erase-system", "none",
                 "--no-exact-dup", "--near-dup-threshold", "0.9", "--lang", "en"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "3 rows: kept 1" in out and "refusal 1" in out and "near_duplicate 1" in out
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["settings"]["gates"]["exact_dedup"] is False and m["near_dup"]["threshold"] == 0.9
    assert m["settings"]["gates"]["languages"] == ["en"] and m["command"].startswith("imitate curate ")


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--erase-system", "all"], 2, "curate.erase_system: Input should be 'generic' or 'none'"),
        (["--max-tokens", "10"], 2, "max_tokens counts with the student's tokenizer"),
        (["--per-cluster", "2"], 2, "a diversity cap needs k"),
        (["--shingle-unit", "line"], 2, "curate.gates.near_dup.unit"),
    ],
)
def test_cli_config_errors_are_one_line(tmp_path, capsys, args, code, needle):
    write_jsonl(tmp_path / "in.jsonl", [rec(1)])
    assert main(["curate", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o"), *args]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ConfigError") and needle in err[0], err
    assert not (tmp_path / "o").exists()


def test_text_flags_stay_text(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [rec(1)])
    assert main(["curate", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o"), "--score-field", "123",
                 "--top-k", "1", "--tokenizer", "7"]) == 0  # fmt: skip
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["settings"]["select"]["score"] == "123" and m["settings"]["gates"]["tokenizer"] == "7"
    assert m["gates"]["unscored"] == 1


def test_cli_input_errors_are_one_line_and_write_nothing_half(tmp_path, capsys):
    assert main(["curate", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 3
    assert capsys.readouterr().err.strip().startswith("error: InputError: ")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(rec(1).to_json() + "\n" + rec(2).to_json() + "\n{not json\n")
    assert main(["curate", str(bad), "--out", str(tmp_path / "o")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl:3" in err[0]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == []  # no records, drops or manifest
    assert main(["curate", str(bad), "--out", str(tmp_path / "o"), "--skip-bad-rows"]) == 0
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["input"]["bad_rows_skipped"] == 1
    harvest = tmp_path / "h"
    harvest.mkdir()
    write_jsonl(harvest / "shard-00000.jsonl", [rec(1)])
    assert main(["curate", str(harvest), "--out", str(harvest / "curated")]) == 3
    assert "inside the input" in capsys.readouterr().err and not (harvest / "curated").exists()


def test_the_console_script_prints_one_line():
    r = subprocess.run(
        [sys.executable, "-m", "imitate.cli", "curate", "nope.jsonl", "--out", "data/runs/never-curated"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 3 and r.stderr.strip() == "error: InputError: nope.jsonl: no such file or folder"
    assert not (REPO / "data" / "runs" / "never-curated" / "records.jsonl").exists()


def test_a_harvest_folders_failed_rows_meet_the_failed_gate_once_and_only_while_unanswered(tmp_path):
    """failures.jsonl keeps every failure line ever written: a request that failed twice counts once (its last
    line), and one that a later run answered does not count at all."""
    from imitate.harvest.journal import Journal

    def failure(i: int, cls: str) -> Record:
        r = rec(i, None, status="failed", error_class=cls, error_message="boom")
        r.provenance.request_key = f"{i:064x}"
        return r

    def answer(i: int) -> Record:
        r = rec(i, LOREM + f" {i}")
        r.provenance.request_key = f"{i:064x}"
        return r

    harvest = tmp_path / "harvest"
    with Journal(harvest) as journal:
        for r in (failure(1, "ServerError"), failure(2, "BadRequest"), failure(3, "ServerError")):
            journal.append(r)
        for r in (failure(1, "ServerError"), answer(3), answer(4)):  # a second run: 1 fails again, 3 answered
            journal.append(r)
    manifest = curate(harvest, tmp_path / "out", CurateConfig())
    dropped = [json.loads(line) for line in (tmp_path / "out" / "dropped.jsonl").read_text().splitlines()]
    kept = [Record.from_json(line) for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert sorted(d["record"]["id"] for d in dropped if d["gate"] == "failed") == ["r1", "r2"]
    assert manifest["gates"]["failed"] == 2
    assert sorted(r.id for r in kept) == ["r3", "r4"]
