"""The asyncio client against the same real server: the same calls, awaited, and several
at once."""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, List

import pytest
import pytest_asyncio

import thaw
from thawtest import Server, free_port

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def aclient(server: Server) -> AsyncIterator[thaw.AsyncClient]:
    async with server.async_client() as c:
        yield c


async def test_service_and_templates(aclient: thaw.AsyncClient) -> None:
    assert (await aclient.health()).status == "ok"
    assert "/v1/sessions" in (await aclient.openapi())["paths"]
    assert "shell" in [t.name for t in await aclient.templates()]
    assert (await aclient.template("shell")).state == "ready"
    with pytest.raises(thaw.NotFoundError):
        await aclient.template("nope")


async def test_invoke_and_exec(aclient: thaw.AsyncClient) -> None:
    inv = await aclient.invoke("shell", {"a": 1})
    assert inv.ok and inv.result["payload"] == {"a": 1}
    out = await aclient.exec("shell", ["sh", "-c", "cat; echo err >&2; exit 2"], stdin=b"in")
    assert (out.stdout, out.stderr, out.exit_code) == (b"in", b"err\n", 2)
    events = [e async for e in aclient.invoke_stream("shell", {"b": 2})]
    assert isinstance(events[-1], thaw.ResultEvent) and events[-1].invocation.result["payload"] == {"b": 2}


async def test_exec_stream_is_an_async_iterator(aclient: thaw.AsyncClient) -> None:
    stamps: List[float] = []
    events: List[thaw.ExecEvent] = []
    start = time.monotonic()
    async for ev in aclient.exec_stream("shell", ["sh", "-c", "echo one; sleep 1; echo two; exit 4"]):
        stamps.append(time.monotonic() - start)
        events.append(ev)
    out = [e.data for e in events if isinstance(e, thaw.OutputEvent)]
    assert b"".join(out) == b"one\ntwo\n"
    last = events[-1]
    assert isinstance(last, thaw.ExitEvent) and last.result.exit_code == 4
    assert stamps[-1] - stamps[0] > 0.7


async def test_session_lifecycle(aclient: thaw.AsyncClient) -> None:
    s = await aclient.create_session("shell", idle_timeout_s=120)
    try:
        await aclient.put_file(s.id, "/tmp/x", b"\x00\x01async")
        assert await aclient.get_file(s.id, "/tmp/x") == b"\x00\x01async"
        out = await aclient.session_exec(s.id, ["sh", "-c", "wc -c < /tmp/x"])
        assert out.stdout.strip() == b"7"
        evs = [e async for e in aclient.session_exec_stream(s.id, ["echo", "streamed"])]
        assert isinstance(evs[-1], thaw.ExitEvent)
        assert (await aclient.session_invoke(s.id, {"k": 1})).result["payload"] == {"k": 1}
        assert (await aclient.pause_session(s.id)).state == "paused"
        with pytest.raises(thaw.ConflictError):
            await aclient.get_file(s.id, "/tmp/x")
        assert (await aclient.resume_session(s.id)).state == "running"
        assert await aclient.get_file(s.id, "/tmp/x") == b"\x00\x01async"
        assert (await aclient.extend_session(s.id, idle_timeout_s=99)).idle_timeout_s == 99
        assert s.id in [x.id for x in await aclient.sessions()]
    finally:
        await aclient.delete_session(s.id)
    with pytest.raises(thaw.NotFoundError):
        await aclient.session(s.id)


async def test_concurrent_sessions(aclient: thaw.AsyncClient) -> None:
    sessions = await asyncio.gather(*(aclient.create_session("shell") for _ in range(3)))
    try:
        assert len({s.id for s in sessions}) == 3
        outs = await asyncio.gather(
            *(
                aclient.session_exec(s.id, ["sh", "-c", f"echo {i} > /tmp/i; cat /tmp/i"])
                for i, s in enumerate(sessions)
            )
        )
        assert [o.stdout for o in outs] == [b"0\n", b"1\n", b"2\n"]
    finally:
        await asyncio.gather(*(aclient.delete_session(s.id) for s in sessions))


async def test_errors_and_retries(server: Server, one_slot_key: str) -> None:
    seen: List[thaw.RetryAttempt] = []
    retry = thaw.Retry(attempts=3, backoff=0.05, on_retry=seen.append)
    async with thaw.AsyncClient(f"http://127.0.0.1:{free_port()}", "k", retry=retry) as dead:
        with pytest.raises(thaw.ServerConnectionError) as e:
            await dead.sessions()
    assert e.value.attempts == 3 and len(seen) == 2

    seen.clear()
    async with server.async_client(retry=retry) as c:
        with pytest.raises(thaw.CallerError) as ce:
            await c.exec("shell", [])
        assert ce.value.path == "argv"
    assert seen == []

    async with server.async_client(one_slot_key) as owner:
        holder = await owner.create_session("shell")
        try:
            async with server.async_client(one_slot_key, retry=thaw.NO_RETRY) as c:
                with pytest.raises(thaw.RateLimitedError) as re_:
                    await c.exec("shell", ["true"])
                assert re_.value.retry_after == 1.0
                # Streams are refused before they start, with the same error.
                with pytest.raises(thaw.RateLimitedError):
                    async for _ in c.exec_stream("shell", ["true"]):
                        pass
        finally:
            await owner.delete_session(holder.id)
