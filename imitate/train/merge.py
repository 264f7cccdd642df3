"""`imitate merge ADAPTER --out DIR [--model BASE]`: fold a LoRA adapter into a full model, and prove it.

The base is the one named in the adapter's `imitate.json` (or `--model`), loaded the way training loaded it (a
GGUF is de-quantised to a plain float model). The adapter is attached with every tensor accounted for: a key the
base has no slot for, or a LoRA slot the file does not fill, fails instead of silently training nothing. Then
the self-check: logits of base + adapter (unmerged) on a probe batch are compared with the merged model's; if
any is not finite or they differ beyond the tolerance, the merge fails and nothing is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from imitate.errors import InputError, TrainError
from imitate.records import Message
from imitate.train.model import ModelSource, load_model, load_tokenizer, peft_model, resolve
from imitate.train.tokenize import ChatFormat

PROBES = [
    [Message(role="user", content="Explain why the sky is blue in two sentences.")],
    [
        Message(role="system", content="You are a careful tutor."),
        Message(role="user", content="What is 17 times 3? Show your steps."),
    ],
]
ATOL, RTOL = 1e-3, 1e-4


def base_of(adapter: Path, model: str | None = None) -> ModelSource:
    """The base model an adapter was trained on: `model` if given, else what the adapter folder records."""
    if model:
        return resolve(model)
    meta = adapter / "imitate.json"
    if meta.exists():
        return resolve(json.loads(meta.read_text(encoding="utf-8"))["base_model"])
    peft_cfg = adapter / "adapter_config.json"
    if peft_cfg.exists():
        return resolve(json.loads(peft_cfg.read_text(encoding="utf-8")).get("base_model_name_or_path") or None)
    raise InputError(f"{adapter} is not an adapter folder (no adapter_config.json)")


def attach(base: Any, adapter: Path) -> Any:
    """base + LoRA adapter (unmerged, eval mode), refusing any tensor that does not fit."""
    from peft import PeftConfig, set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = adapter / "adapter_model.safetensors"
    if not weights.exists():
        raise InputError(f"{adapter} is not an adapter folder (no adapter_model.safetensors)")
    try:
        config = PeftConfig.from_pretrained(str(adapter))
        state = load_file(weights)
    except (OSError, ValueError, SafetensorError) as exc:
        raise InputError(f"cannot read the adapter in {adapter}: {str(exc).splitlines()[0][:200]}") from exc
    config.inference_mode = True
    model = peft_model(base, config)
    result = set_peft_model_state_dict(model, state)
    unfilled = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or unfilled:
        raise TrainError(
            f"the adapter in {adapter} does not fit the base model: {len(result.unexpected_keys)} unexpected "
            f"tensor(s) (e.g. {(result.unexpected_keys or ['-'])[0]}), {len(unfilled)} LoRA weight(s) missing"
        )
    return model.eval()


def probe_batch(tokenizer: Any, fmt: ChatFormat) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [tokenizer(fmt.render(m, generation_prompt=True), add_special_tokens=False)["input_ids"] for m in PROBES]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def self_check(before: torch.Tensor, after: torch.Tensor, mask: torch.Tensor) -> float:
    """Max |difference| of the logits at real positions; TrainError if not finite or beyond tolerance."""
    keep = mask.bool()
    a, b = before[keep], after[keep]
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise TrainError("merge self-check failed: the logits are not finite (corrupted adapter?)")
    diff = (a - b).abs().max().item()
    limit = ATOL + RTOL * a.abs().max().item()
    if diff > limit:
        raise TrainError(f"merge self-check failed: merged logits differ from base+adapter by {diff:.3g} > {limit:.3g}")
    return diff


@torch.no_grad()
def merge(adapter: Path, out: Path, model: str | None = None) -> dict[str, Any]:
    adapter = Path(adapter).expanduser()
    if not adapter.is_dir():
        raise InputError(f"adapter {adapter} does not exist")
    source = base_of(adapter, model)
    tokenizer = load_tokenizer(ModelSource("folder", str(adapter)))
    fmt = ChatFormat.of(tokenizer)
    peft_model = attach(load_model(source, torch.float32), adapter)
    ids, mask = probe_batch(tokenizer, fmt)
    before = peft_model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    merged = peft_model.merge_and_unload()
    after = merged(input_ids=ids, attention_mask=mask, use_cache=False).logits
    diff = self_check(before, after, mask)
    merged.config.use_cache = True
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for name in ("generation_config.json", "imitate.json", "config.yaml"):
        if (adapter / name).exists():
            shutil.copy2(adapter / name, out / (name if name != "config.yaml" else "train_config.yaml"))
    report = {
        "base_model": str(source),
        "adapter": str(adapter),
        "probe_tokens": int(mask.sum()),
        "max_abs_logit_diff": diff,
        "tolerance": f"{ATOL} + {RTOL}·max|logit|",
    }
    (out / "merge_check.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report
