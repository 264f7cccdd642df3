"""The journal's exactly-once bookkeeping: recovery from a crash between write and index commit, damaged shards
and index, the attempt ledger, transient failures, and a disk that fills up."""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from imitate.errors import StorageError
from imitate.harvest.journal import FAILURES, INDEX, Journal
from imitate.harvest.ledger import LEDGER
from imitate.records import Message, Provenance, Query, Record, Request, Usage


def _record(i: int, ok: bool = True, error_class: str = "ContextTooLong") -> Record:
    req = Request(
        query_id=f"q{i}",
        teacher="t",
        model="m",
        base_url="http://x/v1",
        messages=[Message(role="user", content=f"q{i}")],
    )
    prov = Provenance(
        teacher="t",
        model="m",
        base_url="http://x/v1",
        request_key=req.key(),
        usage=Usage(prompt_tokens=3, completion_tokens=7, total_tokens=10),
        cost_usd=0.5,
        attempts=2,
    )
    kw = {"response": f"a{i}"} if ok else {"status": "failed", "error_class": error_class, "error_message": "x"}
    return Record(
        id=f"q{i}/t/0", query=Query(id=f"q{i}", question=f"q{i}"), messages=req.messages, provenance=prov, **kw
    )


def _key(i: int) -> str:
    return _record(i).provenance.request_key


def _die(j: Journal) -> None:
    """What a kill -9 leaves: the bytes written so far are in the kernel; no flush, no index commit."""
    for fd in j._fds.values():
        os.close(fd)
    j.ledger.close()
    j.db.close()  # the open transaction (index rows since the last flush) is lost


def test_append_index_totals_and_a_rerun_continues_the_last_shard(tmp_path: Path):
    with Journal(tmp_path, shard_rows=3, fsync_every=2) as j:
        for i in range(7):
            j.append(_record(i, ok=i != 5))
        assert j.status_of(_key(0)) == 1
        assert j.status_of(_key(5)) == 0
        assert j.status_of(_key(99)) is None
    shards = sorted(p.name for p in tmp_path.glob("shard-*.jsonl"))
    assert shards == ["shard-00000.jsonl", "shard-00001.jsonl"]
    assert sum(len(p.read_text().splitlines()) for p in tmp_path.glob("shard-*.jsonl")) == 6
    assert len((tmp_path / FAILURES).read_text().splitlines()) == 1
    for run in range(3):  # reruns fill the last shard (3 rows each) before starting a new one
        with Journal(tmp_path, shard_rows=3) as j:
            if run == 0:
                t = j.totals()
                assert (t.ok, t.failed, t.tokens, t.attempts) == (6, 1, 70, 14)
                assert abs(t.cost_usd - 3.5) < 1e-9
                assert t.failed_by_class == {"ContextTooLong": 1}
                assert j.recovered_rows == 0
            j.append(_record(10 + run))
    lines = {p.name: len(p.read_text().splitlines()) for p in tmp_path.glob("shard-*.jsonl")}
    assert lines == {"shard-00000.jsonl": 3, "shard-00001.jsonl": 3, "shard-00002.jsonl": 3}


def test_a_row_is_in_the_file_when_append_returns_and_recovery_indexes_it(tmp_path: Path):
    j = Journal(tmp_path, fsync_every=1000)
    j.append(_record(0))
    j.flush()
    j.append(_record(1))
    j.append(_record(2))
    shard = next(tmp_path.glob("shard-*.jsonl"))
    assert len(shard.read_bytes().splitlines()) == 3  # no user-space buffer: a kill -9 now loses nothing
    _die(j)
    with open(shard, "ab") as f:
        f.write(_record(3).to_json().encode()[:40])  # a torn line: that request was in flight
    with Journal(tmp_path) as j2:
        assert (j2.recovered_rows, j2.torn_bytes) == (2, 40)
        assert [j2.status_of(_key(i)) for i in range(4)] == [1, 1, 1, None]
    assert [json.loads(x)["id"] for x in shard.read_text().splitlines()] == ["q0/t/0", "q1/t/0", "q2/t/0"]


@pytest.mark.parametrize("damage", ["garbled", "cut"])
def test_a_damaged_last_line_under_the_index_is_cut_and_asked_again(tmp_path: Path, damage: str):
    with Journal(tmp_path) as j:
        for i in range(3):
            j.append(_record(i))
    shard = next(tmp_path.glob("shard-*.jsonl"))
    data = shard.read_bytes()
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    if damage == "garbled":  # same length, still newline-terminated: only parsing can tell
        shard.write_bytes(data[:last] + b"#" * (len(data) - last - 1) + b"\n")
    else:
        shard.write_bytes(data[: last + 25])
    with Journal(tmp_path) as j:
        assert j.dropped_rows == 1
        assert [j.status_of(_key(i)) for i in range(3)] == [1, 1, None]  # the rerun asks for row 2 again
        assert j.totals().ok == 2
    assert shard.read_bytes() == data[:last]


@pytest.mark.parametrize("damage", [b"garbage" * 100, b"", "truncate", "old-schema"])
def test_an_unreadable_index_is_rebuilt_from_shards_and_ledger(tmp_path: Path, damage):
    with Journal(tmp_path, fsync_every=1) as j:
        for i in range(5):
            seq = j.ledger.sent(_key(i), 0.01, 100)
            j.ledger.billed(seq, 0.5, 10)
            j.append(_record(i, ok=i != 4))
        j.ledger.sent(_key(9), 0.01, 100)
        j.ledger.unbilled(j.ledger.seq)
    index = tmp_path / INDEX
    if damage == "truncate":
        index.write_bytes(index.read_bytes()[:3000])
    elif damage == "old-schema":
        db = sqlite3.connect(index)
        db.execute("PRAGMA user_version=1")
        db.commit()
        db.close()
    else:
        index.write_bytes(damage)
    with Journal(tmp_path) as j:
        assert damage == b"" or j.rebuilt
        assert [j.status_of(_key(i)) for i in range(5)] == [1, 1, 1, 1, 0]
        assert (j.ledger.spent.requests, j.ledger.spent.tokens) == (6, 50)
        assert j.ledger.spent.usd == pytest.approx(2.5)


def test_the_ledger_counts_every_attempt_across_runs_and_open_ones_at_their_estimate(tmp_path: Path):
    j = Journal(tmp_path)
    a = j.ledger.sent(_key(0), 0.25, 300)
    j.ledger.billed(a, 0.125, 120)
    b = j.ledger.sent(_key(1), 0.25, 300)
    j.ledger.unbilled(b)  # a 500: no answer, not billed
    j.flush()  # checkpoint: the next open replays only what follows
    j.ledger.sent(_key(1), 0.25, 300)  # in flight when the process dies
    j.ledger.sent(_key(2), 0.25, 300)
    _die(j)
    with open(tmp_path / LEDGER, "ab") as f:
        f.write(b"S\0\0")  # a torn entry
    j2 = Journal(tmp_path)
    assert j2.ledger.spent.requests == 4
    assert j2.ledger.spent.usd == pytest.approx(0.125 + 0.5)  # billed + both open attempts at their estimate
    assert j2.ledger.spent.tokens == 120 + 600
    assert (tmp_path / LEDGER).stat().st_size % 40 == 0
    for key in (_key(1), _key(1), _key(2), _key(3)):
        j2.note_send(key)
    assert j2.resent_after_crash == 2  # keys 1 and 2, once each; key 3 was never in flight
    j2.close()
    with Journal(tmp_path) as j3:  # a clean close keeps the totals; nothing is open any more
        assert (j3.ledger.spent.requests, j3.ledger.spent.tokens) == (4, 720)


def test_transient_failures_are_asked_again_permanent_ones_are_done(tmp_path: Path):
    with Journal(tmp_path) as j:
        j.append(_record(1, ok=False, error_class="ServerError"))
        j.append(_record(2, ok=False, error_class="ContextTooLong"))
        assert (j.status_of(_key(1)), j.status_of(_key(2))) == (None, 0)
        t = j.totals()
        assert (t.failed, t.retry) == (1, 1)
        j.append(_record(1, ok=True))
        assert j.status_of(_key(1)) == 1
        assert (j.totals().retry, j.totals().ok) == (0, 1)


def test_failed_then_ok_supersedes(tmp_path: Path):
    with Journal(tmp_path) as j:
        j.append(_record(1, ok=False))
        j.append(_record(1, ok=True))
        assert j.status_of(_key(1)) == 1
        assert j.totals().failed == 0


_FILL = """
import resource, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from tests.test_journal import _record
from imitate.errors import StorageError
from imitate.harvest.journal import Journal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
j = Journal(Path(sys.argv[1]), fsync_every=1)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # no file can grow past 100 kB: a full disk
n = 0
try:
    for i in range(1000):
        j.append(_record(i))
        n += 1
except StorageError as exc:
    print(n, exc.one_line())
"""


def test_a_full_disk_is_one_storage_error_and_leaves_whole_lines(tmp_path: Path):
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", _FILL, str(tmp_path), str(root)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    written, message = out.stdout.split(" ", 1)
    assert 0 < int(written) < 1000 and "StorageError: cannot write" in message and "rerun" in message
    lines = next(tmp_path.glob("shard-*")).read_bytes().splitlines()
    assert all(line.endswith(b"}") for line in lines)
    with Journal(tmp_path) as j:  # the row whose index commit failed is in its shard: recovered, not lost
        assert j.totals().ok == len(lines) and len(lines) in (int(written), int(written) + 1)
    with pytest.raises(StorageError):
        Journal(tmp_path / "shard-00000.jsonl" / "x")  # an output path under a file
