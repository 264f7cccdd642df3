"""Running a harvest end to end: set-up, the collector under signal handling, the manifest, status, dry run.

imitate harvest data/samples/queries.jsonl --out data/runs/demo --base-url http://127.0.0.1:8089/v1
imitate status data/runs/demo
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imitate import __version__
from imitate.config import ImitateConfig, TeacherConfig, redact_url, redacted, resolve_api_key, stamp
from imitate.errors import BudgetExhausted, ImitateError, InputError, Interrupted, StorageError, TeacherError
from imitate.harvest.collector import Collector
from imitate.harvest.fleet import FleetClients
from imitate.harvest.journal import MANIFEST, Journal, write_json_atomic
from imitate.harvest.plan import Budget, Planner, estimate_request
from imitate.harvest.progress import Progress
from imitate.harvest.sources import open_source
from imitate.prompts import SystemMessageSampler, load_library
from imitate.records import Query


@dataclass
class Outcome:
    manifest: dict[str, Any]
    error: ImitateError | None


def build_planner(cfg: ImitateConfig) -> Planner:
    h = cfg.harvest
    sampler = SystemMessageSampler(load_library(), h.preset, weights=h.preset_weights, seed=h.seed)
    return Planner(h, sampler.sample)


def make_clients(cfg: ImitateConfig) -> dict[str, Any]:
    """One TeacherClient per configured teacher (online and batch mode), or for a teacher with several
    `base_urls` a FleetClients holding one per replica; every missing key is reported first."""
    from imitate.teacher.client import TeacherClient

    keys = {t.name: resolve_api_key(t) for t in cfg.harvest.teachers}  # every missing key reported before work

    def client(t: TeacherConfig, url: str) -> TeacherClient:
        return TeacherClient(
            base_url=url,
            api_key=keys[t.name],
            timeout=t.timeout_s,
            max_connections=max(64, t.max_concurrency * 2),  # per replica: each has its own concurrency
            transport=t.transport,
            ca_bundle=t.ca_bundle,
            max_response_bytes=t.max_response_bytes,
        )

    return {
        t.name: FleetClients([client(t, u) for u in t.replicas]) if len(t.replicas) > 1 else client(t, t.base_url)
        for t in cfg.harvest.teachers
    }


def manifest_totals(journal: Journal) -> dict[str, Any]:
    """The `totals` block of a manifest (online and batch runs alike): what every run of this output did."""
    totals = journal.totals()
    planned = journal.get_meta("planned")
    pending = None
    if planned is not None:  # rows that failed transiently are asked again: they are pending
        pending = max(0, int(planned) - totals.ok - totals.failed)
    spent = journal.ledger.spent
    return {
        "ok": totals.ok,
        "failed": totals.failed,
        "retry_next_run": totals.retry,
        "failed_by_class": totals.failed_by_class,
        "tokens": totals.tokens,
        "spend_usd": round(totals.cost_usd, 8),
        "attempts": totals.attempts,
        "pending": pending,
        "planned": int(planned) if planned is not None else None,
        # what the teacher may have billed, every attempt of every run (the budget counts these)
        "billable": {"requests": spent.requests, "usd_upper_bound": round(spent.usd, 8), "tokens": spent.tokens},
    }


def _manifest(
    cfg: ImitateConfig,
    col: Collector,
    journal: Journal,
    *,
    command: str,
    source_name: str,
    out_dir: Path,
    started_at: float,
    source: Any,
) -> dict[str, Any]:
    s = col.stats
    totals = manifest_totals(journal)
    complete = s.source_exhausted and col.stop_reason is None and totals["pending"] == 0
    return {
        "imitate_version": __version__,
        "command": command,
        "input": source_name,
        "out": str(out_dir),
        "status": "complete" if complete else "partial",
        "stop_reason": col.stop_reason,
        "started_at": round(started_at, 3),
        "finished_at": round(time.time(), 3),
        "elapsed_s": round(time.monotonic() - s.started, 3),
        "totals": totals,
        "this_run": {
            "ok": s.ok,
            "failed": s.failed,
            "truncated": s.truncated,
            "skipped_done": s.skipped_done,
            "requests": s.requests,
            "throttled_429": s.throttled,
            "retries": s.retries,
            "tokens": s.tokens,
            "spend_usd": round(s.spend_usd, 8),
            "resent_after_crash": journal.resent_after_crash,
            "recovered_rows": journal.recovered_rows,
            "dropped_damaged_rows": journal.dropped_rows,
            "index_rebuilt": journal.rebuilt,
            "skipped_bad_input_rows": getattr(source, "skipped", 0),
        },
        "teachers": {name: rt.snapshot() for name, rt in col.teachers.items()},
        "config": redacted(cfg),
    }


def _final_error(col: Collector, manifest: dict[str, Any], input_path: str, source: Any) -> ImitateError | None:
    if col.fatal is not None:
        return col.fatal
    if col.stats.source_exhausted and col.stats.planned == 0:
        skipped = getattr(source, "skipped", 0)
        if skipped:
            return InputError(f"{input_path}: every row was skipped as malformed ({skipped} rows)",
                              hint="fix the rows or the source.fields mapping")  # fmt: skip
        return InputError(f"{input_path}: no rows to harvest", hint="the input is empty (or --limit is 0)")
    if manifest["status"] == "complete":
        return None
    reason = col.stop_reason or "not every planned row finished"
    hint = "partial output is valid; rerun the same command to resume"
    if reason.startswith("budget"):
        return BudgetExhausted(reason, hint=hint)
    if reason.startswith("interrupted"):
        return Interrupted(reason, hint=hint)
    if "teacher" in reason:
        return TeacherError(reason, hint=hint)
    if not col.stats.source_exhausted:
        return Interrupted(reason, hint=hint)
    retry = manifest["totals"]["retry_next_run"]
    if retry:
        return TeacherError(f"{retry} rows failed for a transient reason (see failures.jsonl)",
                            hint="rerun the same command to ask for them again")  # fmt: skip
    return None


async def harvest(
    cfg: ImitateConfig,
    input_path: str,
    out_dir: Path,
    *,
    command: str = "imitate harvest",
    progress: str = "live",
    clients: dict[str, Any] | None = None,
    source: Iterable[Query] | None = None,
    progress_interval: float | None = None,
) -> Outcome:
    """Harvest `input_path` into `out_dir`. Never raises for a row; returns the manifest and the stop error.
    `source`: queries made by the caller (`imitate generate`) instead of reading `input_path`, which then only
    names them in the manifest and messages. `progress_interval`: seconds between progress updates (None: the
    mode's own)."""
    h = cfg.harvest
    own_clients = clients is None
    clients = clients if clients is not None else make_clients(cfg)
    planner = build_planner(cfg)
    source = open_source(input_path, h.source) if source is None else source
    started_at = time.time()
    journal = Journal(out_dir, shard_rows=h.shard_rows, fsync_every=h.fsync_every)
    stamp(cfg, out_dir, command)
    spent = journal.ledger.spent  # every attempt of every earlier run, crashed ones at their estimate
    budget = Budget(h.budget, spent_usd=spent.usd, tokens=spent.tokens, requests=spent.requests)
    col = Collector(cfg, source, planner, journal, clients, budget=budget)
    view = Progress(progress, col, getattr(source, "count_hint", lambda: None)(), interval=progress_interval)
    loop = asyncio.get_running_loop()
    signals = _install_signals(loop, col)
    view.start()
    ticker = asyncio.create_task(_tick(view, col, journal, out_dir))
    try:
        await col.run()
        if col.stats.source_exhausted and col.stop_reason is None:
            journal.set_meta("planned", str(col.stats.planned))
    except StorageError as exc:
        col.fatal = col.fatal or exc
    finally:
        ticker.cancel()
        view.stop()
        for sig in signals:
            loop.remove_signal_handler(sig)
        manifest = _manifest(cfg, col, journal, command=command, source_name=input_path, out_dir=out_dir,
                             started_at=started_at, source=source)  # fmt: skip
        for step in (lambda: write_json_atomic(out_dir / MANIFEST, manifest), journal.close):
            try:
                step()
            except StorageError as exc:  # a full disk: the journal stays valid, the manifest is rewritten next run
                col.fatal = col.fatal or exc
        if own_clients:
            for c in clients.values():
                await c.aclose()
    return Outcome(manifest, _final_error(col, manifest, input_path, source))


async def _tick(view: Progress, col: Collector, journal: Journal, out_dir: Path) -> None:
    while True:
        await asyncio.sleep(view.interval)
        view.tick()


def _install_signals(loop: asyncio.AbstractEventLoop, col: Collector) -> list[int]:
    """First SIGINT/SIGTERM: stop admitting and drain. Second: drop in-flight work now (it stays pending)."""
    hits = {"n": 0}

    def on_signal(sig: int) -> None:
        hits["n"] += 1
        name = signal.Signals(sig).name
        if hits["n"] == 1:
            col.stop(f"interrupted ({name})")
        else:
            col.h = col.h.model_copy(update={"drain_timeout_s": 0.0})
            for task in list(col._tasks):
                task.cancel()

    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests driving it in-process)
            pass
    return installed


# ------------------------------------------------------------------------------------------------ status


def status(out_dir: Path) -> dict[str, Any]:
    """`imitate status DIR`: the journal's totals and the last manifest's status, as a dict (read-only)."""
    if not out_dir.is_dir():
        raise InputError(f"{out_dir}: no such directory", hint="pass the --out directory of a harvest")
    journal = Journal(out_dir, readonly=True)
    try:
        totals = journal.totals()
        planned = journal.get_meta("planned")
    finally:
        journal.close()
    manifest: dict[str, Any] = {}
    if (out_dir / MANIFEST).exists():
        import json

        try:
            manifest = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # the journal's counts above still stand; the manifest is rewritten next run
            manifest = {"status": f"unknown ({MANIFEST} unreadable)"}
    finished = totals.ok + totals.failed
    return {
        "out": str(out_dir),
        "done": totals.ok,
        "failed": totals.failed,
        "failed_by_class": totals.failed_by_class,
        "pending": max(0, int(planned) - finished) if planned is not None else None,
        "planned": int(planned) if planned is not None else None,
        "spend_usd": round(totals.cost_usd, 6),
        "tokens": totals.tokens,
        "attempts": totals.attempts,
        "last_status": manifest.get("status"),
        "last_stop_reason": manifest.get("stop_reason"),
    }


# ------------------------------------------------------------------------------------------------ dry run


def dry_run(cfg: ImitateConfig, input_path: str, out_dir: Path | None) -> dict[str, Any]:
    """Plan every request without sending any: counts, estimated tokens, cost and time at the limits."""
    h = cfg.harvest
    planner = build_planner(cfg)
    source = open_source(input_path, h.source)
    journal = Journal(out_dir, readonly=True) if out_dir and (out_dir / "journal.sqlite").exists() else None
    per: dict[str, dict[str, float]] = {t.name: {"requests": 0, "tokens": 0, "usd": 0.0} for t in h.teachers}
    already = 0
    try:
        for q in source:
            for p in planner.plan(q):
                if journal and journal.status_of(p.request.key()) is not None:
                    already += 1
                    continue
                est, usd = estimate_request(p.request, cfg.price_for(p.request.model))
                d = per[p.request.teacher]
                d["requests"] += 1
                d["tokens"] += est
                d["usd"] += usd
    finally:
        if journal:
            journal.close()
    teachers = {}
    for t in h.teachers:
        d = per[t.name]
        n = len(t.replicas)  # limits are per replica: a fleet of n moves n times as much
        minutes = [d["requests"] / (t.rpm * n) if t.rpm else 0.0, d["tokens"] / (t.tpm * n) if t.tpm else 0.0]
        teachers[t.name] = {
            "replicas": [redact_url(u) for u in t.replicas],
            "requests": int(d["requests"]),
            "est_tokens_upper_bound": int(d["tokens"]),
            "est_usd_upper_bound": round(d["usd"], 4),
            "est_minutes_at_limits": round(max(minutes), 2) if (t.rpm or t.tpm) else None,
        }
    return {
        "requests": sum(int(d["requests"]) for d in per.values()),
        "already_done": already,
        "skipped_bad_input_rows": getattr(source, "skipped", 0),
        "teachers": teachers,
    }
