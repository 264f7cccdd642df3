"""`imitate serve`: a local OpenAI-compatible teacher with continuous batching.

    imitate serve [MODEL] [--adapter DIR] [--host 127.0.0.1] [--port 8000] [--api-key-env VAR]
                  [--max-batch 16] [--queue 16] [--max-model-len N] [--model-name NAME] [--threads N]
                  [--dtype auto|float32|bfloat16]

MODEL is what `imitate chat` takes (a model folder, a GGUF, a Hub name, a merged model, an adapter folder;
default: the local SmolLM2 student). Modules, from the wire inwards:

- `protocol.py`  the OpenAI request model, error bodies, responses, stream chunks, 429 headers, stop-string scan
- `app.py`       the starlette routes: chat completions (JSON or SSE), models, health, stats; auth; disconnects
- `scheduler.py` admission and the bounded queue (429), the engine task stepping in a worker thread
- `engine.py`    sequences, sampling, detokenisation, stops: one decoding step for the whole batch
- `batch.py`     the running batch's KV cache: left-padded rows in buffers grown in place
- `run.py`       loading (imitate/train's loaders), uvicorn, `ServerThread` for tests and benchmarks

The server needs the `serve` extra (starlette, uvicorn, sse-starlette) and the `train` extra (torch,
transformers); this package's `__init__` imports neither, so `imitate --help` stays light.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Coroutine
from typing import Any

from imitate.errors import ConfigError

EXTRAS = {"starlette": "serve", "uvicorn": "serve", "sse_starlette": "serve", "torch": "train", "transformers": "train"}


def require_extras() -> None:
    """One ConfigError line naming what is missing, instead of an ImportError traceback."""
    missing = [name for name in EXTRAS if importlib.util.find_spec(name) is None]
    if missing:
        extras = ",".join(sorted({EXTRAS[m] for m in missing}))
        raise ConfigError(
            f"imitate serve needs {', '.join(missing)}, which is not installed", hint=f"pip install 'imitate[{extras}]'"
        )


def serve_command(
    model: str | None, api_key_env: str | None = None, **options: Any
) -> Callable[[], Coroutine[Any, Any, None]]:
    """Load everything (errors surface here, before any socket is bound); returns the coroutine to run."""
    api_key = api_key_from_env(api_key_env)
    require_extras()
    from imitate.serve.run import prepare

    return prepare(model, api_key=api_key, api_key_env=api_key_env, **options)


def api_key_from_env(var: str | None) -> str | None:
    if var is None:
        return None
    key = os.environ.get(var, "")
    if not key:
        raise ConfigError(f"environment variable {var} (--api-key-env) is not set or empty")
    return key
