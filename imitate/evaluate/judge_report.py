"""The judge's results as numbers, a Markdown section, and a bar chart (`imitate eval judge`'s outputs).

    rows = score_rows(questions, items_by_row, results)    # one row per question and model / pair -> JSONL
    summary = summarise(rows, models, pairs)                # win/tie/loss tables, mean scores with intervals
    markdown(summary)                                       # the report.md section
    plot(summary, out / "judge.png")                        # matplotlib (Agg), imported here only

Single scores: the mean over the questions a model's answer was scored on, with a 95 % percentile-bootstrap
interval, and the student − base difference paired over the questions both were scored on. Unparsed and failed
judgements are counted and shown, never averaged in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imitate.evaluate.judge import WinTable, mean_interval, paired_difference

MODEL_ORDER = ("student", "base", "teacher")


def summarise(rows: list[dict[str, Any]], models: list[str], pairs: list[tuple[str, str]]) -> dict[str, Any]:
    single: dict[str, Any] = {}
    scores: dict[str, dict[str, float]] = {m: {} for m in models}
    for m in models:
        mine = [r for r in rows if r["kind"] == "single" and r["model"] == m]
        for r in mine:
            if r["status"] == "ok":
                scores[m][r["question_id"]] = r["score"]
        mean, low, high = mean_interval(list(scores[m].values()))
        single[m] = {
            "mean": _round(mean),
            "ci95": [_round(low), _round(high)],
            "n": len(scores[m]),
            "unparsed": sum(r["status"] == "unparsed" for r in mine),
            "failed": sum(r["status"] == "failed" for r in mine),
        }
    paired = {}
    for x, y in pairs:
        both = sorted(set(scores.get(x, {})) & set(scores.get(y, {})))
        if both:
            diff, low, high = paired_difference([scores[x][q] for q in both], [scores[y][q] for q in both])
            paired[f"{x} - {y}"] = {"diff": _round(diff), "ci95": [_round(low), _round(high)], "n": len(both)}
    tables = {}
    for x, y in pairs:
        table = WinTable(x, y)
        for r in rows:
            if r["kind"] == "pairwise" and (r["x"], r["y"]) == (x, y):
                table.add(r["outcome"], r.get("verdict_x_first"), r.get("verdict_x_second"))
        if table.scored or table.unparsed or table.failed:
            tables[f"{x} vs {y}"] = table.as_dict()
    return {"single": single if any(v["n"] or v["unparsed"] or v["failed"] for v in single.values()) else {},
            "single_paired": paired, "pairwise": tables}  # fmt: skip


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _rate(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def markdown(summary: dict[str, Any], about: dict[str, Any]) -> str:
    """The report section: what was judged by whom, the win/tie/loss table and the mean scores."""
    j = about["judge"]
    prompts = ", ".join(f"{p['id']} v{p['version']} (`{p['sha256'][:12]}…`)" for p in about["prompts"].values())
    lines = [
        f"Judge `{j['model']}` at `{j['base_url']}`, temperature 0; prompts {prompts}. {about['questions']['n']} "
        f"questions from `{about['questions']['file']}`. Unreadable verdicts were asked again up to "
        f"{about['max_reasks']} times, then counted as unparsed (never scored).",
        "",
    ]
    if summary["pairwise"]:
        lines += [
            "**Pairwise** — each pair asked in both orders; a win needs the judge to prefer the same answer both "
            "times, anything else is a tie.",
            "",
            "| pair | win | tie | loss | win rate | unparsed | failed | inconsistent | verdicts A / B |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, t in summary["pairwise"].items():
            lines.append(
                f"| {name} | {t['win']} | {t['tie']} | {t['loss']} | {_rate(t['win_rate'])} | {t['unparsed']} | "
                f"{t['failed']} | {t['inconsistent']} | {t['position_a_verdicts']} / {t['position_b_verdicts']} |"
            )
        lines.append("")
    if summary["single"]:
        lines += ["**Single-answer grading** (1–10)", "", "| model | mean [95% CI] | scored | unparsed | failed |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for m, s in summary["single"].items():
            lo, hi = s["ci95"]
            lines.append(f"| {m} | {_num(s['mean'])} [{_num(lo)}, {_num(hi)}] | {s['n']} | {s['unparsed']} | "
                         f"{s['failed']} |")  # fmt: skip
        for name, d in summary["single_paired"].items():
            lo, hi = d["ci95"]
            lines.append(f"\n{name}: {d['diff']:+.2f} [{_num(lo)}, {_num(hi)}], paired over {d['n']} questions.")
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> Path | None:
    """Win/tie/loss bars per pair and mean single scores with their intervals, side by side (None: no data)."""
    panels = [p for p in ("pairwise", "single") if summary.get(p)]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 2.2 + 0.5 * len(summary["pairwise"])))
    axes = list(axes) if len(panels) > 1 else [axes]
    for ax, panel in zip(axes, panels, strict=True):
        if panel == "pairwise":
            names = list(summary["pairwise"])
            left = [0.0] * len(names)
            for part, colour in (("win", "#4c9a2a"), ("tie", "#b0b0b0"), ("loss", "#c0392b")):
                widths = [summary["pairwise"][n][part] for n in names]
                ax.barh(names, widths, left=left, color=colour, label=part)
                left = [a + b for a, b in zip(left, widths, strict=True)]
            ax.set_xlabel("questions (both orders agree = win/loss)")
            ax.invert_yaxis()
            ax.legend(frameon=False, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0))
        else:
            names = [m for m in summary["single"] if summary["single"][m]["mean"] is not None]
            means = [summary["single"][m]["mean"] for m in names]
            below = [m - summary["single"][n]["ci95"][0] for m, n in zip(means, names, strict=True)]
            above = [summary["single"][n]["ci95"][1] - m for m, n in zip(means, names, strict=True)]
            ax.bar(names, means, yerr=[below, above], capsize=4, color="#3b6ea8")
            ax.set_ylim(0, 10)
            ax.set_ylabel("mean judge score (95% CI)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
