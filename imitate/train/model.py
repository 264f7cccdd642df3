"""Load the student and its tokenizer from a local HF folder, a GGUF file, or (online) a Hub name.

A GGUF loads through transformers (`gguf_file=`), which de-quantises the weights to float but leaves the model
flagged as quantized, and transformers then refuses to train or save it. So a GGUF model is rebuilt once at load:
the same config without `quantization_config`, `from_config`, `load_state_dict` of the de-quantised weights.

The default student is SmolLM2-135M-Instruct: the GGUF in `$IMITATE_MODEL_DIR` (default
`~/.cache/imitate/models`, filled by `make install`), else its Hub name for users who are online. Any path that
is not a model is an InputError in one line.

GPU-only options (`train.quantization` = QLoRA through bitsandbytes, `train.attn_implementation=flash_attention_2`)
are optional extras (`pip install 'imitate[gpu]'`): `check_options` probes for CUDA and the packages without
importing them and fails in one TrainError line naming the field before any weights load; the packages are
imported (by transformers) only when asked for. Loading hides transformers' per-tensor progress bars (GGUF
de-quantisation, "Loading weights"), which would flood `imitate train`'s output, for the load only.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imitate.errors import InputError, TrainError

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"
# What a missing, truncated or foreign model file raises inside transformers / the GGUF reader.
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, EOFError, struct.error)
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
GPU_EXTRA = "pip install 'imitate[gpu]'"


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


def load_model(
    src: ModelSource, dtype: Any = None, *, quantization: str = "none", attn_implementation: str = "auto"
) -> Any:
    """A plain, trainable, saveable causal LM in `dtype` (default float32), or with `quantization` a 4/8-bit base
    on this rank's GPU prepared for QLoRA. `attn_implementation="auto"` keeps transformers' choice."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    check_options(src, quantization=quantization, attn_implementation=attn_implementation, dtype=dtype)
    attn = {} if attn_implementation == "auto" else {"attn_implementation": attn_implementation}
    kbit = _kbit_options(quantization) if quantization != "none" else {}
    try:
        with quiet_progress(gguf=src.gguf_file is not None):
            model = AutoModelForCausalLM.from_pretrained(src.location, dtype=dtype, **src.kwargs(), **attn, **kbit)
    except (*_LOAD_ERRORS, RuntimeError) as exc:
        raise _load_failed(src, "model", exc) from exc
    except ImportError as exc:  # an optional GPU package transformers found unusable (too old, broken build)
        raise TrainError(f"cannot load {src} with the GPU options: {str(exc).strip()[:200]}") from exc
    if kbit:
        from peft import prepare_model_for_kbit_training

        # Gradient checkpointing is a separate memory/speed trade that the recipe makes nowhere else.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    elif src.gguf_file or getattr(model.config, "quantization_config", None) is not None:
        model = _plain_copy(model, dtype, attn)
    model.config.use_cache = False
    return model


def peft_model(model: Any, config: Any) -> Any:
    """`peft.get_peft_model`, without the FutureWarning peft 0.21 triggers through a property transformers 5
    deprecates (noise in `imitate train` / `merge` output, nothing the user can act on)."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return get_peft_model(model, config)


def _plain_copy(model: Any, dtype: Any, attn: dict[str, str]) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    config = AutoConfig.for_model(**cfg)
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype, **attn)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain.eval()


def _kbit_options(quantization: str) -> dict[str, Any]:
    """from_pretrained options for a QLoRA base: NF4 with double quantisation and bf16 compute (or 8-bit)."""
    import torch
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    else:
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    # bitsandbytes quantises while placing the weights, so they load straight onto this rank's GPU.
    return {"quantization_config": bnb, "device_map": {"": _cuda_device()}}


# ---------------------------------------------------------------------------------------------- GPU-only options


@dataclass(frozen=True)
class Machine:
    """What the GPU-only options need, probed without importing the optional packages."""

    cuda: bool
    installed: frozenset[str]  # of the GPU extras' import names: "bitsandbytes", "flash_attn"

    @classmethod
    def here(cls) -> Machine:
        import torch

        names = ("bitsandbytes", "flash_attn")
        return cls(torch.cuda.is_available(), frozenset(n for n in names if importlib.util.find_spec(n) is not None))


def check_options(
    src: ModelSource,
    *,
    quantization: str = "none",
    attn_implementation: str = "auto",
    dtype: Any = None,
    machine: Machine | None = None,
) -> None:
    """Raise one TrainError naming the `train.*` field when a GPU-only option cannot work for this student on this
    machine. The defaults need nothing and probe nothing."""
    if quantization == "none" and attn_implementation != "flash_attention_2":
        return
    machine = machine or Machine.here()
    if quantization != "none":
        field = f"train.quantization={quantization}"
        if src.gguf_file:
            raise TrainError(
                f"{field} cannot quantise a GGUF student ({src}): transformers de-quantises GGUF to float",
                hint="give an HF model folder or Hub name as the student, or set train.quantization=none",
            )
        _need(
            field,
            machine,
            "bitsandbytes",
            "bitsandbytes",
            hint="or set train.quantization=none to train the full-precision base",
        )
    if attn_implementation == "flash_attention_2":
        field = "train.attn_implementation=flash_attention_2"
        _need(field, machine, "flash_attn", "flash-attn", hint="or use train.attn_implementation=auto (SDPA)")
        loads_in = str(dtype).removeprefix("torch.")
        if dtype is not None and loads_in not in ("bfloat16", "float16"):
            raise TrainError(
                f"{field} needs bfloat16 weights; the student would load in {loads_in}",
                hint="set train.dtype=bfloat16, or use train.attn_implementation=auto",
            )


def _need(field: str, machine: Machine, module: str, package: str, *, hint: str) -> None:
    if not machine.cuda:
        missing = "this machine has no CUDA GPU"
    elif module not in machine.installed:
        missing = f"{package} is not installed"
    else:
        return
    raise TrainError(f"{field} needs a CUDA GPU and {package} ({GPU_EXTRA}); {missing}", hint=hint)


@contextlib.contextmanager
def quiet_progress(*, gguf: bool = False) -> Iterator[None]:
    """Hide transformers' per-tensor progress bars for one load, then put them back. Hub download bars stay.

    "Loading weights" goes through transformers' tqdm hook. The GGUF bar ("Converting and de-quantizing GGUF
    tensors...") is a bare `tqdm.auto.tqdm` that no setting reaches, so that module's `tqdm` is swapped for a
    disabled one while the load runs (process-wide: loads are not meant to run in parallel threads).
    """
    from transformers.utils import logging as hf_logging

    hooked = hasattr(hf_logging, "set_tqdm_hook")  # transformers >= 5
    previous_hook = hf_logging.set_tqdm_hook(_no_bar) if hooked else None
    gguf_utils = bar = None
    if gguf:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils

        bar = getattr(gguf_utils, "tqdm", None)
        if bar is not None:
            gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
        if hooked:
            hf_logging.set_tqdm_hook(previous_hook)


def _no_bar(factory: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return factory(*args, **{**kwargs, "disable": True})


def _cuda_device() -> Any:
    import torch

    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def device_and_dtype(choice: str) -> tuple[Any, Any]:
    """CUDA when present (bf16 where supported under `auto`), else CPU in fp32."""
    import torch

    if torch.cuda.is_available():
        device = _cuda_device()
        bf16 = torch.cuda.is_bf16_supported()
    else:
        device, bf16 = torch.device("cpu"), False
    if choice in ("bfloat16", "bf16") or (choice == "auto" and bf16):
        return device, torch.bfloat16
    return device, torch.float32
