"""Pure policy: routing, subsets, fallbacks, samples, budgets, retry decisions by error class."""

import random

import pytest

from imitate.config import BudgetConfig, HarvestConfig, RetryConfig, TeacherConfig
from imitate.errors import (
    AuthError,
    BadResponse,
    ConfigError,
    ContentFiltered,
    ContextTooLong,
    NetworkError,
    QuotaExhausted,
    RateLimited,
    ServerError,
)
from imitate.harvest.plan import Budget, Planner
from imitate.harvest.runtime import Health
from imitate.records import Query
from imitate.teacher.retry import RetryPolicy


def _no_system(q):
    return (None, None, None)


def _cfg(teachers, n=1) -> HarvestConfig:
    return HarvestConfig(teachers=teachers, samples_per_prompt=n)


QS = [Query(id=f"q{i}", question=f"question {i}", collection="cot" if i % 2 else "flan") for i in range(2000)]


def test_orca_subset_routing_is_deterministic():
    p = Planner(_cfg([TeacherConfig(name="a"), TeacherConfig(name="b", subset_fraction=0.2)]), _no_system)
    plans = [p.plan(q) for q in QS]
    assert all(pl[0].request.teacher == "a" for pl in plans)  # every query to teacher A
    share_b = sum(any(x.request.teacher == "b" for x in pl) for pl in plans) / len(QS)
    assert 0.17 < share_b < 0.23  # a 20 % subset also to B
    assert [[x.request.key() for x in p.plan(q)] for q in QS[:50]] == [
        [x.request.key() for x in pl] for pl in plans[:50]
    ]


def test_weights_collections_fallback_and_samples():
    p = Planner(
        _cfg(
            [
                TeacherConfig(name="a", weight=3),
                TeacherConfig(name="b", weight=1),
                TeacherConfig(name="c", collections=["cot"], weight=0),
                TeacherConfig(name="z", model="other-model", fallback=True),
            ],
            n=2,
        ),
        _no_system,
    )
    plans = [p.plan(q) for q in QS]
    assert all(len(pl) == 2 and [x.request.sample_index for x in pl] == [0, 1] for pl in plans)
    share_a = sum(pl[0].request.teacher == "a" for pl in plans) / len(QS)
    assert 0.7 < share_a < 0.8
    alt = p.fallback_for(plans[0][0], dead={"a", "b"})
    assert alt.teacher == "z" and alt.key() != plans[0][0].request.key()
    assert p.fallback_for(plans[0][0], dead={"a", "b", "z"}) is None


def test_no_main_teacher_is_a_config_error():
    with pytest.raises(ConfigError, match="no main teacher"):
        Planner(_cfg([TeacherConfig(name="b", subset_fraction=0.5)]), _no_system)


def test_budget_never_admits_past_a_limit():
    b = Budget(BudgetConfig(max_usd=1.0))
    assert b.admit(0.4, 10) and b.admit(0.4, 10)
    assert not b.admit(0.4, 10)  # 0.8 reserved + 0.4 > 1.0
    assert b.describe().startswith("budget reached: max_usd")
    b.release(0.4, 10)
    b.spend(0.1, 10, 1)
    assert b.admit(0.4, 10)
    t = Budget(BudgetConfig(max_tokens=100, max_requests=2), tokens=50)
    assert t.admit(0, 50)
    assert not t.admit(0, 1) and t.exhausted == "max_tokens"
    r = Budget(BudgetConfig(max_requests=2))
    assert r.admit(0, 0) and r.admit(0, 0) and not r.admit(0, 0) and r.exhausted == "max_requests"


def test_budget_settles_reservations_into_what_was_used():
    b = Budget(BudgetConfig(max_usd=1.0, max_requests=3), spent_usd=0.2, requests=1)  # an earlier run's spend
    assert b.fits(0.5, 100)
    b.reserve(0.5, 100)
    assert not b.fits(0.5, 100)  # 0.2 spent + 0.5 reserved + 0.5 > 1.0: wait for the one in flight
    b.settle(0.5, 100, 0.1, 40)  # it cost less than its upper bound
    assert (b.reserved_requests, b.requests, round(b.spent_usd, 9), b.tokens) == (0, 2, 0.3, 40)
    assert b.fits(0.5, 100)
    b.reserve(0.5, 100)
    b.settle(0.5, 100, 0.0, 0)  # a 500: not billed, still a request
    assert not b.fits(0.01, 1) and b.exhausted == "max_requests"


def test_health_stops_a_teacher_never_reached_fast_and_rides_out_a_brief_outage():
    now = [0.0]
    h = Health(down_after=4, down_after_s=60.0, clock=lambda: now[0])
    assert [h.failed(connect=True) for _ in range(4)] == [False, False, False, True]  # refused from the start
    h = Health(down_after=4, down_after_s=60.0, clock=lambda: now[0])
    assert not any(h.failed(connect=False) for _ in range(50))  # 5xx from the start: give it time
    now[0] = 61.0
    assert h.failed(connect=False)
    h = Health(down_after=4, down_after_s=60.0, clock=lambda: now[0])
    h.ok()
    assert not any(h.failed(connect=True) for _ in range(500))  # it answered before: a restart is ridden out
    now[0] += 30
    assert not h.failed(connect=True)
    now[0] += 31
    assert h.failed(connect=True)
    h.ok()
    assert not h.failed(connect=True)


def test_retry_policy_by_class():
    pol = RetryPolicy(RetryConfig(max_attempts=3, base_delay_s=1.0, max_delay_s=8.0), rng=random.Random(1))
    for exc in (QuotaExhausted("q"), AuthError("a"), ContextTooLong("c"), ContentFiltered("f")):
        assert pol.delay(exc, 1) is None
    assert pol.delay(RateLimited("r", retry_after=5), 1) == 0.0  # the limiter pauses the teacher instead
    assert pol.delay(RateLimited("r"), 11) == 0.0 and pol.delay(RateLimited("r"), 12) is None
    for exc in (ServerError("s"), NetworkError("n"), BadResponse("b")):
        d1, d2 = pol.delay(exc, 1), pol.delay(exc, 2)
        assert 0 <= d1 <= 1.0 and 0 <= d2 <= 2.0
        assert pol.delay(exc, 3) is None
    assert pol.delay(ServerError("s", retry_after=4.0), 1) >= 4.0  # a server's Retry-After wins when longer
