"""Running the fake teacher outside a caller's event loop: `FakeTeacherServer` (a background thread, or its own
process via `python -m imitate.teacher.fake`), `running_fake_teacher`, `serve` (a coroutine for `imitate
fake-teacher`), `serve_forever` and `main` (the argument parser of `python -m imitate.teacher.fake`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import types
import typing
import urllib.request
from collections.abc import Iterator
from typing import Any

from imitate.errors import ConfigError
from imitate.teacher.fake.answers import FakeConfig
from imitate.teacher.fake.app import FakeTeacher


class FakeTeacherServer:
    """A FakeTeacher for sync code: in a background thread (fast start, shares the GIL) or, with
    `process=True`, in its own Python process so a benchmark does not measure a server sharing its GIL."""

    def __init__(self, *, process: bool = False, host: str = "127.0.0.1", port: int = 0, **options: Any):
        self.options = dataclasses.asdict(FakeConfig(**options))  # fail here, in the caller, on bad options
        self.process, self.host, self.port = process, host, port
        self.base_url = ""
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never proxy

    @property
    def pid(self) -> int:
        return self._proc.pid if self._proc is not None else os.getpid()

    def start(self) -> str:
        self.base_url = self._start_process() if self.process else self._start_thread()
        return self.base_url

    def _start_process(self) -> str:
        here = os.path.abspath(__file__)  # <root>/imitate/teacher/fake/runner.py
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(here))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        cmd = [sys.executable, "-m", "imitate.teacher.fake", "--host", self.host, "--port", str(self.port)]
        self._proc = subprocess.Popen(
            [*cmd, "--config-json", json.dumps(self.options)], stdout=subprocess.PIPE, env=env
        )
        line = self._proc.stdout.readline().decode() if self._proc.stdout else ""
        if not line.startswith("fake teacher listening on "):
            self.stop()
            raise RuntimeError(f"the fake teacher process did not start: {line.strip() or 'no output'}")
        return line.split()[-1]

    def _start_thread(self) -> str:
        started, failed = threading.Event(), []
        fake = FakeTeacher(**self.options)

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            try:
                self.base_url = loop.run_until_complete(fake.start(self.host, self.port))
            except OSError as exc:
                failed.append(exc)
            finally:
                started.set()
            if not failed:
                loop.run_forever()
                loop.run_until_complete(fake.stop())
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-teacher", daemon=True)
        self._thread.start()
        started.wait()
        if failed or not self.base_url:
            raise failed[0] if failed else RuntimeError("the fake teacher thread did not start")
        return self.base_url

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None
        if self._thread is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeTeacherServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/fake/stats")

    def reset(self) -> dict[str, Any]:
        return self._call("POST", "/fake/reset")

    def _call(self, method: str, path: str) -> dict[str, Any]:
        request = urllib.request.Request(self.base_url.removesuffix("/v1") + path, method=method)
        with self._opener.open(request, timeout=10) as response:
            out = json.loads(response.read())
        out["by_status"] = {int(k): v for k, v in out["by_status"].items()}  # JSON keys are strings
        return out


@contextlib.contextmanager
def running_fake_teacher(*, process: bool = True, **options: Any) -> Iterator[str]:
    """`with running_fake_teacher(rpm=600) as base_url:` a fake teacher in its own process (or a thread)."""
    with FakeTeacherServer(process=process, **options) as server:
        yield server.base_url


async def serve(host: str = "127.0.0.1", port: int = 8089, **options: Any) -> None:
    """Serve until SIGTERM or cancellation; prints `fake teacher listening on <base_url>` once accepting.
    `options` are FakeConfig's fields (`latency` is read as `latency_s`: the name imitate/cli.py passes)."""
    if "latency" in options:
        options["latency_s"] = options.pop("latency")
    fake = FakeTeacher(**options)
    stopping = asyncio.Event()
    with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows loops
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    try:
        base_url = await fake.start(host, port)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    print(f"fake teacher listening on {base_url}", flush=True)
    try:
        await stopping.wait()
    finally:
        await fake.stop()


def serve_forever(host: str = "127.0.0.1", port: int = 8089, **options: Any) -> None:
    """`serve(host, port, **options)` in its own event loop until SIGINT/SIGTERM (for callers without one, like
    `main`)."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(host, port, **options))


def _parser(prog: str = "python -m imitate.teacher.fake") -> argparse.ArgumentParser:
    """One flag per FakeConfig field (`latency_s` -> `--latency-s`; a unique prefix such as `--latency` works):
    the options are defined once, for `python -m imitate.teacher.fake` and `imitate fake-teacher` alike."""
    parser = argparse.ArgumentParser(prog=prog, description=_description())
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    hints = typing.get_type_hints(FakeConfig)
    for field in dataclasses.fields(FakeConfig):
        flag, kind = "--" + field.name.replace("_", "-"), hints[field.name]
        if isinstance(kind, types.UnionType):  # `int | None` -> int
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        kwargs: dict[str, Any] = {"help": field.metadata.get("help"), "default": argparse.SUPPRESS}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:  # a dict (faults) is given as text and parsed by FakeConfig
            kwargs["type"] = str if typing.get_origin(kind) is dict else kind
        parser.add_argument(flag, **kwargs)
    parser.add_argument("--config-json", help="all FakeConfig fields as JSON (used by FakeTeacherServer)")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m imitate.teacher.fake") -> None:
    parser = _parser(prog)
    args = vars(parser.parse_args(argv))
    host, port, config_json = args.pop("host"), args.pop("port"), args.pop("config_json")
    try:
        config = FakeConfig(**(json.loads(config_json) if config_json else args))
    except ConfigError as exc:
        parser.exit(2, exc.one_line() + "\n")
    serve_forever(host, port, **dataclasses.asdict(config))


def _description() -> str:
    from imitate.teacher import fake  # the package docstring describes the server; this module only runs it

    return (fake.__doc__ or "").splitlines()[0]
