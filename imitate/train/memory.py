"""The memory budget of a training run, estimated before anything heavy loads: `imitate train --estimate-memory`.

    imitate train DATA --out DIR --estimate-memory [--model PATH|GGUF|HUB] [--set train.key=value ...]

What is estimated: the peak resident memory the run adds on top of the process as it stands just before the
student loads (CPU: RSS; GPU: `max_memory_allocated`) — the figure the trainer records as `memory.added_peak`
in summary.json (peak since the student started loading, minus the memory in use then). Not included: Python,
torch and the tokenizer themselves, and the tokenised data (all there before the model loads).

The model's shape comes from its config alone (config.json; a GGUF's metadata through the `gguf` reader, which
maps the file and reads no tensor; a Hub name's config.json). The peak is the larger of two moments:

  load   the weights in the training dtype + what loading holds beside them: the mapped checkpoint file, and for a
         GGUF the de-quantised state dict that `train/model.py` copies into a plain model (one more fp32 copy);
  train  weights + LoRA (parameter, gradient, two AdamW moments: 16 bytes each in fp32) + the activations one
         micro-batch keeps for backward + the loss's buffers + the backward's working set.

Activations per token and decoder layer, LLaMA-class, as this recipe computes them (fused LoRA, train/fused.py):
the two RMSNorm inputs (2d), each LoRA projection's dropped-out input (4·d for q, k, v, o and gate, up; f for down;
plus a one-byte mask each when dropout is on) and rank-r product, attention's q, k and v (repeated to the query
heads) and output (4·q, q = heads × head_dim), and the MLP's gate, up, SiLU output and product (4f). With gradient
checkpointing only each layer's input (d) is kept, and one layer's activations exist at a time (its
recomputation). The loss keeps the gathered hidden states and their gradient and one [chunk × vocab] fp32 logits
buffer (train/loss.py). This is a model of the implementation, not a measurement: tests/test_train_memory.py
checks it within 30 % of the measured peak on the CPU. FSDP's sharding (train/fsdp.py) is not divided out.
With checkpointing the loss's buffers and the recomputed layer are not alive at once, so the peak takes the larger.

On the CPU the measured figure is the RSS high-water mark, which also holds freed blocks glibc's heap kept: its
adaptive mmap threshold rises to the largest block freed (up to 32 MiB), and activation-sized buffers then come
from a heap that stays resident (the tiny test model measured 193-293 MiB for 160 MiB of live tensors; SmolLM2 at
2,048 tokens with checkpointing 2,077 MiB for 903). `train.cpu_mmap_threshold=131072` fixes the threshold at
start (`metrics.set_mmap_threshold`) and RSS then follows the live tensors this estimate models (the test uses it),
at ~30 % fewer tokens/s (every large block is mapped and faulted in afresh); by default, expect RSS above the
estimate by such heap slack (up to 2x with checkpointing).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imitate.errors import InputError
from imitate.train.model import ModelSource

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2}
LOSS_CHUNK_ELEMENTS = 1 << 24  # train/loss.py CHUNK_ELEMENTS
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    head_dim: int
    file_bytes: int = 0  # the checkpoint file(s) loading maps
    gguf: bool = False

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each adapted projection of one layer."""
        d, f, q = self.hidden, self.intermediate, self.heads * self.head_dim
        return {
            "q_proj": (d, q),
            "k_proj": (d, self.kv),
            "v_proj": (d, self.kv),
            "o_proj": (q, d),
            "gate_proj": (d, f),
            "up_proj": (d, f),
            "down_proj": (f, d),
        }

    def base_parameters(self) -> int:
        per_layer = sum(i * o for i, o in self.projection_shapes().values()) + 2 * self.hidden
        head = 0 if self.tied else self.vocab * self.hidden
        return self.vocab * self.hidden + head + self.layers * per_layer + self.hidden


def _shape(cfg: dict[str, Any], **extra: Any) -> ModelShape:
    heads = cfg["num_attention_heads"]
    return ModelShape(
        hidden=cfg["hidden_size"],
        intermediate=cfg["intermediate_size"],
        layers=cfg["num_hidden_layers"],
        heads=heads,
        kv_heads=cfg.get("num_key_value_heads") or heads,
        vocab=cfg["vocab_size"],
        tied=bool(cfg.get("tie_word_embeddings", False)),
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        **extra,
    )


def shape_of(source: ModelSource) -> ModelShape:
    """The student's shape from its config only: no weights are read."""
    if source.kind == "folder":
        folder = Path(source.location)
        files = sum(p.stat().st_size for p in folder.glob("*.safetensors")) or sum(
            p.stat().st_size for p in folder.glob("*.bin")
        )
        return _shape(json.loads((folder / "config.json").read_text()), file_bytes=files)
    if source.kind == "gguf":
        return _gguf_shape(Path(source.location) / str(source.gguf_file))
    from transformers import AutoConfig

    try:
        return _shape(AutoConfig.from_pretrained(source.location).to_dict())
    except OSError as exc:
        raise InputError(f"cannot read the config of {source}: {str(exc).splitlines()[0][:200]}") from exc


def _gguf_shape(path: Path) -> ModelShape:
    from gguf import GGUFReader

    reader = GGUFReader(path)  # maps the file; tensor data stays on disk

    def field(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    heads = field(f"{arch}.attention.head_count")
    hidden = field(f"{arch}.embedding_length")
    cfg = {
        "hidden_size": hidden,
        "intermediate_size": field(f"{arch}.feed_forward_length"),
        "num_hidden_layers": field(f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": field(f"{arch}.attention.head_count_kv", heads),
        "vocab_size": field(f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else 0),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "head_dim": field(f"{arch}.attention.key_length") or hidden // heads,
    }
    if None in cfg.values():
        raise InputError(f"{path}: GGUF metadata lacks the LLaMA shape keys ({arch})")
    return _shape(cfg, file_bytes=os.path.getsize(path), gguf=True)


@dataclass(frozen=True)
class Estimate:
    parts: dict[str, int]  # bytes by component
    load_peak: int
    train_peak: int

    @property
    def peak(self) -> int:
        return max(self.load_peak, self.train_peak)

    def lines(self) -> list[str]:
        out = [f"  {name:<22} {b / GiB:8.3f} GiB" for name, b in self.parts.items()]
        out.append(f"  {'peak while loading':<22} {self.load_peak / GiB:8.3f} GiB")
        out.append(f"  {'peak while training':<22} {self.train_peak / GiB:8.3f} GiB")
        out.append(f"  {'expected peak':<22} {self.peak / GiB:8.3f} GiB  (on top of the process before the load)")
        return out


def estimate(
    shape: ModelShape,
    *,
    rank: int,
    targets: list[str] | str = "all-linear",
    tokens: int,
    dtype: str = "float32",
    quantization: str = "none",
    dropout: bool = True,
    checkpointing: bool = False,
) -> Estimate:
    """Bytes a run adds: `tokens` = tokens per micro-batch (pack_length × batch_rows), dtype the base weights'."""
    d, f, r = shape.hidden, shape.intermediate, rank
    wb = DTYPE_BYTES[dtype]
    adapted = {
        n: s for n, s in shape.projection_shapes().items() if targets == "all-linear" or n in targets
    }  # peft's "all-linear" adapts every projection of the layers, not the LM head
    n_lora = shape.layers * sum(r * (i + o) for i, o in adapted.values())
    linear = shape.layers * sum(i * o for i, o in shape.projection_shapes().values())
    other = shape.base_parameters() - linear
    if quantization == "4bit":  # NF4 + double-quantised scales; the rest in bf16
        weights = int(linear * 0.53) + other * 2
    elif quantization == "8bit":
        weights = linear + other * 2
    else:
        weights = shape.base_parameters() * wb
    ab = wb if quantization == "none" else 2  # activation element size
    lora_in = 6 * d + f  # the inputs of q, k, v, o, gate, up (d each) and down (f)
    # with dropout each projection keeps its own dropped-out fp32 copy and a bool mask; without, the shared inputs
    inputs = 5 * lora_in if dropout else ab * (2 * d + f)
    # attention keeps q and the key/value heads repeated to the query heads (train/attention.py), and its output
    q = shape.heads * shape.head_dim
    per_token_layer = ab * (2 * d + 4 * q + 4 * f) + inputs + 4 * r * len(adapted)
    if checkpointing:
        activations = tokens * (shape.layers * d * ab + per_token_layer)
    else:
        activations = tokens * shape.layers * per_token_layer
    chunk = max(1, LOSS_CHUNK_ELEMENTS // shape.vocab)
    loss = 4 * min(chunk, tokens) * shape.vocab + tokens * d * (2 * ab + 4)
    working = tokens * 4 * (2 * f + 2 * d)  # the backward's gradient buffers of one layer
    parts = {
        "base weights": weights,
        "LoRA + grads + AdamW": 16 * n_lora,
        "activations": activations,
        "loss buffers": loss,
        "backward working set": working,
    }
    if shape.gguf:
        loading = shape.file_bytes + 2 * shape.base_parameters() * 4 + (weights if wb != 4 else 0)
    else:
        loading = shape.file_bytes + weights
    if checkpointing:
        # the loss's buffers are freed before the backward recomputes the last layer: the two never coexist
        kept = tokens * shape.layers * d * ab
        train_peak = weights + 16 * n_lora + kept + max(loss, activations - kept + working)
    else:
        train_peak = sum(parts.values())
    return Estimate(parts, load_peak=loading, train_peak=train_peak)


def for_config(t: Any, source: ModelSource) -> tuple[ModelShape, Estimate]:
    """The estimate for a `TrainConfig` and its student."""
    shape = shape_of(source)
    dtype = {"auto": "float32"}.get(t.dtype, t.dtype)
    tokens = (t.pack_length or t.max_length) * t.batch_rows if t.batching == "pack" else t.max_length * t.batch_rows
    est = estimate(
        shape,
        rank=t.lora.r,
        targets=t.lora.target_modules,
        tokens=tokens,
        dtype=dtype,
        quantization=t.quantization,
        dropout=t.lora.dropout > 0,
        checkpointing=t.gradient_checkpointing,
    )
    return shape, est
