"""The train-stage commands as plain functions; the CLI parses arguments, calls one of these, prints errors.

    imitate train DATA --out DIR [--model PATH|GGUF] [--config FILE] [--set k=v ...] [--check] [--estimate-memory]
    imitate merge ADAPTER --out DIR [--model BASE]
    imitate chat MODEL [--adapter DIR] [--prompt TEXT] [--system TEXT] [--max-new-tokens N] [--temperature T]

Importing this module imports neither torch nor transformers: they load inside the functions.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.console import Console

from imitate.config import ImitateConfig, load_config


def _command(*parts: Any, **options: Any) -> str:
    words = ["imitate", *[str(p) for p in parts]]
    for key, value in options.items():
        if value is None or value is False or value == []:
            continue
        flag = "--" + key.replace("_", "-")
        for v in value if isinstance(value, list) else [value]:
            words += [flag] if v is True else [flag, str(v)]
    return shlex.join(words)


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()


def train_command(
    data: Path,
    out: Path,
    model: str | None = None,
    config: Path | None = None,
    overrides: list[str] | None = None,
    check: bool = False,
    console: Console | None = None,
    estimate_memory: bool = False,
) -> dict[str, Any]:
    """Train (or with `check`, only tokenise and show; with `estimate_memory`, only estimate the peak memory);
    returns the run summary / the check report / the estimate."""
    console = console or Console(stderr=True)
    cfg = load_config(config, overrides or [])
    if estimate_memory:
        return estimate_command(cfg, model, console)
    command = _command("train", data, out=out, model=model, config=config, set=overrides or [], check=check)
    _quiet_transformers()
    if check:
        return check_data(cfg, Path(data), model, console)
    from imitate.config import to_yaml
    from imitate.train.recipe import train

    console.print(f"[dim]{to_yaml(ImitateConfig(train=cfg.train), command)}[/]", highlight=False)
    return train(cfg, Path(data), Path(out), model=model, console=console, command=command).summary


def check_data(cfg: ImitateConfig, data: Path, model: str | None, console: Console) -> dict[str, Any]:
    """`--check`: the tokenisation summary, the planned batches, and a coloured token/label dump. No training."""
    from imitate.train.pack import pad_fraction
    from imitate.train.recipe import plan_stages, prepare
    from imitate.train.tokenize import dump

    t = cfg.train
    prep = prepare(t, data, model)
    console.print(f"[bold]check[/] {len(prep.records)} records from {data}, student {prep.source}")
    for line in prep.summary.lines():
        console.print(f"  {line}", highlight=False)
    if prep.fmt.default_system:
        console.print(f"  [dim]template default system turn removed: {prep.fmt.default_system!r}[/]")
    pad_id = prep.tokenizer.pad_token_id if prep.tokenizer.pad_token_id is not None else prep.fmt.eot_id
    stages = plan_stages(t, prep, pad_id)
    for plan in stages:
        lengths = [len(e.input_ids) for e in plan.examples]
        console.print(
            f"  stage {plan.name!r}: {len(plan.examples)} examples in {len(plan.batches)} micro-batches "
            f"({t.batching}), pad fraction {100 * pad_fraction(plan.batches, lengths):.1f}%"
        )
    console.print("[bold]examples[/] ([bold green]supervised[/], [dim]masked[/]):")
    for ex in prep.examples[: t.check_examples]:
        console.rule(ex.id)
        console.print(dump(ex, prep.tokenizer))
    return {"tokenize": prep.summary.to_dict(), "records": len(prep.records), "stages": [s.name for s in stages]}


def estimate_command(cfg: ImitateConfig, model: str | None, console: Console) -> dict[str, Any]:
    """`--estimate-memory`: the expected peak from the student's config (no weights, no data read)."""
    from imitate.train.memory import GiB, for_config
    from imitate.train.model import resolve

    t = cfg.train
    source = resolve(model or t.model)
    shape, est = for_config(t, source)
    tokens = (t.pack_length or t.max_length) * t.batch_rows
    console.print(
        f"[bold]memory estimate[/] {source}: {shape.base_parameters() / 1e6:.1f}M parameters, {shape.layers} layers, "
        f"LoRA r={t.lora.r}, {tokens} tokens per micro-batch, dtype {t.dtype}, quantization {t.quantization}, "
        f"gradient checkpointing {'on' if t.gradient_checkpointing else 'off'}",
        highlight=False,
    )
    for line in est.lines():
        console.print(line, highlight=False, markup=False)
    return {
        "parts": est.parts,
        "load_peak": est.load_peak,
        "train_peak": est.train_peak,
        "peak": est.peak,
        "peak_gib": est.peak / GiB,
    }


def merge_command(adapter: Path, out: Path, model: str | None = None, console: Console | None = None) -> dict[str, Any]:
    """Merge an adapter into its base and self-check; returns the check report (also OUT/merge_check.json)."""
    from imitate.train.merge import merge

    console = console or Console(stderr=True)
    _quiet_transformers()
    report = merge(Path(adapter), Path(out), model)
    console.print(
        f"[bold green]merged[/] {adapter} into {report['base_model']} → {out} "
        f"(self-check: max |Δlogit| {report['max_abs_logit_diff']:.2e} on {report['probe_tokens']} tokens)"
    )
    return report


def chat_command(
    model: str | None,
    adapter: Path | None = None,
    prompt: str | None = None,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    console: Console | None = None,
    lines: Iterable[str] | None = None,
) -> str | None:
    """One-shot with `prompt` (returns the answer, printed to stdout), else a loop over stdin lines."""
    from imitate.records import Message
    from imitate.train.chat import Student, converse

    console = console or Console()
    _quiet_transformers()
    student = Student(model, Path(adapter) if adapter else None)
    if prompt is not None:
        messages = [Message(role="system", content=system)] if system else []
        answer = student.reply([*messages, Message(role="user", content=prompt)], max_new_tokens, temperature)
        console.print(answer, highlight=False, markup=False)
        return answer
    console.print("[dim]chat: type a message, empty line to stop[/]")
    converse(
        student,
        lines if lines is not None else sys.stdin,
        lambda text: console.print(text, highlight=False, markup=False),
        system=system,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
    )
    return None
