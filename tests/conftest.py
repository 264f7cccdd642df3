"""Shared fixtures. Tests never reach the network: the Hub is forced offline before anything imports it, and
teachers are the loopback fake (`imitate.teacher.fake`)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from collections.abc import Callable, Iterator

import pytest

from imitate.teacher.fake import FakeTeacherServer


@pytest.fixture(scope="session")
def _shared_fake_teacher() -> Iterator[FakeTeacherServer]:
    with FakeTeacherServer() as server:
        yield server


@pytest.fixture
def fake_teacher(_shared_fake_teacher: FakeTeacherServer) -> FakeTeacherServer:
    """The default fake teacher (no limits, no random faults) in a background thread, shared by the session;
    its stats, buckets and scripted-fault attempts are reset for each test. Has `.base_url` and `.stats()`."""
    _shared_fake_teacher.reset()
    return _shared_fake_teacher


@pytest.fixture
def make_fake_teacher() -> Iterator[Callable[..., FakeTeacherServer]]:
    """Factory: `make_fake_teacher(rpm=60, headers=False, process=False, ...)` -> a started FakeTeacherServer
    (thread by default, `process=True` for its own process), stopped when the test ends."""
    servers: list[FakeTeacherServer] = []

    def make(**options) -> FakeTeacherServer:
        server = FakeTeacherServer(**options)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
