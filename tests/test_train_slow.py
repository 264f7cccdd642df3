"""The real student: SmolLM2-135M-Instruct from the local GGUF, trained for a few steps (`make test-all`)."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console
from train_fixtures import make_record, require_gguf

from imitate.records import write_jsonl
from imitate.train.commands import chat_command, train_command

pytestmark = pytest.mark.slow


def test_smollm2_trains_a_few_steps_and_answers(tmp_path):
    gguf = require_gguf()
    records = [
        make_record(f"r{i}", f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.", system="Answer briefly.")
        for i in range(8)
    ]
    write_jsonl(tmp_path / "data.jsonl", records)
    sets = [
        f"train.cache_dir={tmp_path / 'cache'}",
        "train.epochs=4",
        "train.grad_accum=1",
        "train.lr=1e-3",
        "train.eval_fraction=0",
        "train.warmup_ratio=0",
    ]
    console = Console(file=io.StringIO(), width=200)
    summary = train_command(tmp_path / "data.jsonl", tmp_path / "run", model=str(gguf), overrides=sets, console=console)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert summary["n_base"] == 134_515_008 - 576 * 61  # every linear weight: all parameters but the norms
    assert summary["pad_fraction"] == 0.0 and summary["tokens_per_s"] > 0
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "generation_config.json").read_text())["eos_token_id"] == 2
    answer = chat_command(str(adapter), prompt="What is 3 plus 3?", max_new_tokens=12, console=console)
    assert answer
