"""The evaluation report: `OUT/report.json` (every number) and `OUT/report.md` (the same, for people), which every
eval command in the same `--out` folder adds to.

    report = Report.open(out)                       # reads OUT/report.json if an earlier eval wrote one
    report.set_models(student={"model": ..., "adapter": ...}, base={"model": ...})
    report.add_benchmark("general_mc", kind="multiple_choice", data={"file": ..., "sha256": ..., "rows": 100},
                         results={"student": {...}, "base": {...}}, paired={...}, contamination={...})
    report.add_section("judge", markdown, data)     # JUDGE / LMEVAL fold their tables in the same way
    report.add_plot("accuracy", out / "accuracy.png")
    report.save()                                   # rewrites both files (atomically); other sections stay

A benchmark or section replaces the one of the same name and leaves every other one as it was, so
`imitate eval bench --out R` then `imitate eval judge --out R` gives one report with both. `results` maps a model
label ("student", "base", ...) to a dict with at least `accuracy`, `ci95` ([low, high]), `correct`, `n`; for
multiple choice `metric` names the headline one and `metrics` may hold others. `paired` is stats.PairedDiff's
dict. Rendering reads only report.json's content, so the Markdown always shows everything the JSON holds.

Every report says what each kind of number is evidence of (`EVIDENCE`): a benchmark with right answers shows what
the model knows or can work out; a judge's preference shows which answers a judge liked, which style alone can win.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imitate import __version__
from imitate.dataset.io import atomic_path

SCHEMA = 1
JSON_NAME, MD_NAME = "report.json", "report.md"
JUDGE_CAVEAT = (
    "A judge result shows which answers a judge model preferred, and judges are swayed by confident, fluent "
    "style; it does not show that the student knows more or answers more correctly — only the benchmarks with "
    "right answers (above) show that."
)
EVIDENCE = (
    "Benchmarks with right answers measure what a model knows or can work out, compared on the same items "
    "(paired): a difference whose interval excludes 0 is evidence the student gained or lost capability. "
    + JUDGE_CAVEAT
)


@dataclass
class Report:
    out: Path
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, out: str | Path) -> Report:
        """The report in `out`, continued from its report.json when there is one (a broken one starts over)."""
        out = Path(out)
        data: dict[str, Any] = {}
        path = out / JSON_NAME
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = {}
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            data = {}
        data.setdefault("schema", SCHEMA)
        for key in ("models", "benchmarks", "sections", "plots"):
            data.setdefault(key, {})
        data.setdefault("runs", [])
        return cls(out, data)

    # ------------------------------------------------------------------------------------------------ adding

    def set_models(self, **models: dict[str, Any] | None) -> None:
        """Describe the models by label (student=..., base=..., teacher=...); None removes a label."""
        for label, desc in models.items():
            if desc is None:
                self.data["models"].pop(label, None)
            else:
                self.data["models"][label] = desc

    def add_run(self, command: str) -> None:
        self.data["runs"].append(
            {"command": command, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "imitate": __version__}
        )

    def add_benchmark(
        self,
        name: str,
        *,
        kind: str,
        results: dict[str, dict[str, Any]],
        data: dict[str, Any] | None = None,
        paired: dict[str, Any] | None = None,
        contamination: dict[str, Any] | None = None,
        **extra: Any,
    ) -> None:
        self.data["benchmarks"][name] = {
            "kind": kind,
            "data": data or {},
            "results": results,
            "paired": paired,
            "contamination": contamination,
            **extra,
        }

    def add_section(self, name: str, markdown: str, data: Any = None) -> None:
        """A free section (judge table, lm-eval results, ...): its Markdown goes in report.md as is, `data` in
        report.json under `sections.<name>`."""
        self.data["sections"][name] = {"markdown": markdown.strip(), "data": data}

    def add_plot(self, name: str, path: str | Path) -> None:
        """A plot file; stored relative to the report folder when it is inside it."""
        path = Path(path)
        try:
            shown = str(path.resolve().relative_to(self.out.resolve()))
        except ValueError:
            shown = str(path)
        self.data["plots"][name] = shown

    # ------------------------------------------------------------------------------------------------ writing

    def save(self) -> tuple[Path, Path]:
        self.out.mkdir(parents=True, exist_ok=True)
        json_path, md_path = self.out / JSON_NAME, self.out / MD_NAME
        with atomic_path(json_path) as tmp:
            tmp.write_text(json.dumps(self.data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        with atomic_path(md_path) as tmp:
            tmp.write_text(render(self.data), encoding="utf-8")
        return md_path, json_path


# ---------------------------------------------------------------------------------------------- Markdown


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _acc(result: dict[str, Any] | None) -> str:
    if not result:
        return "–"
    lo, hi = result.get("ci95") or (None, None)
    return (
        f"{_pct(result.get('accuracy'))} [{_pct(lo)}, {_pct(hi)}] ({result.get('correct', '?')}/{result.get('n', '?')})"
    )


def _paired(p: dict[str, Any] | None) -> str:
    if not p:
        return "–"
    lo, hi = p.get("ci95") or (None, None)
    sign = "+" if p.get("diff", 0) >= 0 else ""
    text = f"{sign}{_pct(p.get('diff'))} [{_pct(lo)}, {_pct(hi)}]"
    if p.get("p_value") is not None:
        text += f", McNemar p={p['p_value']:.3g}; right only for student {p.get('student_only', '?')}, "
        text += f"only for base {p.get('base_only', '?')}"
    return text


def _models(models: dict[str, Any]) -> list[str]:
    lines = []
    for label, desc in models.items():
        parts = [f"`{desc.get('model')}`"]
        if desc.get("adapter"):
            parts.append(f"+ adapter `{desc['adapter']}`")
        lines.append(f"- **{label}**: {' '.join(parts)}")
    return lines


def _benchmark_rows(benchmarks: dict[str, Any], labels: list[str]) -> list[str]:
    head = ["benchmark", "kind", "n", *[f"{lab} % [95% CI]" for lab in labels], "student − base (pp) [95% CI]"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, b in benchmarks.items():
        results = b.get("results", {})
        n = next((r.get("n") for r in results.values() if r), "?")
        cells = [name, b.get("kind", ""), str(n), *[_acc(results.get(lab)) for lab in labels], _paired(b.get("paired"))]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _details(name: str, b: dict[str, Any]) -> list[str]:
    out = [f"### {name}", ""]
    d = b.get("data") or {}
    if d:
        out.append(f"- data: `{d.get('file')}` (sha256 `{str(d.get('sha256', ''))[:16]}…`, {d.get('rows', '?')} items)")
    if b.get("metric"):
        out.append(f"- metric: {b['metric']}" + (f" — {b['metric_note']}" if b.get("metric_note") else ""))
    for label, r in (b.get("results") or {}).items():
        others = r.get("metrics") or {}
        if others:
            shown = ", ".join(f"{k} {_acc(v)}" for k, v in others.items())
            out.append(f"- {label}: {shown}")
    c = b.get("contamination")
    if c:
        out.append(
            f"- contamination: {c.get('flagged', 0)} of {c.get('n', '?')} items share a {c.get('ngram', 13)}-gram "
            f"with {c.get('train_records', '?')} training records ({c.get('source', '')})"
        )
        for label, r in (c.get("clean") or {}).items():
            out.append(f"  - {label} without flagged items: {_acc(r)}")
    return [*out, ""]


def render(data: dict[str, Any]) -> str:
    """report.md from report.json's content."""
    lines = ["# Evaluation report", ""]
    if data.get("models"):
        lines += [*_models(data["models"]), ""]
    lines += [f"> {EVIDENCE}", ""]
    benchmarks = data.get("benchmarks", {})
    if benchmarks:
        labels = sorted({lab for b in benchmarks.values() for lab in b.get("results", {})}, key=_label_order)
        lines += ["## Benchmarks with right answers", "", *_benchmark_rows(benchmarks, labels), ""]
        for name, b in benchmarks.items():
            lines += _details(name, b)
    for name, section in data.get("sections", {}).items():
        lines += [f"## {name}", "", section.get("markdown", ""), ""]
        if "judge" in name.lower():
            lines += [f"*{JUDGE_CAVEAT}*", ""]
    plots = data.get("plots", {})
    if plots:
        lines += ["## Plots", "", *[f"![{n}]({p})" for n, p in plots.items()], ""]
    runs = data.get("runs", [])
    if runs:
        lines += ["## Runs", "", *[f"- {r.get('at', '')}: `{r.get('command', '')}`" for r in runs], ""]
    return "\n".join(lines).rstrip() + "\n"


def _label_order(label: str) -> tuple[int, str]:
    order = {"student": 0, "base": 1, "teacher": 2}
    return (order.get(label, 3), label)


def plot_accuracy(benchmarks: dict[str, Any], path: Path) -> Path | None:
    """Accuracy with its 95 % interval per benchmark and model, as a grouped bar chart PNG (None if no data)."""
    names = list(benchmarks)
    if not names:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({lab for b in benchmarks.values() for lab in b.get("results", {})}, key=_label_order)
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(names) + 2), 3.2))
    for k, lab in enumerate(labels):
        xs, heights, below, above = [], [], [], []
        for i, name in enumerate(names):
            r = benchmarks[name]["results"].get(lab)
            if not r:
                continue
            lo, hi = r["ci95"]
            xs.append(i + (k - (len(labels) - 1) / 2) * width)
            heights.append(r["accuracy"])
            below.append(max(0.0, r["accuracy"] - lo))
            above.append(max(0.0, hi - r["accuracy"]))
        ax.bar(xs, heights, width, yerr=[below, above], capsize=3, label=lab)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (95% CI)")
    ax.legend(frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
