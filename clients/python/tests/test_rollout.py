"""The rollout routes (checkpoints, reset, fork, batch, reward) and the error fields that
come with them (`fault`, `retryable`), written against the contract of issue 15.

Each test is skipped only by a capability probe: when the server's /openapi.json lacks the
routes it needs ("server predates the rollout routes"), or the `checkpointable` field of a
session's body ("server predates checkpointable sessions"). Against a server that has them,
they run for real.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

import thaw
from thaw import _core as core
from thawtest import (  # noqa: F401
    REPO,
    SHELL_TEMPLATE,
    Server,
    lacks_field,
    lacks_routes,
    made_session,
    needs_field,
    rollout,
)

CHECKPOINTS = "/v1/sessions/{id}/checkpoints"
CHECKPOINT = "/v1/sessions/{id}/checkpoints/{name}"
RESET = "/v1/sessions/{id}/reset"
FORK = "/v1/sessions/{id}/fork"
BATCH = "/v1/sessions/batch"
REWARD = "/v1/sessions/{id}/reward"

README = REPO / "clients" / "python" / "README.md"

# Sessions that share their memory with their snapshot (`checkpointable: false`).
shared = needs_field("checkpointable sessions", "SessionCreateBody", "checkpointable")

REWARD_SECTION = """
[reward]
command = ["/bin/sh", "-c", "v=$(cat /tmp/score 2>/dev/null || echo 0); echo scoring; echo $v"]
timeout_s = 5
"""


def strip_reward(toml: str) -> str:
    """template.toml without its [reward] table, if it has one."""
    out: List[str] = []
    skipping = False
    for line in toml.splitlines():
        if line.strip().startswith("["):
            skipping = line.strip() == "[reward]"
        if not skipping:
            out.append(line)
    return "\n".join(out) + "\n"


def shell_variant(dest: Path, name: str, reward: str = "") -> Path:
    """templates/shell under another name, with the given [reward] section (or none)."""
    shutil.copytree(SHELL_TEMPLATE, dest)
    toml = strip_reward((dest / "template.toml").read_text())
    toml = re.sub(r'(?m)^name = "shell"$', f'name = "{name}"', toml)
    (dest / "template.toml").write_text(toml + reward)
    return dest


@pytest.fixture(scope="module")
def reward_templates(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, str]]:
    """`py-reward` (its reward is /tmp/score's last line) and `py-noreward` (none)."""
    root = tmp_path_factory.mktemp("reward-templates")
    with server.client() as c:
        c.deploy(shell_variant(root / "r", "py-reward", REWARD_SECTION))
        c.deploy(shell_variant(root / "n", "py-noreward"))
        yield {"reward": "py-reward", "none": "py-noreward"}
        for t in ("py-reward", "py-noreward"):
            c.delete_template(t)


def cleanup(c: thaw.Client, sessions: List[thaw.Session]) -> None:
    for s in sessions:
        try:
            c.delete_session(s.id)
        except thaw.NotFoundError:
            pass


# ---- checkpoints ----


@rollout(CHECKPOINTS, CHECKPOINT)
def test_checkpoints_create_list_delete(client: thaw.Client, session: thaw.Session) -> None:
    client.session_exec(session.id, ["sh", "-c", "echo a > /tmp/step"])
    cp = client.create_checkpoint(session.id, "mid")
    assert (cp.name, cp.session) == ("mid", session.id)
    assert cp.created_at >= int(time.time()) - 60 and cp.raw_bytes > 0
    assert [c.name for c in client.checkpoints(session.id)] == ["mid"]
    s = client.session(session.id)
    assert s.checkpoints == ["mid"] and s.state == "running"  # it goes on running

    with pytest.raises(thaw.ConflictError) as e:
        client.create_checkpoint(session.id, "mid")
    assert e.value.code == "checkpoint_exists"
    for bad in ("-leading-dash", "has space", "x" * 65, ""):
        with pytest.raises(thaw.CallerError) as ce:
            client.create_checkpoint(session.id, bad)
        assert ce.value.status == 400, bad

    client.create_checkpoint(session.id, "v1.2_b-3")
    assert [c.name for c in client.checkpoints(session.id)] == ["mid", "v1.2_b-3"]
    gone = client.delete_checkpoint(session.id, "mid")
    assert gone.name == "mid"
    assert [c.name for c in client.checkpoints(session.id)] == ["v1.2_b-3"]
    with pytest.raises(thaw.NotFoundError):
        client.delete_checkpoint(session.id, "mid")


@rollout(CHECKPOINTS)
def test_a_paused_session_cannot_be_checkpointed(client: thaw.Client, session: thaw.Session) -> None:
    client.pause_session(session.id)
    with pytest.raises(thaw.ConflictError) as e:
        client.create_checkpoint(session.id, "mid")
    assert e.value.code == "session_conflict"


# ---- reset ----


@rollout(CHECKPOINTS, RESET)
def test_reset_to_the_origin_and_to_a_checkpoint(client: thaw.Client, session: thaw.Session) -> None:
    assert session.origin is not None and session.origin.startswith("template"), session.origin
    assert session.resets == 0
    client.put_file(session.id, "/tmp/state", b"a")
    client.create_checkpoint(session.id, "mid")
    client.put_file(session.id, "/tmp/state", b"b")

    r = client.reset(session.id, "mid")
    assert r.from_ == "checkpoint mid" and r.cancelled_calls == 0 and r.reset_ms > 0
    assert r.session.id == session.id and r.session.state == "running" and r.session.resets == 1
    assert client.get_file(session.id, "/tmp/state") == b"a"

    r = client.reset(session.id)
    assert r.from_ == "origin" and r.session.resets == 2
    with pytest.raises(thaw.NotFoundError):
        client.get_file(session.id, "/tmp/state")
    # Checkpoints outlive a reset.
    assert client.session(session.id).checkpoints == ["mid"]

    with pytest.raises(thaw.NotFoundError) as e:
        client.reset(session.id, "nope")
    assert e.value.code == "unknown_checkpoint" and "mid" in e.value.message


@rollout(RESET)
def test_reset_cancels_a_running_exec(server: Server, client: thaw.Client, session: thaw.Session) -> None:
    outcome: Dict[str, object] = {}
    started = threading.Event()

    def run() -> None:
        with server.client(retry=thaw.NO_RETRY) as c:
            try:
                for ev in c.session_exec_stream(session.id, ["sh", "-c", "echo started; sleep 60"]):
                    if isinstance(ev, thaw.OutputEvent):
                        started.set()
                    else:
                        outcome["end"] = ev
            except thaw.ThawError as e:
                outcome["error"] = e
            finally:
                started.set()

    t = threading.Thread(target=run)
    t.start()
    assert started.wait(30)
    r = client.reset(session.id)
    t.join(30)
    assert not t.is_alive()
    assert r.cancelled_calls == 1, r
    err = outcome.get("error")
    assert isinstance(err, thaw.ThawError) and err.code == "cancelled", outcome
    assert client.session_exec(session.id, ["true"]).exit_code == 0


# ---- fork ----


@rollout(CHECKPOINTS, FORK, RESET)
def test_fork_from_now_and_from_a_checkpoint(client: thaw.Client, session: thaw.Session) -> None:
    client.put_file(session.id, "/tmp/state", b"before")
    made: List[thaw.Session] = []
    try:
        f = client.fork(session.id, 2)
        made += f.sessions
        assert f.errors == [] and len(f.sessions) == 2 and f.fork_ms > 0
        assert len({s.id for s in f.sessions} | {session.id}) == 3
        assert client.session(session.id).state == "running"  # the source goes on
        for s in f.sessions:
            assert s.state == "running" and s.template == session.template
            assert s.origin and session.id in s.origin, s.origin
            assert client.get_file(s.id, "/tmp/state") == b"before"
        # Forks are independent, and reset to the fork point.
        a, b = f.sessions
        client.put_file(a.id, "/tmp/state", b"changed")
        assert client.get_file(b.id, "/tmp/state") == b"before"
        client.reset(a.id)
        assert client.get_file(a.id, "/tmp/state") == b"before"

        client.create_checkpoint(session.id, "mid")
        client.put_file(session.id, "/tmp/state", b"after")
        f = client.fork(session.id, 1, checkpoint="mid", idle_timeout_s=120, env={"FORKED": "1"})
        made += f.sessions
        (c,) = f.sessions
        assert c.idle_timeout_s == 120
        assert client.get_file(c.id, "/tmp/state") == b"before"
        assert client.session_exec(c.id, ["sh", "-c", "echo $FORKED"]).stdout == b"1\n"

        with pytest.raises(thaw.NotFoundError):
            client.fork(session.id, 1, checkpoint="nope")
    finally:
        cleanup(client, made)


# ---- batch ----


@rollout(BATCH)
def test_batch_from_a_template(client: thaw.Client) -> None:
    b = client.batch(3, template="shell", idle_timeout_s=300)
    try:
        assert b.errors == [] and len(b.sessions) == 3 and b.batch_ms > 0
        assert len({s.id for s in b.sessions}) == 3
        for s in b.sessions:
            assert s.state == "running" and s.template == "shell" and s.idle_timeout_s == 300
        # Each is its own clone.
        ids = {client.session_exec(s.id, ["hostname"]).stdout for s in b.sessions}
        assert len(ids) == 3
    finally:
        cleanup(client, b.sessions)


@rollout(CHECKPOINTS, BATCH)
def test_batch_from_a_checkpoint_and_from_a_paused_session(client: thaw.Client, session: thaw.Session) -> None:
    client.put_file(session.id, "/tmp/state", b"mid")
    client.create_checkpoint(session.id, "mid")
    made: List[thaw.Session] = []
    try:
        b = client.batch(2, session=session.id, checkpoint="mid")
        made += b.sessions
        assert len(b.sessions) == 2 and b.errors == []
        for s in b.sessions:
            assert client.get_file(s.id, "/tmp/state") == b"mid"
        client.put_file(session.id, "/tmp/state", b"paused")
        client.pause_session(session.id)
        b = client.batch(1, session=session.id)
        made += b.sessions
        assert client.get_file(b.sessions[0].id, "/tmp/state") == b"paused"
    finally:
        cleanup(client, made)
    with pytest.raises(ValueError):
        client.batch(1, template="shell", session=session.id)
    with pytest.raises(ValueError):
        client.batch(1, template="shell", checkpoint="mid")


@rollout(BATCH)
def test_batch_stream_yields_each_session_as_it_is_ready(client: thaw.Client) -> None:
    events = []
    try:
        for ev in client.batch_stream(3, template="shell"):
            events.append((time.monotonic(), ev))
        kinds = [type(e).__name__ for _, e in events]
        assert kinds == ["BatchSessionEvent"] * 3 + ["BatchDoneEvent"], kinds
        done = events[-1][1]
        assert isinstance(done, thaw.BatchDoneEvent) and (done.created, done.failed) == (3, 0)
        got = [e for _, e in events if isinstance(e, thaw.BatchSessionEvent)]
        assert sorted(e.index for e in got) == [0, 1, 2]
        assert all(e.session.state == "running" for e in got)
    finally:
        cleanup(client, [e.session for _, e in events if isinstance(e, thaw.BatchSessionEvent)])


@rollout(BATCH, FORK)
def test_more_sessions_than_free_sandboxes_is_429_before_any_restore(server: Server, one_slot_key: str) -> None:
    with server.client(one_slot_key, retry=thaw.NO_RETRY) as c:
        before = c.sessions()
        with pytest.raises(thaw.RateLimitedError) as e:
            c.batch(5, template="shell")
        assert e.value.code == "too_many_sandboxes" and e.value.retryable and e.value.retry_after is not None
        with pytest.raises(thaw.RateLimitedError):
            list(c.batch_stream(5, template="shell"))
        s = c.create_session("shell")
        try:
            with pytest.raises(thaw.RateLimitedError):
                c.fork(s.id, 1)
        finally:
            c.delete_session(s.id)
        assert [x.id for x in c.sessions()] == [x.id for x in before]


# ---- sessions that are not checkpointable ----


def test_checkpointable_is_sent_only_when_given() -> None:
    assert core.create_session("shell", None, None, None, None, None).json == {"template": "shell"}
    assert core.create_session("shell", None, None, None, False, None).json == {
        "template": "shell",
        "checkpointable": False,
    }
    assert core.fork("ses-x", 2, None, None, None, None, None, None).json == {"n": 2}
    assert core.fork("ses-x", 2, "mid", None, None, "stop", False, None).json == {
        "n": 2,
        "checkpoint": "mid",
        "on_timeout": "stop",
        "checkpointable": False,
    }
    for make in (core.batch, core.batch_stream):
        assert make(3, "shell", None, None, None, None, None, None, None).json == {"n": 3, "template": "shell"}
        assert make(3, "shell", None, None, None, None, None, True, None).json == {
            "n": 3,
            "template": "shell",
            "checkpointable": True,
        }
    # A keyword of every method that makes sessions, in both clients; None: not sent.
    for cls in (thaw.Client, thaw.AsyncClient):
        for name in ("create_session", "fork", "batch", "batch_stream"):
            p = inspect.signature(getattr(cls, name)).parameters["checkpointable"]
            assert (p.kind, p.default) == (inspect.Parameter.KEYWORD_ONLY, None), (cls, name)


@shared
@rollout(CHECKPOINTS, FORK, RESET)
def test_a_session_that_is_not_checkpointable(client: thaw.Client) -> None:
    with made_session(client, checkpointable=False) as s:
        assert s.checkpointable is False and s.on_timeout == "stop"  # its timeouts stop it
        assert client.session(s.id).checkpointable is False
        assert client.session_exec(s.id, ["sh", "-c", "echo hi > /tmp/x; cat /tmp/x"]).stdout == b"hi\n"
        for refused in (
            lambda: client.pause_session(s.id),
            lambda: client.create_checkpoint(s.id, "mid"),
            lambda: client.fork(s.id, 1),  # from its state now
        ):
            with pytest.raises(thaw.ConflictError) as e:
                refused()
            err = e.value
            assert (err.status, err.code, err.fault, err.retryable) == (409, "conflict", "caller", False)
            assert "checkpointable: false" in err.message, err.message
        assert client.session(s.id).state == "running"
        # What such a session is for: a reset back to its origin.
        assert client.reset(s.id).session.checkpointable is False
        with pytest.raises(thaw.NotFoundError):
            client.get_file(s.id, "/tmp/x")


@shared
@rollout(FORK, BATCH)
def test_on_timeout_pause_needs_a_checkpointable_session(client: thaw.Client, session: thaw.Session) -> None:
    before = [x.id for x in client.sessions()]
    for refused in (
        lambda: client.create_session("shell", checkpointable=False, on_timeout="pause"),
        lambda: client.fork(session.id, 1, checkpointable=False, on_timeout="pause"),
        lambda: client.batch(1, template="shell", checkpointable=False, on_timeout="pause"),
    ):
        with pytest.raises(thaw.CallerError) as e:
            refused()
        err = e.value
        assert type(err) is thaw.CallerError, repr(err)
        assert (err.status, err.path, err.fault, err.retryable) == (400, "on_timeout", "caller", False)
        assert "checkpointable" in err.message, err.message
    assert [x.id for x in client.sessions()] == before


@shared
@rollout(FORK, BATCH)
def test_fork_and_batch_make_sessions_that_are_not_checkpointable(client: thaw.Client, session: thaw.Session) -> None:
    assert session.checkpointable is True  # the default
    made: List[thaw.Session] = []
    try:
        f = client.fork(session.id, 1, checkpointable=False)
        made += f.sessions
        b = client.batch(1, template="shell", checkpointable=False)
        made += b.sessions
        events = list(client.batch_stream(1, template="shell", checkpointable=False))
        made += [e.session for e in events if isinstance(e, thaw.BatchSessionEvent)]
        assert f.errors == [] and b.errors == [] and len(made) == 3, (f, b, events)
        for s in made:
            assert s.checkpointable is False and client.session(s.id).checkpointable is False
        assert client.session(session.id).checkpointable is True  # the source is left as it was
    finally:
        cleanup(client, made)


@shared
@rollout(FORK, BATCH)
@pytest.mark.asyncio
async def test_async_sessions_that_are_not_checkpointable(server: Server) -> None:
    async with server.async_client() as c:
        made: List[thaw.Session] = []
        try:
            src = await c.create_session("shell")
            made.append(src)
            assert src.checkpointable is True
            made.append(await c.create_session("shell", checkpointable=False))
            made += (await c.fork(src.id, 1, checkpointable=False)).sessions
            made += (await c.batch(1, template="shell", checkpointable=False)).sessions
            async for ev in c.batch_stream(1, template="shell", checkpointable=False):
                if isinstance(ev, thaw.BatchSessionEvent):
                    made.append(ev.session)
            assert len(made) == 5
            assert [s.checkpointable for s in made] == [True, False, False, False, False]
            with pytest.raises(thaw.ConflictError):
                await c.pause_session(made[1].id)
        finally:
            await asyncio.gather(*(c.delete_session(x.id) for x in made))


# ---- reward ----


@rollout(REWARD)
def test_reward(server: Server, client: thaw.Client, reward_templates: Dict[str, str]) -> None:
    s = client.create_session(reward_templates["reward"])
    try:
        assert client.reward(s.id).reward == 0.0
        client.put_file(s.id, "/tmp/score", b"0.75\n")
        r = client.reward(s.id)
        assert r.reward == 0.75 and r.exit_code == 0 and "scoring" in r.output and r.run_ms > 0
        client.put_file(s.id, "/tmp/score", b"-3e2")
        assert client.reward(s.id, timeout_ms=4000).reward == -300.0

        # Not a number: the task's fault, never retried.
        seen: List[thaw.RetryAttempt] = []
        client.put_file(s.id, "/tmp/score", b"forty-two\n")
        with server.client(retry=thaw.Retry(attempts=5, on_retry=seen.append)) as c:
            with pytest.raises(thaw.TaskError) as e:
                c.reward(s.id)
        err = e.value
        assert (err.status, err.code, err.fault, err.retryable) == (422, "reward_not_a_number", "task", False)
        assert "forty-two" in err.message and err.attempts == 1 and seen == []
        client.put_file(s.id, "/tmp/score", b"nan\n")
        with pytest.raises(thaw.TaskError):
            client.reward(s.id)
    finally:
        client.delete_session(s.id)

    s = client.create_session(reward_templates["none"])
    try:
        with pytest.raises(thaw.ConflictError) as ce:
            client.reward(s.id)
        assert ce.value.code == "no_reward_command" and ce.value.fault == "caller"
    finally:
        client.delete_session(s.id)


# ---- errors carry fault and retryable ----


@pytest.mark.skipif("lacks_field('ErrorDetail', 'fault')", reason="server predates the rollout routes")
def test_errors_carry_the_servers_fault_and_retryable(server: Server, client: thaw.Client, one_slot_key: str) -> None:
    with pytest.raises(thaw.NotFoundError) as e:
        client.session("ses-00000000000000000000000000000000")
    assert e.value.body is not None
    assert e.value.body["error"]["fault"] == "caller" and e.value.body["error"]["retryable"] is False
    with server.client(one_slot_key, retry=thaw.NO_RETRY) as c:
        s = c.create_session("shell")
        try:
            with pytest.raises(thaw.RateLimitedError) as re_:
                c.exec("shell", ["true"])
        finally:
            c.delete_session(s.id)
    body = re_.value.body
    assert body is not None and body["error"]["fault"] == "infrastructure" and body["error"]["retryable"] is True


# ---- the asyncio client ----


@rollout(CHECKPOINTS, RESET, BATCH)
@pytest.mark.asyncio
async def test_async_rollout_calls(server: Server) -> None:
    async with server.async_client() as c:
        got: List[thaw.Session] = []
        async for ev in c.batch_stream(2, template="shell"):
            if isinstance(ev, thaw.BatchSessionEvent):
                got.append(ev.session)
            elif isinstance(ev, thaw.BatchDoneEvent):
                assert ev.created == 2
        try:
            assert len(got) == 2
            s = got[0]
            await c.put_file(s.id, "/tmp/x", b"1")
            cp = await c.create_checkpoint(s.id, "one")
            assert [x.name for x in await c.checkpoints(s.id)] == [cp.name]
            await c.put_file(s.id, "/tmp/x", b"2")
            r = await c.reset(s.id, "one")
            assert r.from_ == "checkpoint one" and await c.get_file(s.id, "/tmp/x") == b"1"
            assert (await c.delete_checkpoint(s.id, "one")).name == "one"
            b = await c.batch(1, template="shell")
            got += b.sessions
        finally:
            await asyncio.gather(*(c.delete_session(x.id) for x in got))


# ---- the README's rollout loops, run for real ----


def readme_block(lang: str, first_line: str) -> str:
    blocks = re.findall(r"```" + lang + r"\n(.*?)```", README.read_text(), re.S)
    found = [b for b in blocks if b.startswith(first_line)]
    assert len(found) == 1, f"README has no single {lang} block starting with {first_line!r}"
    return str(found[0])


@pytest.fixture(scope="module")
def grader(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The README's `grader` template: templates/shell with the README's [reward]."""
    reward = readme_block("toml", "[reward]")
    d = shell_variant(tmp_path_factory.mktemp("grader") / "grader", "grader", "\n" + reward)
    with server.client() as c:
        c.deploy(d)
        yield "grader"
        c.delete_template("grader")


def run_readme_loop(server: Server, monkeypatch: pytest.MonkeyPatch, first_line: str, n: int) -> Dict[str, List[float]]:
    code = readme_block("python", first_line)
    assert "N, STEPS" in code and "= 16," in code
    code = code.replace("= 16,", f"= {n},", 1)  # fewer rollouts on a test machine
    monkeypatch.setenv("THAW_SERVER", server.url)
    monkeypatch.setenv("THAW_API_KEY", server.key)
    ns: Dict[str, object] = {"__name__": "readme"}
    exec(compile(code, f"README.md ({first_line})", "exec"), ns)
    results = ns["results"]
    assert isinstance(results, dict)
    return results


@rollout(BATCH, RESET, REWARD)
def test_readme_rollout_loop_a(server: Server, grader: str, monkeypatch: pytest.MonkeyPatch) -> None:
    results = run_readme_loop(server, monkeypatch, "# rollout loop (a)", 4)
    # Even rollouts answer right (1), odd ones one too many (0); every problem, after resets.
    assert results == {"6*7": [1.0, 0.0, 1.0, 0.0], "2+3": [1.0, 0.0, 1.0, 0.0]}
    with server.client() as c:
        assert c.sessions() == []


@rollout(CHECKPOINTS, FORK, RESET, REWARD)
def test_readme_rollout_loop_b(server: Server, grader: str, monkeypatch: pytest.MonkeyPatch) -> None:
    results = run_readme_loop(server, monkeypatch, "# rollout loop (b)", 3)
    # 3 forks x 2 rounds each (reset to the checkpoint between them).
    assert results == {"6*7": [1.0, 1.0, 0.0, 0.0, 1.0, 1.0], "2+3": [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]}
    with server.client() as c:
        assert c.sessions() == []
