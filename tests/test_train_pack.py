"""Packing (imitate/train/pack.py) and the supervised-only loss (imitate/train/loss.py) on a tiny LLaMA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from train_fixtures import smol_tokenizer, synthetic_records, tiny_llama

from imitate.train.attention import install
from imitate.train.loss import _LinearCrossEntropy, token_losses
from imitate.train.pack import collate, micro_batches, pad_fraction, plan_packs, shifted
from imitate.train.tokenize import IGNORE, ChatFormat, Example, tokenize


@pytest.fixture(scope="module")
def examples():
    fmt = ChatFormat.of(smol_tokenizer())
    examples, _ = tokenize(synthetic_records(7, seed=1), fmt, max_length=256)
    return examples


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3)


def test_plan_packs_respects_capacity_and_places_everything_once():
    lengths = [90, 10, 50, 60, 30, 120, 5]
    rows = plan_packs(lengths, 100)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    for row in rows:
        assert sum(lengths[i] for i in row) <= 100 or len(row) == 1  # a too-long example sits alone
    assert rows[0] == [5]  # longest first


def test_collate_restarts_positions_and_shifts_targets_per_example():
    a = Example("a", [1, 2, 3], [IGNORE, 2, 3])
    b = Example("b", [4, 5], [IGNORE, 5])
    batch = collate([a, b], [[0, 1]], pad_id=0, packed=True)
    assert batch.attention_mask is None
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    # The last token of `a` predicts nothing: never the first token of `b`.
    assert batch.targets.tolist() == [[2, 3, IGNORE, 5, IGNORE]]
    assert batch.sample.tolist() == [[0, 0, 0, 1, 1]] and batch.ids == ["a", "b"]
    padded = collate([a, b], [[0], [1]], pad_id=0, packed=False)
    assert padded.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert padded.targets.tolist() == [[2, 3, IGNORE], [5, IGNORE, IGNORE]]
    assert (padded.real_tokens, padded.slots, padded.supervised_tokens) == (5, 6, 3)
    assert shifted([7, 8]) == [8, IGNORE]


def _reference_loss(model, examples):
    """Mean CE over supervised tokens, each example run alone through the stock HF forward."""
    total, count = 0.0, 0
    for ex in examples:
        ids = torch.tensor([ex.input_ids])
        out = model(input_ids=ids, labels=torch.tensor([ex.labels]), use_cache=False)
        n = sum(1 for x in ex.labels[1:] if x != IGNORE)
        total += out.loss.item() * n
        count += n
    return total / count


def test_packed_loss_equals_unpacked_loss(model, examples):
    reference = _reference_loss(model, examples)
    with torch.no_grad():
        packed = collate(examples, [list(range(len(examples)))], pad_id=2, packed=True)
        assert len(set(packed.sample[0].tolist())) == len(examples)  # one row holds them all
        packed_loss = token_losses(model, packed).mean().item()
        rows = collate(examples, [[i] for i in range(len(examples))], pad_id=2, packed=False)
        padded_loss = token_losses(model, rows).mean().item()
    assert packed_loss == pytest.approx(reference, abs=1e-4)
    assert padded_loss == pytest.approx(reference, abs=1e-4)


def test_packed_rows_would_leak_without_restarting_positions(model, examples):
    """The control: the same row with a plain all-ones mask lets examples attend to each other."""
    reference = _reference_loss(model, examples)
    packed = collate(examples, [list(range(len(examples)))], pad_id=2, packed=True)
    packed.attention_mask = torch.ones_like(packed.input_ids)
    with torch.no_grad():
        leaked = token_losses(model, packed).mean().item()
    assert abs(leaked - reference) > 1e-3


def test_fused_cross_entropy_matches_autograd():
    torch.manual_seed(0)
    hidden = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.float64)
    targets = torch.randint(0, 50, (13,))
    scale = torch.rand(13, dtype=torch.float64)
    fused = _LinearCrossEntropy.apply(hidden, weight, targets, 4)
    (fused.double() * scale).sum().backward()
    got = hidden.grad.clone()
    hidden.grad = None
    plain = F.cross_entropy(hidden @ weight.t(), targets, reduction="none")
    (plain * scale).sum().backward()
    assert torch.allclose(fused.double(), plain, atol=1e-6)
    assert torch.allclose(got, hidden.grad, atol=1e-10)


def test_length_grouped_padding_keeps_pad_low(examples):
    lengths = [len(e.input_ids) for e in examples]
    grouped = micro_batches(examples, mode="pad", rows_per_batch=2, pack_length=512, pad_id=2)
    naive = [[[i] for i in range(j, min(j + 2, len(examples)))] for j in range(0, len(examples), 2)]
    assert pad_fraction(grouped, lengths) < pad_fraction(naive, lengths)
    packed = micro_batches(examples, mode="pack", rows_per_batch=1, pack_length=512, pad_id=2)
    assert pad_fraction(packed, lengths) == 0.0  # one row per micro-batch: nothing to pad


def test_per_example_attention_equals_masked_sdpa(examples):
    """`imitate_packed` (one causal SDPA per example) gives the stock block-diagonal result, gradients included."""
    stock, fast = tiny_llama(seed=3), tiny_llama(seed=3)
    install(fast)
    assert fast.config._attn_implementation == "imitate_packed"
    rows = [list(range(0, 4)), list(range(4, len(examples)))]  # two rows: the shorter one gets padding
    packed = collate(examples, rows, pad_id=2, packed=True)
    losses = []
    for model in (stock, fast):
        loss = token_losses(model, packed).mean()
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert losses[1] == pytest.approx(_reference_loss(stock, examples), abs=1e-4)
    for (name, a), (_, b) in zip(stock.named_parameters(), fast.named_parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
    padded = collate(examples, [[i] for i in range(len(examples))], pad_id=2, packed=False)
    with torch.no_grad():  # without segments it is plain sdpa with the padding mask
        assert token_losses(fast, padded).mean().item() == pytest.approx(losses[0], abs=1e-4)
