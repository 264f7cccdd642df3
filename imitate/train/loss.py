"""Per-token cross-entropy computed only where a target is supervised, without materialising all logits.

The LM head of a small model is a large share of its work (SmolLM2-135M: 28M of 135M parameters sit in the
tied embedding, and every logit row is 49,152 floats). So the backbone runs on every token, but hidden states are
gathered at supervised positions only, and the head + softmax run there, in chunks. While the head is frozen
(LoRA never trains it) `_LinearCrossEntropy` computes the gradient with respect to the hidden states in the same
pass (softmax − one-hot, times the head weight) and keeps only that: no [tokens × vocab] tensor is stored for
backward. A trainable head falls back to the plain autograd path.

`token_losses` returns one float32 loss per supervised target, in row-major order of `batch.targets`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from imitate.errors import TrainError
from imitate.train import attention
from imitate.train.pack import Batch
from imitate.train.tokenize import IGNORE

CHUNK_ELEMENTS = 1 << 24  # logits per chunk (64 MiB in fp32): stays in cache-friendly territory on CPU


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        need_grad = ctx.needs_input_grad[0]
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if need_grad else None
        # One logits buffer for all chunks: a fresh 64 MiB tensor per chunk costs its page faults every time.
        buffer = hidden.new_empty(min(chunk, hidden.shape[0]), weight.shape[0], dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            t = targets[start : start + chunk]
            # One max, one in-place exp, one sum over the [chunk × vocab] logits: `torch.logsumexp` followed by a
            # second exp for the softmax made three more full passes (and two temporaries) per chunk.
            logits = buffer[: h.shape[0]]
            if h.dtype == torch.float32:
                torch.mm(h, weight.t(), out=logits)
            else:
                logits.copy_(h @ weight.t())
            top = logits.amax(dim=-1, keepdim=True)
            picked = logits.gather(1, t[:, None]).squeeze(1)
            sums = logits.sub_(top).exp_().sum(dim=-1)
            losses[start : start + chunk] = top.squeeze(1) + sums.log() - picked
            if need_grad:  # (softmax − one-hot) @ W = (exp @ W) / sum − W[target]: no pass to normalise the probs
                g = (logits.to(h.dtype) @ weight).div_(sums[:, None].to(h.dtype))
                grad[start : start + chunk] = g.sub_(weight[t])
        ctx.save_for_backward(grad if need_grad else hidden.new_empty(0))
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_losses[:, None].to(grad.dtype), None, None, None


def split_model(model: Any) -> tuple[Any, torch.nn.Module]:
    """(backbone returning hidden states, LM head) of a causal LM, unwrapping a peft model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        raise TrainError(f"{cfg.model_type}: logit soft-capping/scaling is not supported (LLaMA-class only)")
    return base.get_decoder(), base.get_output_embeddings()


def hidden_states(backbone: Any, batch: Batch) -> torch.Tensor:
    # use_cache=False: with a cache, transformers ignores restarting position_ids and packed rows mix.
    extra = {}
    if batch.segments is not None and backbone.config._attn_implementation == attention.NAME:
        extra["imitate_segments"] = batch.segments  # per-example causal attention (train/attention.py)
    out = backbone(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        attention_mask=batch.attention_mask,
        use_cache=False,
        **extra,
    )
    return out.last_hidden_state


def token_losses(model: Any, batch: Batch) -> torch.Tensor:
    backbone, head = split_model(model)
    hidden = hidden_states(backbone, batch)
    where = batch.targets != IGNORE
    h = hidden[where]
    t = batch.targets[where]
    if head.weight.requires_grad or getattr(head, "bias", None) is not None:
        return F.cross_entropy(head(h).float(), t, reduction="none")
    chunk = max(1, CHUNK_ELEMENTS // head.weight.shape[0])
    return _LinearCrossEntropy.apply(h, head.weight, t, chunk)
