"""`imitate train` straight from an OpenOrca, ShareGPT (multi-turn), Alpaca or messages file: no conversion step.
A few steps each on one tiny random LLaMA (the train recipe's own entry point, in-process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_fixtures import WORDS, tiny_model_dir

from imitate.config import load_config
from imitate.train.recipe import prepare, train
from imitate.train.tokenize import IGNORE

pytestmark = pytest.mark.integration
SETTINGS = [
    "train.lr=5e-3",
    "train.epochs=1",
    "train.grad_accum=1",
    "train.batching=pad",
    "train.batch_rows=2",
    "train.eval_fraction=0",
    "train.lora.r=8",
    "train.threads=1",
    "train.max_steps=2",
]


def _text(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


def _rows(fmt: str, n: int = 6) -> list[dict]:
    rows = []
    for i in range(n):
        q, a = _text(i, 6) + "?", _text(i + 1, 10) + "."
        if fmt == "openorca":
            rows.append({"id": f"o{i}", "system_prompt": "Answer step by step." if i % 2 else "", "question": q,
                         "response": a})  # fmt: skip
        elif fmt == "alpaca":
            rows.append({"instruction": q, "input": _text(i + 2, 4) if i % 2 else "", "output": a})
        elif fmt == "sharegpt":
            turns = [("human", q), ("gpt", a), ("human", _text(i + 3, 5) + "?"), ("gpt", _text(i + 4, 8) + ".")]
            rows.append({"id": f"s{i}", "conversations": [{"from": f, "value": v} for f, v in turns]})
        else:
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return rows


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def _spans(labels: list[int]) -> int:
    """Runs of supervised tokens: one per assistant turn."""
    return sum(1 for i, x in enumerate(labels) if x != IGNORE and (i == 0 or labels[i - 1] == IGNORE))


@pytest.mark.parametrize(("fmt", "suffix"), [("openorca", ".parquet"), ("sharegpt", ".json"), ("alpaca", ".jsonl"),
                                             ("messages", ".jsonl")])  # fmt: skip
def test_train_runs_from_each_format(tmp_path, student, fmt, suffix):
    rows = _rows(fmt)
    data = tmp_path / f"data{suffix}"
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), data)
    else:
        data.write_text(json.dumps(rows) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(overrides=[*SETTINGS, f"train.cache_dir={tmp_path / 'cache'}"])
    prep = prepare(cfg.train, data, str(student))
    assert len(prep.records) == len(rows) and {r.provenance.source.format for r in prep.records} == {fmt}
    turns = 2 if fmt == "sharegpt" else 1  # every assistant turn of a multi-turn chat is supervised
    assert [_spans(e.labels) for e in prep.examples] == [turns] * len(rows)
    summary = train(cfg, data, tmp_path / "out", model=str(student)).summary
    assert summary["records"] == len(rows) and summary["steps"] == 2
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(0 < x < 100 for x in losses)
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()
