"""Gradient checkpointing (imitate/train/recompute.py) under LoRA dropout: the recomputed layers draw the same
dropout masks as their forward pass, so losses and gradients equal those of a run that keeps its activations."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from peft import LoraConfig
from train_fixtures import smol_tokenizer, synthetic_records, tiny_llama

from imitate.train import dropout, fused, recompute
from imitate.train.loss import token_losses
from imitate.train.model import peft_model
from imitate.train.pack import collate, micro_batches
from imitate.train.tokenize import ChatFormat, tokenize


def _student(checkpointing: bool, *, replay: bool = True):
    lora = LoraConfig(r=4, lora_dropout=0.3, target_modules="all-linear")
    model = peft_model(tiny_llama(hidden=64, layers=3), lora)
    rng = np.random.Generator(np.random.SFC64(7))
    dropout.install(model, rng)
    fused.install(model)
    if checkpointing:
        assert recompute.enable(model, rng if replay else None) == 3
    model.train()
    return model, rng


@functools.cache
def _batches():
    tok = smol_tokenizer()
    fmt = ChatFormat.of(tok, None)
    examples, _ = tokenize(synthetic_records(8, seed=3), fmt, max_length=256)
    plan = micro_batches(examples, mode="pack", rows_per_batch=2, pack_length=96, pad_id=tok.pad_token_id)
    return [collate(examples, rows, tok.pad_token_id, packed=True) for rows in plan[:2]]


@functools.cache
def _run(checkpointing: bool, *, replay: bool = True):
    model, rng = _student(checkpointing, replay=replay)
    losses = []
    for batch in _batches():  # several micro-batches accumulated: the generator runs on across them
        loss = token_losses(model, batch).mean()
        loss.backward()
        losses.append(loss.item())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, grads, rng.bit_generator.random_raw(4).tolist()  # the next draws


def test_checkpointing_gives_the_same_losses_and_gradients_under_dropout():
    plain_losses, plain_grads, plain_state = _run(False)
    losses, grads, state = _run(True)
    assert losses == pytest.approx(plain_losses, rel=1e-6)
    assert set(grads) == set(plain_grads) and len(grads) == 3 * 7 * 2
    for name, g in grads.items():
        torch.testing.assert_close(g, plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert state == plain_state  # the run's stream of masks goes on exactly as without checkpointing


def test_without_the_replay_the_recomputation_draws_other_masks():
    plain_losses, plain_grads, _ = _run(False)
    losses, grads, _ = _run(True, replay=False)
    assert losses[0] == pytest.approx(plain_losses[0], rel=1e-6)  # the forward is the same...
    assert any(not torch.allclose(g, plain_grads[n]) for n, g in grads.items())  # ...its gradients are not


def test_checkpointing_recomputes_in_backward():
    model, _ = _student(True)
    calls = []
    layer = recompute.decoder_layers(model)[0]
    layer.self_attn.register_forward_hook(lambda *a: calls.append(1))
    token_losses(model, _batches()[0]).sum().backward()
    assert len(calls) == 2  # forward + recomputation


def test_recipe_with_checkpointing_logs_the_same_losses(tmp_path):
    from train_fixtures import tiny_model_dir

    from imitate.config import load_config
    from imitate.records import write_jsonl
    from imitate.train.recipe import train

    model = tiny_model_dir(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    write_jsonl(data, synthetic_records(12, seed=2))
    sets = ["train.lr=5e-3", "train.pack_length=128", "train.eval_fraction=0", "train.lora.dropout=0.2"]
    sets += ["train.max_steps=3", "train.grad_accum=1", "train.threads=1", f"train.cache_dir={tmp_path / 'cache'}"]
    runs = {}
    for flag in ("false", "true"):
        cfg = load_config(overrides=[*sets, f"train.gradient_checkpointing={flag}"])
        runs[flag] = train(cfg, data, tmp_path / flag, model=str(model)).summary
    assert runs["true"]["final_loss"] == pytest.approx(runs["false"]["final_loss"], rel=1e-5)
