"""`imitate eval judge`: MT-Bench-style judging of the student beside its base (and optionally a teacher), with any
OpenAI-compatible endpoint as the judge, through the harvester engine.

    imitate eval judge --model M [--adapter DIR] --questions data/eval/judge_questions.jsonl \
        --judge-base-url URL --judge-model NAME --out DIR [--mode single|pairwise|both] \
        [--teacher-base-url URL --teacher-model NAME]

1. Questions: any file `imitate harvest` reads (`id`, `question`, optional `category`; a chat is judged as its
   transcript). `data/eval/judge_questions.jsonl` ships 20 open questions of our own.
2. Answers: the student and its base answer locally (`evaluate/generate.py`: greedy, the training chat template,
   stop at the end-of-turn token) into `OUT/answers/{student,base}.jsonl`; a teacher endpoint's answers are
   harvested into `OUT/answers/teacher/`. Both are reused by a rerun (keys cover model, settings and question).
3. Judging (`evaluate/judging.py`): single-answer grading of every answer, and pairwise comparison of student vs
   base (and student vs teacher), each pair asked in both orders and combined by the rule in `evaluate/judge.py`,
   into `OUT/judge/` (journal, ledger, manifest: kill it and rerun, nothing is bought twice). One budget
   (`--max-usd/--max-tokens/--max-requests`) covers the judge and the teacher's answers across runs.
4. Outputs: `OUT/judge_scores.jsonl` (one row per question and model or pair: score or outcome, status, the
   judge's rationale, request keys), `OUT/judge.json` (tables, prompts, endpoints, spend), `OUT/judge.png`, and the
   "judge" section of `OUT/report.md` / `OUT/report.json` (`evaluate/report.py`), which says what a judge result
   does and does not show.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imitate import __version__
from imitate.config import FieldMap, ImitateConfig, SourceConfig, redact_url, resolve_api_key
from imitate.dataset.harvested import Tail, is_final, ledger_spent
from imitate.dataset.io import atomic_path
from imitate.errors import InputError
from imitate.evaluate import judge_report
from imitate.evaluate.answers import PromptJournal, answer_key, fingerprint, generate_missing
from imitate.evaluate.judge import combine, load_judge_prompts, with_max_tokens
from imitate.evaluate.judging import MAX_REASKS, JudgeItem, JudgeResult, JudgeRunner, budgeted, only_teacher
from imitate.records import Query, sha256_text

MODES = ("single", "pairwise", "both")


@dataclass
class JudgeOptions:
    questions: str
    out: Path
    model: str | None = None
    adapter: Path | None = None
    base: str | None = None
    no_base: bool = False
    mode: str = "both"
    limit: int | None = None
    max_new_tokens: int = 512
    batch_size: int = 8
    max_reasks: int = MAX_REASKS
    judge_max_tokens: int | None = None


def read_questions(path: str, limit: int | None = None) -> list[Query]:
    from imitate.harvest.sources import open_source

    fields = FieldMap(question="question", system="system", id="id", collection="category")
    questions = list(open_source(path, SourceConfig(fields=fields, limit=limit)))
    if not questions:
        raise InputError(f"{path}: no questions")
    return questions


def transcript(q: Query) -> str:
    """What the judge sees as the question: the question, or a multi-turn chat written out."""
    if not q.turns:
        return q.question
    lines = [f"{m.role.capitalize()}: {m.content}" for m in q.turns]
    return "\n\n".join([*lines, f"User: {q.question}"])


class JudgeEval:
    """One `imitate eval judge` run: `prepare()` (sync, local models), `await judge()`, `finish()`."""

    def __init__(
        self,
        cfg: ImitateConfig,
        options: JudgeOptions,
        *,
        teacher_cfg: ImitateConfig | None = None,
        command: str = "imitate eval judge",
        progress: str = "quiet",
        log: Callable[[str], None] | None = None,
    ):
        if options.mode not in MODES:
            raise InputError(f"--mode {options.mode!r}: expected one of {', '.join(MODES)}")
        self.cfg, self.o = only_teacher(cfg, "judge"), options
        self.teacher_cfg = only_teacher(teacher_cfg, "teacher") if teacher_cfg is not None else None
        for c in (self.cfg, self.teacher_cfg):  # an unset key variable fails now, not after the local answers
            if c is not None:
                resolve_api_key(c.harvest.teachers[0])
        self.command, self.progress, self.log = command, progress, log or (lambda _: None)
        self.prompts = with_max_tokens(load_judge_prompts(), options.judge_max_tokens)
        self.dirs = {"judge": options.out / "judge", "teacher": options.out / "answers" / "teacher"}
        self.questions: list[Query] = []
        self.answers: dict[str, dict[str, str]] = {}  # model label -> question id -> answer
        self.models: dict[str, dict[str, Any]] = {}
        self.items: list[JudgeItem] = []
        self.results: dict[str, JudgeResult] = {}
        self.this_run: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------ answers

    def prepare(self) -> None:
        """Questions and the local models' answers (generated only where the cache has none)."""
        from imitate.evaluate.generate import base_source, load_student, split_spec
        from imitate.train.model import resolve

        o = self.o
        if o.mode != "single" and o.no_base and self.teacher_cfg is None:
            raise InputError(f"--mode {o.mode} compares the student with a second model, and there is none",
                             hint="drop --no-base, add --teacher-base-url, or use --mode single")  # fmt: skip
        questions = read_questions(o.questions, o.limit)
        model, adapter = split_spec(o.model, o.adapter)
        if adapter is not None and not adapter.is_dir():
            raise InputError(f"adapter {adapter} does not exist")
        if adapter is None:
            resolve(model)  # a missing --model is named as such, before anything else is said about it
        local = {"student": ((model, adapter), lambda: load_student(model, adapter))}
        if not o.no_base:
            where = base_source(o.model, o.adapter, o.base)
            if where is None:
                raise InputError(f"no base model known for --model {o.model}",
                                 hint="name it with --base, or judge the student alone with --no-base")  # fmt: skip
            local["base"] = ((where, None), lambda: load_student(where))
        answers, models = {}, {}
        for label, ((spec, adp), load) in local.items():
            shown = spec if spec is not None else ("the adapter's base" if adp else "default")
            models[label] = {"model": shown, "adapter": str(adp) if adp else None}
            answers[label] = self._local_answers(questions, label, spec, adp, load)
        self.use(questions, answers, models)

    def use(self, questions: list[Query], answers: dict[str, dict[str, str]], models: dict[str, Any]) -> None:
        """The questions and the answers to judge (label -> question id -> text), with the models described for
        the report; `prepare()` calls it with the local models' answers."""
        self.questions, self.answers, self.models = questions, dict(answers), dict(models)
        if self.teacher_cfg is not None:
            t = self.teacher_cfg.harvest.teachers[0]
            self.models["teacher"] = {"model": t.model, "base_url": redact_url(t.base_url)}

    def _local_answers(
        self, questions: list[Query], label: str, spec: str | None, adapter: Path | None, load: Callable
    ) -> dict[str, str]:
        from imitate.train.model import resolve

        base = str(resolve(spec)) if spec or adapter is None else None  # None: the base the adapter records
        identity = {"model": fingerprint(base), "adapter": fingerprint(adapter),
                    "max_new_tokens": self.o.max_new_tokens, "temperature": 0.0}  # fmt: skip
        journal = PromptJournal(self.o.out / "answers" / f"{label}.jsonl")
        prompts = [(answer_key(identity, q.messages(q.system)), q.id, q.messages(q.system)) for q in questions]
        made = generate_missing(journal, load, prompts, max_new_tokens=self.o.max_new_tokens,
                                batch_size=self.o.batch_size, log=self.log)  # fmt: skip
        self.this_run[f"{label}_answers_generated"] = made
        return {qid: journal.get(key)[0] for key, qid, _ in prompts}  # type: ignore[index]

    async def _teacher_answers(self, clients: dict[str, Any] | None = None) -> dict[str, str]:
        from imitate.harvest.run import build_planner, harvest

        assert self.teacher_cfg is not None
        ids = {q.id: f"{q.id}:{sha256_text(transcript(q))[:12]}" for q in self.questions}
        queries = [q.model_copy(update={"id": ids[q.id]}) for q in self.questions]
        cfg = budgeted(self.teacher_cfg, [self.dirs["judge"]])
        planner = build_planner(cfg)  # answers are read back by request key: another model's are not these
        keys = {q.id: planner.plan(query)[0].key for q, query in zip(self.questions, queries, strict=True)}
        outcome = await harvest(cfg, self.o.questions, self.dirs["teacher"], command=self.command,
                                progress=self.progress, source=queries)  # fmt: skip
        self.this_run["teacher_requests"] = outcome.manifest["this_run"]["requests"]
        if outcome.error is not None:
            raise outcome.error
        got: dict[str, str] = {}
        for record, _, _ in Tail(self.dirs["teacher"]).new():
            if record.status == "ok" and is_final(record):
                got[record.provenance.request_key] = record.response or ""
        return {qid: got[key] for qid, key in keys.items() if key in got}

    # ------------------------------------------------------------------------------------------ judging

    def _pairs(self) -> list[tuple[str, str]]:
        others = [m for m in ("base", "teacher") if m in self.answers]
        return [("student", m) for m in others]

    def _build_items(self) -> None:
        mode, items = self.o.mode, []
        for q in self.questions:
            text = transcript(q)
            if mode in ("single", "both"):
                for m, answers in self.answers.items():
                    if q.id in answers:
                        items.append(JudgeItem(f"single/{m}/{q.id}", "single", text, (answers[q.id],)))
            if mode in ("pairwise", "both"):
                for x, y in self._pairs():
                    ax, ay = self.answers[x].get(q.id), self.answers[y].get(q.id)
                    if ax is None or ay is None:
                        continue
                    items.append(JudgeItem(f"pairwise/{x}-vs-{y}/{q.id}/x-first", "pairwise", text, (ax, ay)))
                    items.append(JudgeItem(f"pairwise/{x}-vs-{y}/{q.id}/x-second", "pairwise", text, (ay, ax)))
        self.items = items

    async def judge(self) -> None:
        """The teacher's answers (if a teacher is given), then every judgement."""
        if self.teacher_cfg is not None:
            self.answers["teacher"] = await self._teacher_answers()
        if self.o.mode in ("pairwise", "both") and not self._pairs():
            raise InputError(f"--mode {self.o.mode} compares the student with a second model, and there is none",
                             hint="drop --no-base, add --teacher-base-url, or use --mode single")  # fmt: skip
        self._build_items()
        runner = JudgeRunner(self.cfg, self.dirs["judge"], self.prompts, max_reasks=self.o.max_reasks,
                             others=[self.dirs["teacher"]], command=self.command, progress=self.progress,
                             log=self.log)  # fmt: skip
        self.results = await runner.run(self.items)
        self.this_run["judge"] = runner.this_run

    # ------------------------------------------------------------------------------------------ outputs

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for q in self.questions:
            for m in self.answers:
                r = self.results.get(f"single/{m}/{q.id}")
                if self.o.mode == "pairwise" or (r is None and m != "teacher"):
                    continue
                r = r or JudgeResult("failed", reason=f"no {m} answer")
                rows.append({"kind": "single", "question_id": q.id, "category": q.collection, "model": m,
                             "score": r.value, "status": r.status, "reason": r.reason, "rationale": r.reply,
                             "asks": r.attempts})  # fmt: skip
            if self.o.mode == "single":
                continue
            for x, y in self._pairs():
                rows.append(self._pair_row(q, x, y))
        return rows

    def _pair_row(self, q: Query, x: str, y: str) -> dict[str, Any]:
        key = f"pairwise/{x}-vs-{y}/{q.id}"
        first, second = self.results.get(f"{key}/x-first"), self.results.get(f"{key}/x-second")
        row: dict[str, Any] = {"kind": "pairwise", "question_id": q.id, "category": q.collection, "x": x, "y": y}
        if first is None or second is None:
            return row | {"outcome": "failed", "reason": f"no {y} answer", "consistent": None}
        outcome, consistent = combine(
            first.value if first.status == "ok" else None, second.value if second.status == "ok" else None
        )  # type: ignore[arg-type]
        if "failed" in (first.status, second.status):
            outcome = "failed"
        reasons = [r.reason for r in (first, second) if r.reason]
        return row | {"outcome": outcome, "consistent": consistent, "verdict_x_first": first.value,
                      "verdict_x_second": second.value, "reason": "; ".join(reasons) or None,
                      "rationale_x_first": first.reply, "rationale_x_second": second.reply,
                      "asks": {"x_first": first.attempts, "x_second": second.attempts}}  # fmt: skip

    def finish(self) -> dict[str, Any]:
        """Write the scores, judge.json, the chart and the report section; returns judge.json's content."""
        from imitate.evaluate.report import JUDGE_CAVEAT, Report

        out = self.o.out
        rows = self.rows()
        with atomic_path(out / "judge_scores.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        summary = judge_report.summarise(rows, list(self.answers), self._pairs() if self.o.mode != "single" else [])
        j = self.cfg.harvest.teachers[0]
        about = {
            "imitate_version": __version__,
            "command": self.command,
            "questions": {"file": self.o.questions, "sha256": _file_sha256(self.o.questions), "n": len(self.questions)},
            "models": self.models,
            "judge": {"base_url": redact_url(j.base_url), "model": j.model},
            "prompts": {k: {"id": p.id, "version": p.version, "sha256": p.sha256,
                          "max_tokens": p.params.max_tokens}
                        for k, p in (("single", self.prompts.single), ("pairwise", self.prompts.pairwise))},
            "mode": self.o.mode,
            "max_reasks": self.o.max_reasks,
            "max_new_tokens": self.o.max_new_tokens,
            "rule": "pairwise: asked in both orders; win/loss only when both orders agree, otherwise a tie",
            "caveat": JUDGE_CAVEAT,
        }  # fmt: skip
        spent = {name: ledger_spent(d) for name, d in self.dirs.items()}
        billable = {k: {"requests": s.requests, "usd_upper_bound": round(s.usd, 8), "tokens": s.tokens}
                    for k, s in spent.items()}  # fmt: skip
        result = {**about, "summary": summary, "billable": billable, "this_run": self.this_run}
        with atomic_path(out / "judge.json") as tmp:
            tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        png = judge_report.plot(summary, out / "judge.png")
        report = Report.open(out)
        report.set_models(**self.models)
        report.add_section("judge", judge_report.markdown(summary, about), {**about, "summary": summary})
        if png is not None:
            report.add_plot("judge", png)
        report.add_run(self.command)
        report.save()
        return result


def _file_sha256(path: str) -> str | None:
    p = Path(path).expanduser()
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def headline(result: dict[str, Any]) -> str:
    """The one line `imitate eval judge` prints."""
    s = result["summary"]
    parts = [f"{t['x']} vs {t['y']}: {t['win']} win / {t['tie']} tie / {t['loss']} loss"
             + (f" ({t['unparsed']} unparsed)" if t["unparsed"] else "") for t in s["pairwise"].values()]  # fmt: skip
    means = ", ".join(f"{m} {v['mean']:.2f}" for m, v in s["single"].items() if v["mean"] is not None)
    if means:
        unparsed = sum(v["unparsed"] for v in s["single"].values())
        parts.append(f"mean score {means}" + (f" ({unparsed} unparsed)" if unparsed else ""))
    return f"{result['questions']['n']} questions judged: " + "; ".join(parts)
