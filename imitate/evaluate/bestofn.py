"""`imitate generate best-of-n`: rejection sampling (LLaMA-2-Chat) — n answers per prompt, each scored, the best
kept, and optionally the worst too as a preference pair for later DPO.

    imitate generate best-of-n PROMPTS --out DIR --n 4 [--source teacher|student] \
        [--scorer judge|reward --reward-model DIR] [--keep best|best-worst]

Samples
- teacher: one harvest of PROMPTS with `harvest.samples_per_prompt = n` into `DIR/samples/` (rate limits,
  journal, resume, budget, provenance as in `imitate harvest`; the n requests of a prompt differ only in their
  sample index, so they share its system message and only the teacher's sampling tells them apart).
- student: the local student (`--student-model M [--adapter DIR]`, `evaluate/generate.py` at `--temperature`)
  draws n answers per prompt, each prompt with its own seed; `DIR/student_samples.jsonl` gets one line per prompt
  as soon as its n answers exist, and a rerun skips those prompts.
Scores
- judge: single-answer grading (1-10) of every sample through the engine into `DIR/judge/`
  (`evaluate/judging.py`, `prompts/judge.yaml`; unreadable verdicts re-asked, then left unscored).
- reward: a local reward model (`evaluate/reward.py`); `DIR/reward_scores.jsonl`, one line per prompt.
Keep: per prompt the sample with the highest score (a tie goes to the lower sample index). A sample without a
score (verdict unparsed, judge request failed) is never picked; a prompt with no scored sample keeps nothing and
is counted. `--keep best-worst` also takes the lowest-scoring sample, when it scores below the best, as a pair.

Outputs (each written whole, at the end of a run that finished)
    records.jsonl   the best sample of each prompt: Records with `scores[<scorer>]` and the tag `best-of-n`, which
                    `imitate curate --score-field judge|reward` and `imitate train` take as they are
    samples.jsonl   every answered sample with its score (tags `best-of-n:best`, `best-of-n:worst` on the picks)
    pairs.jsonl     with --keep best-worst: {"id", "prompt", "system", "chosen", "rejected", "score_chosen",
                    "score_rejected", "scorer", "chosen_id", "rejected_id"} (prompt/chosen/rejected as DPO reads)
    manifest.json   counts, settings, the judge prompt or reward model, spend
Resume: rerun the same command; the harvest journals (samples, judge), the student samples and the reward scores
are all kept per prompt, so nothing done is asked, generated or scored again. One budget (`--max-usd`, ...)
covers the teacher's samples and the judge across runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imitate import __version__
from imitate.config import ImitateConfig, redact_url, redacted, resolve_api_key
from imitate.dataset.harvested import Tail, is_final, ledger_spent
from imitate.dataset.io import atomic_path
from imitate.errors import ConfigError, InputError
from imitate.evaluate.answers import PromptJournal, answer_key, fingerprint, generate_missing, sample_seed
from imitate.evaluate.judge import load_judge_prompts, with_max_tokens
from imitate.evaluate.judge_eval import transcript
from imitate.evaluate.judging import MAX_REASKS, JudgeItem, JudgeRunner, budgeted, only_teacher
from imitate.records import GenerationParams, Provenance, Query, Record, canonical_json, sha256_text

TAG = "best-of-n"


@dataclass
class BestOfNOptions:
    prompts: str
    out: Path
    n: int
    source: str = "teacher"
    scorer: str = "judge"
    keep: str = "best"
    reward_model: Path | None = None
    student_model: str | None = None
    adapter: Path | None = None
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 512
    batch_size: int = 8
    seed: int = 0
    max_reasks: int = MAX_REASKS
    judge_max_tokens: int | None = None


def pick(scored: list[tuple[Record, float | None]], keep: str) -> tuple[Record | None, Record | None]:
    """(best, worst) of one prompt's samples: the highest score (ties: the lower sample index); with
    `keep="best-worst"` the lowest when it is below the best (ties: the higher index), else None."""
    ranked = [(s, r.provenance.sample_index, r) for r, s in scored if s is not None]
    if not ranked:
        return None, None
    best = max(ranked, key=lambda t: (t[0], -t[1]))
    worst = min(ranked, key=lambda t: (t[0], -t[1]))
    return best[2], (worst[2] if keep == "best-worst" and worst[0] < best[0] else None)


class BestOfN:
    """One run: `prepare()` (prompts; student samples), `await collect()` (teacher samples, judge scores),
    `score_local()` (reward scores), `finish()` (outputs)."""

    def __init__(
        self,
        cfg: ImitateConfig,
        options: BestOfNOptions,
        *,
        judge_cfg: ImitateConfig | None = None,
        command: str = "imitate generate best-of-n",
        progress: str = "quiet",
        log: Callable[[str], None] | None = None,
    ):
        o = options
        problems = []
        if o.n < 1:
            problems.append("--n must be at least 1")
        for flag, value, allowed in (("--source", o.source, ("teacher", "student")),
                                     ("--scorer", o.scorer, ("judge", "reward")),
                                     ("--keep", o.keep, ("best", "best-worst"))):  # fmt: skip
            if value not in allowed:
                problems.append(f"{flag} {value!r}: expected {' or '.join(allowed)}")
        if o.scorer == "reward" and o.reward_model is None:
            problems.append("--scorer reward needs --reward-model DIR")
        if o.source == "student" and o.temperature == 0 and o.n > 1:
            problems.append("--temperature 0 makes the student's n answers identical: sample with a temperature > 0")
        if cfg.harvest.mode != "online":
            problems.append("best-of-n asks the teacher online: set harvest.mode=online")
        if problems:
            raise ConfigError("bad best-of-n options", problems=problems)
        self.cfg, self.o, self.judge_cfg = cfg, o, only_teacher(judge_cfg or cfg, "judge")
        used = [cfg] if o.source == "teacher" else []  # an unset key variable fails now, not after local work
        for c in used + ([self.judge_cfg] if o.scorer == "judge" else []):
            resolve_api_key(c.harvest.teachers[0])
        self.command, self.progress, self.log = command, progress, log or (lambda _: None)
        self.dirs = {"samples": o.out / "samples", "judge": o.out / "judge"}
        self.prompts = with_max_tokens(load_judge_prompts(), o.judge_max_tokens) if o.scorer == "judge" else None
        self.queries: list[Query] = []
        self.skipped_rows = 0
        self.samples: dict[str, list[Record]] = {}  # query id -> its answered samples, by sample index
        self.failed_samples = 0
        self.scores: dict[str, float | None] = {}  # sample record id -> score (None: unscored)
        self.unscored: dict[str, int] = {"unparsed": 0, "failed": 0}
        self.this_run: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------ samples

    def prepare(self) -> None:
        from imitate.harvest.sources import open_source

        src = open_source(self.o.prompts, self.cfg.harvest.source)
        self.queries = list(src)
        self.skipped_rows = src.skipped
        if not self.queries:
            raise InputError(f"{self.o.prompts}: no prompts")
        if self.o.source == "student":
            self._student_samples()

    def _student_samples(self) -> None:
        from imitate.evaluate.generate import load_student, split_spec
        from imitate.train.model import resolve

        o = self.o
        model, adapter = split_spec(o.student_model, o.adapter)
        if adapter is not None and not adapter.is_dir():
            raise InputError(f"adapter {adapter} does not exist")
        base = str(resolve(model)) if model or adapter is None else None  # None: the base the adapter records
        label = f"{base or 'base'} + {adapter}" if adapter else str(base)
        params = GenerationParams(temperature=o.temperature, top_p=o.top_p, max_tokens=o.max_new_tokens)
        identity = {"model": fingerprint(base), "adapter": fingerprint(adapter), "params": params.api_kwargs(),
                    "n": o.n, "seed": o.seed}  # fmt: skip
        journal = PromptJournal(o.out / "student_samples.jsonl")
        prompts = [(answer_key(identity, q.messages(q.system)), q.id, q.messages(q.system)) for q in self.queries]
        self.this_run["student_prompts_generated"] = generate_missing(
            journal, lambda: load_student(model, adapter), prompts, n=o.n, temperature=o.temperature, top_p=o.top_p,
            max_new_tokens=o.max_new_tokens, batch_size=o.batch_size, seed=o.seed, log=self.log,
        )  # fmt: skip
        for q, (key, _, messages) in zip(self.queries, prompts, strict=True):
            seeded = params.model_copy(update={"seed": sample_seed(o.seed, key)})
            self.samples[q.id] = [
                Record(
                    id=f"{q.id}/student/{i}",
                    query=q,
                    messages=messages,
                    response=text,
                    provenance=Provenance(
                        teacher="student",
                        model=label,
                        base_url="",
                        params=seeded,
                        request_key=sha256_text(f"{key}/{i}"),
                        sample_index=i,
                        imitate_version=__version__,
                    ),
                )  # fmt: skip
                for i, text in enumerate(journal.get(key) or [])
            ]

    async def _teacher_samples(self) -> None:
        from imitate.harvest.run import build_planner, harvest

        h = self.cfg.harvest.model_copy(update={"samples_per_prompt": self.o.n})
        cfg = budgeted(self.cfg.model_copy(update={"harvest": h}), [self.dirs["judge"]])
        outcome = await harvest(cfg, self.o.prompts, self.dirs["samples"], command=self.command,
                                progress=self.progress, source=self.queries)  # fmt: skip
        self.this_run["sample_requests"] = outcome.manifest["this_run"]["requests"]
        self.this_run["resent_after_crash"] = outcome.manifest["this_run"]["resent_after_crash"]
        if outcome.error is not None:
            raise outcome.error
        planner = build_planner(cfg)
        wanted: dict[str, str] = {}  # the requests of this run's settings (a fallback teacher's included)
        for q in self.queries:
            for p in planner.plan(q):
                wanted |= {key: q.id for key in (p.key, *(r.key() for r in planner.fallback_requests(p)))}
        got: dict[str, Record] = {}
        for record, _, _ in Tail(self.dirs["samples"]).new():
            key = record.provenance.request_key
            if key in wanted and is_final(record) and (key not in got or record.status == "ok"):
                got[key] = record
        self.failed_samples = sum(r.status != "ok" for r in got.values())
        for q in self.queries:
            self.samples[q.id] = []
        for record in sorted(got.values(), key=lambda r: r.provenance.sample_index):
            if record.status == "ok":
                self.samples[wanted[record.provenance.request_key]].append(record)

    # ------------------------------------------------------------------------------------------ scores

    async def collect(self) -> None:
        if self.o.source == "teacher":
            await self._teacher_samples()
        if self.o.scorer == "judge":
            await self._judge()

    async def _judge(self) -> None:
        assert self.prompts is not None
        items, by_key = [], {}
        for q in self.queries:
            for r in self.samples[q.id]:
                items.append(JudgeItem(r.id, "single", transcript(q), (r.response or "",)))
                by_key[r.id] = r
        runner = JudgeRunner(self.judge_cfg, self.dirs["judge"], self.prompts, max_reasks=self.o.max_reasks,
                             others=[self.dirs["samples"]], command=self.command, progress=self.progress,
                             log=self.log)  # fmt: skip
        results = await runner.run(items)
        self.this_run["judge"] = runner.this_run
        for key, result in results.items():
            self.scores[key] = float(result.value) if result.status == "ok" else None  # type: ignore[arg-type]
            if result.status != "ok":
                self.unscored[result.status] += 1

    def score_local(self) -> None:
        """Reward-model scores of every prompt's samples not scored yet (the model loads only if needed)."""
        if self.o.scorer != "reward":
            return
        from imitate.evaluate.reward import RewardModel

        assert self.o.reward_model is not None
        journal = PromptJournal(self.o.out / "reward_scores.jsonl")
        model_id = fingerprint(self.o.reward_model)
        rm: RewardModel | None = None
        done = 0
        for q in self.queries:
            samples = self.samples[q.id]
            messages = [m.model_dump() for m in samples[0].messages] if samples else []
            answers = [r.response for r in samples]
            key = sha256_text(canonical_json({"reward_model": model_id, "messages": messages, "answers": answers}))
            values = journal.get(key)
            if values is None:
                rm = rm or RewardModel(self.o.reward_model, batch_size=self.o.batch_size)
                values = rm.score([(r.messages, r.response or "") for r in samples]) if samples else []
                journal.append(key, q.id, values)
                done += 1
            for r, v in zip(samples, values, strict=True):
                self.scores[r.id] = float(v)
        self.this_run["reward_prompts_scored"] = done

    # ------------------------------------------------------------------------------------------ outputs

    def finish(self) -> dict[str, Any]:
        o, field = self.o, self.o.scorer
        kept, samples, pairs, no_pick = [], [], [], 0
        for q in self.queries:
            scored = [(r, self.scores.get(r.id)) for r in self.samples[q.id]]
            best, worst = pick(scored, o.keep)
            no_pick += best is None
            for r, s in scored:
                tags = [*r.tags, f"{TAG}:best"] if r is best else [*r.tags, f"{TAG}:worst"] if r is worst else r.tags
                samples.append(r.model_copy(update={"scores": {**r.scores, **({field: s} if s is not None else {})},
                                                    "tags": tags}))  # fmt: skip
            if best is not None:
                kept.append(best.model_copy(update={"scores": {**best.scores, field: self.scores[best.id]},
                                                    "tags": [*best.tags, TAG]}))  # fmt: skip
            if best is not None and worst is not None:
                pairs.append({"id": q.id, "prompt": transcript(q), "system": best.messages[0].content
                              if best.messages[0].role == "system" else None, "chosen": best.response,
                              "rejected": worst.response, "score_chosen": self.scores[best.id],
                              "score_rejected": self.scores[worst.id], "scorer": field, "chosen_id": best.id,
                              "rejected_id": worst.id})  # fmt: skip
        self._write("records.jsonl", [r.to_json() for r in kept])
        self._write("samples.jsonl", [r.to_json() for r in samples])
        if o.keep == "best-worst":
            self._write("pairs.jsonl", [json.dumps(p, ensure_ascii=False) for p in pairs])
        manifest = self._manifest(len(kept), len(samples), len(pairs), no_pick)
        self._write("manifest.json", [json.dumps(manifest, indent=2, ensure_ascii=False)])
        return manifest

    def _write(self, name: str, lines: list[str]) -> None:
        with atomic_path(self.o.out / name) as tmp:
            tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    def _manifest(self, kept: int, samples: int, pairs: int, no_pick: int) -> dict[str, Any]:
        o = self.o
        judge = None
        if self.prompts is not None:
            t, p = self.judge_cfg.harvest.teachers[0], self.prompts.single
            judge = {"base_url": redact_url(t.base_url), "model": t.model, "max_reasks": o.max_reasks,
                     "prompt": {"id": p.id, "version": p.version, "sha256": p.sha256,
                                "max_tokens": p.params.max_tokens}}  # fmt: skip
        billable = {}
        for name, d in self.dirs.items():
            s = ledger_spent(d)
            billable[name] = {"requests": s.requests, "usd_upper_bound": round(s.usd, 8), "tokens": s.tokens}
        return {
            "imitate_version": __version__,
            "command": self.command,
            "prompts": {"path": o.prompts, "rows": len(self.queries), "skipped_bad_rows": self.skipped_rows},
            "n": o.n,
            "source": o.source,
            "scorer": o.scorer,
            "keep": o.keep,
            "status": "complete",
            "student": {
                "model": o.student_model,
                "adapter": str(o.adapter) if o.adapter else None,
                "temperature": o.temperature,
                "top_p": o.top_p,
                "max_new_tokens": o.max_new_tokens,
                "seed": o.seed,
            }
            if o.source == "student"
            else None,  # fmt: skip
            "judge": judge,
            "reward_model": {"path": str(o.reward_model), "fingerprint": fingerprint(o.reward_model)}
            if o.scorer == "reward"
            else None,  # fmt: skip
            "samples": {"ok": samples, "failed": self.failed_samples},
            "unscored": dict(self.unscored),
            "kept": kept,
            "pairs": pairs,
            "prompts_without_pick": no_pick,
            "billable": billable,
            "this_run": self.this_run,
            "config": redacted(self.cfg),
        }


def headline(m: dict[str, Any]) -> str:
    """The one line `imitate generate best-of-n` prints."""
    unscored = sum(m["unscored"].values())
    text = (f"{m['kept']} of {m['prompts']['rows']} prompts kept their best of {m['n']} ({m['source']} samples, "
            f"{m['scorer']} scores): {m['samples']['ok']} samples, {m['samples']['failed']} failed, "
            f"{unscored} unscored")  # fmt: skip
    return text + (f", {m['pairs']} preference pairs" if m["keep"] == "best-worst" else "")
