"""The harvester as a user runs it, in subprocesses: kill -9 and resume, SIGINT drain, one-line input errors,
no secret in any output, no torch import."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imitate.records import read_jsonl
from imitate.teacher.fake import FakeTeacherServer

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
SECRET = "sk-test-DO-NOT-LEAK-4f9a8b7c6d5e"


def cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "imitate.cli", *args],
        cwd=REPO,
        env={**os.environ, "IMITATE_TEST_KEY": SECRET, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def harvest_args(src: Path, out: Path, base_url: str, *extra: str) -> list[str]:
    return [
        "harvest", str(src), "--out", str(out), "--base-url", base_url, "--api-key-env", "IMITATE_TEST_KEY",
        "--set", "harvest.retry.base_delay_s=0.01", "--set", "harvest.fsync_every=8",
        "--set", "prices.fake-teacher.input_per_mtok=1", "--set", "prices.fake-teacher.output_per_mtok=1",
        *extra,
    ]  # fmt: skip


def wait_until(condition, timeout: float = 30.0) -> None:
    """Poll for an event (a request served, a line printed) instead of sleeping a guessed time."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def all_rows(out: Path):
    got = [r for s in sorted(out.glob("shard-*.jsonl")) for r in read_jsonl(s)]
    if (out / "failures.jsonl").exists():
        got += list(read_jsonl(out / "failures.jsonl"))
    return got


@pytest.fixture(scope="module")
def slow_fake():
    with FakeTeacherServer(process=True, latency_s=0.1, jitter_s=0.05, api_key=SECRET) as server:
        yield server


def test_kill_9_at_random_moments_then_resume_gives_exactly_one_row_each(slow_fake, tmp_path: Path):
    n = 1000
    src = tmp_path / "q.jsonl"
    src.write_text("".join(json.dumps({"id": f"k{i}", "question": f"Kill test {i}?"}) + "\n" for i in range(n)))
    out = tmp_path / "out"
    rng = random.Random(7)
    kills = 0
    for _ in range(6):
        p = cli(
            *harvest_args(src, out, slow_fake.base_url, "--quiet", "--set", "harvest.teachers.0.max_concurrency=16")
        )
        time.sleep(rng.uniform(0.8, 2.0))
        if p.poll() is None:
            p.kill()
            kills += 1
        p.communicate(timeout=30)
    assert kills >= 5
    final = cli(*harvest_args(src, out, slow_fake.base_url, "--quiet"))
    stdout, stderr = final.communicate(timeout=120)
    assert final.returncode == 0, stderr
    got = all_rows(out)
    ids = [r.query.id for r in got]
    assert len(ids) == len(set(ids)) == n  # every input exactly once, no duplicates
    keys = [r.provenance.request_key for r in got]
    assert len(set(keys)) == n
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["ok"] + manifest["totals"]["failed"] == n
    assert manifest["totals"]["spend_usd"] == pytest.approx(sum(r.provenance.cost_usd for r in got))  # counted once
    served = slow_fake.stats()["completed"]
    assert served - n <= kills * 16  # at most the in-flight requests of each crash were paid twice


def test_sigint_drains_to_a_valid_partial_dataset(slow_fake, tmp_path: Path):
    src = tmp_path / "q.jsonl"
    src.write_text("".join(json.dumps({"question": f"Drain {i}?"}) + "\n" for i in range(2000)))
    out = tmp_path / "out"
    before = slow_fake.stats()["completed"]
    p = cli(*harvest_args(src, out, slow_fake.base_url, "--json-log", "--set", "harvest.teachers.0.max_concurrency=8"))
    wait_until(lambda: slow_fake.stats()["completed"] - before >= 20 or p.poll() is not None)
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "partial" and manifest["stop_reason"].startswith("interrupted")
    got = all_rows(out)  # every line parses as a Record
    assert 0 < len(got) < 2000 and manifest["totals"]["ok"] + manifest["totals"]["failed"] == len(got)
    assert "Interrupted" in stderr.strip().splitlines()[-1]


def test_bad_input_row_names_file_and_line_and_skip_mode_counts(slow_fake, tmp_path: Path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"question": "ok?"}\n{"question": "fine?"}\n{not json\n')
    p = cli(*harvest_args(src, tmp_path / "o", slow_fake.base_url, "--quiet"))
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 3
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: InputError") and "bad.jsonl:3" in last and "Traceback" not in stderr
    p = cli(*harvest_args(src, tmp_path / "o2", slow_fake.base_url, "--quiet", "--skip-bad-rows"))
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr
    assert json.loads((tmp_path / "o2" / "manifest.json").read_text())["this_run"]["skipped_bad_input_rows"] == 1


def test_api_key_never_written_or_logged_and_torch_never_imported(slow_fake, tmp_path: Path):
    src = tmp_path / "q.jsonl"
    src.write_text("".join(json.dumps({"question": f"Secret test {i}? [[fault:500x1]]"}) + "\n" for i in range(5)))
    out = tmp_path / "out"
    code = (
        "import sys; from imitate.cli import main; rc = main(sys.argv[1:]); "
        "print('TORCH', 'torch' in sys.modules, file=sys.stderr); sys.exit(rc)"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, *harvest_args(src, out, slow_fake.base_url, "--json-log")],
        cwd=REPO, env={**os.environ, "IMITATE_TEST_KEY": SECRET}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "TORCH False" in p.stderr
    assert slow_fake.stats()["requests"] > 0  # the fake demands the key: it was sent
    for f in out.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f
    assert SECRET not in p.stdout + p.stderr
    wrong = cli(
        *harvest_args(src, tmp_path / "o2", slow_fake.base_url, "--quiet"),
        env={"IMITATE_TEST_KEY": "sk-wrong-key-123456"},
    )
    _, stderr = wrong.communicate(timeout=60)
    assert wrong.returncode == 4 and "AuthError" in stderr and "sk-wrong-key-123456" not in stderr


def test_second_sigint_forces_a_quick_exit(tmp_path: Path):
    with FakeTeacherServer(process=True, latency_s=30.0) as hanging:  # answers take far longer than the test
        src = tmp_path / "q.jsonl"
        src.write_text("".join(json.dumps({"question": f"Hang {i}?"}) + "\n" for i in range(50)))
        out = tmp_path / "out"
        p = cli(*harvest_args(src, out, hanging.base_url, "--quiet", "--set", "harvest.drain_timeout_s=60"))
        # Requests in flight: the signal handlers went in before the first one was sent.
        wait_until(lambda: hanging.stats()["requests"] > 0 or p.poll() is not None)
        p.send_signal(signal.SIGINT)
        with pytest.raises(subprocess.TimeoutExpired):
            p.wait(timeout=0.5)  # first Ctrl-C: draining, waiting for in-flight answers
        started = time.monotonic()
        p.send_signal(signal.SIGINT)
        _, stderr = p.communicate(timeout=20)
        assert time.monotonic() - started < 10
        assert p.returncode == 130, stderr
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["status"] == "partial" and manifest["totals"]["ok"] == 0
    again = subprocess.run(
        [sys.executable, "-m", "imitate.cli", "status", str(out)], cwd=REPO, capture_output=True, text=True
    )
    assert again.returncode == 0 and json.loads(again.stdout)["done"] == 0


# ---------------------------------------------------------------------------------------------- CLI edges (issue 9)


URL_USER, URL_KEY = "alice-USERPART", "sk-URL-KEY-7e3d9c1b"


@pytest.fixture
def harvest_with_key_in_url(fake_teacher, tmp_path: Path):
    url = fake_teacher.base_url.replace("http://", f"http://{URL_USER}:{URL_KEY}@")
    src = tmp_path / "q.jsonl"
    src.write_text("".join(json.dumps({"question": f"URL key {i}?"}) + "\n" for i in range(5)))
    out = tmp_path / "out"
    p = cli(*harvest_args(src, out, url, "--json-log"))  # config printed, progress as JSON on stderr
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    assert fake_teacher.stats()["completed"] == 5
    return out, stdout + stderr


def test_a_key_in_the_base_url_is_not_on_screen_nor_in_config_or_manifest(harvest_with_key_in_url):
    out, screen = harvest_with_key_in_url
    assert URL_KEY not in screen and URL_USER not in screen
    for f in [*out.glob("*.json"), *out.glob("*.yaml"), *out.glob("*.sqlite*"), *out.glob("*.bin")]:
        data = f.read_bytes()
        assert URL_KEY.encode() not in data and URL_USER.encode() not in data, f
    manifest = json.loads((out / "manifest.json").read_text())
    assert "--base-url http://***@127.0.0.1" in manifest["command"]


def test_a_key_in_the_base_url_is_in_no_output_file(harvest_with_key_in_url):
    out, _ = harvest_with_key_in_url
    for f in out.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert URL_KEY.encode() not in data and URL_USER.encode() not in data, f
    assert all(r.provenance.base_url.startswith("http://***@") for r in all_rows(out))


def test_a_file_named_status_is_harvested_and_status_is_its_own_command(fake_teacher, tmp_path: Path):
    (tmp_path / "status").write_text("".join(json.dumps({"question": f"Status {i}?"}) + "\n" for i in range(3)))
    p = subprocess.run(
        [sys.executable, "-m", "imitate.cli", "harvest", "status", "--out", "o", "--base-url", fake_teacher.base_url,
         "--set", "harvest.source.format=jsonl", "--quiet"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    r = subprocess.run(
        [sys.executable, "-m", "imitate.cli", "status", "o"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["done"] == 3 and shown["pending"] == 0 and shown["last_status"] == "complete"


def test_ctrl_c_while_a_harvest_starts_exits_130_with_a_message(slow_fake, tmp_path: Path):
    src = tmp_path / "q.jsonl"
    src.write_text("".join(json.dumps({"question": f"Start {i}?"}) + "\n" for i in range(50)))
    p = cli(*harvest_args(src, tmp_path / "out", slow_fake.base_url))
    try:
        first = p.stderr.readline()
    finally:
        p.send_signal(signal.SIGINT)  # whatever the first line says, the child is stopped and reaped below
    assert first.startswith("teacher "), first  # the settings summary is printed: set-up is under way
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last == "interrupted (Ctrl-C)" or last.startswith("error: Interrupted")
