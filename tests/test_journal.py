"""The journal's exactly-once bookkeeping, including recovery from a crash between write and index commit."""

import json
from pathlib import Path

from imitate.harvest.journal import FAILURES, Journal
from imitate.records import Message, Provenance, Query, Record, Request, Usage


def _record(i: int, ok: bool = True) -> Record:
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
    kw = {"response": f"a{i}"} if ok else {"status": "failed", "error_class": "ContextTooLong", "error_message": "x"}
    return Record(
        id=f"q{i}/t/0", query=Query(id=f"q{i}", question=f"q{i}"), messages=req.messages, provenance=prov, **kw
    )


def test_append_index_totals_and_rotation(tmp_path: Path):
    with Journal(tmp_path, shard_rows=3, fsync_every=2) as j:
        for i in range(7):
            j.append(_record(i, ok=i != 5))
        assert j.status_of(_record(0).provenance.request_key) == 1
        assert j.status_of(_record(5).provenance.request_key) == 0
        assert j.status_of(_record(99).provenance.request_key) is None
    shards = sorted(p.name for p in tmp_path.glob("shard-*.jsonl"))
    assert shards == ["shard-00000.jsonl", "shard-00001.jsonl"]
    assert sum(len(p.read_text().splitlines()) for p in tmp_path.glob("shard-*.jsonl")) == 6
    assert len((tmp_path / FAILURES).read_text().splitlines()) == 1
    with Journal(tmp_path) as j:
        t = j.totals()
        assert (t.ok, t.failed, t.tokens, t.attempts) == (6, 1, 70, 14)
        assert abs(t.cost_usd - 3.5) < 1e-9
        assert t.failed_by_class == {"ContextTooLong": 1}
        assert j.recovered_rows == 0
        j.append(_record(7))
    assert sorted(p.name for p in tmp_path.glob("shard-*.jsonl"))[-1] == "shard-00002.jsonl"  # a new shard per run


def test_recovery_indexes_unindexed_lines_and_cuts_torn_tail(tmp_path: Path):
    j = Journal(tmp_path, fsync_every=1000)
    j.append(_record(0))
    j.flush()
    for i in (1, 2):
        j.mark_inflight(_record(i).provenance.request_key)
    j.mark_inflight(_record(3).provenance.request_key)
    j.append(_record(1))
    j.append(_record(2))
    # simulate kill -9: lines 1 and 2 reached the file (OS buffers), the index commit did not happen
    for f in j._files.values():
        f.close()  # the OS has the bytes; the process dies before the index commit
    shard = next(tmp_path.glob("shard-*.jsonl"))
    with open(shard, "ab") as f:
        f.write(_record(3).to_json().encode()[:40])  # a torn line: the request was in flight
    j.db.close()  # the uncommitted transaction (index rows, in-flight marks) is lost

    with Journal(tmp_path) as j2:
        assert j2.recovered_rows == 2
        assert j2.torn_bytes == 40
        assert j2.resent_after_crash == 0  # in-flight marks were never committed either
        for i in (0, 1, 2):
            assert j2.status_of(_record(i).provenance.request_key) == 1
        assert j2.status_of(_record(3).provenance.request_key) is None
    lines = shard.read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["q0/t/0", "q1/t/0", "q2/t/0"]


def test_committed_inflight_without_record_counts_as_resent(tmp_path: Path):
    j = Journal(tmp_path)
    j.mark_inflight(_record(8).provenance.request_key)
    j.mark_inflight(_record(9).provenance.request_key)
    j.append(_record(9))
    j.flush()
    for f in j._files.values():
        f.close()
    j.db.close()
    with Journal(tmp_path) as j2:
        assert j2.resent_after_crash == 1  # 8 was sent, never journaled: it will be sent again and is counted


def test_failed_then_ok_supersedes(tmp_path: Path):
    with Journal(tmp_path) as j:
        j.append(_record(1, ok=False))
        j.append(_record(1, ok=True))
        assert j.status_of(_record(1).provenance.request_key) == 1
        assert j.totals().failed == 0
