"""`train.parallel=fsdp`: the student sharded per decoder layer with FSDP2 (`torch.distributed.fsdp.fully_shard`).

    torchrun --nproc_per_node 2 $(which imitate) train DATA --out DIR --set train.parallel=fsdp

Each decoder layer's parameters — the frozen base and the LoRA weights — are split over the ranks; a layer is
all-gathered for its forward (and again for its backward) and its LoRA gradients are reduce-scattered, so each
rank holds and updates only its shard of the AdamW state. The embedding / LM head stays whole on every rank (it is
frozen, and the loss reads the head's weight outside any module's forward: train/loss.py).

Loss normalisation stays exact: gradients are *summed* over ranks (FSDP2 averages by default; gloo cannot
pre-scale, so the divide factor is 1 with sum reductions), and the recipe already divides each micro-batch's loss
by the supervised tokens of the whole step on all ranks. Every rank must run the same number of forward and
backward passes (each one all-gathers), so a rank with fewer micro-batches in a step runs one with weight 0.

Checkpoints are sharded (torch.distributed.checkpoint: LoRA weights and optimizer state, each rank its part, under
`step-N/sharded/`); the adapter is saved in peft's format from the gathered full LoRA state on rank 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

from imitate.train import recompute

_LORA_ONLY = StateDictOptions(ignore_frozen_params=True)
# loading only the LoRA part into the whole model: the frozen base is not in the checkpoint (dcp.load has already
# failed if a LoRA tensor was missing from it)
_INTO_MODEL = StateDictOptions(ignore_frozen_params=True, strict=False)


def shard(model: Any) -> int:
    """Shard every decoder layer of `model` (in place) with summed gradient reductions; returns how many."""
    layers = recompute.decoder_layers(model)
    for layer in layers:
        fully_shard(layer)
        layer.set_gradient_divide_factor(1.0)
        layer.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
    return len(layers)


def full_adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) parameters gathered whole, by the peft model's names (a collective: every rank)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def save(folder: Path, model: Any, optimizer: Any) -> None:
    """Every rank writes its shards of the LoRA weights and the optimizer state (a collective)."""
    state = {
        "model": get_model_state_dict(model, options=_LORA_ONLY),
        "optim": get_optimizer_state_dict(model, optimizer, options=_LORA_ONLY),
    }
    dcp.save(state, checkpoint_id=folder / "sharded")


def load_model(folder: Path, model: Any) -> None:
    state = {"model": get_model_state_dict(model, options=_LORA_ONLY)}
    dcp.load(state, checkpoint_id=folder / "sharded")
    set_model_state_dict(model, state["model"], options=_INTO_MODEL)


def load_optimizer(folder: Path, model: Any, optimizer: Any) -> None:
    state = {"optim": get_optimizer_state_dict(model, optimizer, options=_LORA_ONLY)}
    dcp.load(state, checkpoint_id=folder / "sharded")
    set_optimizer_state_dict(model, optimizer, state["optim"], options=_LORA_ONLY)
