"""Multiple choice by log-likelihood: the hot loop of every evaluation.

    requests = [Request(context_ids, [choice_ids, ...]), ...]          # one per question
    sums = score(model, requests, batch_size=8)                        # sums[q][k] = log P(choice k | context q)
    pick(sums[q], lengths)                                             # argmax, optionally length-normalised

**One forward pass per batch, the shared prompt run once.** Each question becomes one packed row: its context,
then every continuation back to back without its last token (a last token is only predicted, never read: lm-eval
feeds `(context + continuation)[:-1]` for the same reason). A custom 4-D attention mask lets each continuation
token see the whole context and the earlier tokens of its *own* continuation only, and the position ids of every
continuation restart where the context ends — so each continuation is computed exactly as if it followed the
context alone, but the context's tokens go through the model once instead of once per choice (lm-eval's HF backend
runs context + continuation as a separate row for every choice). Rows are sorted by length and right-padded; a padding
position attends only to itself and is never read. The 4-D mask is additive (0 / the dtype's minimum), which
transformers passes to the attention kernel as it is (SDPA and eager alike).

Only the positions that predict a continuation token go through the LM head (hidden states are gathered first):
for a vocabulary of 49k the head over every position would cost a fifth of the forward pass and most of the
memory. Architectures that soft-cap their final logits (`final_logit_softcapping`) get the same capping here.

`Request.continuations` are token ids that follow the context ids directly (how they are tokenised is the
caller's choice: `encode_chat` tokenises the answer on its own, as training does; `encode_split` is lm-eval's
whole-minus-context split for plain-text prompts). Tested: batched scores equal one-continuation-at-a-time scores
of a plain causal forward to 1e-4.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from imitate.errors import InputError


@dataclass(frozen=True)
class Request:
    context: list[int]
    continuations: list[list[int]]

    @property
    def width(self) -> int:
        """Packed row length: the context, then each continuation without its last token (predicted, not fed)."""
        return len(self.context) + sum(len(c) - 1 for c in self.continuations)


def encode_chat(tokenizer: Any, fmt: Any, messages: Sequence[Any], choices: Sequence[str]) -> Request:
    """Context = the conversation rendered with the generation prompt (as training and generation render it);
    each choice tokenised on its own, as an assistant answer is in training."""
    context = tokenizer(fmt.render(list(messages), generation_prompt=True), add_special_tokens=False)["input_ids"]
    conts = tokenizer(list(choices), add_special_tokens=False)["input_ids"]
    return Request(list(context), [list(c) for c in conts])


def encode_split(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's rule for plain text: trailing spaces of the context move to the continuation, then the
    continuation's ids are those of encode(context + continuation) after the first len(encode(context)) ids."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return list(whole[: len(ctx)]), list(whole[len(ctx) :])


def check(requests: Sequence[Request]) -> None:
    for i, r in enumerate(requests):
        if not r.context:
            raise InputError(f"scoring: question {i} has an empty context")
        if not r.continuations or any(len(c) == 0 for c in r.continuations):
            raise InputError(f"scoring: question {i} has no choices or a choice with no tokens")


def _pack(batch: Sequence[Request], pad_id: int, dtype: Any) -> dict[str, Any]:
    """Packed ids, position ids, the additive 4-D mask, and where each continuation's predictions are."""
    import torch

    width = max(r.width for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(batch), width), dtype=torch.long)
    seg = torch.full((len(batch), width), -1, dtype=torch.long)  # 0 = context, k = continuation k, -1 = pad
    rows, at, targets, owner = [], [], [], []  # one entry per scored token
    n_choice = 0
    for b, r in enumerate(batch):
        lc = len(r.context)
        ids[b, :lc] = torch.tensor(r.context)
        pos[b, :lc] = torch.arange(lc)
        seg[b, :lc] = 0
        start = lc
        for k, cont in enumerate(r.continuations, 1):
            # Token 0 is predicted by the context's last position, token j by the continuation's token j - 1; the
            # last token is only predicted, never read, so it is not fed (a one-token choice costs no position).
            t = len(cont) - 1
            ids[b, start : start + t] = torch.tensor(cont[:-1])
            pos[b, start : start + t] = torch.arange(lc, lc + t)
            seg[b, start : start + t] = k
            at += [lc - 1, *range(start, start + t)]
            rows += [b] * len(cont)
            targets += cont
            owner += [n_choice] * len(cont)
            n_choice += 1
            start += t
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
    allowed = causal & same & (seg[:, None, :] >= 0)
    allowed |= torch.eye(width, dtype=torch.bool)  # padding rows attend to themselves: no all-masked softmax
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return {
        "ids": ids,
        "pos": pos,
        "mask": mask[:, None],
        "rows": torch.tensor(rows),
        "at": torch.tensor(at),
        "targets": torch.tensor(targets),
        "owner": torch.tensor(owner),
        "n_choice": n_choice,
    }


def _parts(model: Any) -> tuple[Any, Any, float | None]:
    """The decoder stack and the LM head of a causal LM (through a peft wrapper), and its final logit cap."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    cap = getattr(causal.config, "final_logit_softcapping", None)
    return causal.get_decoder(), causal.get_output_embeddings(), cap


def score_batch(model: Any, batch: Sequence[Request], pad_id: int = 0) -> list[list[float]]:
    """Sum of log-probabilities of each continuation of each request, in one forward pass."""
    import torch

    decoder, head, cap = _parts(model)
    dtype = next(model.parameters()).dtype
    p = _pack(batch, pad_id, dtype)
    with torch.inference_mode():
        hidden = decoder(input_ids=p["ids"], attention_mask=p["mask"], position_ids=p["pos"], use_cache=False)
        picked = hidden.last_hidden_state[p["rows"], p["at"]]
        logits = head(picked).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        logp = torch.log_softmax(logits, dim=-1).gather(1, p["targets"][:, None])[:, 0]
        sums = torch.zeros(p["n_choice"], dtype=torch.float64).index_add_(0, p["owner"], logp.double())
    flat = sums.tolist()
    out, i = [], 0
    for r in batch:
        out.append(flat[i : i + len(r.continuations)])
        i += len(r.continuations)
    return out


def score(
    model: Any,
    requests: Sequence[Request],
    *,
    batch_size: int = 8,
    pad_id: int = 0,
    on_batch: Callable[[int], Any] | None = None,
) -> list[list[float]]:
    """Log-likelihood sums for every continuation of every request, `batch_size` questions per forward pass
    (sorted by packed length so a batch pads little; results come back in the input order)."""
    check(requests)
    order = sorted(range(len(requests)), key=lambda i: -requests[i].width)
    out: list[list[float]] = [[] for _ in requests]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for i, sums in zip(chunk, score_batch(model, [requests[i] for i in chunk], pad_id), strict=True):
            out[i] = sums
        if on_batch:
            on_batch(len(chunk))
    return out


def pick(scores: Sequence[float], lengths: Sequence[int] | None = None) -> int:
    """The index of the best choice: highest sum, or highest sum per unit of `lengths` (first on ties)."""
    values = scores if lengths is None else [s / max(1, n) for s, n in zip(scores, lengths, strict=True)]
    return max(range(len(values)), key=lambda k: (values[k], -k))


def reference_scores(model: Any, request: Request) -> list[float]:
    """One plain causal forward per continuation (context + continuation): the slow definition `score` must
    equal. For tests and benchmarks."""
    import torch

    out = []
    with torch.inference_mode():
        for cont in request.continuations:
            ids = torch.tensor([request.context + cont])
            logits = model(input_ids=ids, use_cache=False).logits[0].float()
            logp = torch.log_softmax(logits[len(request.context) - 1 : -1], dim=-1)
            out.append(float(logp.gather(1, torch.tensor(cont)[:, None]).sum()))
    return out
