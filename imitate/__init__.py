"""imitate — imitation-data distillation: harvest teacher explanations, curate, LoRA-train a student, publish.

Importing the package is cheap: it exposes the data contract and errors, never torch or openai. The names below
load on first use (PEP 562), so the `imitate` command starts its Ctrl-C handling before pydantic is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imitate.errors import ConfigError, ImitateError, InputError, TeacherError, TrainError
    from imitate.records import GenerationParams, Message, Provenance, Query, Record, Request, Usage

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "GenerationParams",
    "ImitateError",
    "InputError",
    "Message",
    "Provenance",
    "Query",
    "Record",
    "Request",
    "TeacherError",
    "TrainError",
    "Usage",
    "__version__",
]

_HOME = {name: "imitate.errors" for name in ("ConfigError", "ImitateError", "InputError", "TeacherError", "TrainError")}
_HOME |= {name: "imitate.records" for name in __all__ if name not in _HOME and name != "__version__"}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'imitate' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
