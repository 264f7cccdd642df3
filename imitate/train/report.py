"""What a training run reports and leaves behind: per-step metrics, per-sample losses, the summary, the adapter.

OUT/
    config.yaml             resolved config (first line: the command)
    metrics.jsonl           one row per logged step: loss, lr, grad norm, tokens/s, pad fraction, MFU, memory
    per_sample_loss.jsonl   every sample's mean loss each time it was trained on, with its record id
    loss.png                train (and eval) loss per step, stage boundaries dotted
    summary.json            the run summary (also printed)
    adapter/                LoRA weights + tokenizer + chat template + generation config + config + imitate.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from imitate import config as cfgmod
from imitate.dataset.io import atomic_path
from imitate.train import metrics
from imitate.train.pack import Batch
from imitate.train.tokenize import IGNORE, Example


def n_targets(ex: Example) -> int:
    """Supervised positions of an example once targets are shifted (the first token predicts nothing)."""
    return sum(1 for x in ex.labels[1:] if x != IGNORE)


def per_sample(batch: Batch, losses: torch.Tensor) -> list[dict[str, Any]]:
    """Mean loss of each example in a micro-batch, from the per-token losses of that forward pass."""
    index = batch.sample[batch.targets != IGNORE]
    sums = torch.zeros(len(batch.ids), dtype=torch.float64, device=losses.device)
    sums.index_add_(0, index, losses.double())
    counts = torch.bincount(index, minlength=len(batch.ids))
    return [
        {"id": rid, "loss": round(s / c, 6), "tokens": c}
        for rid, s, c in zip(batch.ids, sums.tolist(), counts.tolist(), strict=True)
        if c
    ]


def step_metrics(examples: list[Example], group: list[list[list[int]]], seconds: float) -> dict[str, Any]:
    """Token counts of a whole step (all ranks) read off the plan, so no communication is needed."""
    real = slots = supervised = 0
    for rows in group:
        widths = [sum(len(examples[i].input_ids) for i in row) for row in rows]
        real += sum(widths)
        slots += max(widths) * len(rows)
        supervised += sum(n_targets(examples[i]) for row in rows for i in row)
    return {
        "seconds": seconds,
        "tokens": real,
        "supervised_tokens": supervised,
        "slots": slots,
        "pad_fraction": 1 - real / slots if slots else 0.0,
        "tokens_per_s": real / seconds,
        "supervised_tokens_per_s": supervised / seconds,
    }


def log_line(row: dict[str, Any], goal: int) -> str:
    return (
        f"step {row['step']}/{goal} [{row['stage']}] loss {row['loss']:.4f} lr {row['lr']:.2e} "
        f"gnorm {row['grad_norm']:.3f} tok/s {row['tokens_per_s']:.0f} sup/s {row['supervised_tokens_per_s']:.0f} "
        f"pad {100 * row['pad_fraction']:.1f}% MFU {100 * row['mfu']:.1f}% "
        f"mem {row['peak_memory_bytes'] / 2**30:.2f} GiB"
    )


def progress_bar(console: Any, enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]train[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )


def restart_outputs(out: Path, step: int, *, fresh: bool) -> None:
    """Metrics rows after `step` belong to an interrupted run; a fresh run also drops old checkpoints, so that
    a later `resume=latest` can never pick up a checkpoint of the run this one replaces."""
    import shutil

    metrics_file = out / "metrics.jsonl"
    if metrics_file.exists():
        kept = []
        for line in metrics_file.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the row a kill tore in half: it is after any checkpoint
                continue
            if row["step"] <= step:
                kept.append(line)
        with atomic_path(metrics_file) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    if fresh:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def summarise(
    steps: list[dict[str, Any]],
    evals: list[dict[str, Any]],
    samples: list[dict[str, Any]],
    *,
    flops_per_token: int,
    roofline: float,
    peak_memory: int,
) -> dict[str, Any]:
    seconds = sum(s["seconds"] for s in steps) or 1e-9
    tokens = sum(s["tokens"] for s in steps)
    supervised = sum(s["supervised_tokens"] for s in steps)
    slots = sum(s["slots"] for s in steps)
    latest = {row["id"]: row for row in samples}  # each sample's most recent loss
    return {
        "steps": steps[-1]["step"] if steps else 0,
        "final_loss": steps[-1]["loss"] if steps else None,
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "train_seconds": seconds,
        "tokens": tokens,
        "supervised_tokens": supervised,
        "tokens_per_s": tokens / seconds,
        "supervised_tokens_per_s": supervised / seconds,
        "pad_fraction": 1 - tokens / slots if slots else 0.0,
        "flops_rule": metrics.RULE,
        "flops_per_token": flops_per_token,
        "achieved_flops_per_s": flops_per_token * tokens / seconds,
        "matmul_flops_per_s": roofline,
        "mfu": flops_per_token * tokens / seconds / roofline,
        "peak_memory_bytes": peak_memory,
        "highest_loss_samples": sorted(latest.values(), key=lambda r: -r["loss"])[:5],
    }


def save_outputs(
    out: Path,
    model: Any,
    tokenizer: Any,
    *,
    generation: dict[str, Any],
    cfg: cfgmod.ImitateConfig,
    meta: dict[str, Any],
    history: Any,
    summary: dict[str, Any],
    command: str | None,
    adapter_state: dict[str, Any] | None = None,
) -> Path:
    from transformers import GenerationConfig

    adapter = out / "adapter"
    model.save_pretrained(adapter, state_dict=adapter_state)  # adapter_state: gathered when sharded (fsdp)
    tokenizer.save_pretrained(adapter)
    GenerationConfig(**generation).save_pretrained(adapter)
    cfgmod.stamp(cfg, adapter, command)
    (adapter / "imitate.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    with open(out / "per_sample_loss.jsonl", "w", encoding="utf-8") as f:
        for row in history.samples:
            f.write(json.dumps(row) + "\n")
    if history.steps:
        metrics.plot_losses(history.steps, history.evals, out / "loss.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return adapter
