"""Loading and running `imitate serve`: the model through imitate/train (a folder, a GGUF, a Hub name, a merged
model, or base + LoRA adapter, merged in memory for speed), the engine, the app, and uvicorn.

    imitate serve [MODEL] [--adapter DIR] [--host 127.0.0.1] [--port 8000] [--api-key-env VAR]
                  [--max-batch 16] [--queue 16] [--max-model-len N] [--model-name NAME] [--threads N]
                  [--dtype auto|float32|bfloat16]

`ServerThread` runs the same server in a background thread on a free port (tests, benchmarks):

    with ServerThread(load_model_parts("model/dir"), max_batch=4) as server:
        openai.OpenAI(base_url=server.base_url, api_key="-").chat.completions.create(...)
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import uvicorn

from imitate.errors import ConfigError, InputError
from imitate.serve.app import Service, build_app
from imitate.serve.engine import Engine
from imitate.serve.scheduler import Scheduler
from imitate.train.chat import Student
from imitate.train.model import DEFAULT_GGUF, resolve
from imitate.train.tokenize import ChatFormat


@dataclass
class ModelParts:
    model: Any
    tokenizer: Any
    fmt: ChatFormat
    name: str


def load_model_parts(
    model: str | None, adapter: Path | None = None, name: str | None = None, dtype: str = "float32"
) -> ModelParts:
    """The model in eval mode (an adapter merged into it) in `dtype` (auto: `pick_dtype`), its tokenizer and chat
    format, and its served name."""
    student = Student(model, adapter)
    net = student.model
    if hasattr(net, "merge_and_unload"):  # base + LoRA: one set of weights, no adapter matmuls per step
        net = net.merge_and_unload()
    net = net.to(DTYPES[pick_dtype(dtype)]).eval()
    check_attention(net.config)
    return ModelParts(net, student.tokenizer, student.fmt, name or served_name(model, adapter))


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def pick_dtype(choice: str, cpu_flags: str | None = None) -> str:
    """`auto` is bfloat16 where the CPU multiplies bf16 natively (AVX512-BF16 or AMX: oneDNN's bf16 matmuls
    are then about twice as fast as fp32 here), else float32 (the dtype training uses on CPU)."""
    if choice != "auto":
        if choice not in DTYPES:
            raise ConfigError(f"--dtype {choice}: use auto, float32 or bfloat16")
        return choice
    flags = cpu_flags if cpu_flags is not None else _cpu_flags()
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(flags.split()) else "float32"


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line.split(":", 1)[1] for line in text.splitlines() if line.startswith("flags")), "")


def served_name(model: str | None, adapter: Path | None = None) -> str:
    """The `model` id clients send: the adapter's folder name, a GGUF's file stem, a folder's name, a Hub name."""
    if adapter is not None:
        return Path(adapter).expanduser().resolve().name
    if model is None:
        return Path(DEFAULT_GGUF).stem if resolve(None).kind == "gguf" else resolve(None).location
    path = Path(model).expanduser()
    if path.is_file():
        return path.stem
    return path.resolve().name if path.exists() else model


def check_attention(config: Any) -> None:
    from transformers.cache_utils import get_layer_types_and_kwargs

    types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    other = sorted(set(types) - {"full_attention"})
    if other:
        raise InputError(f"imitate serve supports full-attention models only; this one has {', '.join(other)} layers")


def context_limit(config: Any, requested: int | None) -> int:
    positions = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
    if requested is None:
        if positions is None:
            raise ConfigError("the model config has no max_position_embeddings: give --max-model-len")
        return int(positions)
    if requested < 2 or (positions is not None and requested > positions):
        raise ConfigError(f"--max-model-len {requested}: must be between 2 and the model's {positions} positions")
    return requested


def build_service(
    parts: ModelParts,
    *,
    max_batch: int = 16,
    queue: int = 16,
    max_model_len: int | None = None,
    api_key: str | None = None,
    threads: int | None = None,
) -> Service:
    if max_batch < 1 or queue < 0:
        raise ConfigError(f"--max-batch must be >= 1 and --queue >= 0 (got {max_batch}, {queue})")
    torch.set_num_threads(threads or default_threads())
    limit = context_limit(parts.model.config, max_model_len)
    stop_ids = {parts.fmt.eot_id} | ({parts.tokenizer.eos_token_id} - {None})
    engine = Engine(parts.model, parts.tokenizer, stop_ids, max_batch=max_batch, max_model_len=limit)
    scheduler = Scheduler(engine, queue=queue)
    return Service(scheduler, parts.tokenizer, parts.fmt, parts.name, limit, api_key)


def default_threads() -> int:
    """All cores but one: the event loop, the HTTP side and (often) the harvest client need a core, and torch's
    threads wait on each other when one of them is descheduled (on 2 busy cores, 2 threads made a decoding step
    3x slower than 1 did: bench/RESULTS.md, "Serve throughput")."""
    return max(1, (os.cpu_count() or 2) - 1)


def uvicorn_server(service: Service, host: str, port: int) -> uvicorn.Server:
    config = uvicorn.Config(
        build_app(service), host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=5
    )
    return uvicorn.Server(config)


def bound_port(server: uvicorn.Server) -> int:
    return server.servers[0].sockets[0].getsockname()[1]


async def serve(server: uvicorn.Server, announce: Callable[[int], Any]) -> None:
    """Run until stopped (Ctrl-C), calling `announce(port)` once the socket is listening."""

    async def when_started() -> None:
        while not server.started:
            await asyncio.sleep(0.05)
        announce(bound_port(server))

    watcher = asyncio.create_task(when_started())
    try:
        await server.serve()
    finally:
        watcher.cancel()


class ServerThread:
    """`imitate serve` in a background thread on 127.0.0.1 and a free port; `.base_url` ends in /v1."""

    def __init__(self, parts: ModelParts, **options: Any):
        self.service = build_service(parts, **options)
        self.server = uvicorn_server(self.service, "127.0.0.1", 0)
        self._thread = threading.Thread(target=self.server.run, name="imitate-serve", daemon=True)
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> ServerThread:
        self._thread.start()
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("imitate serve did not start")
            self._thread.join(0.02)
        self.port = bound_port(self.server)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(30)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def prepare(
    model: str | None,
    *,
    adapter: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    api_key_env: str | None = None,
    max_batch: int = 16,
    queue: int = 16,
    max_model_len: int | None = None,
    model_name: str | None = None,
    threads: int | None = None,
    dtype: str = "float32",
    say: Callable[[str], Any] = print,
) -> Callable[[], Any]:
    """`imitate serve`: load the model and build the server; returns the coroutine factory the CLI runs."""
    parts = load_model_parts(model, adapter, model_name, dtype)
    service = build_service(
        parts, max_batch=max_batch, queue=queue, max_model_len=max_model_len, api_key=api_key, threads=threads
    )
    server = uvicorn_server(service, host, port)
    auth = f"Bearer ${api_key_env}" if api_key_env else "none"

    def announce(bound: int) -> None:
        say(
            f"imitate serve: `{parts.name}` listening on http://{host}:{bound}/v1 (max batch {max_batch}, "
            f"queue {queue}, context {service.max_model_len} tokens, {parts.model.dtype}, "
            f"{torch.get_num_threads()} threads, auth {auth}); Ctrl-C stops"
        )

    return lambda: serve(server, announce)
