"""Live sandboxes and kill (``thaw ps``, ``thaw kill`` over the API) against the real
server: what a key sees, what a kill ends, and what the calls it cut short get.

Kills only ever name a sandbox or session the test made, or run with a key of the test's
own: an admin key's kill-all without ``key`` would end every test's sandboxes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable, Dict, List

import pytest

import thaw
from thawtest import Server, lacks_routes, needs_routes  # noqa: F401

live = needs_routes("the live-sandbox routes", "/v1/sandboxes", "/v1/sandboxes/{id}/kill", "/v1/sandboxes/kill")

LONG = ["sh", "-c", "echo started; sleep 60"]


def in_thread(fn: Callable[[], Any]) -> Dict[str, Any]:
    """Runs ``fn`` in a thread; the returned dict gets ``value`` or ``error`` when it ends,
    and ``thread``."""
    out: Dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    out["thread"] = t
    t.start()
    return out


def finished(call: Dict[str, Any], within: float = 10.0) -> Any:
    call["thread"].join(within)
    assert not call["thread"].is_alive(), f"the call did not return within {within} s"
    return call.get("error", call.get("value"))


def wait_for_task(c: thaw.Client, argv: List[str], timeout: float = 30.0) -> thaw.LiveSandbox:
    """The live sandbox running ``argv``, once it shows."""
    deadline = time.monotonic() + timeout
    while True:
        for sb in c.sandboxes():
            if any(t.argv == argv for t in sb.tasks):
                return sb
        assert time.monotonic() < deadline, f"no sandbox runs {argv}: {c.sandboxes()}"
        time.sleep(0.1)


@live
def test_a_running_session_is_listed_with_its_figures(
    server: Server, client: thaw.Client, session: thaw.Session, admin_key: str, other_key: str
) -> None:
    mine = [sb for sb in client.sandboxes() if sb.session == session.id]
    assert len(mine) == 1, client.sandboxes()
    sb = mine[0]
    assert sb.id == session.sandbox and sb.id.startswith("sb-")
    assert (sb.template, sb.owner, sb.state, sb.tier) == ("shell", session.owner, "running", "container")
    assert sb.started_at is not None and sb.started_at >= session.created_at - 5
    assert sb.tasks == []
    # A container's figures come from its cgroups: known, never made up.
    f = sb.figures
    assert f.memory_bytes is not None and f.memory_bytes > 0 and f.pids is not None and f.pids >= 1
    assert f.cpu_seconds is not None and f.cpu_seconds >= 0
    # By its id or its session's.
    assert client.sandbox(sb.id).id == sb.id and client.sandbox(session.id).id == sb.id

    # A call in it shows as a task while it runs.
    call = in_thread(lambda: client.session_exec(session.id, ["sleep", "2"]))
    running = wait_for_task(client, ["sleep", "2"])
    assert running.id == sb.id
    (task,) = running.tasks
    assert task.kind == "exec" and task.since_ms >= session.created_at * 1000
    assert finished(call).exit_code == 0

    # Another key does not see it (nor can it name it); an admin key sees every key's.
    with server.client(other_key) as other:
        assert sb.id not in [x.id for x in other.sandboxes()]
        with pytest.raises(thaw.NotFoundError):
            other.sandbox(sb.id)
    with server.client(admin_key) as admin:
        assert sb.id in [x.id for x in admin.sandboxes()]

    # A paused session holds none.
    client.pause_session(session.id)
    assert session.id not in [x.session for x in client.sandboxes()]
    with pytest.raises(thaw.NotFoundError):
        client.sandbox(session.id)


@live
def test_killing_a_session_fails_its_call_with_410_and_ends_it(client: thaw.Client) -> None:
    s = client.create_session("shell")
    try:
        call = in_thread(lambda: client.session_exec(s.id, LONG))
        sb = wait_for_task(client, LONG)
        assert sb.session == s.id

        report = client.kill(s.id)
        assert (report.session, report.sandbox, report.was) == (s.id, sb.id, "running")
        assert report.template == "shell" and report.owner == s.owner
        assert report.killed_processes >= 1 and report.kill_ms > 0

        # The call cut short: a 410 of its own class, the caller's, and not retried.
        err = finished(call)
        assert isinstance(err, thaw.KilledError) and isinstance(err, thaw.CallerError), repr(err)
        assert (err.status, err.code, err.fault, err.retryable) == (410, "killed", "caller", False)
        assert "thaw kill" in err.message and err.attempts == 1

        # Gone from the list; the session ended for good.
        assert sb.id not in [x.id for x in client.sandboxes()]
        ended = client.session(s.id)
        assert ended.state == "stopped" and ended.sandbox is None
        assert ended.error is not None and "thaw kill" in ended.error

        # Whatever comes next is refused, naming the kill. (Which status depends on the
        # route today: 410 for pause and extend, 409 `session_conflict` for the calls.)
        with pytest.raises(thaw.KilledError) as e:
            client.pause_session(s.id)
        assert e.value.status == 410
        with pytest.raises((thaw.KilledError, thaw.ConflictError)) as ce:
            client.session_exec(s.id, ["true"])
        assert "thaw kill" in ce.value.message
        with pytest.raises((thaw.KilledError, thaw.ConflictError)):
            client.resume_session(s.id)

        # A kill of it again says so, and ends nothing.
        again = client.kill(s.id)
        assert (again.session, again.sandbox, again.was, again.killed_processes) == (s.id, None, "stopped", 0)
    finally:
        client.delete_session(s.id)


@live
def test_killing_a_paused_session_drops_it(client: thaw.Client) -> None:
    s = client.create_session("shell")
    try:
        client.pause_session(s.id)
        report = client.kill(s.id)
        assert (report.session, report.sandbox, report.was, report.killed_processes) == (s.id, None, "paused", 0)
        ended = client.session(s.id)
        assert ended.state == "stopped" and ended.snapshot is None
        with pytest.raises((thaw.KilledError, thaw.ConflictError)):
            client.resume_session(s.id)
    finally:
        client.delete_session(s.id)


@live
def test_killing_an_unknown_or_anothers_sandbox_is_not_found(
    server: Server, client: thaw.Client, session: thaw.Session, other_key: str
) -> None:
    for unknown in ("sb-0000000000000000", "ses-0000000000000000", "no such thing"):
        with pytest.raises(thaw.NotFoundError) as e:
            client.kill(unknown)
        assert (e.value.status, e.value.code, e.value.fault) == (404, "not_found", "caller")
    # Another key's session is unknown to it, as if it did not exist; it runs on.
    with server.client(other_key) as other:
        with pytest.raises(thaw.NotFoundError):
            other.kill(session.id)
        with pytest.raises(thaw.NotFoundError):
            other.kill(str(session.sandbox))
    assert client.session_exec(session.id, ["true"]).exit_code == 0


@live
def test_kill_all_ends_the_keys_calls_and_only_an_admin_names_another_key(
    server: Server, admin_key: str, other_key: str
) -> None:
    mine = server.key_with_shell("py-killall", 4)
    with server.client(mine) as c, server.client(other_key) as other, server.client(admin_key) as admin:
        # A key that is not an admin may not name another key.
        with pytest.raises(thaw.ForbiddenError) as e:
            c.kill_all(key="someone-else")
        err = e.value
        assert isinstance(err, thaw.CallerError)
        assert (err.status, err.code, err.path) == (403, "forbidden", "key")

        # An exec in a fresh sandbox of `mine`, and a session of `other` that must survive.
        call = in_thread(lambda: c.exec("shell", LONG))
        sb = wait_for_task(c, LONG)
        assert sb.session is None and sb.state == "running"
        keep = other.create_session("shell")
        try:
            killed = c.kill_all()
            assert [(k.sandbox, k.session, k.was) for k in killed] == [(sb.id, None, "running")]
            err = finished(call)
            assert isinstance(err, thaw.KilledError) and err.status == 410, repr(err)
            assert c.sandboxes() == [] and c.kill_all() == []
            assert other.session(keep.id).state == "running"

            # An admin's kill-all of one key (by its id) leaves every other key alone.
            call = in_thread(lambda: c.exec("shell", LONG))
            sb = wait_for_task(c, LONG)
            killed = admin.kill_all(key=sb.owner)
            assert [k.sandbox for k in killed] == [sb.id] and killed[0].owner == sb.owner
            err = finished(call)
            assert isinstance(err, thaw.KilledError) and "by API key" in err.message, repr(err)
            assert other.session(keep.id).state == "running"
        finally:
            other.delete_session(keep.id)


@live
@pytest.mark.asyncio
async def test_the_async_client_lists_and_kills(server: Server) -> None:
    async with server.async_client() as c:
        s = await c.create_session("shell")
        try:
            assert s.sandbox in [sb.id for sb in await c.sandboxes()]
            assert (await c.sandbox(s.id)).session == s.id
            call = asyncio.ensure_future(c.session_exec(s.id, LONG))
            deadline = time.monotonic() + 30
            while not any(t.argv == LONG for t in (await c.sandbox(s.id)).tasks):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            report = await c.kill(s.id)
            assert report.sandbox == s.sandbox
            with pytest.raises(thaw.KilledError):
                await asyncio.wait_for(call, 10)
            with pytest.raises(thaw.NotFoundError):
                await c.kill("sb-0000000000000000")
        finally:
            await c.delete_session(s.id)
