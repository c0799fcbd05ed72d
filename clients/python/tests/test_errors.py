"""Errors and retries against real servers: what is retried (connection refused, 429 and
503 after their ``Retry-After``) and what never is (caller errors)."""

from __future__ import annotations

import inspect
import socket
import threading
import time
from typing import Iterator, List

import pytest

import thaw
from thawtest import Server, free_port


def recorder() -> "tuple[List[thaw.RetryAttempt], thaw.Retry]":
    seen: List[thaw.RetryAttempt] = []
    return seen, thaw.Retry(attempts=6, backoff=0.05, on_retry=seen.append)


# ---- caller errors: never retried ----


def test_unknown_ids_are_caller_errors_and_never_retried(server: Server) -> None:
    seen, retry = recorder()
    with server.client(retry=retry) as c:
        with pytest.raises(thaw.NotFoundError) as e:
            c.invoke("no-such-template", {})
        err = e.value
        assert isinstance(err, thaw.CallerError) and isinstance(err, thaw.ThawError)
        assert (err.status, err.code, err.fault, err.retryable) == (404, "unknown_template", "caller", False)
        assert "no-such-template" in err.message and err.attempts == 1
        with pytest.raises(thaw.NotFoundError) as e:
            c.session_exec("ses-00000000000000000000000000000000", ["true"])
        assert e.value.code == "unknown_session"
    assert seen == []


def test_bad_bodies_name_the_field(client: thaw.Client) -> None:
    with pytest.raises(thaw.CallerError) as e:
        client.exec("shell", [])
    assert e.value.status == 400 and e.value.path == "argv" and e.value.code == "bad_request"
    with pytest.raises(thaw.CallerError) as e:
        client.exec("shell", ["true"], timeout_ms=3_600_000)
    assert e.value.status == 400 and e.value.path == "timeout_ms"
    with pytest.raises(thaw.CallerError) as e:
        client.exec("shell", ["true"], env={"A=B": "x"})
    assert e.value.status == 400 and e.value.path is not None and e.value.path.startswith("env")
    with pytest.raises(ValueError):
        client.create_session("shell", on_timeout="explode")


def test_a_command_that_cannot_start_is_the_callers_error(client: thaw.Client) -> None:
    with pytest.raises(thaw.CallerError) as e:
        client.exec("shell", ["/no/such/program"])
    assert e.value.status == 422 and e.value.code == "spawn_failed"


# ---- infrastructure errors: retried ----


def test_connection_refused_is_retried_then_raised() -> None:
    seen, _ = recorder()
    retry = thaw.Retry(attempts=3, backoff=0.05, on_retry=seen.append)
    port = free_port()  # nothing listens there
    with thaw.Client(f"http://127.0.0.1:{port}", "k", retry=retry) as c:
        with pytest.raises(thaw.ServerConnectionError) as e:
            c.sessions()
    err = e.value
    assert isinstance(err, thaw.InfrastructureError)
    assert err.code == "connect_failed" and err.retryable and err.fault == "infrastructure"
    assert err.status is None and err.attempts == 3
    assert [a.attempt for a in seen] == [1, 2]
    assert all(0.0 < a.delay <= 0.1 for a in seen)


def test_no_retry_means_one_attempt() -> None:
    with thaw.Client(f"http://127.0.0.1:{free_port()}", retry=thaw.NO_RETRY) as c:
        with pytest.raises(thaw.ServerConnectionError) as e:
            c.health()
    assert e.value.attempts == 1
    with pytest.raises(ValueError):
        thaw.Retry(attempts=0)


def test_429_carries_retry_after_and_is_retried_until_a_slot_frees(server: Server, one_slot_key: str) -> None:
    with server.client(one_slot_key) as owner:
        holder = owner.create_session("shell")
        try:
            with server.client(one_slot_key, retry=thaw.NO_RETRY) as c:
                with pytest.raises(thaw.RateLimitedError) as e:
                    c.create_session("shell")
            err = e.value
            assert isinstance(err, thaw.InfrastructureError)
            assert (err.status, err.code, err.fault, err.retryable) == (
                429,
                "too_many_sandboxes",
                "infrastructure",
                True,
            )
            assert err.retry_after == 1.0 and err.attempts == 1

            # With retries, the call waits (Retry-After) and succeeds once the slot frees.
            threading.Timer(1.5, lambda: owner.delete_session(holder.id)).start()
            seen, _ = recorder()
            retry = thaw.Retry(attempts=10, backoff=0.05, on_retry=seen.append)
            with server.client(one_slot_key, retry=retry) as c:
                start = time.monotonic()
                s = c.create_session("shell")
                took = time.monotonic() - start
                c.delete_session(s.id)
            assert s.state == "running"
            assert seen and all(a.delay == 1.0 and a.error.status == 429 for a in seen), seen
            assert took >= 1.0
        finally:
            try:
                owner.delete_session(holder.id)
            except thaw.NotFoundError:
                pass


def test_429_retries_give_up_after_the_attempts(server: Server, one_slot_key: str) -> None:
    with server.client(one_slot_key) as owner:
        holder = owner.create_session("shell")
        try:
            retry = thaw.Retry(attempts=2, max_retry_after=0.2)
            with server.client(one_slot_key, retry=retry) as c:
                start = time.monotonic()
                with pytest.raises(thaw.RateLimitedError) as e:
                    c.exec("shell", ["true"])
                # Retry-After (1 s) was cut to max_retry_after.
                assert time.monotonic() - start < 1.0
            assert e.value.attempts == 2
        finally:
            owner.delete_session(holder.id)


@pytest.fixture(scope="module")
def tiny_server() -> Iterator[Server]:
    """A server that admits one connection, and gives up on a stalled body after 2 s."""
    srv = Server("conns", ["--max-connections", "1", "--header-read-timeout", "2"])
    try:
        yield srv
    finally:
        srv.destroy()


def stall(srv: Server) -> socket.socket:
    """A connection inside a request: its head is sent, its body never comes."""
    head = (
        f"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\n"
        f"Authorization: Bearer {srv.key}\r\nContent-Type: application/json\r\n"
        "Content-Length: 100\r\n\r\n{"
    ).encode()
    for _ in range(50):
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.sendall(head)
        s.settimeout(0.5)
        try:
            answer = s.recv(4096)
        except socket.timeout:
            # No answer: the server is waiting for the body, the connection is inside a
            # request.
            s.settimeout(None)
            return s
        # Refused (the previous stalled connection was not closed yet on the server's
        # side): try again.
        s.close()
        assert answer == b"" or answer.startswith(b"HTTP/1.1 503"), answer
        time.sleep(0.2)
    raise AssertionError("could not get a connection inside a request")


def test_503_is_retried_after_retry_after(tiny_server: Server) -> None:
    s = stall(tiny_server)
    try:
        with tiny_server.client(retry=thaw.NO_RETRY) as c:
            with pytest.raises(thaw.InfrastructureError) as e:
                c.sessions()
        err = e.value
        assert err.retryable and err.fault == "infrastructure"
        assert err.status == 503, repr(err)
        assert err.code == "too_many_connections" and err.retry_after == 1.0
    finally:
        s.close()

    # The stalled request ends (408) after 2 s, freeing the connection: a retrying client
    # gets through.
    s = stall(tiny_server)
    try:
        seen, _ = recorder()
        retry = thaw.Retry(attempts=8, backoff=0.05, on_retry=seen.append)
        with tiny_server.client(retry=retry) as c:
            assert c.sessions() == []
        assert seen, "the first attempt should have been refused"
        assert any(a.error.status == 503 and a.delay == 1.0 for a in seen), seen
    finally:
        s.close()


# ---- classification without the server's `fault` ----


@pytest.mark.parametrize(
    "status,code,cls,retryable",
    [
        (400, "bad_request", thaw.CallerError, False),
        (404, "unknown_session", thaw.NotFoundError, False),
        (409, "session_busy", thaw.ConflictError, False),
        (403, "forbidden", thaw.ForbiddenError, False),
        (410, "killed", thaw.KilledError, False),
        (None, "killed", thaw.KilledError, False),
        (400, "bad_network", thaw.CallerError, False),
        (None, "bad_network", thaw.CallerError, False),
        (None, "session_lost", thaw.InfrastructureError, True),
        (422, "reward_not_a_number", thaw.TaskError, False),
        (429, "too_many_sandboxes", thaw.RateLimitedError, True),
        (500, "criu", thaw.InfrastructureError, False),
        (502, "output_flood", thaw.TaskError, False),
        (503, "missing_dependency", thaw.InfrastructureError, True),
        (504, "host_timeout", thaw.InfrastructureError, True),
        (None, "runtime", thaw.InfrastructureError, False),
        (None, "cancelled", thaw.CallerError, False),
    ],
)
def test_errors_without_fault_are_classified_by_code_then_status(
    status: "int | None", code: str, cls: type, retryable: bool
) -> None:
    from thaw._errors import error_from_detail

    err = error_from_detail({"code": code, "message": "m"}, status=status)
    assert type(err) is cls and err.retryable is retryable


def test_the_servers_fault_wins() -> None:
    from thaw._errors import error_from_detail

    err = error_from_detail(
        {"code": "restore_failed", "message": "m", "fault": "infrastructure", "retryable": True}, status=500
    )
    assert type(err) is thaw.InfrastructureError and err.retryable
    err = error_from_detail({"code": "x", "message": "m", "fault": "task", "retryable": True}, status=500)
    assert isinstance(err, thaw.TaskError)
    # A kill is the caller's (an operator's decision): a KilledError, never retried.
    err = error_from_detail({"code": "killed", "message": "m", "fault": "caller", "retryable": False}, status=410)
    assert type(err) is thaw.KilledError and not thaw.Retry().should_retry(err, 1)
    # A task fault is never retried, whatever `retryable` says.
    assert not thaw.Retry().should_retry(err, 1)


# ---- the two clients have the same methods ----


def test_async_client_mirrors_the_sync_client() -> None:
    def public(cls: type) -> "dict[str, inspect.Signature]":
        return {
            n: inspect.signature(f)
            for n, f in vars(cls).items()
            if callable(f) and not n.startswith("_") and n not in ("close", "aclose")
        }

    sync, asyn = public(thaw.Client), public(thaw.AsyncClient)
    assert sorted(sync) == sorted(asyn)
    for name, sig in sync.items():
        a = asyn[name]
        assert list(sig.parameters) == list(a.parameters), name
        assert [p.default for p in sig.parameters.values()] == [p.default for p in a.parameters.values()], name
        streams = name.endswith("_stream")
        assert inspect.iscoroutinefunction(getattr(thaw.AsyncClient, name)) is not streams, name
