"""Examples → micro-batches: packing without cross-contamination, or length-grouped padding.

Packing concatenates examples into rows with `position_ids` restarting at 0 for every example and passes
`attention_mask=None`. transformers (5.x) then builds a block-diagonal causal mask from the restarting positions,
so every token attends only within its own example. It does that only when the attention mask is None *and* no
KV cache is in play: the forward must pass `use_cache=False`, or packed examples silently attend to each other
(tests/test_train_pack.py proves packed loss == unpacked loss).

Targets are shifted per example *before* packing (`targets[t] = labels[t + 1]`, the last position of each
example -100), so no position is ever asked to predict the first token of the next example. Rows are planned
with first-fit decreasing; the padded alternative sorts by length so a batch's rows are close in length. Both
report their pad fraction.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import torch

from imitate.train.tokenize import IGNORE, Example


@dataclass
class Batch:
    """One micro-batch. `sample` maps every position to its example's index in the batch list (-1 = pad)."""

    input_ids: torch.Tensor  # [rows, length]
    position_ids: torch.Tensor
    targets: torch.Tensor  # labels shifted left by one, per example
    sample: torch.Tensor
    attention_mask: torch.Tensor | None  # None for packed rows (block-diagonal from position_ids)
    ids: list[str]  # record ids, indexed by `sample`
    segments: list[list[tuple[int, int]]] | None = None  # packed rows: (start, end) of each example per row

    @property
    def real_tokens(self) -> int:
        return int((self.sample >= 0).sum())

    @property
    def supervised_tokens(self) -> int:
        return int((self.targets != IGNORE).sum())

    @property
    def slots(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device | str) -> Batch:
        move = {k: getattr(self, k).to(device) for k in ("input_ids", "position_ids", "targets", "sample")}
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return Batch(**move, attention_mask=mask, ids=self.ids, segments=self.segments)


def shifted(labels: list[int]) -> list[int]:
    return [*labels[1:], IGNORE]


def plan_packs(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices of examples per row, no row above `capacity` (longer examples sit alone)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def collate(examples: list[Example], rows: list[list[int]], pad_id: int, packed: bool) -> Batch:
    """Rows of example indices → tensors, right-padded to the longest row."""
    width = max(sum(len(examples[i].input_ids) for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    targets = torch.full(shape, IGNORE, dtype=torch.long)
    sample = torch.full(shape, -1, dtype=torch.long)
    attention = torch.zeros(shape, dtype=torch.long)
    ids: list[str] = []
    segments: list[list[tuple[int, int]]] = []
    for r, row in enumerate(rows):
        at = 0
        segments.append([])
        for i in row:
            ex = examples[i]
            n = len(ex.input_ids)
            input_ids[r, at : at + n] = torch.tensor(ex.input_ids)
            position_ids[r, at : at + n] = torch.arange(n)
            targets[r, at : at + n] = torch.tensor(shifted(ex.labels))
            sample[r, at : at + n] = len(ids)
            attention[r, at : at + n] = 1
            ids.append(ex.id)
            segments[-1].append((at, at + n))
            at += n
        if packed and at < width:  # padding of a packed row is its own "example": positions restart there too
            position_ids[r, at:] = torch.arange(width - at)
    if packed:
        return Batch(input_ids, position_ids, targets, sample, None, ids, segments)
    return Batch(input_ids, position_ids, targets, sample, attention, ids)


def micro_batches(
    examples: list[Example],
    *,
    mode: Literal["pack", "pad"],
    rows_per_batch: int,
    pack_length: int,
    pad_id: int,
) -> list[list[list[int]]]:
    """The fixed plan of micro-batches (each a list of rows of example indices), before epoch shuffling."""
    if mode == "pack":
        rows = plan_packs([len(e.input_ids) for e in examples], pack_length)
    else:
        rows = [[i] for i in sorted(range(len(examples)), key=lambda i: (len(examples[i].input_ids), i))]
    return [rows[i : i + rows_per_batch] for i in range(0, len(rows), rows_per_batch)]


def epoch_order(n_batches: int, seed: int, stage: int, epoch: int) -> list[int]:
    """The micro-batch order of one epoch: a pure function of (seed, stage, epoch), so resume can replay it."""
    order = list(range(n_batches))
    random.Random(f"{seed}/{stage}/{epoch}").shuffle(order)
    return order


def pad_fraction(plan: list[list[list[int]]], lengths: list[int]) -> float:
    real = slots = 0
    for batch in plan:
        widths = [sum(lengths[i] for i in row) for row in batch]
        real += sum(widths)
        slots += max(widths) * len(batch)
    return 1.0 - real / slots if slots else 0.0
