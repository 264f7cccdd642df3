"""How harvested rows end: what one row's attempts added up to (`Accum`), the run's counters (`Stats`), and
`build_record`, the one place a row becomes a `Record` (online and batch mode alike). Pure: no I/O, no asyncio.

    attempts ─▶ Accum (attempts, usage, cost) ─▶ build_record(planned, acc, reply or error) ─▶ Record
        ─▶ the journal (by the collector or batch mode) and Stats.count
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from imitate import __version__
from imitate.errors import TeacherError
from imitate.harvest.plan import Planned
from imitate.records import GenerationParams, Provenance, Record, Usage
from imitate.teacher.reply import Reply


@dataclass
class Accum:
    """One row across its attempts (and re-asks): how many were sent, what they used and cost, and where the
    last one went."""

    attempts: int = 0
    usage: Usage = field(default_factory=Usage)
    cost: float = 0.0
    replica: str | None = None  # the fleet replica of the last attempt (None: a lone server)


@dataclass
class Stats:
    """The run's counters, for the progress view and the run summary."""

    started: float = field(default_factory=time.monotonic)
    planned: int = 0
    skipped_done: int = 0
    ok: int = 0
    failed: int = 0
    truncated: int = 0
    requests: int = 0
    throttled: int = 0
    retries: int = 0
    tokens: int = 0
    spend_usd: float = 0.0
    failed_by_class: Counter = field(default_factory=Counter)
    source_exhausted: bool = False

    def count(self, record: Record, acc: Accum) -> None:
        """A row ended as `record` (journaled), its attempts having added up to `acc`."""
        if record.status == "failed":
            self.failed += 1
            self.failed_by_class[record.error_class] += 1
        else:
            self.ok += 1
            self.truncated += record.truncated
        self.tokens += acc.usage.total_tokens
        self.spend_usd += acc.cost


def build_record(
    p: Planned, acc: Accum, *, params: GenerationParams, reply: Reply | None = None, error: TeacherError | None = None
) -> Record:
    """The one place a harvested row becomes a Record (online and batch mode alike)."""
    req = p.request
    prov = Provenance(
        teacher=req.teacher,
        model=req.model,
        base_url=req.base_url,
        request_key=p.key,
        system_prompt_id=req.system_prompt_id,
        system_prompt_sha256=req.system_prompt_sha256,
        params=params,
        sample_index=req.sample_index,
        usage=acc.usage,
        cost_usd=round(acc.cost, 10),
        finish_reason=reply.finish_reason if reply else None,
        attempts=acc.attempts,
        latency_s=round(reply.latency_s, 6) if reply else 0.0,
        request_id=reply.request_id if reply else None,
        created_at=round(time.time(), 3),
        imitate_version=__version__,
        replica=acc.replica,
    )
    common = {"id": f"{p.query.id}/{req.teacher}/{req.sample_index}", "query": p.query, "messages": req.messages}
    if error is not None:
        return Record(
            **common,
            status="failed",
            error_class=type(error).__name__,
            error_message=error.message[:500],
            provenance=prov,
        )
    return Record(**common, response=reply.text, truncated=reply.finish_reason == "length", provenance=prov)
