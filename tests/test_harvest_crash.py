"""What a crash or a full disk can cost, measured on the real CLI in subprocesses against a fake teacher in its
own process: after a kill -9 only the requests truly in flight are bought again (and the rerun says how many);
a budget holds across kill -9s; a full disk stops the run at once with one line and a resumable output."""

import json
import os
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
CONCURRENCY = 16


def cli(src: Path, out: Path, base_url: str, *extra: str, **kw) -> subprocess.Popen:
    args = [
        "harvest", str(src), "--out", str(out), "--base-url", base_url, "--quiet",
        "--set", "harvest.retry.base_delay_s=0.01", "--set", f"harvest.teachers.0.max_concurrency={CONCURRENCY}",
        "--set", "prices.fake-teacher.input_per_mtok=1", "--set", "prices.fake-teacher.output_per_mtok=1", *extra,
    ]  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-m", "imitate.cli", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def queries(path: Path, n: int, tag: str) -> Path:
    path.write_text("".join(json.dumps({"id": f"{tag}{i}", "question": f"{tag} {i}?"}) + "\n" for i in range(n)))
    return path


def rows(out: Path) -> list:
    return [r for s in sorted(out.glob("shard-*.jsonl")) for r in read_jsonl(s)]


def wait_until(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def fake():
    with FakeTeacherServer(process=True, latency_s=0.1, jitter_s=0.05) as server:
        yield server


def test_after_kill_9_only_requests_in_flight_are_bought_again_and_counted(fake, tmp_path: Path):
    n = 600
    src, out = queries(tmp_path / "q.jsonl", n, "crash"), tmp_path / "out"
    p = cli(src, out, fake.base_url)
    wait_until(lambda: fake.stats()["completed"] >= 150)
    p.kill()  # answers that arrived just before are kept: each row is in the kernel before it counts as done
    p.communicate(timeout=30)
    again = cli(src, out, fake.base_url)
    _, stderr = again.communicate(timeout=120)
    assert again.returncode == 0, stderr
    got = rows(out)
    assert sorted(r.query.id for r in got) == sorted(f"crash{i}" for i in range(n))
    bought_twice = fake.stats()["completed"] - n
    resent = json.loads((out / "manifest.json").read_text())["this_run"]["resent_after_crash"]
    assert bought_twice <= resent <= CONCURRENCY  # the count covers every re-buy; only in-flight ones happen


def test_a_budget_holds_across_kill_9s(fake, tmp_path: Path):
    src, out = queries(tmp_path / "q.jsonl", 400, "budget"), tmp_path / "out"
    budget = ["--max-requests", "150"]
    for kill_at in (40, 80, 120):
        p = cli(src, out, fake.base_url, *budget)
        wait_until(lambda k=kill_at, p=p: fake.stats()["requests"] >= k or p.poll() is not None)
        p.kill()
        p.communicate(timeout=30)
    final = cli(src, out, fake.base_url, *budget)
    _, stderr = final.communicate(timeout=120)
    assert final.returncode == 5, stderr  # BudgetExhausted
    manifest = json.loads((out / "manifest.json").read_text())
    assert fake.stats()["requests"] <= 150  # never crossed, whatever was in flight at each kill
    assert manifest["totals"]["billable"]["requests"] == 150  # and used to the last request
    assert len(rows(out)) <= 150


def _fill_limit() -> None:
    """In the child: no file may grow past 64 kB, as on a full disk (the write fails with EFBIG)."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))


_TMPFS = 'd=$1; o=$2; shift 2; mount -t tmpfs -o size=128k tmpfs "$d" && "$@"; rc=$?; cp -a "$d/out" "$o/out"; exit $rc'


def _on_a_full_disk(how: str, src: Path, out: Path, base_url: str) -> subprocess.Popen:
    """The harvest with its output on a disk that fills up: a 128 kB tmpfs (real ENOSPC, in a mount namespace of
    our own; the output is copied out for the checks) or a file-size limit (EFBIG, anywhere)."""
    if how == "fsize":
        return cli(src, out, base_url, preexec_fn=_fill_limit)
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("no user/mount namespaces here for a real tmpfs (the fsize variant still runs)")
    disk = out.parent / "disk"
    disk.mkdir()
    p = cli(src, disk / "out", base_url)  # the command line to run inside the namespace
    p.kill()
    p.communicate()
    return subprocess.Popen(
        ["unshare", "-rm", "sh", "-c", _TMPFS, "sh", str(disk), str(out.parent),
         *p.args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.mark.parametrize("how", ["fsize", "tmpfs"])
def test_a_full_disk_stops_at_once_with_one_line_and_resumes(fake, tmp_path: Path, how: str):
    n = 400
    src, out = queries(tmp_path / "q.jsonl", n, "disk"), tmp_path / "out"
    p = _on_a_full_disk(how, src, out, fake.base_url)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 7, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: StorageError: cannot write") and "Traceback" not in stderr
    kept = rows(out)  # every line written is a whole record
    served = fake.stats()["completed"]
    assert 0 < len(kept) < n and served <= len(kept) + 2 * CONCURRENCY  # no buying on after the first failure
    again = cli(src, out, fake.base_url)
    _, stderr = again.communicate(timeout=120)
    assert again.returncode == 0, stderr
    assert sorted(r.query.id for r in rows(out)) == sorted(f"disk{i}" for i in range(n))
    assert fake.stats()["completed"] - n <= 2 * CONCURRENCY


def test_sigterm_is_not_a_crash_nothing_is_bought_twice(fake, tmp_path: Path):
    src, out = queries(tmp_path / "q.jsonl", 300, "term"), tmp_path / "out"
    p = cli(src, out, fake.base_url)
    wait_until(lambda: fake.stats()["completed"] >= 50)
    p.send_signal(signal.SIGTERM)  # drains: every answer in flight is waited for and kept
    p.communicate(timeout=60)
    again = cli(src, out, fake.base_url)
    again.communicate(timeout=120)
    assert fake.stats()["completed"] == 300
    assert json.loads((out / "manifest.json").read_text())["this_run"]["resent_after_crash"] == 0
    assert os.path.getsize(out / "ledger.bin") % 40 == 0
