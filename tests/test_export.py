"""`imitate export`: the folder `datasets.load_dataset` reads (each format), the card's metadata and provenance
figures, no secret in any exported byte, atomic replacement, one-line errors, and the push to a loopback Hub."""

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from hub_fixtures import FakeHub

from imitate.cli import main
from imitate.dataset.formats import read_records, record_to_row
from imitate.records import Record
from imitate.teacher.fake import FakeTeacherServer

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
KEY_ENV, KEY = "IMITATE_EXPORT_TEST_KEY", "sk-export-test-planted-4f9d2c"
QUESTIONS = [
    "Why is the sky blue?",
    "What is 2+2?",
    "Name a river. [[fault:400]]",
    "How do plants grow?",
    "What is a prime?",
    "Why do cats purr?",
    "What is rain?",
    "How far is the moon?",
]


@pytest.fixture(scope="module")
def harvest_dir(tmp_path_factory) -> Path:
    """A real harvest through the fake teacher (orca system messages, prices set, one BadRequest failure)."""
    root = tmp_path_factory.mktemp("harvest")
    queries = root / "q.jsonl"
    queries.write_text("".join(json.dumps({"id": f"r{i}", "question": q}) + "\n" for i, q in enumerate(QUESTIONS)))
    out = root / "h"
    with FakeTeacherServer() as fake, pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, KEY)
        code = main(
            [
                "harvest",
                str(queries),
                "--out",
                str(out),
                "--base-url",
                fake.base_url,
                "--api-key-env",
                KEY_ENV,
                "--quiet",
                "--set",
                "prices.fake-teacher.input_per_mtok=2",
                "--set",
                "prices.fake-teacher.output_per_mtok=8",
            ]
        )
    assert code == 0 and (out / "manifest.json").exists()
    return out


def ok_records(src: Path) -> list[Record]:
    return [r for r in read_records(src) if r.status == "ok"]


def load(folder: Path, tmp_path: Path):
    import datasets

    return datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "hf-cache"))


def front_matter(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    head, _, body = text[4:].partition("\n---\n")
    return yaml.safe_load(head), body


def no_nulls(row: dict) -> dict:
    return {k: v for k, v in row.items() if v is not None}


# ------------------------------------------------------------------ the folder and its rows


@pytest.mark.parametrize("fmt", ["openorca", "sharegpt", "messages", "imitate"])
def test_each_format_loads_with_datasets_as_the_records_rows(harvest_dir: Path, tmp_path: Path, fmt: str):
    out = tmp_path / "export"
    assert main(["export", str(harvest_dir), "--out", str(out), "--format", fmt, "--shard-rows", "3"]) == 0
    records = ok_records(harvest_dir)
    shards = sorted(p.name for p in (out / "data").iterdir())
    assert shards == ["train-00000-of-00003.parquet", "train-00001-of-00003.parquet", "train-00002-of-00003.parquet"]
    rows = [no_nulls(r) for r in load(out, tmp_path)["train"]]
    if fmt == "imitate":
        assert [Record.from_json(r["json"]) for r in rows] == records
    else:
        assert rows == [record_to_row(r, fmt) for r in records]


def test_shards_share_one_schema_when_rows_differ(tmp_path: Path):
    """A column absent from one shard (collection) and extra columns of any type (query metadata) load as one
    table: the extras are text (JSON for non-strings), missing cells are nulls."""
    src = tmp_path / "chats.jsonl"
    rows = []
    for i in range(6):
        row = {"id": f"c{i}", "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
        if i >= 2:
            row["collection"] = "late"
        row["extra"] = [i, {"k": i}] if i % 2 else f"s{i}"
        rows.append(row)
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "export"
    assert main(["export", str(src), "--out", str(out), "--shard-rows", "2"]) == 0
    got = list(load(out, tmp_path)["train"])
    assert [r["collection"] for r in got] == [None, None, "late", "late", "late", "late"]
    assert [r["extra"] for r in got] == ["s0", '[1, {"k": 1}]', "s2", '[3, {"k": 3}]', "s4", '[5, {"k": 5}]']
    assert [r["messages"] for r in got] == [r["messages"] for r in rows]


def test_alpaca_rows_and_imported_provenance(tmp_path: Path):
    src = tmp_path / "alpaca.json"
    given = [
        {"instruction": f"Add {i} and 1.", "input": "" if i % 2 else f"n={i}", "output": str(i + 1)} for i in range(7)
    ]
    src.write_text(json.dumps(given))
    out = tmp_path / "export"
    assert main(["export", str(src), "--out", str(out), "--format", "alpaca", "--licence", "cc-by-4.0"]) == 0
    rows = load(out, tmp_path)["train"]
    assert [{k: r[k] for k in ("instruction", "input", "output")} for r in rows] == given
    meta, body = front_matter(out)
    assert meta["license"] == "cc-by-4.0"
    assert f"| {src} | alpaca | 7 |" in body and "keep the licence and terms of their source" in body


def test_test_split_by_id_hash(harvest_dir: Path, tmp_path: Path):
    out = tmp_path / "export"
    assert main(["export", str(harvest_dir), "--out", str(out), "--test-fraction", "0.5"]) == 0
    ds = load(out, tmp_path)
    train, test = {r["id"] for r in ds["train"]}, {r["id"] for r in ds["test"]}
    assert train and test and not train & test and train | test == {r.id for r in ok_records(harvest_dir)}
    meta, _ = front_matter(out)
    assert meta["configs"][0]["data_files"] == [
        {"split": "train", "path": "data/train-*.parquet"},
        {"split": "test", "path": "data/test-*.parquet"},
    ]


# ------------------------------------------------------------------ the card


def test_card_metadata_and_provenance_figures(harvest_dir: Path, tmp_path: Path):
    out = tmp_path / "export"
    assert main(["export", str(harvest_dir), "--out", str(out), "--name", "Demo set", "--language", "en"]) == 0
    meta, body = front_matter(out)
    assert meta["license"] == "unknown" and meta["pretty_name"] == "Demo set" and meta["language"] == ["en"]
    assert meta["task_categories"] == ["text-generation"] and meta["size_categories"] == ["n<1K"]
    assert {"imitate", "synthetic", "messages", "fake-teacher"} <= set(meta["tags"])
    assert meta["configs"] == [
        {"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}
    ]
    records = ok_records(harvest_dir)
    prompt = sum(r.provenance.usage.prompt_tokens for r in records)
    completion = sum(r.provenance.usage.completion_tokens for r in records)
    cost = sum(r.provenance.cost_usd for r in records)
    assert cost > 0
    assert f"| default | fake-teacher | {len(records)} | {prompt} | {completion} | {cost:.4f} |" in body
    for sp_id, n in Counter(r.provenance.system_prompt_id for r in records).items():
        assert f"| {sp_id} | " in body and f" | {n} | {n / len(records):.1%} |" in body
    assert '`{"max_tokens": 1024, "temperature": 0.7, "top_p": 1.0}` | 7 |' in body
    assert "| failed: BadRequest | 1 |" in body  # from the harvest manifest
    import hashlib

    assert hashlib.sha256((harvest_dir / "config.yaml").read_bytes()).hexdigest() in body
    assert "imitate version: 0.1.0" in body and "## Terms of use" in body and "`fake-teacher`" in body
    assert "No deduplication, filtering or selection is recorded" in body


def test_card_of_a_mix_follows_the_chain_to_the_harvest(harvest_dir: Path, tmp_path: Path):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": f"Say {i}", "input": "", "output": str(i)} for i in range(9)]))
    mixed = tmp_path / "mixed"
    assert main(["mix", f"{harvest_dir}=0.5", f"{alpaca}=0.5", "--out", str(mixed)]) == 0
    out = tmp_path / "export"
    assert main(["export", str(mixed), "--out", str(out), "--format", "sharegpt"]) == 0
    _, body = front_matter(out)
    assert "#### mix: `mixed`" in body and "#### harvest: `h`" in body
    assert (
        "| h | weight 0.5 | 7 | 0 | 0 | 7 | 0.5 |" in body and "| alpaca | weight 0.5 | 9 | 0 | 0 | 7 | 0.5 |" in body
    )
    assert "| mix:h | 7 |" in body and "| mix:alpaca | 7 |" in body
    assert "| failed: BadRequest | 1 |" in body


def test_card_of_a_curated_set_shows_its_gates_and_dedup_settings(harvest_dir: Path, tmp_path: Path):
    curated = tmp_path / "curated"
    assert main(["curate", str(harvest_dir), "--out", str(curated), "--top-k", "3"]) == 0
    out = tmp_path / "export"
    assert main(["export", str(curated), "--out", str(out)]) == 0
    assert len(load(out, tmp_path)["train"]) == 3  # the kept records, not dropped.jsonl
    _, body = front_matter(out)
    gates = json.loads((curated / "manifest.json").read_text())["gates"]
    assert gates["failed"] == 1  # the harvest's BadRequest row (failures.jsonl) meets the failed gate
    assert sum(gates.values()) == 5 and "#### curate: `curated`" in body and "#### harvest: `h`" in body
    for gate, n in gates.items():  # every gate that dropped rows, with its count, as the manifest says
        assert (f"| gates.{gate} | {n} |" in body) == (n > 0)
    assert "near_dup.threshold`: `0.8`" in body and "No deduplication" not in body


def test_a_stage_folder_exports_its_records_not_side_files_and_cards_its_inner_stages(harvest_dir, tmp_path):
    """Self-instruct's layout: records.jsonl beside side files, its own harvests in sub-folders."""
    stage = tmp_path / "stage"
    stage.mkdir()
    shutil.copy(harvest_dir / "shard-00000.jsonl", stage / "records.jsonl")
    (stage / "rejected.jsonl").write_text('{"instruction": "Draw a cat", "reason": "blacklisted"}\n')
    manifest = {
        "imitate_version": "0.1.0",
        "command": "imitate generate self-instruct seeds.jsonl --out stage",
        "rejected": {"similar": 3, "blacklisted": 1},
    }
    (stage / "manifest.json").write_text(json.dumps(manifest))
    shutil.copytree(harvest_dir, stage / "answer")
    out = tmp_path / "export"
    assert main(["export", str(stage), "--out", str(out)]) == 0
    assert len(load(out, tmp_path)["train"]) == len(ok_records(harvest_dir))
    _, body = front_matter(out)
    assert (
        "#### generate self-instruct: `stage`" in body
        and "| rejected.similar | 3 |" in body
        and "#### harvest: `answer`" in body
    )


def test_no_secret_in_any_exported_byte(harvest_dir: Path, tmp_path: Path, monkeypatch):
    """A key planted in the environment (named by the stamped config), in a manifest and in a record's base URL,
    must be absent from every file of the export, whatever the format."""
    src = tmp_path / "h"
    shutil.copytree(harvest_dir, src)
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["command"] += f" --set harvest.teachers.0.api_key={KEY}"
    manifest["note"] = f"someone pasted {KEY} here"
    manifest["config"]["harvest"]["teachers"][0]["base_url"] = "http://me:url-pass-31337@10.0.0.1/v1"
    (src / "manifest.json").write_text(json.dumps(manifest))
    shard = src / "shard-00000.jsonl"
    lines = shard.read_text().splitlines()
    first = json.loads(lines[0])
    first["provenance"]["base_url"] = "http://me:url-pass-31337@10.0.0.1/v1"
    first["response"] += f" (the key was {KEY})"
    shard.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    monkeypatch.setenv(KEY_ENV, KEY)
    for fmt in ("imitate", "openorca"):
        out = tmp_path / f"export-{fmt}"
        assert main(["export", str(src), "--out", str(out), "--format", fmt]) == 0
        files = [p for p in out.rglob("*") if p.is_file()]
        assert {p.name for p in files} >= {"README.md", "manifest.json", "train-00000-of-00001.parquet"}
        for path in files:
            texts = [path.read_bytes().decode("utf-8", "replace")]
            if path.suffix == ".parquet":  # pages are compressed: look at the values too
                texts.append(json.dumps(pq.read_table(path).to_pylist()))
            for text in texts:
                assert KEY not in text and "url-pass-31337" not in text, path
        assert "pasted *** here" in (out / "README.md").read_text()


# ------------------------------------------------------------------ atomic output and errors


def test_reexport_replaces_an_earlier_export_and_a_failed_one_changes_nothing(
    harvest_dir: Path, tmp_path: Path, capsys
):
    out = tmp_path / "export"
    assert main(["export", str(harvest_dir), "--out", str(out), "--shard-rows", "2"]) == 0
    assert main(["export", str(harvest_dir), "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "data").iterdir()) == ["train-00000-of-00001.parquet"]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    multi = tmp_path / "multi.jsonl"
    convo = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "bye"},
    ]
    multi.write_text(json.dumps({"messages": convo}) + "\n")
    capsys.readouterr()
    assert main(["export", str(multi), "--out", str(out), "--format", "openorca"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "openorca holds one question and one answer" in err[0] and "--skip-bad-rows" in err[0]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_bad_input_is_one_line(harvest_dir: Path, tmp_path: Path, capsys):
    empty, failed_only, taken = tmp_path / "empty", tmp_path / "failed", tmp_path / "taken"
    empty.mkdir()
    failed_only.mkdir()
    shutil.copy(harvest_dir / "failures.jsonl", failed_only / "rows.jsonl")
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    out = str(tmp_path / "o")
    cases = [
        ([str(empty), "--out", out], 3, "no *.jsonl or *.parquet record files"),
        ([str(tmp_path / "missing"), "--out", out], 3, "no such file or folder"),
        ([str(failed_only), "--out", out], 3, "no completed (status ok) records to export"),
        ([str(harvest_dir), "--out", str(taken)], 3, "exists and is not an earlier imitate export"),
        ([str(harvest_dir), "--out", out, "--format", "csv"], 3, "--format 'csv': unknown"),
        ([str(harvest_dir), "--out", out, "--licence", "Apache 2"], 3, "not a Hub licence id"),
        ([str(harvest_dir), "--out", out, "--private"], 3, "--private applies to a push"),
        ([str(harvest_dir), "--out", out, "--hub", "no-slash"], 3, "not a Hub repo id"),
    ]
    for args, code, needle in cases:
        assert main(["export", *args]) == code, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: InputError") and needle in err[0], (args, err)
    assert not Path(out).exists() and (taken / "notes.txt").read_text() == "mine"


def test_push_while_offline_is_one_hub_error(harvest_dir: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_offline_test_token_123")
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # set by conftest before huggingface_hub was imported
    assert main(["export", str(harvest_dir), "--out", str(tmp_path / "o"), "--hub", "me/data"]) == 8
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: HubError: push to me/data failed") and "offline" in err[0]
    assert "hf_offline_test_token_123" not in err[0]


# ------------------------------------------------------------------ the push, against a loopback Hub


def push(args: list[str], hub_url: str, token: str | None, home: Path) -> subprocess.CompletedProcess:
    """`imitate export ... --hub` in its own process: huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and
    HF_HUB_DISABLE_XET once, at import, so this test's process (offline by conftest) cannot host the push."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env |= {
        "HF_ENDPOINT": hub_url,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": "127.0.0.1",
        "no_proxy": "127.0.0.1",
    }
    if token:
        env["HF_TOKEN"] = token
    cmd = [sys.executable, "-m", "imitate.cli", "export", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


def test_push_uploads_the_exact_folder_with_the_token(harvest_dir: Path, tmp_path: Path):
    token = "hf_fake_hub_token_8d7c6b5a"
    out = tmp_path / "export"
    with FakeHub(token=token) as hub:
        r = push(
            [str(harvest_dir), "--out", str(out), "--hub", "me/data", "--private", "--shard-rows", "3"],
            hub.base_url,
            token,
            tmp_path / "home",
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[-1] == f"pushed -> {hub.base_url}/datasets/me/data"
        local = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert hub.repos["me/data"]["files"] == local and hub.repos["me/data"]["private"] is True
        assert len([p for p in local if p.endswith(".parquet")]) == 3
        called = {(m, p) for m, p, _ in hub.calls}
        assert ("POST", "/datasets/me/data.git/info/lfs/objects/batch") in called  # parquet went through LFS
        assert ("POST", "/api/datasets/me/data/commit/main") in called
        api = [(m, p, a) for m, p, a in hub.calls if not p.startswith("/lfs/") and p != "/api/agent-harnesses"]
        assert api and all(a == f"Bearer {token}" for _, _, a in api), api
        for text in (r.stdout, r.stderr, *(b.decode("utf-8", "replace") for b in local.values())):
            assert token not in text
        assert 'load_dataset("me/data")' in local["README.md"].decode()

        # a new version with fewer shards: the stale remote shards go in the same commit
        r = push(
            [str(harvest_dir), "--out", str(out), "--hub", "me/data", "--private"],
            hub.base_url,
            token,
            tmp_path / "home",
        )
        assert r.returncode == 0, r.stderr
        local = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert hub.repos["me/data"]["files"] == local and "data/train-00000-of-00001.parquet" in local

        r = push(
            [str(harvest_dir), "--out", str(out), "--hub", "me/data"],
            hub.base_url,
            "hf_wrong_token_000",
            tmp_path / "home",
        )
        err = r.stderr.strip().splitlines()
        assert r.returncode == 8 and len(err) == 1 and err[0].startswith("error: HubError: push to me/data failed")
        assert "401" in err[0] and "hf_wrong_token_000" not in r.stderr

        assert (
            push(
                [str(harvest_dir), "--out", str(out), "--hub", "me/open"], hub.base_url, token, tmp_path / "home"
            ).returncode
            == 0
        )
        r = push(
            [str(harvest_dir), "--out", str(out), "--hub", "me/open", "--private"],
            hub.base_url,
            token,
            tmp_path / "home",
        )
        assert r.returncode == 8 and "exists and is public" in r.stderr and hub.repos["me/open"]["private"] is False


def test_push_without_a_token_stops_before_any_work(harvest_dir: Path, tmp_path: Path):
    with FakeHub(token="unused-token-123") as hub:
        r = push(
            [str(harvest_dir), "--out", str(tmp_path / "o"), "--hub", "me/data"],
            hub.base_url,
            None,
            tmp_path / "empty-home",
        )
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [
            "error: ConfigError: no Hugging Face token for --hub — set HF_TOKEN or log in with `hf auth login`"
        ]
        assert not (tmp_path / "o").exists() and hub.calls == []
