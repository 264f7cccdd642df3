"""Load the student and its tokenizer from a local HF folder, a GGUF file, or (online) a Hub name.

A GGUF loads through transformers (`gguf_file=`), which de-quantises the weights to float but leaves the model
flagged as quantized, and transformers then refuses to train or save it. So a GGUF model is rebuilt once at load:
the same config without `quantization_config`, `from_config`, `load_state_dict` of the de-quantised weights.

The default student is SmolLM2-135M-Instruct: the GGUF in `$IMITATE_MODEL_DIR` (default
`~/.cache/imitate/models`, filled by `make install`), else its Hub name for users who are online. Any path that
is not a model is an InputError in one line.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imitate.errors import InputError

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"
# What a missing, truncated or foreign model file raises inside transformers / the GGUF reader.
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, EOFError, struct.error)
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "folder" | "gguf" | "hub"
    location: str  # folder path, the GGUF's folder, or the Hub name
    gguf_file: str | None = None

    def __str__(self) -> str:
        return str(Path(self.location) / self.gguf_file) if self.gguf_file else self.location

    def kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def model_dir() -> Path:
    return Path(os.environ.get("IMITATE_MODEL_DIR", "~/.cache/imitate/models")).expanduser()


def resolve(spec: str | os.PathLike[str] | None) -> ModelSource:
    """Where the student comes from. Local paths are checked here; a Hub name is only tried when loading."""
    if spec is None:
        default = model_dir() / DEFAULT_GGUF
        return ModelSource("gguf", str(default.parent), default.name) if default.exists() else resolve(DEFAULT_HUB)
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise InputError(f"model {text}: a file must be a .gguf; otherwise give a model folder")
        return ModelSource("gguf", str(path.parent), path.name)
    if path.is_dir():
        if (path / "config.json").exists():
            return ModelSource("folder", str(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", str(path), ggufs[0].name)
        what = f"{len(ggufs)} .gguf files, name one" if ggufs else "no config.json and no .gguf file"
        raise InputError(f"model {text}: not a model folder ({what})")
    if _HUB_NAME.match(text) and not text.startswith((".", "/", "~")):
        return ModelSource("hub", text)
    raise InputError(f"model {text} does not exist", hint="give a model folder, a .gguf file or a Hub name")


def _load_failed(src: ModelSource, what: str, exc: Exception) -> InputError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    hint = "offline? Hub names need a network; give a local folder or GGUF" if src.kind == "hub" else None
    return InputError(f"cannot load {what} from {src}: {first[:200]}", hint=hint)


def load_tokenizer(src: ModelSource) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src.location, **src.kwargs())
    except _LOAD_ERRORS as exc:
        raise _load_failed(src, "tokenizer", exc) from exc
    return tok


def load_model(src: ModelSource, dtype: Any = None) -> Any:
    """A plain, trainable, saveable causal LM in `dtype` (default float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(src.location, dtype=dtype, **src.kwargs())
    except (*_LOAD_ERRORS, RuntimeError) as exc:
        raise _load_failed(src, "model", exc) from exc
    if src.gguf_file or getattr(model.config, "quantization_config", None) is not None:
        model = _plain_copy(model, dtype)
    model.config.use_cache = False
    return model


def _plain_copy(model: Any, dtype: Any) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    config = AutoConfig.for_model(**cfg)
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain.eval()


def device_and_dtype(choice: str) -> tuple[Any, Any]:
    """CUDA when present (bf16 where supported under `auto`), else CPU in fp32."""
    import torch

    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        bf16 = torch.cuda.is_bf16_supported()
    else:
        device, bf16 = torch.device("cpu"), False
    if choice == "bfloat16" or (choice == "auto" and bf16):
        return device, torch.bfloat16
    return device, torch.float32
