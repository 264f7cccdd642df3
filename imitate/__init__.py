"""imitate — imitation-data distillation: harvest teacher explanations, curate, LoRA-train a student, publish.

Importing the package is cheap: it exposes the data contract and errors, never torch or openai.
"""

from imitate.errors import (
    ConfigError,
    ImitateError,
    InputError,
    TeacherError,
    TrainError,
)
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
