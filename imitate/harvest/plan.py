"""Pure planning: which teacher(s) a query goes to, the exact `Request`s, and the budget that admits them.

Routing rules (all deterministic in the query id, so a resumed run plans the same requests):
- Main route: every query goes to exactly one *main* teacher (no `subset_fraction`, not `fallback`), chosen by
  weight among those whose `collections` admit the query's collection.
- Subsets: a teacher with `subset_fraction=f` also gets a copy of the fraction f of queries (Orca: every query to
  teacher A, a 20 % subset also to teacher B).
- Fallback: a `fallback` teacher takes a main-route request when the routed teacher is out of quota or down.
- `samples_per_prompt=n` makes n requests per route, told apart by `sample_index` only: all n share the query's
  system message, so rejection sampling compares answers to the same prompt.
"""

from __future__ import annotations

from collections.abc import Callable

from imitate.config import BudgetConfig, HarvestConfig, Price, TeacherConfig, redact_url
from imitate.errors import ConfigError
from imitate.records import Query, Request, unit_hash
from imitate.teacher.buckets import estimate_tokens

Sample = Callable[[Query], tuple[str | None, str | None, str | None]]


class Planned:
    """One request planned for a query. `key` is `request.key()`, kept up to date when the request is replaced
    (re-routing): it hashes the whole request, and the collector needs it several times per row."""

    __slots__ = ("_request", "key", "query", "route")

    def __init__(self, request: Request, query: Query, route: str):
        self.request = request
        self.query = query
        self.route = route  # "main" or the subset teacher's name

    @property
    def request(self) -> Request:
        return self._request

    @request.setter
    def request(self, request: Request) -> None:
        self._request = request
        self.key = request.key()

    def __repr__(self) -> str:
        return f"Planned(request={self._request!r}, query={self.query!r}, route={self.route!r})"


class Planner:
    def __init__(self, cfg: HarvestConfig, sample_system: Sample):
        self.cfg = cfg
        self.sample_system = sample_system
        self.main = [t for t in cfg.teachers if t.subset_fraction is None and not t.fallback]
        self.subsets = [t for t in cfg.teachers if t.subset_fraction is not None and not t.fallback]
        self.fallbacks = [t for t in cfg.teachers if t.fallback]
        if not self.main:
            raise ConfigError(
                "harvest.teachers: no main teacher",
                hint="at least one teacher needs no subset_fraction and fallback: false",
            )

    @staticmethod
    def _admits(t: TeacherConfig, q: Query) -> bool:
        return t.collections is None or (q.collection in t.collections)

    def route_main(self, q: Query) -> TeacherConfig | None:
        pool = [t for t in self.main if self._admits(t, q) and t.weight > 0]
        if not pool:
            return None
        total = sum(t.weight for t in pool)
        x = unit_hash("route", q.id) * total
        for t in pool:
            x -= t.weight
            if x < 0:
                return t
        return pool[-1]

    def request(self, q: Query, t: TeacherConfig, sample_index: int) -> Request:
        prompt_id, sha, text = self.sample_system(q)
        return Request(
            query_id=q.id,
            teacher=t.name,
            model=t.model,
            # the teacher, not the replica that will answer (a fleet is one teacher: one cache key); requests
            # and their records never hold URL credentials
            base_url=redact_url(t.key_url),
            messages=q.messages(text),
            params=self.cfg.params,
            sample_index=sample_index,
            system_prompt_id=prompt_id,
            system_prompt_sha256=sha,
        )

    def plan(self, q: Query) -> list[Planned]:
        out = []
        main = self.route_main(q)
        routes: list[tuple[str, TeacherConfig]] = [("main", main)] if main else []
        for t in self.subsets:
            if self._admits(t, q) and unit_hash("subset", t.name, q.id) < (t.subset_fraction or 0):
                routes.append((t.name, t))
        for route, t in routes:
            for i in range(self.cfg.samples_per_prompt):
                out.append(Planned(self.request(q, t, i), q, route))
        return out

    def fallback_for(self, p: Planned, dead: set[str]) -> Request | None:
        """The same request sent to the first live fallback teacher (main route only)."""
        if p.route != "main":
            return None
        for t in self.fallbacks:
            if t.name not in dead and self._admits(t, p.query):
                return self.request(p.query, t, p.request.sample_index)
        return None

    def fallback_requests(self, p: Planned) -> list[Request]:
        """Every request a fallback could have answered for this row: if one is done, the row is done."""
        if p.route != "main":
            return []
        return [self.request(p.query, t, p.request.sample_index) for t in self.fallbacks if self._admits(t, p.query)]


class Budget:
    """Spend limits that are never crossed: an attempt is admitted only if what the teacher may already have
    billed (every run of this output, from the ledger), what the attempts in flight reserve and its own
    upper-bound estimate all fit. Every attempt counts, retries included. Pure; the collector drives it:

        if budget.fits(est_usd, est_tokens): budget.reserve(...)  ...send...  budget.settle(est..., actual...)

    When an attempt does not fit while others are in flight, the caller waits for them to settle (their actual
    cost is usually below the reservation) and asks again; it stops only when the attempt does not fit with
    nothing in flight, so the budget is used to within one request's estimate."""

    def __init__(self, cfg: BudgetConfig, *, spent_usd: float = 0.0, tokens: int = 0, requests: int = 0):
        self.cfg = cfg
        self.spent_usd = spent_usd
        self.tokens = tokens
        self.requests = requests
        self.reserved_usd = 0.0
        self.reserved_tokens = 0
        self.reserved_requests = 0
        self.exhausted: str | None = None

    def fits(self, est_usd: float, est_tokens: int, est_requests: int = 1) -> bool:
        c = self.cfg
        checks = (
            ("max_usd", c.max_usd, self.spent_usd + self.reserved_usd + est_usd),
            ("max_tokens", c.max_tokens, self.tokens + self.reserved_tokens + est_tokens),
            ("max_requests", c.max_requests, self.requests + self.reserved_requests + est_requests),
        )
        for name, limit, would_be in checks:
            if limit is not None and would_be > limit * (1 + 1e-12):
                self.exhausted = name
                return False
        return True

    def reserve(self, est_usd: float, est_tokens: int, est_requests: int = 1) -> None:
        self.reserved_usd += est_usd
        self.reserved_tokens += est_tokens
        self.reserved_requests += est_requests

    def admit(self, est_usd: float, est_tokens: int, est_requests: int = 1) -> bool:
        """`fits` then `reserve` (batch mode, which reserves a whole file of requests up front)."""
        if not self.fits(est_usd, est_tokens, est_requests):
            return False
        self.reserve(est_usd, est_tokens, est_requests)
        return True

    def release(self, est_usd: float, est_tokens: int, est_requests: int = 1) -> None:
        """A reservation whose request was never sent."""
        self.reserved_usd = max(0.0, self.reserved_usd - est_usd)
        self.reserved_tokens = max(0, self.reserved_tokens - est_tokens)
        self.reserved_requests = max(0, self.reserved_requests - est_requests)

    def spend(self, usd: float, tokens: int, requests: int) -> None:
        self.spent_usd += usd
        self.tokens += tokens
        self.requests += requests

    def settle(self, est_usd: float, est_tokens: int, usd: float, tokens: int) -> None:
        """A sent attempt ended: its reservation becomes what it really used (one request, billed or not)."""
        self.release(est_usd, est_tokens)
        self.spend(usd, tokens, 1)

    def describe(self) -> str:
        c = self.cfg
        if self.exhausted == "max_usd":
            return f"budget reached: max_usd ${self.spent_usd:.4f} spent of ${c.max_usd}"
        if self.exhausted == "max_tokens":
            return f"budget reached: max_tokens {self.tokens} used of {c.max_tokens}"
        if self.exhausted == "max_requests":
            return f"budget reached: max_requests {self.requests} sent of {c.max_requests}"
        return "within budget"


def estimate_request(req: Request, price: Price, max_tokens: int | None = None) -> tuple[int, float]:
    """(tokens, USD) upper bounds of one request: its prompt estimate plus every completion token it may use
    (`max_tokens`: a re-ask's larger limit). The one estimate the collector, batch mode and the dry run share."""
    max_tokens = req.params.max_tokens if max_tokens is None else max_tokens
    est = estimate_tokens(req.messages, max_tokens)
    return est, price.cost(max(0, est - max_tokens), max_tokens)
