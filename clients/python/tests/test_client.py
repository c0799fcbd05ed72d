"""The blocking client against a real ``thaw serve``: service, templates, invoke, exec
(buffered and streamed), sessions and files."""

from __future__ import annotations

import io
import os
import re
import shutil
import tarfile
import time
from pathlib import Path

import pytest

import thaw
from thawtest import REPO, SHELL_TEMPLATE, Server


# ---- service ----


def test_health_openapi_and_metrics(client: thaw.Client) -> None:
    assert client.health() == thaw.Health(status="ok")
    doc = client.openapi()
    for p in ("/v1/templates", "/v1/sessions/{id}/exec", "/v1/sessions/{id}/files"):
        assert p in doc["paths"], p
    assert "# TYPE" in client.metrics()


def test_health_needs_no_key_but_everything_else_does(server: Server) -> None:
    with thaw.Client(server.url, api_key="") as anon:
        assert anon.health().status == "ok"
        with pytest.raises(thaw.CallerError) as e:
            anon.templates()
    assert e.value.status == 401 and e.value.code == "unauthorized"
    assert e.value.fault == "caller" and not e.value.retryable
    with thaw.Client(server.url, api_key="thaw_nope_nope") as bad:
        with pytest.raises(thaw.CallerError) as e:
            bad.sessions()
    assert e.value.status == 401


def test_client_settings_come_from_the_environment(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THAW_SERVER", server.url)
    monkeypatch.setenv("THAW_API_KEY", server.key)
    with thaw.Client() as c:
        assert c.base_url == server.url
        assert any(t.name == "shell" for t in c.templates())
        assert server.key not in repr(c)
    with pytest.raises(ValueError):
        thaw.Client("127.0.0.1:7070")


# ---- templates ----


def test_template_list_and_get(client: thaw.Client) -> None:
    names = [t.name for t in client.templates()]
    assert "shell" in names
    t = client.template("shell")
    assert t.state == "ready" and t.snapshot
    assert t.spec["handler"]["command"] == ["/bin/sh", "/app/handler.sh"]
    assert t.spec["limits"]["timeout_s"] == 10
    with pytest.raises(thaw.NotFoundError) as e:
        client.template("no-such-template")
    assert e.value.code == "unknown_template" and e.value.status == 404


def test_deploy_a_directory_invoke_it_and_delete_it(client: thaw.Client, tmp_path: Path) -> None:
    d = tmp_path / "tpl"
    shutil.copytree(SHELL_TEMPLATE, d)
    toml = (d / "template.toml").read_text()
    toml = toml.replace('name = "shell"', 'name = "pyclient-deploy"').replace(
        'GREETING = "hello from thaw"', 'GREETING = "hello from the python client"'
    )
    (d / "template.toml").write_text(toml)
    # What packing must cope with: a symlink inside the directory and a hard link.
    os.symlink("handler.sh", d / "link-to-handler")
    os.link(d / "handler.sh", d / "hardlinked.sh")
    t = client.deploy(d)
    try:
        assert t.name == "pyclient-deploy" and t.state == "ready"
        assert client.template("pyclient-deploy").published_at == t.published_at
        inv = client.invoke("pyclient-deploy", {"n": 1})
        assert inv.ok and inv.result["greeting"] == "hello from the python client"
        assert inv.result["payload"] == {"n": 1}
    finally:
        removed = client.delete_template("pyclient-deploy")
    assert removed.name == "pyclient-deploy"
    with pytest.raises(thaw.NotFoundError):
        client.template("pyclient-deploy")
    assert "pyclient-deploy" not in [x.name for x in client.templates()]


def test_a_bad_template_is_the_callers_error(client: thaw.Client, tmp_path: Path) -> None:
    (tmp_path / "template.toml").write_text('name = "broken"\nno_such_key = 1\n')
    with pytest.raises(thaw.CallerError) as e:
        client.deploy(tmp_path)
    assert e.value.status == 400, e.value
    with pytest.raises(FileNotFoundError):
        client.deploy(tmp_path / "missing")


def test_pack_dir_keeps_relative_paths_and_symlinks(tmp_path: Path) -> None:
    (tmp_path / "template.toml").write_text("name = 'x'")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(tmp_path / "sub" / "run.sh", 0o755)
    os.symlink("/etc/passwd", tmp_path / "link")
    os.link(tmp_path / "template.toml", tmp_path / "hard")
    tar = tarfile.open(fileobj=io.BytesIO(thaw.pack_dir(tmp_path)))
    members = {m.name: m for m in tar.getmembers()}
    assert all(not n.startswith("/") for n in members), members
    assert members["./link"].issym() and members["./link"].linkname == "/etc/passwd"
    assert members["./sub/run.sh"].mode & 0o777 == 0o755
    assert members["./hard"].isreg()
    f = tar.extractfile(members["./hard"])
    assert f is not None and f.read() == b"name = 'x'"


# ---- invoke and exec ----


def test_invoke(client: thaw.Client) -> None:
    inv = client.invoke("shell", {"task": "say hi", "n": [1, 2]})
    assert inv.ok and inv.status == "ok" and inv.start == "restore"
    assert inv.result["payload"] == {"task": "say hi", "n": [1, 2]}
    assert inv.result["greeting"] == "hello from thaw"
    assert inv.result["sandbox"] == inv.sandbox_id
    assert inv.outcome is not None and inv.outcome.success
    assert inv.timings.total_ms > 0
    inv = client.invoke("shell", env={"GREETING": "overridden"})
    assert inv.result == {"greeting": "overridden", "sandbox": inv.sandbox_id, "payload": None}


def test_invoke_stream_ends_with_the_result(client: thaw.Client) -> None:
    events = list(client.invoke_stream("shell", {"x": 1}))
    assert isinstance(events[-1], thaw.ResultEvent)
    assert events[-1].invocation.result["payload"] == {"x": 1}
    assert all(isinstance(e, thaw.OutputEvent) for e in events[:-1])


def test_exec_buffered(client: thaw.Client) -> None:
    out = client.exec("shell", ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert out.stdout == b"out\n" and out.stderr == b"err\n"
    assert out.exit_code == 3 and out.result.outcome == thaw.Outcome("exited", code=3)
    assert out.result.start == "restore" and out.result.sandbox_id.startswith("sb-")
    # stdin, env, and bytes that are not UTF-8 both ways.
    out = client.exec("shell", ["sh", "-c", "cat; printf '\\377\\000'; echo $K"], stdin=b"\x01in\xfe", env={"K": "v"})
    assert out.stdout == b"\x01in\xfe\xff\x00v\n" and out.exit_code == 0
    assert client.exec("shell", ["cat"], stdin="text stdin").text == "text stdin"


def test_exec_timeout_is_an_outcome_not_an_error(client: thaw.Client) -> None:
    out = client.exec("shell", ["sleep", "5"], timeout_ms=500)
    assert out.result.outcome.kind == "timeout" and out.exit_code == 124


def test_exec_stream_yields_output_as_it_comes(client: thaw.Client) -> None:
    seen = []
    start = time.monotonic()
    for ev in client.exec_stream("shell", ["sh", "-c", "echo one; sleep 1; printf '\\377' >&2; echo two; exit 7"]):
        seen.append((time.monotonic() - start, ev))
    evs = [e for _, e in seen]
    assert isinstance(evs[-1], thaw.ExitEvent) and evs[-1].result.exit_code == 7
    outputs = [e for e in evs if isinstance(e, thaw.OutputEvent)]
    assert b"".join(e.data for e in outputs if e.stream == "stdout") == b"one\ntwo\n"
    assert b"".join(e.data for e in outputs if e.stream == "stderr") == b"\xff"
    # "one" came a second before the end: it was streamed, not buffered.
    first_at = next(t for t, e in seen if isinstance(e, thaw.OutputEvent))
    assert seen[-1][0] - first_at > 0.7, seen


def test_stopping_a_stream_early_cancels_the_command(server: Server, one_slot_key: str) -> None:
    # A key with one sandbox: if the abandoned command still ran, the next call would get 429.
    with server.client(one_slot_key, retry=thaw.NO_RETRY) as c:
        stream = c.exec_stream("shell", ["sh", "-c", "echo started; sleep 60"])
        first = next(stream)
        assert isinstance(first, thaw.OutputEvent) and first.data == b"started\n"
        stream.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                assert c.exec("shell", ["true"]).exit_code == 0
                break
            except thaw.RateLimitedError:
                assert time.monotonic() < deadline, "the abandoned exec still holds the key's sandbox"
                time.sleep(0.2)


def test_argv_must_be_a_list(client: thaw.Client) -> None:
    with pytest.raises(TypeError):
        client.exec("shell", "echo hi")


# ---- sessions ----


def test_session_lifecycle(client: thaw.Client) -> None:
    s = client.create_session("shell", idle_timeout_s=300, max_lifetime_s=3600, on_timeout="stop", env={"E": "1"})
    try:
        assert s.state == "running" and s.template == "shell" and s.id.startswith("ses-")
        assert s.idle_timeout_s == 300 and s.on_timeout == "stop" and s.env == {"E": "1"}
        assert s.id in [x.id for x in client.sessions()]
        assert client.session(s.id).state == "running"

        # State persists between calls.
        assert client.session_exec(s.id, ["sh", "-c", "echo $E > /tmp/state"]).exit_code == 0
        assert client.session_exec(s.id, ["cat", "/tmp/state"]).stdout == b"1\n"
        inv = client.session_invoke(s.id, {"in": "session"})
        assert inv.start == "session" and inv.result["payload"] == {"in": "session"}
        events = list(client.session_invoke_stream(s.id, {"again": True}))
        assert isinstance(events[-1], thaw.ResultEvent) and events[-1].invocation.result["payload"] == {"again": True}

        paused = client.pause_session(s.id)
        assert paused.state == "paused" and paused.pauses == 1 and paused.snapshot
        with pytest.raises(thaw.ConflictError) as ce:
            client.session_exec(s.id, ["true"])
        assert ce.value.status == 409 and ce.value.code == "session_conflict" and ce.value.fault == "caller"

        resumed = client.resume_session(s.id)
        assert resumed.state == "running"
        assert client.session_exec(s.id, ["cat", "/tmp/state"]).stdout == b"1\n"

        ext = client.extend_session(s.id, idle_timeout_s=1234)
        assert ext.idle_timeout_s == 1234
        ext = client.extend_session(s.id, max_lifetime_s=60)
        assert ext.expires_at <= int(time.time()) + 61
    finally:
        ended = client.delete_session(s.id)
    assert ended.id == s.id
    with pytest.raises(thaw.NotFoundError) as e:
        client.session(s.id)
    assert e.value.code == "unknown_session"


def test_session_exec_stream(client: thaw.Client, session: thaw.Session) -> None:
    evs = list(client.session_exec_stream(session.id, ["sh", "-c", "echo a; echo b >&2; echo x > /tmp/s"]))
    assert [(e.stream, e.data) for e in evs if isinstance(e, thaw.OutputEvent)] in (
        [("stdout", b"a\n"), ("stderr", b"b\n")],
        [("stderr", b"b\n"), ("stdout", b"a\n")],
    )
    last = evs[-1]
    assert isinstance(last, thaw.ExitEvent) and last.result.exit_code == 0 and last.result.start == "session"
    assert client.get_file(session.id, "/tmp/s") == b"x\n"


def test_files(client: thaw.Client, session: thaw.Session) -> None:
    blob = bytes(range(256)) * 300
    client.put_file(session.id, "/tmp/blob", blob)
    assert client.get_file(session.id, "/tmp/blob") == blob
    client.put_file(session.id, "/tmp/run.sh", "#!/bin/sh\necho ran\n", mode=0o755)
    out = client.session_exec(session.id, ["sh", "-c", "stat -c %a /tmp/run.sh; /tmp/run.sh"])
    assert out.stdout == b"755\nran\n"
    with pytest.raises(thaw.CallerError) as e:
        client.get_file(session.id, "relative/path")
    assert e.value.status == 400 and e.value.path == "path"
    with pytest.raises(thaw.NotFoundError):
        client.get_file(session.id, "/no/such/file")


# ---- the README's quick start, run for real ----


def test_readme_quick_start(
    server: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    readme = (REPO / "clients" / "python" / "README.md").read_text()
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if b.startswith("# quick start")]
    monkeypatch.setenv("THAW_SERVER", server.url)
    monkeypatch.setenv("THAW_API_KEY", server.key)
    monkeypatch.chdir(REPO)
    exec(compile(code, "README.md (quick start)", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "3 b'hi\\n' b'oops\\n'" in out, out
    assert "stdout 1" in out and "exit 0" in out and "42\n" in out and "b'41\\n'" in out, out
