"""The training recipe (imitate/train/recipe.py) on a tiny random LLaMA: what changes, golden losses, exact resume,
progressive stages, outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import synthetic_records, tiny_llama, tiny_model_dir

from imitate.config import load_config
from imitate.errors import TrainError
from imitate.records import write_jsonl
from imitate.train.recipe import prepare, train

GOLDEN = Path(__file__).parent / "golden" / "train_losses.json"
BASE = [
    "train.lr=5e-3",
    "train.epochs=2",
    "train.grad_accum=2",
    "train.pack_length=192",
    "train.eval_fraction=0",
    "train.lora.r=8",
    "train.threads=1",
]


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("harvest")
    write_jsonl(folder / "shard-00000.jsonl", synthetic_records(16, seed=0, teacher="teacher-a"))
    write_jsonl(folder / "shard-00001.jsonl", synthetic_records(16, seed=1, teacher="teacher-b"))
    (folder / "failures.jsonl").write_text("this is not read\n")
    return folder


def _train(tmp: Path, data: Path, model: Path, *overrides: str, out: str = "out"):
    cfg = load_config(overrides=[*BASE, f"train.cache_dir={tmp / 'cache'}", *overrides])
    return train(cfg, data, tmp / out, model=str(model))


def _steps(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in _steps(out)]


def test_adapter_changes_and_base_does_not(tmp_path, dataset, student):
    trained = _train(tmp_path, dataset, student, "train.max_steps=4")
    reference = tiny_llama(seed=0).state_dict()
    lora, base = {}, {}
    for name, p in trained.model.named_parameters():
        (lora if "lora_" in name else base)[name] = p
    assert lora and all(p.requires_grad for p in lora.values())
    assert not any(p.requires_grad for p in base.values())
    for name, p in base.items():
        plain = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(p.detach(), reference[plain]), name
    lora_b = [p for n, p in lora.items() if "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: every one of them moved


def test_losses_match_golden_at_fixed_seed(tmp_path, dataset, student):
    summary = _train(tmp_path, dataset, student).summary
    losses = _losses(tmp_path / "out")
    if os.environ.get("IMITATE_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"config": BASE, "losses": losses}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())["losses"]
    assert losses == pytest.approx(golden, abs=1e-4)
    assert summary["steps"] == len(losses) == 8
    assert losses[-1] < losses[0]


def test_resume_reproduces_the_uninterrupted_run(tmp_path, dataset, student):
    stages = [
        "train.stages.0.name=a",
        "train.stages.0.teachers=[teacher-a]",
        "train.stages.1.name=b",
        "train.stages.1.teachers=[teacher-b]",
        "train.stages.1.epochs=2",
        "train.stages.1.lr=2e-3",
    ]
    _train(tmp_path, dataset, student, *stages, out="straight")
    straight = _steps(tmp_path / "straight")
    boundary = sum(1 for r in straight if r["stage"] == "a")
    assert 1 < boundary < len(straight) - 1
    # Stop mid-stage (optimizer moments, schedule and RNG matter), then at the stage boundary, then finish.
    _train(tmp_path, dataset, student, *stages, "train.max_steps=1", out="pieces")
    _train(tmp_path, dataset, student, *stages, f"train.max_steps={boundary}", "train.resume=latest", out="pieces")
    _train(tmp_path, dataset, student, *stages, "train.resume=latest", out="pieces")
    pieces = _steps(tmp_path / "pieces")
    assert [r["loss"] for r in pieces] == [r["loss"] for r in straight]  # bit for bit
    assert [r["lr"] for r in pieces] == [r["lr"] for r in straight]
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "pieces" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_changed_settings(tmp_path, dataset, student):
    _train(tmp_path, dataset, student, "train.max_steps=1")
    with pytest.raises(TrainError, match="different train settings: lr"):
        _train(tmp_path, dataset, student, "train.resume=latest", "train.lr=1e-3")
    with pytest.raises(TrainError, match="no complete checkpoint"):
        _train(tmp_path, dataset, student, "train.resume=latest", out="elsewhere")


def test_stages_train_their_own_selection_on_one_adapter(tmp_path, dataset, student):
    trained = _train(
        tmp_path,
        dataset,
        student,
        "train.stages.0.name=first",
        "train.stages.0.teachers=[teacher-b]",
        "train.stages.0.lr=1e-2",
        "train.stages.1.name=second",
        "train.stages.1.teachers=[teacher-a]",
        "train.stages.1.lr=1e-3",
    )
    steps = _steps(tmp_path / "out")
    first = [r for r in steps if r["stage"] == "first"]
    second = [r for r in steps if r["stage"] == "second"]
    assert first and second and steps == first + second
    assert max(r["lr"] for r in first) == pytest.approx(1e-2)
    assert max(r["lr"] for r in second) == pytest.approx(1e-3)
    samples = [json.loads(line) for line in (tmp_path / "out" / "per_sample_loss.jsonl").read_text().splitlines()]
    assert {r["id"].split("-")[1] for r in samples if r["stage"] == "first"} == {"b"}
    assert {r["id"].split("-")[1] for r in samples if r["stage"] == "second"} == {"a"}
    assert [s["name"] for s in trained.summary["stages"]] == ["first", "second"]


def test_outputs_metrics_and_saved_adapter(tmp_path, dataset, student):
    summary = _train(
        tmp_path, dataset, student, "train.eval_fraction=0.25", "train.batching=pad", "train.batch_rows=4"
    ).summary
    out = tmp_path / "out"
    row = _steps(out)[0]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "supervised_tokens_per_s", "pad_fraction", "mfu"):
        assert isinstance(row[key], float), key
    assert row["peak_memory_bytes"] > 0
    assert summary["eval_loss"] is not None and summary["eval_records"] > 0
    assert 0 < summary["pad_fraction"] < 0.5 and summary["matmul_flops_per_s"] > 1e8
    assert "4·N_base" in summary["flops_rule"]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    samples = [json.loads(line) for line in (out / "per_sample_loss.jsonl").read_text().splitlines()]
    assert {"id", "loss", "tokens", "step"} <= samples[0].keys()
    adapter = out / "adapter"
    generation = json.loads((adapter / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2  # <|im_end|>, the template's end-of-turn token
    assert (adapter / "chat_template.jinja").exists() and (adapter / "adapter_model.safetensors").exists()
    meta = json.loads((adapter / "imitate.json").read_text())
    assert meta["data_hash"] == summary["data_hash"] and meta["base_model"] == str(student)
    assert (adapter / "config.yaml").read_text().count("lr: 0.005") == 1


def test_preprocessing_cache_is_keyed_by_content(tmp_path, dataset, student):
    cfg = load_config(overrides=[f"train.cache_dir={tmp_path}"]).train
    assert not prepare(cfg, dataset, str(student)).cache_hit
    assert prepare(cfg, dataset, str(student)).cache_hit
    other = cfg.model_copy(update={"max_length": 64})
    assert not prepare(other, dataset, str(student)).cache_hit


def test_a_resume_drops_metrics_rows_after_its_checkpoint_and_a_row_torn_by_a_kill(tmp_path):
    from imitate.train.report import restart_outputs

    rows = [json.dumps({"step": k, "loss": 1.0 / k}) for k in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 5, "lo', encoding="utf-8")
    (tmp_path / "checkpoints" / "step-000002").mkdir(parents=True)
    restart_outputs(tmp_path, 2, fresh=False)
    assert (tmp_path / "metrics.jsonl").read_text(encoding="utf-8") == rows[0] + "\n" + rows[1] + "\n"
    assert (tmp_path / "checkpoints" / "step-000002").exists()
    restart_outputs(tmp_path, 0, fresh=True)
    assert (tmp_path / "metrics.jsonl").read_text(encoding="utf-8") == ""
    assert not (tmp_path / "checkpoints").exists()
