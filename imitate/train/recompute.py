"""Gradient checkpointing (`train.gradient_checkpointing=true`): each decoder layer is recomputed in the backward
pass instead of keeping its activations, with the same LoRA dropout masks as its forward pass.

transformers' decoder layers (`GradientCheckpointingLayer`) call `layer._gradient_checkpointing_func(forward,
*args)` when `layer.gradient_checkpointing` is set; `enable` gives each layer torch's non-reentrant
`torch.utils.checkpoint.checkpoint` wrapped in `_ReplayDropout`. torch's `preserve_rng_state` replays the torch
RNG, but our LoRA dropout (train/dropout.py) draws its masks from a numpy SFC64 generator torch does not know:
without help the recomputation would draw the *next* masks, and the gradients would belong to a different
forward than the loss. So the generator's state is taken when the layer's forward starts, put back for the
recomputation, and the state the run had reached is restored after it — the run's stream of masks is the same
with and without checkpointing (tested in tests/test_train_recompute.py: equal losses and gradients).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint


class _ReplayDropout:
    """A `_gradient_checkpointing_func` that replays the dropout generator's draws in the recomputation."""

    def __init__(self, rng: np.random.Generator | None):
        self.rng = rng

    def __call__(self, forward: Callable[..., Any], *args: Any) -> Any:
        rng = self.rng
        if rng is None:
            return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True)
        start = rng.bit_generator.state
        calls = [0]

        def run(*inner: Any) -> Any:
            calls[0] += 1
            if calls[0] == 1:  # the forward pass: draw as usual
                return forward(*inner)
            reached = rng.bit_generator.state
            rng.bit_generator.state = start  # the recomputation: the same draws as the forward
            try:
                return forward(*inner)
            finally:
                rng.bit_generator.state = reached

        return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True)


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The decoder layers of a (peft-wrapped) causal LM that transformers can checkpoint."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def enable(model: Any, rng: np.random.Generator | None) -> int:
    """Checkpoint every decoder layer of `model`, replaying `rng` (the LoRA dropout generator); returns how many."""
    layers = decoder_layers(model)
    func = _ReplayDropout(rng)
    for layer in layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = func
    return len(layers)
