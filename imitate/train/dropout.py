"""LoRA dropout with the semantics of `nn.Dropout` and a faster random source on CPU.

peft applies `nn.Dropout(p)` to the input of every adapted projection (7 per layer with all-linear targets). On
CPU, torch draws each Bernoulli sample from MT19937 and builds a float mask: measured on the 2-core dev machine,
dropout of a [2048 × 1536] activation takes ~45 ms, more than the ~35 ms projection it feeds, and it was ~15 %
of a training step. `FastDropout` takes raw 64-bit words from numpy's SFC64 generator and reads each as four
16-bit uniforms (1.0 ms per 2048 × 576 mask, against 2.5 ms for `Generator.integers(..., dtype=uint16)`, which
spends a 32-bit draw per value), keeps a bool mask for backward and applies it in one `where`.
`keep_mask` is also what the fused LoRA projection (train/fused.py) draws, in the same order.

Semantics: every element is kept independently with probability 1 − p′, p′ = round(p · 65536) / 65536
(p = 0.05 → p′ = 0.0500031), and kept values are scaled by 1 / (1 − p′), so the expectation is unchanged. Off CPU,
and in eval mode, it is the stock dropout. The generator is seeded per (seed, stage, rank) by the recipe and
checkpointed with the other RNG states, so resume stays exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn


class FastDropout(nn.Module):
    def __init__(self, p: float, rng: np.random.Generator):
        super().__init__()
        self.p = p
        self.rng = rng
        dropped = round(p * 65536)
        self.threshold = dropped - 32768  # keep where a uniform int16 ≥ threshold
        self.scale = 1.0 / (1.0 - dropped / 65536)

    def keep_mask(self, shape: torch.Size) -> torch.Tensor:
        """A bool mask of `shape`, each element True (kept) with probability 1 − p′: the next draws of `rng`."""
        n = shape.numel()
        bits = self.rng.bit_generator.random_raw(-(-n // 4)).view(np.int16)[:n]  # four 16-bit draws per word
        return torch.from_numpy(bits).view(shape) >= self.threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return nn.functional.dropout(x, self.p, self.training)
        return torch.where(self.keep_mask(x.shape), x * self.scale, 0.0)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def install(model: Any, rng: np.random.Generator) -> int:
    """Swap every LoRA `nn.Dropout` of a peft model for a `FastDropout` drawing from `rng`; returns how many."""
    n = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, nn.ModuleDict):
            continue
        for name, drop in list(drops.items()):
            if isinstance(drop, nn.Dropout) and drop.p > 0:
                drops[name] = FastDropout(drop.p, rng)
                n += 1
    return n


def reseed(rng: np.random.Generator, *key: int) -> None:
    """Put `rng` in the state SFC64 seeded with `key` starts from (e.g. seed, stage, rank)."""
    rng.bit_generator.state = np.random.SFC64(list(key)).state
