"""Teacher fleets: one teacher served by several replicas (`base_urls`). The pure balance and back-off policy
(`imitate/harvest/fleet.py`) on a fake clock, then whole harvests against in-process fake teachers of different
speeds, one of which dies mid-run or comes back: no row lost or paid twice, the fast replica does most of the
work, resume re-buys nothing whichever replicas are listed, and the config is checked up front."""

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest
from teacher_fixtures import closed_port

from imitate.config import load_config, to_yaml
from imitate.errors import ConfigError, TeacherError
from imitate.harvest.fleet import Fleet, Replica
from imitate.harvest.ledger import BILLED, ENTRY, LEDGER, SENT
from imitate.harvest.run import build_planner, dry_run, harvest
from imitate.records import Query, read_jsonl
from imitate.teacher.fake import FakeTeacher
from imitate.teacher.limiter import RateLimiter

FAST, MEDIUM, SLOW = 0.005, 0.03, 0.09  # seconds per answer of the three fake replicas


# ---------------------------------------------------------------------------------------------- the policy


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_fleet(n: int, clock: Clock, *, concurrency: int = 8, out_after: int = 3, backoff_s: float = 2.0) -> Fleet:
    replicas = [
        Replica(i, f"http://r{i}:8000/v1", None, RateLimiter(rpm=None, tpm=None, max_concurrency=concurrency,
                                                             clock=clock, initial_concurrency=concurrency))
        for i in range(n)
    ]  # fmt: skip
    return Fleet(replicas, out_after=out_after, backoff_s=backoff_s, max_backoff_s=8.0, clock=clock)


def take(fleet: Fleet):
    wait, replica, ticket = fleet.try_acquire(100)
    assert replica is not None and ticket is not None, f"nothing admitted (wait {wait})"
    return replica, ticket


def test_fewest_outstanding_then_fastest_then_round_robin():
    clock = Clock()
    fleet = make_fleet(3, clock)
    assert [take(fleet)[0].index for _ in range(3)] == [0, 1, 2]  # all idle and unmeasured: round robin
    busy = [take(fleet) for _ in range(3)]  # one more each: 2 outstanding everywhere
    assert sorted(r.index for r, _ in busy) == [0, 1, 2]
    r1, t1 = busy[1]
    r1.limiter.on_success(t1, 10, _no_rate(), 0.05)
    fleet.ok(r1, 0.05)
    assert take(fleet)[0] is r1  # the one with the fewest outstanding gets the next
    fleet2 = make_fleet(3, clock)
    for replica, latency in zip(fleet2.replicas, (0.3, 0.02, 0.1), strict=True):
        fleet2.ok(replica, latency)
    assert take(fleet2)[0].index == 1  # equal outstanding: the fastest recent latency


def test_a_replica_whose_last_attempt_failed_comes_last_until_it_answers():
    clock = Clock()
    fleet = make_fleet(2, clock, concurrency=3)
    sick, well = fleet.replicas
    replica, ticket = admit(fleet, 0)
    replica.limiter.on_failure(ticket, overloaded=True)
    fleet.failed(sick, ticket.at)  # fails fast: 0 outstanding, but not the first choice any more
    held = [take(fleet) for _ in range(3)]
    assert [r for r, _ in held] == [well] * 3
    held.append(take(fleet))
    assert held[-1][0] is sick  # used again once the others are full (one failure does not take it out)
    sick.limiter.on_success(held[-1][1], 10, _no_rate(), 0.01)
    fleet.ok(sick, 0.01)
    assert take(fleet)[0] is sick  # it answered: fewest outstanding again


def test_each_replica_keeps_its_own_concurrency():
    clock = Clock()
    fleet = make_fleet(3, clock, concurrency=2)
    taken = [take(fleet)[0].index for _ in range(6)]
    assert Counter(taken) == {0: 2, 1: 2, 2: 2}
    wait, replica, ticket = fleet.try_acquire(100)
    assert replica is None and ticket is None and wait > 0  # all six slots in use: nothing more


def test_a_failing_replica_backs_off_is_probed_once_and_returns_when_it_answers():
    clock = Clock()
    fleet = make_fleet(2, clock, out_after=3, backoff_s=2.0)
    bad, good = fleet.replicas
    for _ in range(3):
        replica, ticket = admit(fleet, 0)
        replica.limiter.on_failure(ticket, overloaded=True)
        fleet.failed(replica, ticket.at)
    assert bad.state(clock.now) == "out" and bad.times_out == 1
    assert all(take(fleet)[0] is good for _ in range(5))  # out of service: never chosen
    clock.now += 2.5  # the back-off is over: on probation, one attempt at a time
    probe = take(fleet)
    assert probe[0] is bad and bad.state(clock.now) == "probation"
    assert take(fleet)[0] is good  # a second attempt does not go to a replica on probation
    bad.limiter.on_failure(probe[1], overloaded=True)
    fleet.failed(bad, probe[1].at)  # the probe failed: out again for twice as long
    assert bad.backoff_s == 4.0 and bad.state(clock.now) == "out"
    clock.now += 4.5
    probe = take(fleet)
    assert probe[0] is bad
    bad.limiter.on_success(probe[1], 10, _no_rate(), 0.01)
    fleet.ok(bad, 0.01)  # it answers: back in service, back-off forgotten
    assert bad.state(clock.now) == "in" and bad.backoff_s == 0.0 and bad.failures == 0


def test_late_failures_of_old_attempts_do_not_lengthen_the_back_off():
    clock = Clock()
    fleet = make_fleet(2, clock, out_after=2, backoff_s=2.0)
    bad = fleet.replicas[0]
    old = [admit(fleet, 0) for _ in range(4)]  # four in flight when the server dies
    for replica, ticket in old[:2]:
        fleet.failed(replica, ticket.at)
    assert bad.state(clock.now) == "out"
    clock.now += 3.0
    for replica, ticket in old[2:]:  # the stragglers fail after the back-off ended: not a failed probe
        fleet.failed(replica, ticket.at)
    assert bad.backoff_s == 2.0 and bad.times_out == 1


def test_with_every_replica_out_none_is_held_back_and_a_lone_server_never_backs_off():
    clock = Clock()
    fleet = make_fleet(2, clock, out_after=1)
    for index in (0, 1):
        replica, ticket = admit(fleet, index)
        replica.limiter.on_failure(ticket)
        fleet.failed(replica, ticket.at)
    assert {r.state(clock.now) for r in fleet.replicas} == {"out"}
    assert take(fleet)[0] is not None  # the fleet is one failing teacher now: its breaker decides
    lone = make_fleet(1, clock, out_after=1)
    for _ in range(10):
        replica, ticket = take(lone)
        replica.limiter.on_failure(ticket)
        lone.failed(replica, ticket.at)
    assert lone.replicas[0].state(clock.now) == "in" and lone.label(lone.replicas[0]) is None


def admit(fleet: Fleet, index: int):
    """An attempt admitted straight by replica `index`'s limiter (as if the fleet had chosen it)."""
    replica = fleet.replicas[index]
    _, ticket = replica.limiter.try_acquire(100)
    assert ticket is not None
    return replica, ticket


def _no_rate():
    from imitate.teacher.reply import RateLimitState

    return RateLimitState()


# ---------------------------------------------------------------------------------------------- config


def test_config_names_servers_one_way():
    def problem(*overrides: str) -> str:
        with pytest.raises(ConfigError) as info:
            load_config(None, list(overrides))
        line = info.value.one_line()
        assert "\n" not in line
        return line

    line = problem("harvest.teachers.0.base_url=http://a:1/v1", "harvest.teachers.0.base_urls=[http://b:2/v1]")
    assert "harvest.teachers.0: give base_url (one server) or base_urls (a fleet), not both" in line
    assert "base_urls is empty" in problem("harvest.teachers.0.base_urls=[]")
    line = problem("harvest.teachers.0.base_urls=[http://a:1/v1, ftp://b/v1, http://c:3/v1]")
    assert "harvest.teachers.0.base_urls.1: 'ftp://b/v1' must start with http:// or https://" in line
    assert "1 problem(s)" in line  # named once, by its index
    line = problem(
        "harvest.teachers.0.base_urls=[http://u:SECRET-PW@a:1/v1, http://b:2/v1, http://u:SECRET-PW@a:1/v1/]"
    )
    assert "base_urls.2 repeats base_urls.0" in line and "SECRET-PW" not in line
    line = problem("harvest.teachers.0.base_urls=[http://a:1/v1, http://b:2/v1]", "harvest.mode=batch")
    assert "use mode=online" in line


def test_a_stamped_fleet_config_reloads_and_single_url_keys_are_unchanged(tmp_path: Path):
    query = Query(id="q1", question="Why is the sea salty?")
    common = ["harvest.teachers.0.model=m", "harvest.params.max_tokens=64"]

    def key(*overrides: str) -> str:
        return build_planner(load_config(None, [*overrides, *common])).plan(query)[0].key

    # computed by the code before fleets existed: existing outputs resume without re-buying
    pinned = "d168b88545f14662a7e721705e2f9498706a1314ff63bfe6746af9e8b1ecd9ae"
    assert key("harvest.teachers.0.base_url=http://127.0.0.1:8000/v1") == pinned
    assert key("harvest.teachers.0.base_urls=[http://127.0.0.1:8000/v1, http://10.0.0.2:8000/v1]") == pinned
    moved = "harvest.teachers.0.base_urls=[http://10.0.0.2:8000/v1, http://10.0.0.3:8000/v1]"
    assert key(moved) != pinned
    assert key(moved, "harvest.teachers.0.identity=http://127.0.0.1:8000/v1") == pinned
    cfg = load_config(None, ["harvest.teachers.0.base_urls=[http://u:pw@a:1/v1, http://b:2/v1]"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    again = load_config(tmp_path / "config.yaml").harvest.teachers[0]  # carries base_url and base_urls, equal
    assert again.replicas == ["http://***@a:1/v1", "http://b:2/v1"]


# ---------------------------------------------------------------------------------------------- harvests


def write_queries(path: Path, n: int, start: int = 0) -> Path:
    with open(path, "w") as f:
        for i in range(start, start + n):
            f.write(json.dumps({"id": f"r{i}", "question": f"Fleet question number {i}?"}) + "\n")
    return path


def fleet_cfg(urls: list[str], *extra: str):
    return load_config(
        None,
        [
            f"harvest.teachers.0.base_urls=[{', '.join(urls)}]",
            "harvest.teachers.0.name=fleet",
            "harvest.teachers.0.max_concurrency=4",
            "harvest.teachers.0.timeout_s=2",
            "harvest.retry.base_delay_s=0.01",
            "harvest.retry.max_delay_s=0.05",
            "harvest.retry.replica_backoff_s=0.2",
            "harvest.params.max_tokens=64",
            "harvest.preset=none",
            *extra,
        ],
    )


def records(out: Path) -> list:
    found = [r for s in sorted(out.glob("shard-*.jsonl")) for r in read_jsonl(s)]
    if (out / "failures.jsonl").exists():
        found += list(read_jsonl(out / "failures.jsonl"))
    return found


def ledger_entries(out: Path) -> Counter:
    data = (out / LEDGER).read_bytes()
    kinds: Counter = Counter()
    for kind, _tokens, _seq, _usd, key in ENTRY.iter_unpack(data[: len(data) // ENTRY.size * ENTRY.size]):
        kinds[kind] += 1
        if kind == BILLED:
            kinds[(BILLED, key)] += 1
    return kinds


async def stop_when(server: FakeTeacher, completed: int) -> int:
    while server.stats()["completed"] < completed:
        await asyncio.sleep(0.002)
    await server.stop()
    return server.stats()["completed"]


async def test_three_speeds_one_dies_no_row_lost_or_paid_twice(tmp_path: Path):
    n = 240
    src = write_queries(tmp_path / "q.jsonl", n)
    out = tmp_path / "out"
    async with (
        FakeTeacher(latency_s=FAST) as fast,
        FakeTeacher(latency_s=MEDIUM) as medium,
        FakeTeacher(latency_s=SLOW) as slow,
    ):
        killer = asyncio.create_task(stop_when(medium, 12))
        outcome = await harvest(fleet_cfg([fast.base_url, medium.base_url, slow.base_url]), str(src), out,
                                progress="quiet")  # fmt: skip
        served_by_medium = await asyncio.wait_for(killer, 1)
        served = {fast.base_url: fast.stats()["completed"], medium.base_url: served_by_medium,
                  slow.base_url: slow.stats()["completed"]}  # fmt: skip
    assert outcome.error is None and outcome.manifest["status"] == "complete"
    rows = records(out)
    assert len(rows) == n and len({r.id for r in rows}) == n and all(r.status == "ok" for r in rows)
    by_replica = Counter(r.provenance.replica for r in rows)
    assert by_replica == served  # each answer the fakes gave is one record, and each record one answer
    assert {r.provenance.base_url for r in rows} == {fast.base_url}  # the teacher's name: its first server
    kinds = ledger_entries(out)
    assert kinds[BILLED] == n and all(v == 1 for k, v in kinds.items() if isinstance(k, tuple))  # paid once each
    assert kinds[SENT] == outcome.manifest["totals"]["billable"]["requests"]
    assert served[fast.base_url] > 0.6 * n and served[slow.base_url] > 0  # the fast one does most of the work
    assert served[fast.base_url] > served[slow.base_url]
    replicas = outcome.manifest["teachers"]["fleet"]["replicas"]
    assert [r["url"] for r in replicas] == [fast.base_url, medium.base_url, slow.base_url]
    dead = replicas[1]
    assert dead["times_out"] >= 1 and dead["state"] in ("out", "probation")
    assert dead["failed"] <= 4 + 2 + dead["times_out"]  # what was in flight, then one probe per back-off


async def test_a_replica_that_comes_back_is_used_again(tmp_path: Path):
    src = write_queries(tmp_path / "q.jsonl", 90)
    out = tmp_path / "out"
    async with FakeTeacher(latency_s=0.05) as steady, FakeTeacher(latency_s=FAST) as flaky:
        port = flaky.port
        await flaky.stop()  # down when the run starts

        async def come_back() -> None:
            await asyncio.sleep(0.5)
            await flaky.start(port=port)

        returning = asyncio.create_task(come_back())
        outcome = await harvest(fleet_cfg([steady.base_url, flaky.base_url], "harvest.teachers.0.max_concurrency=2"),
                                str(src), out, progress="quiet")  # fmt: skip
        await returning
        served_after_return = flaky.stats()["completed"]
    assert outcome.error is None and outcome.manifest["totals"]["ok"] == 90
    back = outcome.manifest["teachers"]["fleet"]["replicas"][1]
    assert back["times_out"] >= 1 and back["state"] == "in"
    by_replica = Counter(r.provenance.replica for r in records(out))
    assert by_replica[flaky.base_url] == served_after_return > 0  # taken out, probed, used again


async def test_the_teacher_is_down_only_when_every_replica_is(tmp_path: Path):
    dead = [f"http://127.0.0.1:{closed_port()}/v1" for _ in range(2)]
    src = write_queries(tmp_path / "q.jsonl", 30)
    async with FakeTeacher() as live:
        outcome = await harvest(fleet_cfg([dead[0], live.base_url, dead[1]]), str(src), tmp_path / "one",
                                progress="quiet")  # fmt: skip
    assert outcome.error is None and outcome.manifest["totals"]["ok"] == 30
    assert {r.provenance.replica for r in records(tmp_path / "one")} == {live.base_url}
    outcome = await harvest(fleet_cfg(dead), str(src), tmp_path / "none", progress="quiet")
    assert isinstance(outcome.error, TeacherError) and "down after" in outcome.error.message
    assert outcome.manifest["totals"]["ok"] == 0 and outcome.manifest["totals"]["failed"] == 0  # all pending


async def test_resume_across_replica_lists_re_buys_nothing(tmp_path: Path):
    src = write_queries(tmp_path / "q.jsonl", 24)
    out = tmp_path / "out"
    async with FakeTeacher() as a, FakeTeacher() as b, FakeTeacher() as c:
        single = load_config(None, [f"harvest.teachers.0.base_url={a.base_url}", "harvest.teachers.0.name=fleet",
                                    "harvest.params.max_tokens=64", "harvest.preset=none"])  # fmt: skip
        first = await harvest(single, str(src), out, progress="quiet")  # an output from before fleets
        assert first.manifest["this_run"]["ok"] == 24
        assert {r.provenance.replica for r in records(out)} == {None}  # a lone server's records unchanged
        asked = [s.stats()["requests"] for s in (a, b, c)]
        for urls, extra in (
            ([a.base_url, b.base_url, c.base_url], ()),
            ([a.base_url, c.base_url], ()),
            ([c.base_url, b.base_url], (f"harvest.teachers.0.identity={a.base_url}",)),
        ):
            again = await harvest(fleet_cfg(urls, *extra), str(src), out, progress="quiet")
            assert again.manifest["this_run"]["requests"] == 0 and again.manifest["this_run"]["skipped_done"] == 24
        assert [s.stats()["requests"] for s in (a, b, c)] == asked  # not one request re-sent
        more = write_queries(tmp_path / "more.jsonl", 24, start=24)
        grown = await harvest(fleet_cfg([a.base_url, b.base_url, c.base_url]), str(more), out, progress="quiet")
    assert grown.manifest["this_run"]["ok"] == 24
    assert len({r.provenance.request_key for r in records(out)}) == 48


def test_dry_run_shows_the_replicas_and_their_combined_limits(tmp_path: Path):
    src = write_queries(tmp_path / "q.jsonl", 120)
    urls = ["http://u:pw@10.0.0.1:8000/v1", "http://10.0.0.2:8000/v1", "http://10.0.0.3:8000/v1"]
    plan = dry_run(fleet_cfg(urls, "harvest.teachers.0.rpm=20"), str(src), None)["teachers"]["fleet"]
    assert plan["replicas"] == ["http://***@10.0.0.1:8000/v1", *urls[1:]]
    assert plan["requests"] == 120 and plan["est_minutes_at_limits"] == 2.0  # 120 / (20 rpm x 3 replicas)
