"""Fixtures over the real ``thaw serve`` of :mod:`thawtest`."""

from __future__ import annotations

from typing import Iterator

import pytest

import thaw
from thawtest import Server, get_server, shutdown_server


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
    s = client.create_session("shell")
    try:
        yield s
    finally:
        try:
            client.delete_session(s.id)
        except thaw.NotFoundError:
            pass


@pytest.fixture(scope="session")
def one_slot_key(server: Server) -> str:
    """A key that may hold one sandbox at a time, with its own shell template."""
    return server.key_with_shell("one-slot", 1)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # A server started by a skipif probe in a run that used no `server` fixture.
    shutdown_server()
