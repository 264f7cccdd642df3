"""`imitate eval bench`: the student and its base side by side on eval sets with right answers, in one run.

    imitate eval bench --model data/runs/demo/adapter --data data/eval/general_mc.jsonl \\
        --data data/eval/arithmetic.jsonl --out data/runs/demo-eval [--limit N] [--train-data DATA]

The student is `--model` (a folder, a GGUF, a merged folder, or an adapter folder) with `--adapter`; its base is
`--base`, else the base the adapter records, else the `imitate.json` that `imitate merge` copies into a merged
folder; with none of these (or `--no-base`) the student is evaluated alone. Every eval set is read and checked
before any model loads. Then each model in turn (one in memory at a time) answers every set:
- multiple choice: log-likelihood of each choice (`scoring`); the prompt is the question as a user turn in the
  model's chat template (`--prompt chat`, default) or lm-eval's plain "Question: …\\nAnswer:" (`--prompt plain`);
  the choice is the answer text (cloze). Three readings: `acc` (highest summed log-probability), `acc_norm`
  (highest log-probability per character of the choice — the headline, as lm-eval's acc_norm by length), and
  `acc_per_token`.
- generation (GSM8K shape): greedy answers, stopped at the end-of-turn token, final number read with `--extract`.
Per set: accuracy with a Wilson 95 % interval for each model, the paired difference student − base (McNemar exact
p, paired bootstrap interval, seeded), and contamination counts when training data is known (`--train-data`, or
the DATA in the adapter's config.yaml command line) with the accuracies without the flagged items.
`--threads N` sets torch's CPU threads (on a machine busy with other work, fewer threads than cores avoids the
stalls of oversubscribed OpenMP threads, which can make a forward pass ten times slower).
Outputs in OUT: report.md, report.json (merged with other eval commands' sections), accuracy.png, and
items/<set>.jsonl (every item: each model's prediction, correctness, scores or answer; the contamination flag).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imitate.errors import InputError
from imitate.evaluate import stats
from imitate.evaluate.data import MULTIPLE_CHOICE, EvalSet, Item, read_eval_set
from imitate.evaluate.extract import Rule, extract, is_correct, parse_rule
from imitate.evaluate.report import Report, plot_accuracy
from imitate.records import Message

MC_METRICS = ("acc_norm", "acc", "acc_per_token")
HEADLINE = "acc_norm"
PROMPTS = ("chat", "plain")


@dataclass
class BenchOptions:
    data: list[str]
    out: Path
    model: str | None = None
    adapter: Path | None = None
    base: str | None = None
    no_base: bool = False
    format: str = "auto"
    columns: str | None = None
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int = 256
    extract: str | None = None
    train_data: list[str] = field(default_factory=list)
    ngram: int = 13
    seed: int = 0
    prompt: str = "chat"
    threads: int | None = None  # torch CPU threads; None = torch's default


@dataclass
class Outcome:
    """One model on one set: per item, correct or not (per metric for multiple choice) and what it answered."""

    correct: dict[str, list[bool]]
    answers: list[Any]
    seconds: float


# ---------------------------------------------------------------------------------------------- one model, one set


def run_multiple_choice(loaded: Any, es: EvalSet, *, prompt: str, batch_size: int, tick: Callable) -> Outcome:
    from imitate.evaluate import scoring

    tok = loaded.tokenizer
    if prompt == "plain":
        requests = []
        for it in es.items:
            pairs = [scoring.encode_split(tok, f"Question: {it.question}\nAnswer:", f" {c}") for c in it.choices]
            requests.append(scoring.Request(pairs[0][0], [cont for _, cont in pairs]))
    else:
        requests = [
            scoring.encode_chat(tok, loaded.fmt, [Message(role="user", content=it.question)], it.choices)
            for it in es.items
        ]
    pad = tok.pad_token_id if tok.pad_token_id is not None else loaded.fmt.eot_id
    started = time.perf_counter()
    sums = scoring.score(loaded.model, requests, batch_size=batch_size, pad_id=pad, on_batch=tick)
    seconds = time.perf_counter() - started
    correct: dict[str, list[bool]] = {m: [] for m in MC_METRICS}
    answers = []
    for it, req, s in zip(es.items, requests, sums, strict=True):
        picks = {
            "acc": scoring.pick(s),
            "acc_norm": scoring.pick(s, [len(c) for c in it.choices]),
            "acc_per_token": scoring.pick(s, [len(c) for c in req.continuations]),
        }
        for m in MC_METRICS:
            correct[m].append(picks[m] == it.answer)
        answers.append({"pick": picks, "logprob": [round(x, 5) for x in s]})
    return Outcome(correct, answers, seconds)


def run_generation(loaded: Any, es: EvalSet, *, rule: Rule, batch_size: int, max_new_tokens: int, tick) -> Outcome:
    from imitate.evaluate.generate import generate

    conversations = [[Message(role="user", content=it.question)] for it in es.items]
    started = time.perf_counter()
    texts = generate(loaded.model, loaded.tokenizer, conversations, max_new_tokens=max_new_tokens,
                     batch_size=batch_size, fmt=loaded.fmt, on_batch=tick)  # fmt: skip
    seconds = time.perf_counter() - started
    answers, correct = [], []
    for it, (text,) in zip(es.items, texts, strict=True):
        got = extract(text, rule)
        answers.append({"extracted": got, "text": text})
        correct.append(is_correct(got, it.target or ""))
    return Outcome({"exact_match": correct}, answers, seconds)


# ---------------------------------------------------------------------------------------------- the run


def _unique_names(sets: list[EvalSet]) -> None:
    seen: dict[str, int] = {}
    for es in sets:
        seen[es.name] = seen.get(es.name, 0) + 1
        if seen[es.name] > 1:
            es.name = f"{es.name}_{seen[es.name]}"


def _say(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _progress(label: str, es: EvalSet) -> Callable[[int], None]:
    """A progress line per batch on a terminal (rewritten in place), nothing otherwise."""
    done = [0]
    started = time.perf_counter()
    live = sys.stderr.isatty()

    def tick(k: int) -> None:
        done[0] += k
        if live:
            rate = done[0] / max(1e-9, time.perf_counter() - started)
            sys.stderr.write(f"\r  {label} {es.name}: {done[0]}/{len(es.items)} items ({rate:.1f}/s)   ")
            if done[0] >= len(es.items):
                sys.stderr.write("\r" + " " * 70 + "\r")
            sys.stderr.flush()

    return tick


def evaluate_model(loaded: Any, label: str, sets: list[EvalSet], opts: BenchOptions, rule: Rule) -> list[Outcome]:
    outcomes = []
    for es in sets:
        tick = _progress(label, es)
        if es.kind == MULTIPLE_CHOICE:
            o = run_multiple_choice(loaded, es, prompt=opts.prompt, batch_size=opts.batch_size, tick=tick)
        else:
            o = run_generation(loaded, es, rule=rule, batch_size=opts.batch_size,
                               max_new_tokens=opts.max_new_tokens, tick=tick)  # fmt: skip
        main = HEADLINE if es.kind == MULTIPLE_CHOICE else "exact_match"
        acc = stats.accuracy(o.correct[main])
        lo, hi = acc.ci95
        _say(f"  {label:7} {es.name}: {main} {100 * acc.accuracy:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] "
             f"({acc.correct}/{acc.n}, {len(es.items) / max(o.seconds, 1e-9):.1f} items/s)")  # fmt: skip
        outcomes.append(o)
    return outcomes


def _contamination_sources(opts: BenchOptions) -> tuple[list[str], str]:
    from imitate.evaluate.contamination import recorded_train_data
    from imitate.evaluate.generate import split_spec

    if opts.train_data:
        return list(opts.train_data), "--train-data"
    _, adapter = split_spec(opts.model, opts.adapter)
    found = recorded_train_data(adapter)
    return ([found], f"{adapter}/config.yaml") if found else ([], "")


def bench(opts: BenchOptions, *, command: str = "") -> dict[str, Any]:
    """Run the whole evaluation and write the report; returns report.json's content."""
    from imitate.evaluate.contamination import check
    from imitate.evaluate.generate import base_source, load_student

    if opts.prompt not in PROMPTS:
        raise InputError(f"--prompt {opts.prompt!r}: one of {', '.join(PROMPTS)}")
    if opts.threads:
        import torch

        torch.set_num_threads(opts.threads)
    rule = parse_rule(opts.extract)
    sets = [read_eval_set(p, opts.format, columns=opts.columns, limit=opts.limit) for p in opts.data]
    _unique_names(sets)
    sources, origin = _contamination_sources(opts)
    contamination = [check(es.items, sources, opts.ngram) if sources else None for es in sets]
    base_where = None if opts.no_base else base_source(opts.model, opts.adapter, opts.base)
    report = Report.open(opts.out)
    results: dict[str, list[Outcome]] = {}
    describe: dict[str, dict[str, Any]] = {}
    plan = [("student", lambda: load_student(opts.model, opts.adapter))]
    if base_where is not None:
        plan.append(("base", lambda: load_student(base_where)))
    else:
        _say("  no base model known (no adapter, no --base): the student is evaluated alone")
    for label, load in plan:
        loaded = load()
        describe[label] = loaded.describe()
        _say(f"{label}: {loaded.label}")
        results[label] = evaluate_model(loaded, label, sets, opts, rule)
        del loaded
    report.set_models(**describe)
    if command:
        report.add_run(command)
    for k, es in enumerate(sets):
        _add_set(report, es, {lab: outs[k] for lab, outs in results.items()}, contamination[k], origin, opts)
    _write_items(opts.out, sets, results, contamination)
    plot = plot_accuracy(report.data["benchmarks"], opts.out / "accuracy.png")
    if plot:
        report.add_plot("accuracy", plot)
    md, _ = report.save()
    for line in summary_lines({es.name: report.data["benchmarks"][es.name] for es in sets}):
        print(line)
    _say(f"report -> {md}")
    return report.data


def _add_set(report: Report, es: EvalSet, outs: dict[str, Outcome], cont: dict | None, origin: str, opts) -> None:
    main = HEADLINE if es.kind == MULTIPLE_CHOICE else "exact_match"
    results: dict[str, dict[str, Any]] = {}
    for label, o in outs.items():
        r = stats.accuracy(o.correct[main]).to_dict()
        r["items_per_s"] = round(len(es.items) / max(o.seconds, 1e-9), 3)
        if es.kind == MULTIPLE_CHOICE:
            r["metrics"] = {m: stats.accuracy(o.correct[m]).to_dict() for m in MC_METRICS if m != main}
        results[label] = r
    paired = None
    if "base" in outs:
        paired = stats.paired(outs["student"].correct[main], outs["base"].correct[main], seed=opts.seed).to_dict()
    summary = None
    if cont is not None:
        flagged = set(cont["items"])
        keep = [i for i, it in enumerate(es.items) if it.id not in flagged]
        clean = {lab: stats.accuracy([o.correct[main][i] for i in keep]).to_dict() for lab, o in outs.items()}
        summary = {**cont, "source": origin, "clean": clean}
    note = (
        "highest log-probability per character of the choice text; acc = highest summed log-probability, "
        "acc_per_token = per token"
        if es.kind == MULTIPLE_CHOICE
        else f"exact match of the final number (rule {opts.extract or 'auto'})"
    )
    extra = {"prompt": opts.prompt} if es.kind == MULTIPLE_CHOICE else {"max_new_tokens": opts.max_new_tokens}
    report.add_benchmark(es.name, kind=es.kind, data=es.describe() | {"items": len(es.items)}, results=results,
                         paired=paired, contamination=summary, metric=main, metric_note=note, **extra)  # fmt: skip


def _write_items(out: Path, sets: list[EvalSet], results: dict[str, list[Outcome]], cont: list) -> None:
    from imitate.dataset.io import atomic_path

    folder = out / "items"
    folder.mkdir(parents=True, exist_ok=True)
    for k, es in enumerate(sets):
        flagged = (cont[k] or {}).get("items", {})
        with atomic_path(folder / f"{es.name}.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
            for i, it in enumerate(es.items):
                f.write(json.dumps(_item_row(it, i, results, k, flagged), ensure_ascii=False) + "\n")


def _item_row(it: Item, i: int, results: dict[str, list[Outcome]], k: int, flagged: dict[str, str]) -> dict:
    row: dict[str, Any] = {"id": it.id, "where": it.where}
    row["gold"] = it.answer if it.choices else it.target
    for label, outs in results.items():
        o = outs[k]
        row[label] = {"correct": {m: v[i] for m, v in o.correct.items()}, **o.answers[i]}
    if it.id in flagged:
        row["contaminated_by"] = flagged[it.id]
    return row


def bench_command(options: BenchOptions, argv: list[str] | None = None) -> dict[str, Any]:
    from transformers.utils import logging

    from imitate.config import redact_text

    logging.disable_progress_bar()  # the model loads' per-tensor bars would flood the progress lines
    command = redact_text(shlex.join(["imitate", *(argv or ["eval", "bench"])]))
    return bench(options, command=command)


def summary_lines(benchmarks: dict[str, Any]) -> list[str]:
    """The student-vs-base table printed at the end: accuracy [95 % CI] per model, the paired difference."""

    def pct(r: dict[str, Any]) -> str:
        lo, hi = r["ci95"]
        return f"{100 * r['accuracy']:5.1f}% [{100 * lo:5.1f}, {100 * hi:5.1f}]"

    lines = []
    for name, b in benchmarks.items():
        res = b["results"]
        line = f"{name} ({b['metric']}, n={next(iter(res.values()))['n']}): student {pct(res['student'])}"
        if "base" in res:
            line += f"  base {pct(res['base'])}"
        p = b.get("paired")
        if p:
            lo, hi = p["ci95"]
            diff = f"{100 * p['diff']:+.1f} pp [{100 * lo:+.1f}, {100 * hi:+.1f}]"
            line += f"  student − base {diff} McNemar p={p['p_value']:.3g}"
        c = b.get("contamination")
        if c:
            line += f"  contaminated {c['flagged']}/{c['n']}"
        lines.append(line)
    return lines
