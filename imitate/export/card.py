"""The dataset card (README.md) of an export: YAML metadata the Hub reads, and a body stating the full provenance.

Metadata: license, pretty_name, language, task_categories, size_categories, tags, and `configs` with the
`data_files` of each split (the Hub's viewer and `datasets.load_dataset(folder)` both read these).

Body, from the exported records (`CardStats`, filled one record at a time) and the manifests behind them
(`imitate.export.lineage`): teachers and models with rows, tokens and cost; the system-message id distribution
(and prompt erasure); generation params; finish reasons; imported sources and mix sets; per pipeline stage its
command, config sha256, failure and drop counts per gate or reason, and dedup/selection settings; the imitate
version; a note on the teacher's terms of use; the manifests themselves. Rendering is pure: the caller scrubs
secrets from the finished text (`lineage.scrub`).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import yaml

from imitate import __version__
from imitate.export.lineage import Stage, drop_counts, settings
from imitate.records import Record

SIZE_CATEGORIES = [
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
]


def size_category(n: int) -> str:
    return next((label for limit, label in SIZE_CATEGORIES if n < limit), "n>1B")


@dataclass
class CardStats:
    """Provenance figures over the exported records, accumulated one record at a time."""

    rows: int = 0
    teachers: Counter = field(default_factory=Counter)  # (teacher, model) -> rows
    prompt_tokens: Counter = field(default_factory=Counter)
    completion_tokens: Counter = field(default_factory=Counter)
    cost_usd: Counter = field(default_factory=Counter)
    system_prompts: Counter = field(default_factory=Counter)  # (id, sha256[:12]) -> rows
    erased: Counter = field(default_factory=Counter)
    params: Counter = field(default_factory=Counter)  # canonical params JSON -> rows
    finish_reasons: Counter = field(default_factory=Counter)
    sources: Counter = field(default_factory=Counter)  # (uri, format) -> rows
    tags: Counter = field(default_factory=Counter)
    versions: Counter = field(default_factory=Counter)
    multi_turn: int = 0
    splits: Counter = field(default_factory=Counter)

    def add(self, rec: Record, split: str) -> None:
        p = rec.provenance
        key = (p.teacher, p.model)
        self.rows += 1
        self.splits[split] += 1
        self.teachers[key] += 1
        self.prompt_tokens[key] += p.usage.prompt_tokens
        self.completion_tokens[key] += p.usage.completion_tokens
        self.cost_usd[key] += p.cost_usd
        self.system_prompts[(p.system_prompt_id or "none", (p.system_prompt_sha256 or "")[:12])] += 1
        if p.erased_system:
            self.erased[p.erased_system] += 1
        if p.source is None:  # imported rows carry no generation params of ours
            self.params[json.dumps(p.params.api_kwargs(), sort_keys=True)] += 1
        self.finish_reasons[p.finish_reason or "unknown"] += 1
        if p.source is not None:
            self.sources[(p.source.uri, p.source.format)] += 1
        self.tags.update(rec.tags)
        self.versions[p.imitate_version or "unknown"] += 1
        self.multi_turn += bool(rec.query.turns)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def metadata(
    stats: CardStats, *, licence: str, languages: list[str], pretty_name: str, fmt: str, splits: list[str]
) -> dict[str, Any]:
    tags = ["imitate", "synthetic", "distillation", fmt]
    tags += sorted({m for _, m in stats.teachers if m not in ("unknown", "")})
    return {
        "license": licence,
        "pretty_name": pretty_name,
        "language": languages,
        "task_categories": ["text-generation"],
        "size_categories": [size_category(stats.rows)],
        "tags": list(dict.fromkeys(tags)),
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": s, "path": f"data/{s}-*.parquet"} for s in splits],
            }
        ],
    }


def _teachers_section(s: CardStats) -> str:
    rows = [
        [t, m, n, s.prompt_tokens[(t, m)], s.completion_tokens[(t, m)], f"{s.cost_usd[(t, m)]:.4f}"]
        for (t, m), n in s.teachers.most_common()
    ]
    total = [
        "**total**",
        "",
        s.rows,
        sum(s.prompt_tokens.values()),
        sum(s.completion_tokens.values()),
        f"{sum(s.cost_usd.values()):.4f}",
    ]
    header = ["teacher", "model", "rows", "prompt tokens", "completion tokens", "cost (USD)"]
    return "### Teachers and models\n\n" + _table(header, [*rows, total])


def _distribution_sections(s: CardStats) -> list[str]:
    out = []
    sys_rows = [[i, sha or "", n, f"{n / s.rows:.1%}"] for (i, sha), n in s.system_prompts.most_common()]
    text = "### System messages\n\nThe system-message id each answer was generated under (`prompts/system/`).\n\n"
    text += _table(["system prompt id", "sha256 (first 12)", "rows", "share"], sys_rows)
    if s.erased:
        erased = ", ".join(f"{n} rows to `{k}`" for k, n in s.erased.items())
        text += f"\n\nPrompt erasure (Orca 2): the system message was replaced for training in {erased} "
        text += "(`none`: removed); the ids above are those the teacher saw."
    out.append(text)
    if s.params:
        rows = [[f"`{k}`", n] for k, n in s.params.most_common()]
        out.append("### Generation parameters\n\n" + _table(["params", "rows"], rows))
    reasons = [list(kv) for kv in s.finish_reasons.most_common()]
    out.append("### Finish reasons\n\n" + _table(["finish_reason", "rows"], reasons))
    if s.sources:
        rows = [[u, f, n] for (u, f), n in s.sources.most_common()]
        out.append("### Imported sources\n\n" + _table(["source", "format", "rows"], rows))
    if s.tags:
        out.append("### Tags\n\n" + _table(["tag", "rows"], [list(kv) for kv in s.tags.most_common()]))
    return out


def _stage_section(stage: Stage) -> str:
    m = stage.manifest
    lines = [f"#### {stage.kind}: `{stage.dir.name}`", ""]
    if m.get("command"):
        lines.append(f"- command: `{m['command']}`")
    if m.get("imitate_version"):
        lines.append(f"- imitate version: {m['imitate_version']}")
    if stage.config_sha256:
        lines.append(f"- config.yaml sha256: `{stage.config_sha256}`")
    if stage.kind == "harvest" and isinstance(m.get("totals"), dict):
        t = m["totals"]
        lines.append(
            f"- harvest totals: {t.get('ok', 0)} ok, {t.get('failed', 0)} failed, {t.get('tokens', 0)} tokens, "
            f"${t.get('spend_usd', 0):.4f} spent on answers, ${t.get('billable', {}).get('usd_upper_bound', 0):.4f} "
            "billable at most (every attempt)"
        )
    harvest_cfg = m.get("config", {}).get("harvest") if isinstance(m.get("config"), dict) else None
    if stage.kind == "harvest" and isinstance(harvest_cfg, dict):
        keys = ("preset", "samples_per_prompt", "seed", "mode")
        lines.append("- harvest settings: " + ", ".join(f"{k} {harvest_cfg.get(k)}" for k in keys if k in harvest_cfg))
    if stage.kind == "mix" and isinstance(m.get("sets"), list):
        keys = ("name", "spec", "available", "skipped_failed", "skipped_bad_rows", "taken", "share")
        rows = [[x.get(k, 0) for k in keys] for x in m["sets"]]
        header = ["set", "asked", "available", "failed (not mixed)", "bad rows skipped", "taken", "share"]
        lines += ["", _table(header, rows)]
    drops = drop_counts(stage)
    if drops:
        lines += ["", "Failures and drops:", "", _table(["gate / reason", "count"], [list(kv) for kv in drops.items()])]
    conf = settings(stage)
    if conf:
        lines += ["", "Settings:", ""] + [f"- `{k}`: `{v}`" for k, v in conf.items()]
    return "\n".join(lines)


_NO_CURATION = (
    "No deduplication, filtering or selection is recorded behind these rows: they are exported as harvested, "
    "imported or mixed."
)


def _terms_note(s: CardStats) -> str:
    models = sorted({m for (t, m) in s.teachers if t != "imported"})
    imported = sorted({u for (u, _) in s.sources})
    text = "## Terms of use\n\n"
    if models:
        text += (
            f"The answers were generated by {', '.join(f'`{m}`' for m in models)}. The provider of a teacher model "
            "sets terms for the use of its outputs, and some restrict using them to train models (for example, "
            "to build a competing model). The licence above is the publisher's choice for this compilation; it does "
            "not override those terms. Check the teacher's terms before training on or redistributing this data."
        )
    if imported:
        text += ("\n\n" if models else "") + (
            f"Rows imported from {', '.join(f'`{u}`' for u in imported)} keep the licence and terms of their source."
        )
    return text


def render(
    stats: CardStats,
    stages: list[Stage],
    *,
    meta: dict[str, Any],
    fmt: str,
    files: dict[str, list[str]],
    load_name: str | None = None,
    skipped: dict[str, int] | None = None,
) -> str:
    """The README.md text: `---` YAML front matter, then the provenance body."""
    left_out = [[k, n] for k, n in (skipped or {}).items() if n]
    split_text = ", ".join(f"{n} {k}" for k, n in stats.splits.items())
    body = [
        f"# {meta['pretty_name']}",
        "",
        f"{stats.rows} rows ({split_text}) in the `{fmt}` format, exported by imitate {__version__}: "
        "imitation data distilled from teacher models, every row with its provenance.",
        "",
        "```python",
        "from datasets import load_dataset",
        f"ds = load_dataset({json.dumps(load_name or 'path/to/this/folder')})",
        "```",
        "",
        "## Files",
        "",
        *[f"- `{name}`" for split in files for name in files[split]],
        "",
        "## Provenance",
        "",
        _teachers_section(stats),
        "",
        *[sec + "\n" for sec in _distribution_sections(stats)],
        f"Rows with earlier turns (multi-turn): {stats.multi_turn}. imitate versions that made the rows: "
        + ", ".join(f"{v} ({n})" for v, n in stats.versions.most_common())
        + ".",
        "",
        *(["### Left out of this export", "", _table(["reason", "rows"], left_out), ""] if left_out else []),
        "### Pipeline",
        "",
        "Each stage behind this export, nearest first, as its `manifest.json` records it.",
        "",
        *[_stage_section(st) + "\n" for st in stages],
        *(
            []
            if any(settings(st) or (st.kind != "harvest" and drop_counts(st)) for st in stages)
            else [_NO_CURATION, ""]
        ),
        _terms_note(stats),
        "",
    ]
    if stages:
        body += ["## Manifests", "", "<details><summary>The manifest.json of each stage</summary>", ""]
        for st in stages:
            body += [f"`{st.kind}` (`{st.dir.name}`):", "", "```json", json.dumps(st.manifest, indent=1), "```", ""]
        body += ["</details>", ""]
    head = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    return f"---\n{head}---\n\n" + "\n".join(body)
