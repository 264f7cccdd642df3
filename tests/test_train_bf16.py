"""train.dtype=bf16 on CPU: bf16 base weights, LoRA weights (and their optimizer state) in fp32; a few steps
train, the loss is finite and falls, and the adapter is saved in fp32 and loads back with peft."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import synthetic_records, tiny_model_dir

from imitate.config import load_config
from imitate.records import write_jsonl
from imitate.train.recipe import train


def _train(tmp_path, model, data, dtype: str):
    sets = [f"train.dtype={dtype}", "train.lr=2e-2", "train.min_lr_ratio=1", "train.pack_length=256"]
    sets += ["train.eval_fraction=0", "train.epochs=8", "train.grad_accum=1", "train.threads=1"]
    cfg = load_config(overrides=[*sets, f"train.cache_dir={tmp_path / 'cache'}"])
    trained = train(cfg, data, tmp_path / dtype, model=str(model))
    losses = [json.loads(line)["loss"] for line in (tmp_path / dtype / "metrics.jsonl").read_text().splitlines()]
    return trained, losses


def test_bf16_trains_on_cpu_with_fp32_lora(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = tiny_model_dir(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    write_jsonl(data, synthetic_records(4, seed=4, max_words=12))  # one micro-batch, seen every step
    trained, losses = _train(tmp_path, model, data, "bf16")
    _, reference = _train(tmp_path, model, data, "fp32")

    dtypes = {p.dtype for n, p in trained.model.named_parameters() if not p.requires_grad and p.dim() == 2}
    assert dtypes == {torch.bfloat16}  # the frozen base in bf16
    assert {p.dtype for p in trained.model.parameters() if p.requires_grad} == {torch.float32}
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert min(losses[1:]) < losses[0] - 0.1  # it learns
    assert losses[:5] == pytest.approx(reference[:5], abs=0.02)  # and follows the fp32 run while they agree

    saved = load_file(tmp_path / "bf16" / "adapter" / "adapter_model.safetensors")
    assert saved and {t.dtype for t in saved.values()} == {torch.float32}
    base = AutoModelForCausalLM.from_pretrained(model)
    loaded = PeftModel.from_pretrained(base, tmp_path / "bf16" / "adapter")
    params = dict(loaded.named_parameters())
    for name, tensor in saved.items():
        torch.testing.assert_close(params[name.replace(".weight", ".default.weight")], tensor)
