"""`imitate harvest --mode batch`: the same rows through the Batch API, at its price, into the same journal.

    plan (skip journaled and already-submitted keys) ─▶ request files (≤ 50,000 lines, ≤ 200 MB each)
        ─▶ upload ─▶ create batch ─▶ poll ─▶ stream output + error files into the journal
        ─▶ resubmit only rows that are missing or failed with a retryable class (bounded rounds)

`batches/state.json` lists every submitted batch; a rerun polls and collects those instead of submitting the
same rows again, so a batch is paid once even across crashes. Each request file has a sidecar `.meta.jsonl`
with the query and request of every line, so results become full Records with provenance.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from imitate.config import ImitateConfig
from imitate.errors import ImitateError, TeacherError
from imitate.harvest.journal import MANIFEST, Journal, write_json_atomic
from imitate.harvest.plan import Budget, Planned, estimate_request
from imitate.harvest.results import Accum, build_record
from imitate.harvest.run import Outcome, build_planner, make_clients, manifest_totals
from imitate.harvest.sources import open_source
from imitate.records import Query, Request
from imitate.teacher.client import error_for_status, reply_from_body

MAX_LINES = 50_000
MAX_BYTES = 200 * 1024 * 1024
TERMINAL = {"completed", "failed", "expired", "cancelled"}


class BatchState:
    """The submitted batches of one output directory, persisted atomically after every change."""

    def __init__(self, out_dir: Path):
        self.dir = out_dir / "batches"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "state.json"
        self.batches: list[dict[str, Any]] = (
            json.loads(self.path.read_text(encoding="utf-8"))["batches"] if self.path.exists() else []
        )

    def save(self) -> None:
        write_json_atomic(self.path, {"batches": self.batches})

    def outstanding(self) -> list[dict[str, Any]]:
        return [b for b in self.batches if not b.get("collected")]

    def next_name(self) -> str:
        return f"batch-{len(self.batches):05d}"


def _line(p: Planned) -> dict[str, Any]:
    req = p.request
    body = {"model": req.model, "messages": [m.model_dump() for m in req.messages], **req.params.api_kwargs()}
    return {"custom_id": req.key(), "method": "POST", "url": "/v1/chat/completions", "body": body}


class _Writer:
    """Request files for one teacher, cut at the Batch API's line and byte limits."""

    def __init__(self, state: BatchState, teacher: str, round_: int, max_lines: int, max_bytes: int):
        self.state, self.teacher, self.round = state, teacher, round_
        self.max_lines, self.max_bytes = max_lines, max_bytes
        self.files: list[tuple[Path, Path]] = []
        self._open: tuple[Any, Any] | None = None
        self._lines = self._bytes = 0

    def add(self, p: Planned) -> None:
        data = (json.dumps(_line(p), ensure_ascii=False) + "\n").encode()
        if self._open is None or self._lines >= self.max_lines or self._bytes + len(data) > self.max_bytes:
            self._roll()
        req_f, meta_f = self._open  # type: ignore[misc]
        req_f.write(data)
        meta = {"custom_id": p.request.key(), "route": p.route, "query": p.query.model_dump(mode="json"),
                "request": p.request.model_dump(mode="json")}  # fmt: skip
        meta_f.write((json.dumps(meta, ensure_ascii=False) + "\n").encode())
        self._lines += 1
        self._bytes += len(data)

    def _roll(self) -> None:
        self.close()
        name = f"{self.state.next_name()}-{self.teacher}-r{self.round}-{len(self.files)}"
        req_path, meta_path = self.state.dir / f"{name}.jsonl", self.state.dir / f"{name}.meta.jsonl"
        self._open = (open(req_path, "wb"), open(meta_path, "wb"))  # noqa: SIM115 — closed in close()
        self.files.append((req_path, meta_path))
        self._lines = self._bytes = 0

    def close(self) -> None:
        if self._open:
            for f in self._open:
                f.close()
            self._open = None


def _load_meta(meta_path: Path) -> dict[str, Planned]:
    out = {}
    with open(meta_path, encoding="utf-8") as f:
        for line in f:
            m = json.loads(line)
            out[m["custom_id"]] = Planned(
                Request.model_validate(m["request"]), Query.model_validate(m["query"]), m["route"]
            )
    return out


def _submitted_keys(state: BatchState) -> set[str]:
    keys: set[str] = set()
    for b in state.outstanding():
        keys.update(_load_meta(Path(b["meta_file"])))
    return keys


async def _submit(client: Any, state: BatchState, teacher: str, files: list[tuple[Path, Path]], round_: int) -> None:
    for req_path, meta_path in files:
        entry = {"name": req_path.stem, "teacher": teacher, "round": round_, "request_file": str(req_path),
                 "meta_file": str(meta_path), "id": None, "status": "uploading", "collected": False}  # fmt: skip
        state.batches.append(entry)
        entry["input_file_id"] = await client.upload_batch_file(req_path)
        state.save()
        batch = await client.create_batch(entry["input_file_id"], metadata={"imitate": req_path.stem})
        entry.update(id=batch["id"], status=batch["status"])
        state.save()


class BatchHarvest:
    def __init__(self, cfg: ImitateConfig, out_dir: Path, clients: dict[str, Any], *, poll_s: float = 30.0):
        self.cfg, self.h, self.out_dir, self.clients, self.poll_s = cfg, cfg.harvest, out_dir, clients, poll_s
        self.planner = build_planner(cfg)
        self.journal = Journal(out_dir, shard_rows=self.h.shard_rows, fsync_every=self.h.fsync_every)
        self.state = BatchState(out_dir)
        # online attempts are in the ledger, batch lines only in their records: the larger of the two, per field
        t, spent = self.journal.totals(), self.journal.ledger.spent
        self.budget = Budget(self.h.budget, spent_usd=max(t.cost_usd, spent.usd), tokens=max(t.tokens, spent.tokens),
                             requests=max(t.attempts, spent.requests))  # fmt: skip
        # requests: lines sent in batch files; batch_files: the files that carried them
        self.counts = {"ok": 0, "failed": 0, "requests": 0, "batch_files": 0, "resubmitted": 0, "skipped_done": 0,
                       "planned": 0}  # fmt: skip
        self.stop_reason: str | None = None
        self.source_exhausted = False

    # -------------------------------------------------------------------------------------- planning

    def plan(self, source: Any, round_: int = 0) -> dict[str, list[tuple[Path, Path]]]:
        pending = _submitted_keys(self.state)
        writers: dict[str, _Writer] = {}
        for q in source:
            for p in self.planner.plan(q):
                self.counts["planned"] += 1
                key = p.request.key()
                if key in pending or self.journal.status_of(key) is not None:
                    self.counts["skipped_done"] += 1
                    continue
                if not self._admit(p):
                    return self._close(writers)
                w = writers.setdefault(
                    p.request.teacher, _Writer(self.state, p.request.teacher, round_, MAX_LINES, MAX_BYTES)
                )
                w.add(p)
                pending.add(key)
        self.source_exhausted = True
        return self._close(writers)

    def _admit(self, p: Planned) -> bool:
        price = self.cfg.price_for(p.request.model)
        est, est_usd = estimate_request(p.request, price)
        est_usd *= price.batch_multiplier
        if not self.budget.admit(est_usd, est):
            self.stop_reason = self.budget.describe()
            return False
        return True

    @staticmethod
    def _close(writers: dict[str, _Writer]) -> dict[str, list[tuple[Path, Path]]]:
        for w in writers.values():
            w.close()
        return {t: w.files for t, w in writers.items()}

    # -------------------------------------------------------------------------------------- collecting

    async def wait_and_collect(self) -> list[Planned]:
        """Poll every outstanding batch to a terminal state and journal its lines; returns rows to resubmit."""
        retry: list[Planned] = []
        while self.state.outstanding():
            for b in self.state.outstanding():
                if b["id"] is None:  # crashed between upload and create: never created, never paid
                    b["collected"] = True
                    retry.extend(_load_meta(Path(b["meta_file"])).values())
                    continue
                info = await self.clients[b["teacher"]].get_batch(b["id"])
                b["status"] = info["status"]
                if info["status"] in TERMINAL:
                    retry.extend(await self._collect(b, info))
                    b["collected"] = True
                self.state.save()
            if self.state.outstanding():
                await asyncio.sleep(self.poll_s)
        return retry

    async def _collect(self, b: dict[str, Any], info: dict[str, Any]) -> list[Planned]:
        client = self.clients[b["teacher"]]
        planned = _load_meta(Path(b["meta_file"]))
        seen: set[str] = set()
        retry: list[Planned] = []
        for file_key in ("output_file_id", "error_file_id"):
            if not info.get(file_key):
                continue
            for raw in (await client.download_file(info[file_key])).decode().splitlines():
                if not raw.strip():
                    continue
                item = json.loads(raw)
                p = planned.get(item.get("custom_id"))
                if p is None or p.request.key() in seen:
                    continue
                seen.add(p.request.key())
                if self._journal_line(p, item, b["round"]):
                    retry.append(p)
        retry.extend(p for key, p in planned.items() if key not in seen)  # lines the batch never answered
        self.journal.flush()
        return retry

    def _journal_line(self, p: Planned, item: dict[str, Any], round_: int) -> bool:
        """Journal one output line; True when the row should be resubmitted instead."""
        response = item.get("response") or {}
        status = int(response.get("status_code") or 0)
        body = response.get("body")
        acc = Accum(attempts=round_ + 1)
        try:
            if status != 200:
                raise error_for_status(status or 500, {}, body or item.get("error"))
            reply = reply_from_body(json.dumps(body).encode(), {"x-request-id": response.get("request_id") or ""}, 0.0)
        except TeacherError as exc:
            if exc.retryable and round_ + 1 < self.h.retry.max_attempts:
                return True
            self.journal.append(build_record(p, acc, params=p.request.params, error=exc))
            self.counts["failed"] += 1
            return False
        price = self.cfg.price_for(p.request.model)
        acc.usage = reply.usage
        acc.cost = price.cost(reply.usage.prompt_tokens, reply.usage.completion_tokens) * price.batch_multiplier
        self.budget.spend(acc.cost, reply.usage.total_tokens, 1)
        self.journal.append(build_record(p, acc, params=p.request.params, reply=reply))
        self.counts["ok"] += 1
        return False

    # -------------------------------------------------------------------------------------- the run

    async def _submit(self, teacher: str, files: list[tuple[Path, Path]], round_: int) -> None:
        self.counts["batch_files"] += len(files)
        for req_path, _ in files:
            with open(req_path, "rb") as f:
                self.counts["requests"] += sum(1 for _ in f)
        await _submit(self.clients[teacher], self.state, teacher, files, round_)

    async def run(self, source: Any) -> None:
        retry = await self.wait_and_collect()  # batches a previous (crashed) run submitted come first
        files = self.plan(source)
        for teacher, fs in files.items():
            await self._submit(teacher, fs, 0)
        retry += await self.wait_and_collect()
        round_ = 1
        while retry and round_ < self.h.retry.max_attempts:
            writers: dict[str, _Writer] = {}
            for p in retry:
                if self.journal.status_of(p.request.key()) is None:
                    writers.setdefault(p.request.teacher, _Writer(self.state, p.request.teacher, round_, MAX_LINES,
                                                                  MAX_BYTES)).add(p)  # fmt: skip
                    self.counts["resubmitted"] += 1
            for teacher, fs in self._close(writers).items():
                await self._submit(teacher, fs, round_)
            retry = await self.wait_and_collect()
            round_ += 1


async def harvest_batch(
    cfg: ImitateConfig,
    input_path: str,
    out_dir: Path,
    *,
    command: str = "imitate harvest --mode batch",
    clients: dict[str, Any] | None = None,
    poll_s: float = 30.0,
) -> Outcome:
    from imitate.config import redacted, stamp

    own = clients is None
    clients = clients if clients is not None else make_clients(cfg)
    source = open_source(input_path, cfg.harvest.source)
    stamp(cfg, out_dir, command)
    run = BatchHarvest(cfg, out_dir, clients, poll_s=poll_s)
    started = time.time()
    error: ImitateError | None = None
    try:
        await run.run(source)
        if run.source_exhausted and run.stop_reason is None:
            run.journal.set_meta("planned", str(run.counts["planned"]))
    finally:
        totals = manifest_totals(run.journal)
        manifest = {
            "mode": "batch",
            "command": command,
            "input": input_path,
            "status": "complete" if totals["pending"] == 0 and run.stop_reason is None else "partial",
            "stop_reason": run.stop_reason,
            "started_at": round(started, 3),
            "finished_at": round(time.time(), 3),
            "totals": totals,
            "this_run": {**run.counts, "throttled_429": 0},
            "batches": run.state.batches,
            "config": redacted(cfg),
        }
        write_json_atomic(out_dir / MANIFEST, manifest)
        run.journal.close()
        if own:
            for c in clients.values():
                await c.aclose()
    if run.stop_reason:
        from imitate.errors import BudgetExhausted

        error = BudgetExhausted(run.stop_reason, hint="partial output is valid; rerun to resume")
    return Outcome(manifest, error)
