"""Load a student (and its base) for evaluation, and generate answers in batches the way training rendered them.

    student = load_student("data/runs/demo/adapter")              # an adapter folder: base + LoRA
    student = load_student("SmolLM2.gguf", adapter=Path("out/adapter"))
    base = load_base("data/runs/demo/adapter")                    # what the adapter records (or None)
    answers = generate(student.model, student.tokenizer, conversations, max_new_tokens=256)
    answers[i][j]  # the j-th of `n` answers to conversations[i], text without the end-of-turn token

Prompts are rendered by `ChatFormat.render(..., generation_prompt=True)` from `imitate/train/tokenize.py` — the
same text training saw (the template's injected default system turn cut) — and tokenised without special tokens
added. Batches are left-padded (the pad token is the tokenizer's, else the end-of-turn token; padding is masked
out, so its id does not matter), sorted by prompt length so that a batch wastes little padding, and every
sequence stops at the template's end-of-turn token (`<|im_end|>` for ChatML, found as tokenize.py finds it).
Sampling (`temperature > 0`) draws `n` answers per prompt with `torch.manual_seed(seed)` set once per call, so a
seeded call is reproducible on the same machine and batch size; greedy (`temperature == 0`) decodes once and
returns that answer `n` times. The decoding settings are passed whole as a `GenerationConfig`, so a model's own
`generation_config.json` (sampling defaults, repetition penalties) never changes an evaluation.

torch and transformers load inside the functions; importing this module is cheap.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imitate.errors import InputError
from imitate.records import Message


@dataclass
class Loaded:
    """A model ready to evaluate: the network (eval mode, float32), its tokenizer and chat format, and where it
    came from (for the report)."""

    model: Any
    tokenizer: Any
    fmt: Any  # imitate.train.tokenize.ChatFormat
    source: str  # the model file/folder/Hub name (the base, when an adapter is applied)
    adapter: str | None = None

    @property
    def label(self) -> str:
        return f"{self.source} + {self.adapter}" if self.adapter else self.source

    def describe(self) -> dict[str, Any]:
        return {"model": self.source, "adapter": self.adapter}


def split_spec(model: str | None, adapter: Path | None) -> tuple[str | None, Path | None]:
    """`--model` naming an adapter folder means that adapter on the base it records (as `imitate chat` does)."""
    if adapter is None and model and (Path(model).expanduser() / "adapter_config.json").exists():
        return None, Path(model).expanduser()
    return model, (Path(adapter).expanduser() if adapter else None)


def load_student(model: str | None, adapter: Path | None = None, *, merge: bool = True) -> Loaded:
    """base + LoRA adapter (the base is `model`, else what the adapter records), a merged folder, or a GGUF —
    loaded as training loads them (`imitate/train/model.py`), float32, eval mode. An adapter is attached with
    `imitate merge`'s checks (every tensor must fit), then, with `merge`, folded into the weights: the same
    function (to float rounding, ~1e-6 in the logits) without LoRA's extra matmuls on every forward."""
    import torch

    from imitate.train.merge import attach, base_of
    from imitate.train.model import ModelSource, load_model, load_tokenizer, resolve
    from imitate.train.tokenize import ChatFormat

    model, adapter = split_spec(model, adapter)
    if adapter is not None and not adapter.is_dir():
        raise InputError(f"adapter {adapter} does not exist")
    source = base_of(adapter, model) if adapter else resolve(model)
    # The adapter folder holds the tokenizer and chat template training used (they may differ from the base's).
    tokenizer = load_tokenizer(ModelSource("folder", str(adapter)) if adapter else source)
    fmt = ChatFormat.of(tokenizer)
    net = load_model(source, torch.float32)
    if adapter:
        net = attach(net, adapter)
        net = net.merge_and_unload().eval() if merge else net
    else:
        net = net.eval()
    return Loaded(net, tokenizer, fmt, str(source), str(adapter) if adapter else None)


def base_source(model: str | None, adapter: Path | None = None, base: str | None = None) -> str | None:
    """Where the student's base comes from: `base` if given; for an adapter, `model` or what the adapter records;
    for a merged folder, the `imitate.json` that `imitate merge` copies into it; otherwise None (no base known)."""
    from imitate.train.merge import base_of

    if base:
        return base
    model, adapter = split_spec(model, adapter)
    if adapter is not None:
        return str(base_of(adapter, model))
    meta = Path(model).expanduser() / "imitate.json" if model else None
    if meta is not None and meta.is_file():
        try:
            return json.loads(meta.read_text(encoding="utf-8"))["base_model"]
        except (ValueError, KeyError) as exc:
            raise InputError(f"{meta}: no readable base_model ({exc})", hint="name the base with --base") from exc
    return None


def load_base(model: str | None, adapter: Path | None = None, base: str | None = None) -> Loaded | None:
    where = base_source(model, adapter, base)
    return None if where is None else load_student(where)


def prompt_ids(tokenizer: Any, fmt: Any, conversations: Sequence[Sequence[Message]]) -> list[list[int]]:
    """Token ids of each conversation rendered with the generation prompt, exactly as training rendered it."""
    texts = [fmt.render(list(c), generation_prompt=True) for c in conversations]
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Any, Any]:
    """(ids, attention_mask) tensors with every row right-aligned."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def cut_at(ids: Sequence[int], stop_id: int) -> list[int]:
    """The generated ids before the first end-of-turn token (all of them if it never came: a cut answer)."""
    ids = list(ids)
    return ids[: ids.index(stop_id)] if stop_id in ids else ids


def generate(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[Sequence[Message]],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    n: int = 1,
    seed: int | None = None,
    batch_size: int = 8,
    fmt: Any = None,
    on_batch: Callable[[int], Any] | None = None,
) -> list[list[str]]:
    """`n` answers to each conversation (each ending in a user turn), as text without the end-of-turn token.
    Greedy when `temperature == 0`; `fmt` defaults to `ChatFormat.of(tokenizer)`; `on_batch(k)` is called after
    each batch with the number of conversations it finished (progress)."""
    import torch
    from transformers import GenerationConfig

    from imitate.train.tokenize import ChatFormat

    if n < 1 or batch_size < 1 or max_new_tokens < 1:
        raise InputError("generate: n, batch_size and max_new_tokens must be at least 1")
    fmt = fmt or ChatFormat.of(tokenizer)
    rows = prompt_ids(tokenizer, fmt, conversations)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fmt.eot_id
    sampled = temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampled,
        temperature=temperature if sampled else None,
        top_p=top_p if sampled else None,
        top_k=None,
        num_return_sequences=n if sampled else 1,
        eos_token_id=fmt.eot_id,
        pad_token_id=pad_id,
        bos_token_id=fmt.bos_id,
        use_cache=True,
    )
    if seed is not None:
        torch.manual_seed(seed)
    # Longest first: the first batch shows at once whether memory suffices; similar lengths pad little.
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out: list[list[str]] = [[] for _ in rows]
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            ids, mask = left_pad([rows[i] for i in chunk], pad_id)
            generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            new = generated[:, ids.shape[1] :].tolist()
            for k, i in enumerate(chunk):
                seqs = new[k * n : (k + 1) * n] if sampled else [new[k]] * n
                out[i] = [tokenizer.decode(cut_at(s, fmt.eot_id), skip_special_tokens=True).strip() for s in seqs]
            if on_batch:
                on_batch(len(chunk))
    return out
