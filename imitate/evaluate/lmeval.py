"""`imitate eval lm-eval`: EleutherAI's lm-evaluation-harness on the student and on its base, side by side, folded
into the same report as `imitate eval bench`.

    imitate eval lm-eval --model M [--adapter DIR] --tasks mmlu,gsm8k --out DIR
        [--include-path DIR] [--limit N] [--batch-size B] [--num-fewshot K] [--chat-template] [--base B | --no-base]

The harness is an optional extra (`pip install 'imitate[lmeval]'`), imported only inside this command. Each model
is loaded the way training loads it (`evaluate.generate.load_student`: a GGUF de-quantised by train/model.py, a
folder, or base + LoRA adapter, which is merged for speed) and handed to the harness's Hugging Face backend as an
already-built model (`HFLM(pretrained=model, tokenizer=...)`), so whatever imitate can load, the harness can run.
One model is in memory at a time: the student runs, is freed, then the base.

Tasks are the harness's names (its datasets come from the Hub: online, or from a local `datasets` cache) or local
task YAMLs in `--include-path` (e.g. `dataset_path: json` + `dataset_kwargs: {data_files: ...}`, which run
offline). When every task is found in `--include-path`, the harness's own task index (thousands of YAMLs, tens of
seconds to build) is not scanned. Unknown tasks are refused before any model loads.

Out (in `--out`, next to whatever `imitate eval bench` wrote there):
- `report.json` / `report.md`: one benchmark per requested task or group (`lm-eval/<task>`, its headline metric:
  `acc` if the task has it, else its first metric) with the harness's value and a 95 % interval of
  ± 1.96 × the harness's stderr, and the paired student − base difference over the same items (McNemar, paired
  bootstrap) when the metric is 0/1 per item; and an `lm-eval` section with every metric and stderr of every task.
- `lm-eval/<label>.json`: the harness's results (without the per-item samples), `lm-eval/<label>-items.jsonl`: one
  line per item and filter with its metric values.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import shlex
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imitate.errors import ConfigError, InputError
from imitate.evaluate.stats import Z95, paired

EXTRA = "pip install 'imitate[lmeval]'"
_NOT_METRICS = {"alias", "name", "sample_len", "samples", " ", ""}


@dataclass
class LmEvalOptions:
    tasks: list[str]
    out: Path
    model: str | None = None
    adapter: Path | None = None
    base: str | None = None
    no_base: bool = False
    include_path: list[Path] = field(default_factory=list)
    limit: int | None = None
    batch_size: int = 8
    num_fewshot: int | None = None
    chat_template: bool = False
    seed: int = 0


@dataclass(frozen=True)
class Metric:
    """One `metric,filter` value the harness reported for a task or group."""

    name: str
    filter: str
    value: float
    stderr: float | None

    @property
    def key(self) -> str:
        return f"{self.name},{self.filter}"


# ---------------------------------------------------------------------------------------------- pure: options


def parse_tasks(values: list[str]) -> list[str]:
    """`--tasks mmlu,gsm8k --tasks arc_easy` -> ["mmlu", "gsm8k", "arc_easy"] (order kept, duplicates dropped)."""
    names = [t.strip() for v in values for t in v.split(",")]
    names = list(dict.fromkeys(t for t in names if t))
    if not names:
        raise InputError("--tasks names no task", hint="e.g. --tasks mmlu,gsm8k or a task in --include-path")
    return names


# ---------------------------------------------------------------------------------------------- pure: results


def task_metrics(entry: dict[str, Any]) -> list[Metric]:
    """The `metric,filter` values of one results entry, in the harness's order, each with its stderr."""
    out = []
    for key, value in entry.items():
        if key in _NOT_METRICS or "," not in key or "_stderr," in key or not isinstance(value, int | float):
            continue
        name, filt = key.split(",", 1)
        err = entry.get(f"{name}_stderr,{filt}")
        stderr = float(err) if isinstance(err, int | float) and math.isfinite(err) else None
        out.append(Metric(name, filt, float(value), stderr))
    return out


def headline(metrics: list[Metric]) -> Metric | None:
    """`acc` when the task has it (multiple choice), else its first metric (e.g. GSM8K's strict exact match)."""
    return next((m for m in metrics if m.name == "acc"), metrics[0] if metrics else None)


def top_level(raw: dict[str, Any]) -> list[str]:
    """The requested tasks and groups: every results entry that is not inside a group that also has one."""
    inside = {child for children in (raw.get("group_subtasks") or {}).values() for child in children}
    return [name for name in raw.get("results", {}) if name not in inside]


def leaves(raw: dict[str, Any], name: str) -> list[str]:
    """The leaf tasks under `name` (itself when it is a task)."""
    children = (raw.get("group_subtasks") or {}).get(name)
    if not children:
        return [name]
    return [leaf for child in children for leaf in leaves(raw, child)]


def item_values(raw: dict[str, Any], tasks: list[str], metric: Metric) -> dict[tuple[str, int], float]:
    """(task, doc_id) -> the item's value of `metric` (under its filter), over `tasks`."""
    out: dict[tuple[str, int], float] = {}
    for task in tasks:
        for s in (raw.get("samples") or {}).get(task, []):
            value = s.get(metric.name)
            if s.get("filter", "none") == metric.filter and isinstance(value, int | float | bool):
                out[(task, int(s["doc_id"]))] = float(value)
    return out


def n_items(raw: dict[str, Any], tasks: list[str]) -> int:
    counts = raw.get("n-samples") or {}
    return sum(int((counts.get(t) or {}).get("effective", 0)) for t in tasks)


def _interval(m: Metric) -> list[float] | None:
    if m.stderr is None:
        return None
    return [max(0.0, m.value - Z95 * m.stderr), min(1.0, m.value + Z95 * m.stderr)]


def model_result(raw: dict[str, Any], name: str) -> dict[str, Any] | None:
    """One model's numbers for a task/group in the report's benchmark shape (accuracy = the headline metric)."""
    metrics = task_metrics(raw.get("results", {}).get(name, {}))
    head = headline(metrics)
    if head is None:
        return None
    n = n_items(raw, leaves(raw, name))
    return {
        "accuracy": head.value,
        "ci95": _interval(head) or [head.value, head.value],
        "stderr": head.stderr,
        "correct": round(head.value * n),
        "n": n,
        "metric": head.key,
        "metrics": {
            m.key: {
                "accuracy": m.value,
                "ci95": _interval(m),
                "stderr": m.stderr,
                "correct": round(m.value * n),
                "n": n,
            }
            for m in metrics
            if m != head
        },
    }


def paired_items(student: dict[str, Any], base: dict[str, Any], name: str, seed: int = 0) -> dict[str, Any] | None:
    """student − base over the items both ran, when the headline metric is 0/1 per item and its mean over the
    pooled items is what the harness reported (a group averaged without weighting by size is not)."""
    metrics = task_metrics(student.get("results", {}).get(name, {}))
    head = headline(metrics)
    if head is None:
        return None
    tasks = leaves(student, name)
    s_items, b_items = item_values(student, tasks, head), item_values(base, tasks, head)
    keys = sorted(s_items.keys() & b_items.keys())
    if not keys or any(v not in (0.0, 1.0) for v in (*s_items.values(), *b_items.values())):
        return None
    if abs(sum(s_items[k] for k in keys) / len(keys) - head.value) > 1e-9:
        return None
    return paired([s_items[k] == 1.0 for k in keys], [b_items[k] == 1.0 for k in keys], seed=seed).to_dict()


def section_markdown(runs: dict[str, dict[str, Any]], version: str) -> str:
    """Every metric of every task and group, one row per metric, one column per model (value ± stderr, %)."""
    labels = list(runs)
    head = ["task", "metric", *labels]
    lines = [f"lm-evaluation-harness {version}; values in %, ± the harness's stderr.", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    first = next(iter(runs.values()))
    for name in first.get("results", {}):
        for m in task_metrics(first["results"][name]):
            cells = []
            for label in labels:
                other = {x.key: x for x in task_metrics(runs[label].get("results", {}).get(name, {}))}.get(m.key)
                err = f" ± {100 * other.stderr:.1f}" if other and other.stderr is not None else ""
                cells.append(f"{100 * other.value:.1f}{err}" if other else "–")
            lines.append("| " + " | ".join([name, m.key, *cells]) + " |")
    return "\n".join(lines)


def fold(report: Any, runs: dict[str, dict[str, Any]], *, seed: int = 0) -> list[str]:
    """Add each top-level task/group as a benchmark and the full table as the `lm-eval` section; returns the
    benchmark names added."""
    first = next(iter(runs.values()))
    version = str(first.get("lm_eval_version", "?"))
    names = []
    for task in top_level(first):
        results = {label: r for label, raw in runs.items() if (r := model_result(raw, task)) is not None}
        if not results:
            continue
        pair = paired_items(runs["student"], runs["base"], task, seed) if {"student", "base"} <= runs.keys() else None
        name = f"lm-eval/{task}"
        report.add_benchmark(
            name,
            kind="lm-eval",
            results=results,
            data={"file": f"lm-eval task {task}", "rows": next(iter(results.values()))["n"]},
            paired=pair,
            metric=next(iter(results.values()))["metric"],
            metric_note=f"lm-evaluation-harness {version}; interval = ± 1.96 × its stderr",
        )
        names.append(name)
    data = {
        label: {k: raw.get(k) for k in ("results", "n-samples", "n-shot", "versions", "group_subtasks")}
        for label, raw in runs.items()
    }
    report.add_section("lm-eval", section_markdown(runs, version), {"lm_eval_version": version, "models": data})
    return names


# ---------------------------------------------------------------------------------------------- the harness


def _import_harness() -> Any:
    try:
        import lm_eval
    except ImportError as exc:
        raise ConfigError(f"imitate eval lm-eval needs the lm-eval package ({exc})", hint=EXTRA) from exc
    return lm_eval


def task_manager(tasks: list[str], include_path: list[Path]) -> Any:
    """The harness's TaskManager; the built-in index is scanned only when a task is not in `include_path`.
    Unknown tasks are refused here, before any model loads."""
    _import_harness()
    from lm_eval.tasks import TaskManager

    for folder in include_path:
        if not folder.is_dir():
            raise InputError(f"--include-path {folder} is not a folder")
    paths = [str(p) for p in include_path]
    manager = TaskManager(include_path=paths, include_defaults=False) if paths else None
    if manager is None or any(t not in manager.all_tasks and not Path(t).is_file() for t in tasks):
        manager = TaskManager(include_path=paths or None)
    unknown = [t for t in tasks if t not in manager.all_tasks and not Path(t).is_file()]
    if unknown:
        raise InputError(
            f"unknown lm-eval task(s): {', '.join(unknown)}",
            hint="see `lm-eval ls tasks`, or give the folder of your task YAML with --include-path",
        )
    return manager


@contextmanager
def _quiet_harness() -> Iterator[None]:
    """The harness logs a warning per task and one about pre-built models; keep its errors, drop the rest."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_harness(loaded: Any, tasks: list[str], manager: Any, options: LmEvalOptions) -> dict[str, Any]:
    """simple_evaluate on one loaded model (imitate.evaluate.generate.Loaded)."""
    lm_eval = _import_harness()
    import torch
    from lm_eval.models.huggingface import HFLM

    model = loaded.model
    if hasattr(model, "merge_and_unload"):  # base + LoRA: one matmul per layer instead of three
        with warnings.catch_warnings():  # peft reads a property transformers 5 deprecates: noise, not news
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            model = model.merge_and_unload()
    if torch.cuda.is_available():
        model = model.to("cuda")
    with _quiet_harness():
        lm = HFLM(pretrained=model.eval(), tokenizer=loaded.tokenizer, batch_size=options.batch_size)
        try:
            raw = lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                task_manager=manager,
                limit=options.limit,
                num_fewshot=options.num_fewshot,
                apply_chat_template=options.chat_template,
                fewshot_as_multiturn=options.chat_template,
                log_samples=True,
                random_seed=options.seed,
            )
        except (OSError, ConnectionError) as exc:  # datasets: offline with nothing cached, a missing file
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise InputError(
                f"lm-eval could not load the data of {', '.join(tasks)}: {first[:200]}",
                hint="the harness's tasks download from the Hub; offline, use a local task with --include-path",
            ) from exc
    return raw


def _write_outputs(folder: Path, label: str, raw: dict[str, Any]) -> None:
    from imitate.dataset.io import atomic_path

    folder.mkdir(parents=True, exist_ok=True)
    kept = {k: v for k, v in raw.items() if k != "samples"}
    with atomic_path(folder / f"{label}.json") as tmp:
        tmp.write_text(json.dumps(kept, indent=2, default=str) + "\n", encoding="utf-8")
    with atomic_path(folder / f"{label}-items.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
        for task, samples in (raw.get("samples") or {}).items():
            for s in samples:
                metrics = {k: s[k] for k in s.get("metrics", []) if k in s}
                row = {"task": task, "doc_id": s.get("doc_id"), "filter": s.get("filter"), "target": s.get("target")}
                f.write(json.dumps({**row, **metrics}, default=str) + "\n")


def lm_eval_command(options: LmEvalOptions, argv: list[str] | None = None, echo: Any = print) -> dict[str, Any]:
    """Run the harness on the student and its base, write the outputs, fold them into the report."""
    from imitate.evaluate.generate import base_source, load_student
    from imitate.evaluate.report import Report

    tasks = parse_tasks(options.tasks)
    manager = task_manager(tasks, list(options.include_path))
    where_base = None if options.no_base else base_source(options.model, options.adapter, options.base)
    plan = [("student", options.model, options.adapter)]
    if where_base is not None:
        plan.append(("base", where_base, None))
    runs: dict[str, dict[str, Any]] = {}
    described: dict[str, Any] = {}
    for label, model, adapter in plan:
        echo(f"lm-eval: {label} on {', '.join(tasks)}")
        loaded = load_student(model, adapter)
        described[label] = loaded.describe()
        runs[label] = run_harness(loaded, tasks, manager, options)
        _write_outputs(options.out / "lm-eval", label, runs[label])
        del loaded
        gc.collect()
    report = Report.open(options.out)
    report.set_models(**described)
    report.add_run(shlex.join(["imitate", *(argv or ["eval", "lm-eval"])]))
    names = fold(report, runs, seed=options.seed)
    md, _ = report.save()
    for name in names:
        b = report.data["benchmarks"][name]
        cells = [f"{label} {100 * r['accuracy']:.1f}" for label, r in b["results"].items()]
        diff = f", student − base {100 * b['paired']['diff']:+.1f} pp" if b.get("paired") else ""
        echo(f"{name} ({b['metric']}): {', '.join(cells)}{diff}")
    echo(f"report: {md}")
    return runs
