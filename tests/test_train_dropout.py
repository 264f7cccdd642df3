"""FastDropout (imitate/train/dropout.py) keeps nn.Dropout's semantics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from train_fixtures import tiny_llama

from imitate.train.dropout import FastDropout, install, reseed


def test_keeps_with_probability_one_minus_p_and_scales():
    drop = FastDropout(0.05, np.random.Generator(np.random.SFC64(0))).train()
    x = torch.ones(1000, 1000, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(0.95, abs=0.002)
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - 3277 / 65536)))
    assert y.mean().item() == pytest.approx(1.0, abs=0.003)  # unbiased
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # gradient = mask · scale
    drop.eval()
    assert torch.equal(drop(x), x)


def test_same_seed_same_masks_and_masks_differ_between_calls():
    rng = np.random.Generator(np.random.SFC64(0))
    drop = FastDropout(0.5, rng).train()
    x = torch.ones(64, 64)
    reseed(rng, 1, 2, 3)
    first, second = drop(x), drop(x)
    reseed(rng, 1, 2, 3)
    assert torch.equal(drop(x), first) and not torch.equal(first, second)


def test_install_replaces_every_lora_dropout():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_dropout=0.1, target_modules="all-linear"))
    assert install(model, np.random.Generator(np.random.SFC64(0))) == 7 * 2  # 7 projections × 2 layers
    drops = [m for m in model.modules() if isinstance(m, FastDropout)]
    assert len(drops) == 14 and all(d.p == 0.1 for d in drops)
