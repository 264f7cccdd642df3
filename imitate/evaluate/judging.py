"""Asking an LLM judge through the harvester engine (rate limits, journal, resume, budget, provenance apply):

    runner = JudgeRunner(judge_cfg, out / "judge", load_judge_prompts(), max_reasks=2)
    results = await runner.run([JudgeItem("single/student/q1", "single", question, (answer,)), ...])
    results["single/student/q1"].status, .value       # "ok" 7.0 | "unparsed" None | "failed" None

Each item becomes one judge Query (the judge prompt's system message and rendered template; the prompt's id, version
and sha256 in `query.metadata.judge`) harvested into one output directory; items whose rendered prompts are the
same (two identical answers) share one query and its verdict. A reply the parser cannot read is asked
again, up to `max_reasks` times: re-ask k is the same prompt with `seed=k` and the prompt's `reask_temperature`
(a temperature-0 judge would most likely repeat the same reply), so it is a new request with its own journal key.
After the last re-ask the item is `unparsed`, with the reason, and is never scored. A request that failed for
good (context too long, content filter, ...) is `failed`; a transient failure stops the run (`TeacherError`,
exit 4) and the rerun asks it again.

Resume: query ids carry a hash of the prompt text and the attempt number, so a rerun plans the same requests; the
journal skips those answered and the replies are read back from the directory (`dataset/harvested.Tail`, by
request key: the same prompt put to another judge model is another request), so the same verdicts are parsed
again and the same items re-asked: nothing is bought twice.

`budgeted(cfg, others)`: the budget of `cfg` less what the harvests in `others` (other directories of the same
command, e.g. the teacher's answers) have used, so one `--max-usd` covers the whole command across runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from imitate.config import ImitateConfig
from imitate.dataset.harvested import Tail, is_final, ledger_spent
from imitate.errors import BudgetExhausted, ImitateError
from imitate.evaluate.judge import JudgePrompt, JudgePrompts, Parsed, parse
from imitate.records import Query, Record, sha256_text

MAX_REASKS = 2
Kind = Literal["single", "pairwise"]


@dataclass(frozen=True)
class JudgeItem:
    """One judgement to obtain: `key` is unique within a run; `answers` is (answer,) or (answer_a, answer_b)."""

    key: str
    kind: Kind
    question: str
    answers: tuple[str, ...]


@dataclass
class JudgeResult:
    status: Literal["ok", "unparsed", "failed"]
    value: float | str | None = None
    reply: str | None = None  # the judge's last reply (its rationale and verdict)
    reason: str | None = None  # why unparsed or failed
    attempts: list[dict[str, Any]] = field(default_factory=list)  # every ask: request key, status, parse reason

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "value": self.value, "reason": self.reason, "attempts": self.attempts}


def prompt_for(prompts: JudgePrompts, kind: Kind) -> JudgePrompt:
    return prompts.single if kind == "single" else prompts.pairwise


def judge_query(prompts: JudgePrompts, item: JudgeItem, attempt: int) -> Query:
    prompt = prompt_for(prompts, item.kind)
    if item.kind == "single":
        text = prompt.render(question=item.question, answer=item.answers[0])
    else:
        text = prompt.render(question=item.question, answer_a=item.answers[0], answer_b=item.answers[1])
    digest = sha256_text(f"{prompt.sha256}\x00{text}")[:24]
    meta = {"kind": item.kind, "attempt": attempt, "prompt_id": prompt.id, "prompt_version": prompt.version,
            "prompt_sha256": prompt.sha256}  # fmt: skip
    return Query(id=f"judge:{item.kind}:{digest}:{attempt}", question=text, system=prompt.system,
                 metadata={"judge": meta})  # fmt: skip


def attempt_config(cfg: ImitateConfig, prompt: JudgePrompt, attempt: int) -> ImitateConfig:
    """The judge's harvest config for ask number `attempt` (0 = first ask, at the prompt's parameters)."""
    params = prompt.params
    if attempt > 0:
        hotter = max(params.temperature, prompt.reask_temperature)
        params = params.model_copy(update={"temperature": hotter, "seed": attempt})
    h = cfg.harvest.model_copy(update={"params": params, "samples_per_prompt": 1, "preset": "none", "mode": "online"})
    return cfg.model_copy(update={"harvest": h})


def only_teacher(cfg: ImitateConfig, name: str) -> ImitateConfig:
    """`cfg` with its first teacher alone, renamed `name` (records then say "judge" or "teacher"): a judge or an
    answering endpoint is one endpoint, never a route among several."""
    t = cfg.harvest.teachers[0].model_copy(update={"name": name, "subset_fraction": None, "fallback": False,
                                                  "collections": None, "weight": 1.0})  # fmt: skip
    return cfg.model_copy(update={"harvest": cfg.harvest.model_copy(update={"teachers": [t]})})


def budgeted(cfg: ImitateConfig, others: Sequence[Path]) -> ImitateConfig:
    """`cfg` with each budget limit less what the harvests in `others` have used (all runs); BudgetExhausted when
    nothing is left."""
    b = cfg.harvest.budget
    used = [ledger_spent(d) for d in others]
    left: dict[str, Any] = {}
    for name, spent in (
        ("max_usd", sum(s.usd for s in used)),
        ("max_tokens", sum(s.tokens for s in used)),
        ("max_requests", sum(s.requests for s in used)),
    ):
        limit = getattr(b, name)
        if limit is None:
            continue
        if limit - spent <= (0 if name == "max_usd" else 0.5):
            raise BudgetExhausted(
                f"budget reached: {name} {limit} used up by this command's requests (all runs)",
                hint="partial output is valid; rerun the same command with a larger budget to continue",
            )
        left[name] = limit - spent if name == "max_usd" else int(limit - spent)
    h = cfg.harvest.model_copy(update={"budget": b.model_copy(update=left)})
    return cfg.model_copy(update={"harvest": h})


class JudgeRunner:
    """Judgements of many items into one harvest directory (see the module docstring)."""

    def __init__(
        self,
        cfg: ImitateConfig,
        out: Path,
        prompts: JudgePrompts,
        *,
        max_reasks: int = MAX_REASKS,
        others: Sequence[Path] = (),
        command: str = "imitate eval judge",
        progress: str = "quiet",
        clients: dict[str, Any] | None = None,
        log: Callable[[str], None] | None = None,
    ):
        if max_reasks < 0:
            raise ValueError("max_reasks must be >= 0")
        self.cfg, self.out, self.prompts, self.max_reasks = cfg, out, prompts, max_reasks
        self.others, self.command, self.progress, self.clients = list(others), command, progress, clients
        self.log = log or (lambda _: None)
        self.tail = Tail(out)
        self.replies: dict[str, Record] = {}  # request key -> its final record (ok wins over failed)
        self.this_run: dict[str, int] = {"requests": 0, "ok": 0, "failed": 0, "resent_after_crash": 0}

    async def run(self, items: Sequence[JudgeItem]) -> dict[str, JudgeResult]:
        keys = [i.key for i in items]
        if len(set(keys)) != len(keys):
            raise ValueError("judge item keys must be unique")
        from imitate.harvest.run import make_clients

        own = self.clients is None
        clients = self.clients if self.clients is not None else make_clients(self.cfg)
        results: dict[str, JudgeResult] = {}
        try:
            for kind in ("single", "pairwise"):
                mine = [i for i in items if i.kind == kind]
                if mine:
                    results.update(await self._judge(kind, mine, clients))
        finally:
            if own:
                for c in clients.values():
                    await c.aclose()
        return {k: results[k] for k in keys}

    async def _judge(self, kind: Kind, items: list[JudgeItem], clients: dict[str, Any]) -> dict[str, JudgeResult]:
        prompt = prompt_for(self.prompts, kind)
        results = {i.key: JudgeResult("unparsed") for i in items}
        pending = list(items)
        for attempt in range(self.max_reasks + 1):
            if not pending:
                break
            queries = {i.key: judge_query(self.prompts, i, attempt) for i in pending}
            unique = list({q.id: q for q in queries.values()}.values())  # the same prompt twice is asked once
            keys = await self._harvest(attempt_config(self.cfg, prompt, attempt), unique, clients)
            still = []
            for item in pending:
                record = self.replies[keys[queries[item.key].id]]
                if self._settle(kind, record, results[item.key]):
                    continue
                still.append(item)
            self.log(f"judge {kind} ask {attempt}: {len(pending) - len(still)} settled, {len(still)} to re-ask")
            pending = still
        return results

    def _settle(self, kind: Kind, record: Record, result: JudgeResult) -> bool:
        """Fill `result` from one reply; False when the item is to be asked again."""
        p = record.provenance
        ask = {"request_key": p.request_key, "status": record.status, "seed": p.params.seed}
        result.attempts.append(ask)
        if record.status != "ok":
            result.status, result.reason = "failed", f"{record.error_class}: {record.error_message or ''}".strip()
            ask["reason"] = result.reason
            return True
        parsed: Parsed = parse(kind, record.response)
        result.reply = record.response
        if parsed.ok:
            result.status, result.value, result.reason = "ok", parsed.value, None
            return True
        result.status, result.reason = "unparsed", parsed.reason
        ask["reason"] = parsed.reason
        return False

    async def _harvest(self, cfg: ImitateConfig, queries: list[Query], clients: dict[str, Any]) -> dict[str, str]:
        """Ask `queries` (those not answered yet); returns each query id's request key, whose reply is then in
        `self.replies` (keys, not ids: the same prompt put to another judge model is another request)."""
        from imitate.harvest.run import build_planner, harvest

        cfg = budgeted(cfg, self.others)
        planner = build_planner(cfg)
        keys = {q.id: planner.plan(q)[0].key for q in queries}
        outcome = await harvest(cfg, f"judge ({len(queries)} prompts)", self.out, command=self.command,
                                progress=self.progress, clients=clients, source=queries)  # fmt: skip
        run = outcome.manifest["this_run"]
        for k in self.this_run:
            self.this_run[k] += run.get(k, 0)
        self._read()
        error: ImitateError | None = outcome.error
        if error is not None:
            raise error
        missing = [q for q, key in keys.items() if key not in self.replies]
        if missing:  # harvest reported no error, yet a reply is not there: never score on a guess
            raise ImitateError(f"{len(missing)} judge replies missing from {self.out} (first: {missing[0]})",
                               hint="rerun the same command")  # fmt: skip
        return keys

    def _read(self) -> None:
        for record, _, _ in self.tail.new():
            if not is_final(record):
                continue
            key = record.provenance.request_key
            known = self.replies.get(key)
            if known is None or (known.status != "ok" and record.status == "ok"):
                self.replies[key] = record
