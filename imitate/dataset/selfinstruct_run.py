"""The Self-Instruct loop on the harvester engine (rate limits, journal, kill -9 and resume, budgets, provenance):

    imitate generate self-instruct data/seeds/seed_tasks.jsonl --out data/runs/si --target 100

Round r: derive the round's prompts (`selfinstruct.round_queries`) → ask the teacher those not answered yet
(a harvest into DIR/generate) → parse each numbered list → filter → keep; then answer the first kept tasks still
unanswered, as many as the target still needs (a harvest into DIR/answer); repeat until N tasks are answered.

Output (DIR):
    generate/ answer/    harvest outputs (journal, ledger, shards, failures, manifest) of the two steps
    tasks.jsonl          every generated task the filters kept, in order (round, generation query id and key)
    rejected.jsonl       every generated task they rejected, with the reason
    records.jsonl        the first N answered tasks as imitate Records, in task order (tag "self-instruct";
                         query.metadata: instruction, input and the task's origin) — what `imitate train` reads
    manifest.json        rounds, generated, kept, rejected per reason, answered, requests and cost, status

Resume: every run replays from round 0. A round's prompts derive only from the seed tasks, the prompt file's
hash, `harvest.seed` and the pool the earlier rounds left, so a rerun derives the same queries; a query with a
final record in DIR is never asked again (looked up by query id: ids carry the prompt's hash), and the rest go
through the journal and ledger as in `imitate harvest` (what a killed run had in flight is counted in
`this_run.resent_after_crash`). The kept pool does not depend on the target (every passing task is kept; only
answering stops at N), so a rerun with a larger --target continues the same pool.

Budgets (--max-usd/--max-tokens/--max-requests) count both steps' ledgers together, across runs. A round asks
`--per-round` prompts at once; the answers of one batch run concurrently. Generation runs online only.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from imitate import __version__
from imitate.config import ImitateConfig, redacted
from imitate.dataset.harvested import Tail, copy_records, is_final, ledger_spent
from imitate.dataset.io import atomic_path
from imitate.dataset.selfinstruct import (
    Task,
    TaskFilter,
    answer_query,
    load_prompt,
    parse_task_list,
    pool_step,
    read_seeds,
    round_queries,
    seeds_digest,
)
from imitate.errors import BudgetExhausted, ConfigError, ImitateError, TeacherError
from imitate.harvest.ledger import Spent
from imitate.records import Query, Record, canonical_json, sha256_text

STALL_ROUNDS = 5  # rounds in a row that keep no new task: the teacher is not producing usable lists
STEPS = ("generate", "answer")
TAG = "self-instruct"


@dataclass
class Outcome:
    manifest: dict[str, Any]
    error: ImitateError | None


@dataclass
class _Counts:
    rounds: int = 0
    prompts: int = 0
    generated: int = 0
    generation_failed: int = 0
    spend_usd: float = 0.0
    tokens: int = 0
    this_run: dict[str, Counter] = field(default_factory=lambda: {s: Counter() for s in STEPS})


class SelfInstruct:
    """One run of the loop over one output directory (see the module docstring)."""

    def __init__(
        self,
        cfg: ImitateConfig,
        seeds_path: str,
        out: Path,
        *,
        target: int,
        per_round: int = 4,
        max_rounds: int | None = None,
        command: str = "imitate generate self-instruct",
        progress: str = "quiet",
        log: Callable[[str], None] | None = None,
    ):
        h = cfg.harvest
        if h.mode != "online":
            raise ConfigError("imitate generate runs online only", hint="set harvest.mode=online")
        if h.samples_per_prompt != 1:
            raise ConfigError("imitate generate asks each prompt once", hint="set harvest.samples_per_prompt=1")
        self.cfg, self.out, self.target, self.per_round, self.max_rounds = cfg, out, target, per_round, max_rounds
        self.command, self.progress, self.log = command, progress, log or (lambda _: None)
        self.spec = load_prompt()
        self.seeds_path = seeds_path
        self.seeds = read_seeds(seeds_path)
        self.seeds_sha = seeds_digest(self.seeds)
        self.dirs = {s: out / s for s in STEPS}
        gen_h = h.model_copy(update={"params": self.spec.params})
        self.step_h = {"generate": gen_h, "answer": h}
        self.filter = TaskFilter(self.spec.filters)
        for t in self.seeds:
            self.filter.add(t.instruction)
        self.tasks: list[Task] = []
        self.task_index: dict[str, int] = {}
        self.pool_digest = ""
        self.used_prompts: set[str] = set()
        self.generations: dict[str, tuple[bool, str, bool, str]] = {}  # query id -> (ok, text, truncated, key)
        self.answered: dict[str, tuple[str, int]] = {}  # task id -> (shard, offset) of its ok answer
        self.answer_failed: set[str] = set()
        self.ok_count = 0  # kept tasks answered
        self.cursor = 0  # every task before it is answered or failed for good
        self.counts = _Counts()
        self.tails = {s: Tail(d) for s, d in self.dirs.items()}
        self.spent = {s: ledger_spent(d) for s, d in self.dirs.items()}
        self.clients: dict[str, Any] | None = None
        self._files: dict[str, TextIO] = {}

    # ------------------------------------------------------------------------------------------ the loop

    async def run(self) -> Outcome:
        from imitate.harvest.run import make_clients

        started = time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        self._read_new()
        error: ImitateError | None = None
        with contextlib.ExitStack() as files:  # each file moved into place whole when the block ends
            for name in ("tasks", "rejected"):
                tmp = files.enter_context(atomic_path(self.out / f"{name}.jsonl"))
                self._files[name] = files.enter_context(open(tmp, "w", encoding="utf-8"))
            try:
                self.clients = make_clients(self.cfg)
                await self._loop()
            except ImitateError as exc:
                error = exc
            finally:
                for c in (self.clients or {}).values():
                    await c.aclose()
        written = self._write_records()
        manifest = self._manifest(started, written, error)
        from imitate.harvest.journal import write_json_atomic

        write_json_atomic(self.out / "manifest.json", manifest)
        return Outcome(manifest, error)

    async def _loop(self) -> None:
        stall = 0
        while (need := self.target - self.ok_count) > 0:
            pending = self._unanswered(need)
            if pending:
                await self._ask("answer", [answer_query(t, self.spec) for t in pending])
                self.log(f"answered {self.ok_count}/{self.target} ({len(self.answer_failed)} failed)")
                continue
            r = self.counts.rounds
            if self.max_rounds is not None and r >= self.max_rounds:
                raise BudgetExhausted(
                    f"--max-rounds {self.max_rounds} reached with {self.ok_count} of {self.target} tasks answered",
                    hint="raise it and rerun to continue",
                )
            kept = await self._round(r)
            self.counts.rounds += 1
            stall = 0 if kept else stall + 1
            if stall >= STALL_ROUNDS:
                raise TeacherError(
                    f"{STALL_ROUNDS} rounds in a row kept no new task (rejected so far: "
                    f"{dict(self.filter.rejected)}); the teacher's lists do not parse or do not pass the filters",
                    hint=f"look at {self.out}/rejected.jsonl and {self.dirs['generate']}/shard-*.jsonl",
                )

    def _unanswered(self, need: int) -> list[Task]:
        while self.cursor < len(self.tasks) and self._settled(self.tasks[self.cursor].id):
            self.cursor += 1
        rest = itertools.islice(self.tasks, self.cursor, None)
        return list(itertools.islice((t for t in rest if not self._settled(t.id)), need))

    def _settled(self, task_id: str) -> bool:
        return task_id in self.answered or task_id in self.answer_failed

    async def _round(self, r: int) -> int:
        state = sha256_text(f"{self.seeds_sha}|{self.spec.sha256}|{self.cfg.harvest.seed}|{self.pool_digest}")
        queries = round_queries(
            self.spec, self.seeds, self.tasks, round_no=r, per_round=self.per_round, state=state, used=self.used_prompts
        )
        ask = [q for q in queries if q.id not in self.generations]
        if ask:
            await self._ask("generate", ask)
        before = len(self.tasks)
        for q in queries:
            ok, text, truncated, key = self.generations[q.id]
            self.counts.prompts += 1
            if not ok:
                self.counts.generation_failed += 1
                continue
            items = parse_task_list(text, len(q.metadata["self_instruct"]["demos"]) + 1)
            if truncated and items:
                items.pop()  # cut off mid-task
                self.filter.rejected["truncated"] += 1
            self.counts.generated += len(items)
            for item in items:
                task = Task(
                    id=Task.content_id(item.instruction, item.input),
                    instruction=item.instruction,
                    input=item.input,
                    round=r,
                    generation_query_id=q.id,
                    generation_request_key=key,
                )
                self._consider(task)
        kept = len(self.tasks) - before
        self.log(f"round {r}: {len(queries)} prompts ({len(ask)} asked), {kept} tasks kept, pool {len(self.tasks)}")
        return kept

    def _consider(self, task: Task) -> None:
        if task.id in self.task_index:  # the same instruction and input again (ROUGE would say so too)
            self.filter.rejected["similar"] += 1
            why: str | None = "similar"
        else:
            why = self.filter.admit(task.instruction)
        if why is not None:
            row = {
                "reason": why,
                "instruction": task.instruction,
                "input": task.input,
                "round": task.round,
                "generation_query_id": task.generation_query_id,
            }
            self._files["rejected"].write(canonical_json(row) + "\n")
            return
        self.task_index[task.id] = len(self.tasks)
        self.tasks.append(task)
        self.pool_digest = pool_step(self.pool_digest, task.id)
        self.ok_count += task.id in self.answered
        self._files["tasks"].write(task.model_dump_json(exclude_none=True) + "\n")

    # ------------------------------------------------------------------------------------------ asking

    async def _ask(self, step: str, queries: list[Query]) -> None:
        """One harvest of `queries` into the step's directory, within what the budget leaves; raises the stop."""
        from imitate.harvest.run import harvest

        cfg = self._step_cfg(step)
        label = f"{self.seeds_path} (self-instruct {step}, round {self.counts.rounds})"
        outcome = await harvest(
            cfg,
            label,
            self.dirs[step],
            command=self.command,
            progress=self.progress,
            clients=self.clients,
            source=queries,
        )
        billable = outcome.manifest["totals"]["billable"]
        self.spent[step] = Spent(billable["requests"], billable["usd_upper_bound"], billable["tokens"])
        run = outcome.manifest["this_run"]
        self.counts.this_run[step].update(
            {k: run[k] for k in ("ok", "failed", "requests", "resent_after_crash", "throttled_429", "retries")}
        )
        self._read_new()
        if isinstance(outcome.error, BudgetExhausted):
            m = re.search(r"budget reached: (\w+)", outcome.error.message)
            raise self._budget_error(m.group(1) if m else "budget")
        if outcome.error is not None:
            raise outcome.error
        unsettled = [q for q in queries if not self._done(step, q)]
        if unsettled:
            raise TeacherError(
                f"{len(unsettled)} {step} requests failed for a transient reason "
                f"(see {self.dirs[step]}/failures.jsonl)",
                hint="rerun the same command to ask for them again",
            )

    def _done(self, step: str, q: Query) -> bool:
        if step == "generate":
            return q.id in self.generations
        task_id = q.metadata["self_instruct"]["task_id"]
        return self._settled(task_id)

    def _step_cfg(self, step: str) -> ImitateConfig:
        """The step's config with each budget limit less what the other step has used (both count together)."""
        other = self.spent["answer" if step == "generate" else "generate"]
        b = self.cfg.harvest.budget
        left: dict[str, Any] = {}
        for name, limit, used in (
            ("max_usd", b.max_usd, other.usd),
            ("max_tokens", b.max_tokens, other.tokens),
            ("max_requests", b.max_requests, other.requests),
        ):
            if limit is None:
                continue
            if limit - used <= (0 if name == "max_usd" else 0.5):
                raise self._budget_error(name)
            left[name] = limit - used
        h = self.step_h[step].model_copy(update={"budget": b.model_copy(update=left)})
        return self.cfg.model_copy(update={"harvest": h})

    def _budget_error(self, name: str) -> BudgetExhausted:
        g, a = self.spent["generate"], self.spent["answer"]
        used = {
            "max_usd": f"${g.usd + a.usd:.4f} spent",
            "max_tokens": f"{g.tokens + a.tokens} tokens used",
            "max_requests": f"{g.requests + a.requests} requests sent",
        }.get(name, "")
        limit = getattr(self.cfg.harvest.budget, name, None)
        return BudgetExhausted(
            f"budget reached: {name} {used} of {limit} (generation and answers together), "
            f"{self.ok_count} of {self.target} tasks answered",
            hint="partial output is valid; rerun the same command with a larger budget to continue",
        )

    def _read_new(self) -> None:
        for record, _, _ in self.tails["generate"].new():
            self._account(record)
            if is_final(record) and (record.status == "ok" or record.query.id not in self.generations):
                p = record.provenance
                self.generations[record.query.id] = (
                    record.status == "ok",
                    record.response or "",
                    record.truncated,
                    p.request_key,
                )
        for record, shard, offset in self.tails["answer"].new():
            self._account(record)
            task_id = record.query.metadata.get("self_instruct", {}).get("task_id")
            if task_id is None or not is_final(record):
                continue
            if record.status == "ok" and task_id not in self.answered:
                self.answered[task_id] = (shard, offset)
                self.answer_failed.discard(task_id)
                self.ok_count += task_id in self.task_index
            elif record.status != "ok" and task_id not in self.answered:
                self.answer_failed.add(task_id)

    def _account(self, record: Record) -> None:
        self.counts.spend_usd += record.provenance.cost_usd
        self.counts.tokens += record.provenance.usage.total_tokens

    # ------------------------------------------------------------------------------------------ outputs

    def _write_records(self) -> int:
        """The first N answered tasks' records, in task order, tagged."""
        answered = (self.answered[t.id] for t in self.tasks if t.id in self.answered)
        return copy_records(
            self.dirs["answer"], itertools.islice(answered, self.target), self.out / "records.jsonl", [TAG]
        )

    def _manifest(self, started: float, written: int, error: ImitateError | None) -> dict[str, Any]:
        c = self.counts
        kept = len(self.tasks)
        failed = sum(1 for t in self.tasks if t.id in self.answer_failed)
        total = Spent(*(sum(getattr(self.spent[s], k) for s in STEPS) for k in ("requests", "usd", "tokens")))
        return {
            "imitate_version": __version__,
            "command": self.command,
            "seeds": {"path": self.seeds_path, "tasks": len(self.seeds), "sha256": self.seeds_sha},
            "prompt": {"id": self.spec.id, "version": self.spec.version, "sha256": self.spec.sha256},
            "out": str(self.out),
            "target": self.target,
            "per_round": self.per_round,
            "status": "complete" if error is None and written == self.target else "partial",
            "stop_reason": error.one_line() if error is not None else None,
            "started_at": round(started, 3),
            "finished_at": round(time.time(), 3),
            "rounds": c.rounds,
            "prompts": c.prompts,
            "generation_failed": c.generation_failed,
            "generated": c.generated,
            "kept": kept,
            "rejected": dict(sorted(self.filter.rejected.items())),
            "answered": written,
            "answer_failed": failed,
            "unanswered": kept - self.ok_count - failed,
            "spend_usd": round(c.spend_usd, 8),
            "tokens": c.tokens,
            "billable": {
                **{
                    s: {"requests": v.requests, "usd_upper_bound": round(v.usd, 8), "tokens": v.tokens}
                    for s, v in self.spent.items()
                },
                "total": {"requests": total.requests, "usd_upper_bound": round(total.usd, 8), "tokens": total.tokens},
            },
            "this_run": {s: dict(c.this_run[s]) for s in STEPS},
            "config": redacted(self.cfg),
        }


async def self_instruct(cfg: ImitateConfig, seeds: str, out: Path, *, target: int, **options: Any) -> Outcome:
    """`imitate generate self-instruct`: run (or resume) the loop; returns the manifest and the stop error."""
    return await SelfInstruct(cfg, seeds, out, target=target, **options).run()
