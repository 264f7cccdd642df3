"""A LoRA projection as one autograd node: base + scaling · B(A(dropout(x))) with fewer passes over memory.

peft's `lora.Linear.forward` runs the frozen projection, then dropout (a scaled copy of x, then a masked copy),
A, B, a full-size multiply by `scaling` and a full-size add; its backward repeats the multiply, the mask and the
scale, then autograd adds the LoRA path's input gradient to the base path's. Seven projections per layer make
that most of the element-wise work of a training step. `_LoraLinear` does the same arithmetic with one full-size
pass each way:

    forward   out = x Wᵀ (+ bias);  dx = keep ⊙ x;  h = s_d · dx Aᵀ;  out += scaling · h Bᵀ   (gemm with β = 1)
    backward  gh = scaling · g B;  ∂B = scaling · gᵀ h;  ∂A = s_d · ghᵀ dx;
              ∂x = keep ⊙ (s_d · gh A) + g W   (the mask in place, then gemm with β = 1)

`keep` is the bool mask of `FastDropout` (train/dropout.py), drawn from the same generator in the same order as
the unfused path, and s_d = 1 / (1 − p′) is its scale, folded into the rank-r tensors instead of the full ones. The
frozen base weight gets no gradient and x itself is not kept (only dx, as peft's A already keeps it).

`install` swaps the class of every plain peft `lora.Linear` to `FusedLoraLinear`: parameters, state dict and the
saved adapter stay peft's. Anything the fused path does not cover (merged or disabled adapters, several active
adapters, DoRA and other variants, LoRA bias, a trainable base weight, torch dropout off CPU, mixed dtypes) runs
peft's own forward. Equality with peft, gradients included, is tested in tests/test_train_fused.py.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from imitate.train.dropout import FastDropout


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        keep: torch.Tensor | None,
        keep_scale: float,
    ) -> torch.Tensor:
        out = F.linear(x, weight, bias)
        dx = x if keep is None else torch.where(keep, x, 0.0)
        h = dx @ lora_a.t()
        if keep_scale != 1.0:
            h.mul_(keep_scale)
        out.addmm_(h, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(weight, lora_a, lora_b, dx, h, keep)
        ctx.scaling, ctx.keep_scale = scaling, keep_scale
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        weight, lora_a, lora_b, dx, h, keep = ctx.saved_tensors
        need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        gh = (g @ lora_b).mul_(ctx.scaling)
        grad_b = (g.t() @ h).mul_(ctx.scaling) if need_b else None
        grad_a = (gh.t() @ dx).mul_(ctx.keep_scale) if need_a else None
        grad_x = None
        if need_x:
            grad_x = gh.mul_(ctx.keep_scale) @ lora_a
            if keep is not None:
                grad_x.mul_(keep)
            grad_x.addmm_(g, weight)
        grad_bias = g.sum(0) if need_bias else None
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None


class FusedLoraLinear(LoraLinear):
    """peft's `lora.Linear` whose forward runs `_LoraLinear` whenever the adapter is plain LoRA."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self._fused_adapter(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        base, drop = self.base_layer, self.lora_dropout[name]
        flat = x.reshape(-1, x.shape[-1])
        keep, keep_scale = None, 1.0
        if isinstance(drop, FastDropout) and drop.training and drop.p > 0:
            keep, keep_scale = drop.keep_mask(flat.shape), drop.scale
        out = _LoraLinear.apply(
            flat,
            base.weight,
            base.bias,
            self.lora_A[name].weight,
            self.lora_B[name].weight,
            self.scaling[name],
            keep,
            keep_scale,
        )
        return out.view(*x.shape[:-1], out.shape[-1])

    def _fused_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """The one active plain-LoRA adapter when the fused path computes exactly what peft would, else None."""
        if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        variant = name in getattr(self, "lora_variant", {}) or getattr(self, "use_dora", {}).get(name, False)
        if name not in self.lora_A or variant or self.fan_in_fan_out:
            return None
        base, lora_a, lora_b = self.base_layer, self.lora_A[name], self.lora_B[name]
        if (
            type(base) is not nn.Linear
            or base.weight.requires_grad
            or lora_a.bias is not None
            or lora_b.bias is not None
        ):
            return None
        if not x.dtype == base.weight.dtype == lora_a.weight.dtype or torch.is_autocast_enabled(x.device.type):
            return None  # autocast would change the gemms' dtypes under us: peft's path handles it
        if base._forward_hooks or base._forward_pre_hooks:
            return None  # hooks on the base layer (e.g. accelerate offload) must run
        drop = self.lora_dropout[name]
        plain = isinstance(drop, nn.Identity) or not drop.training
        if not (plain or (isinstance(drop, FastDropout) and x.device.type == "cpu")):
            return None
        return name


def install(model: nn.Module) -> int:
    """Make every plain peft `lora.Linear` of `model` a `FusedLoraLinear`; returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.__class__ = FusedLoraLinear
            n += 1
    return n
