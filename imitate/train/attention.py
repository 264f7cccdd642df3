"""Attention for packed rows that does no work across examples: one causal SDPA call per packed example.

With transformers' stock `sdpa`, a packed row gets a block-diagonal mask built from its restarting
`position_ids`. That is correct, but SDPA with an explicit mask computes every (query, key) pair of the row and
masks most of them away: on a 1,024-token row of ~4 examples about 70 % of the attention work is thrown out,
and a mask also keeps SDPA off its `is_causal` fast path (which skips the upper triangle).

`imitate_packed` is registered with transformers' `AttentionInterface` and selected on the training model. The
recipe passes each row's example boundaries (`imitate_segments`, Python ints: no device sync) through the
forward's keyword arguments, which transformers hands to every attention call; each example then runs as its
own `is_causal=True` SDPA, so the cost is Σ Lᵢ² / 2 instead of (Σ Lᵢ)². Without segments (padded batches,
generation) it is exactly transformers' `sdpa`, mask included. The packed == unpacked test covers both paths.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

NAME = "imitate_packed"


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    imitate_segments: list[list[tuple[int, int]]] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if imitate_segments is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    p = dropout if module.training else 0.0
    rows = []
    by_row = zip(*(t.split(1) for t in (query, key, value)), imitate_segments, strict=True)
    for q_row, k_row, v_row, spans in by_row:
        # One split per tensor, not a slice per example: the backward of a split is one concatenation, where
        # slices would each zero-fill a full-size gradient and add it up.
        sizes = [b - a for a, b in spans]
        tail = query.shape[2] - sum(sizes)  # padding after the last example: nothing attends there
        qs, ks, vs = (t.split([*sizes, tail], dim=2)[: len(sizes)] for t in (q_row, k_row, v_row))
        parts = [
            F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=scaling).transpose(1, 2)
            for q, k, v in zip(qs, ks, vs, strict=True)
        ]
        if tail:  # its output is never used
            parts.append(query.new_zeros(1, tail, query.shape[1], query.shape[3]))
        rows.append(torch.cat(parts, dim=1))  # [1, length, heads, dim]: already the layout the caller wants
    return torch.cat(rows), None


def install(model: Any) -> None:
    """Register `imitate_packed` (once) and select it on `model`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, packed_attention)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(NAME)
