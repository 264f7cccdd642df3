"""The unchanged recipe under torchrun: 2 CPU processes (gloo) give the same losses as 1 process accumulating the
same micro-batches, because the loss is normalised by the supervised tokens of the whole step."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import TRAIN_ONE, TRAIN_TWO, run_train, sets, synthetic_records, tiny_model_dir

from imitate.records import write_jsonl

pytestmark = pytest.mark.integration

SETS = [
    "train.lr=5e-3",
    "train.pack_length=160",
    "train.eval_fraction=0.2",
    "train.lora.r=4",
    "train.lora.dropout=0",
    "train.threads=1",
    "train.save_every=2",
]


def test_two_processes_match_one_process_accumulating(tmp_path):
    model = tiny_model_dir(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    write_jsonl(data, synthetic_records(24, seed=5))
    common = [str(data), "--model", str(model)]
    one = [*TRAIN_ONE, *common, "--out", str(tmp_path / "one"), *sets(*SETS, "train.grad_accum=2")]
    run_train(one, tmp_path, "single process")
    two = [*TRAIN_TWO, *common, "--out", str(tmp_path / "two"), *sets(*SETS, "train.grad_accum=1")]
    run_train(two, tmp_path, "torchrun")

    def rows(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    one, two = rows("one"), rows("two")
    assert len(one) == len(two) > 2
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["tokens"] == a["tokens"] and b["supervised_tokens"] == a["supervised_tokens"]
    summary_one = json.loads((tmp_path / "one" / "summary.json").read_text())
    summary_two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary_two["eval_loss"] == pytest.approx(summary_one["eval_loss"], abs=1e-5)
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # Both ranks checkpoint their RNG; rank 0 alone writes the rest and gathers every rank's per-sample losses.
    for folder in (tmp_path / "two" / "checkpoints").iterdir():
        assert {"rng-rank0.pt", "rng-rank1.pt", "trainer.pt", "complete"} <= {p.name for p in folder.iterdir()}
    ids_one = sorted(
        json.loads(line)["id"] for line in (tmp_path / "one" / "per_sample_loss.jsonl").read_text().splitlines()
    )
    ids_two = sorted(
        json.loads(line)["id"] for line in (tmp_path / "two" / "per_sample_loss.jsonl").read_text().splitlines()
    )
    assert ids_one == ids_two
