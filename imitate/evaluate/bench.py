"""`imitate eval bench` (work in progress: the options are fixed, the run lands next)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from imitate.errors import InputError


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


def bench_command(options: BenchOptions, argv: list[str] | None = None) -> None:
    raise InputError("imitate eval bench is not finished yet")
