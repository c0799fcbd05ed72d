"""Fixtures over the real ``thaw serve`` of :mod:`thawtest`."""

from __future__ import annotations

from typing import Iterator

import pytest

import thaw
from thawtest import Server, get_server, made_session, shutdown_server


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    try:
        yield get_server()
    finally:
        shutdown_server()


@pytest.fixture
def client(server: Server) -> Iterator[thaw.Client]:
    with server.client() as c:
        yield c


@pytest.fixture
def session(client: thaw.Client) -> Iterator[thaw.Session]:
    """A running session of the shell template, deleted afterwards."""
    with made_session(client) as s:
        yield s


@pytest.fixture(scope="module")
def admin_key(server: Server, request: pytest.FixtureRequest) -> str:
    """An operator's key (``--admin``) of this test module's own."""
    return server.new_key(f"py-admin-{request.module.__name__}", 4, admin=True)


@pytest.fixture(scope="module")
def other_key(server: Server, request: pytest.FixtureRequest) -> str:
    """A second plain key of this test module's own, with its own shell template."""
    return server.key_with_shell(f"py-other-{request.module.__name__}", 4)


@pytest.fixture(scope="session")
def one_slot_key(server: Server) -> str:
    """A key that may hold one sandbox at a time, with its own shell template."""
    return server.key_with_shell("one-slot", 1)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # A server started by a skipif probe in a run that used no `server` fixture.
    shutdown_server()
