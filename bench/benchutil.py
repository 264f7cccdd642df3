"""Small helpers shared by the bench scripts (run as `python bench/<script>.py`, so this folder is on sys.path)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc; 0.0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float | None:
    """Resident set size of a process in MB (Linux /proc; None elsewhere or once it has gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def write_prompts(path: Path, rows: int) -> None:
    """`rows` distinct numbered questions as harvest input JSONL (id, question), written lazily."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            question = f"Question {i}: why does the number {i} matter for arithmetic and for counting things?"
            f.write(json.dumps({"id": f"r{i}", "question": question}) + "\n")
