"""The fused LoRA projection (imitate/train/fused.py) computes what peft's LoRA computes, gradients included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from train_fixtures import smol_tokenizer, synthetic_records, tiny_llama

from imitate.train import attention, dropout, fused
from imitate.train.fused import FusedLoraLinear, _LoraLinear
from imitate.train.loss import token_losses
from imitate.train.pack import collate, micro_batches
from imitate.train.tokenize import ChatFormat, tokenize


@pytest.fixture(scope="module")
def batch():
    examples, _ = tokenize(synthetic_records(9, seed=2), ChatFormat.of(smol_tokenizer()), max_length=256)
    plan = micro_batches(examples, mode="pack", rows_per_batch=2, pack_length=256, pad_id=2)
    return collate(examples, plan[0], pad_id=2, packed=True)


def _student(p: float, *, fuse: bool, seed: int = 5):
    model = tiny_llama(seed=1)
    attention.install(model)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules="all-linear"))
    with torch.no_grad():  # B starts at zero: give it values so every LoRA gradient path is exercised
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    dropout.install(model, np.random.Generator(np.random.SFC64(seed)))
    if fuse:
        assert fused.install(model) == 7 * 2
    return model.train()


def _loss_and_grads(model, batch):
    losses = token_losses(model, batch)
    losses.mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses.detach(), grads


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_fused_lora_equals_peft_with_the_same_dropout_masks(batch, p):
    ref_losses, ref_grads = _loss_and_grads(_student(p, fuse=False), batch)
    got_losses, got_grads = _loss_and_grads(_student(p, fuse=True), batch)
    assert torch.allclose(got_losses, ref_losses, atol=1e-5)
    assert ref_grads.keys() == got_grads.keys() and len(ref_grads) == 2 * 7 * 2
    for name, ref in ref_grads.items():
        assert torch.allclose(got_grads[name], ref, rtol=1e-4, atol=1e-7), name
        assert ref.abs().sum() > 0, name


def test_dropout_masks_are_independent_per_adapter(batch):
    """A different dropout stream gives different gradients: the masks are drawn, not reused."""
    _, a = _loss_and_grads(_student(0.1, fuse=True, seed=5), batch)
    _, b = _loss_and_grads(_student(0.1, fuse=True, seed=6), batch)
    assert not torch.allclose(
        a["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"],
        b["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"],
    )


def test_eval_and_state_dict_are_peft_s(batch):
    ref, got = _student(0.1, fuse=False).eval(), _student(0.1, fuse=True).eval()
    assert ref.state_dict().keys() == got.state_dict().keys()
    with torch.no_grad():
        assert torch.allclose(token_losses(got, batch), token_losses(ref, batch), atol=1e-5)
    got.base_model.model.model.layers[0].self_attn.q_proj.merge()  # merged: peft's own path, same result
    with torch.no_grad():
        assert torch.allclose(token_losses(got, batch), token_losses(ref, batch), atol=1e-5)


def test_function_gradients_in_float64_with_bias_and_mask():
    torch.manual_seed(0)
    x = torch.randn(12, 6, dtype=torch.float64, requires_grad=True)
    w, bias = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(12, 6) > 0.3
    assert torch.autograd.gradcheck(
        lambda *t: _LoraLinear.apply(t[0], w, t[1], t[2], t[3], 1.5, keep, 1.25), (x, bias, a, b)
    )
    plain = torch.nn.functional.linear(x, w, bias) + 1.5 * ((x * keep * 1.25) @ a.t() @ b.t())
    assert torch.allclose(_LoraLinear.apply(x, w, bias, a, b, 1.5, keep, 1.25), plain)


def test_install_only_swaps_plain_lora_linears():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, use_dora=True, target_modules="all-linear"))
    assert fused.install(model) == 14
    x = torch.randn(1, 3, 32)
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    assert isinstance(layer, FusedLoraLinear) and layer._fused_adapter(x, (), {}) is None  # DoRA: peft's path


def test_autocast_and_base_layer_hooks_fall_back_to_peft(batch):
    """Under autocast the fused gemms would mix dtypes, and hooks on the base layer must run: peft's path does both."""
    model = _student(0.0, fuse=True).eval()
    layer = next(m for m in model.modules() if isinstance(m, FusedLoraLinear))
    x = torch.randn(3, layer.base_layer.in_features)
    with torch.no_grad():
        assert layer._fused_adapter(x, (), {}) is not None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer._fused_adapter(x, (), {}) is None
            assert layer(x).dtype == torch.bfloat16  # runs (peft's path) instead of failing on mixed dtypes
        seen = []
        handle = layer.base_layer.register_forward_hook(lambda *a: seen.append(1))
        layer(x)
        handle.remove()
    assert seen == [1]
