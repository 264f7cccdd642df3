"""Data parallelism for the recipe: one process per device under `torchrun`, one process otherwise.

The recipe does not wrap the model in `DistributedDataParallel`. Every rank holds the same micro-batch plan, so
each knows the supervised-token count of the whole accumulated step without communicating; after its share of
micro-batches each rank all-reduces (sums) the LoRA gradients and the loss once per optimizer step. That keeps
the loss normalisation exact by construction, lets a rank with no micro-batch left at the end of an epoch still
take part, and is cheap: LoRA gradients are a few MB. CPU uses the gloo backend, CUDA nccl.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: list[Any]) -> list[Any]:
        """This rank's micro-batches of one step: every `size`-th, starting at `rank`."""
        return items[self.rank :: self.size]

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum_grads(self, params: list[torch.nn.Parameter], extra: torch.Tensor) -> torch.Tensor:
        """Sum gradients (and `extra`, e.g. the loss) over ranks in one flat all-reduce; returns summed extra."""
        if self.size == 1:
            return extra
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [extra.reshape(-1).to(grads[0].dtype)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        at = 0
        for p, g in zip(params, grads, strict=True):
            p.grad = flat[at : at + g.numel()].view_as(g).clone()
            at += g.numel()
        return flat[at:].to(extra.dtype).view_as(extra)

    def gather(self, rows: list[Any]) -> list[Any]:
        """Every rank's rows, concatenated on rank 0 (others get an empty list)."""
        if self.size == 1:
            return rows
        out: list[list[Any]] | None = [[] for _ in range(self.size)] if self.main else None
        dist.gather_object(rows, out, dst=0)
        return [r for part in out or [] for r in part]

    def broadcast_params(self, params: list[torch.nn.Parameter]) -> None:
        if self.size > 1:
            for p in params:
                dist.broadcast(p.data, src=0)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def init_world() -> World:
    """Join the process group torchrun describes (RANK/WORLD_SIZE in the environment), if any."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size())


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
