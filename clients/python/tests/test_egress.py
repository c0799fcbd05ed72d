"""Egress grants (``allow_out``, ``deny_out``, ``secrets``) of sessions and calls, against
the real server: what it accepts, what it refuses and how the refusal reads, and that a
secret's value shows nowhere on the client's side or in the sandbox.

No test sends network traffic: grants name TEST-NET addresses (RFC 5737) and example.com
names that nothing here connects to, and the server checks a grant without resolving it.
"""

from __future__ import annotations

from typing import Iterator

import pytest

import thaw
from thaw import _core as core
from thawtest import Server, lacks_field, made_session, needs_field  # noqa: F401

egress = needs_field("egress grants", "SessionCreateBody", "allow_out")

# TEST-NET-2: documentation addresses, never routed.
GRANTED = "198.51.100.10:80"
SECRET_VALUE = "sk-live-0123456789abcdef"


@pytest.fixture
def granted(client: thaw.Client) -> Iterator[thaw.Session]:
    with made_session(client, allow_out=[GRANTED], deny_out=["198.51.100.0/30"]) as s:
        yield s


# ---- the request bodies (no server) ----


def test_egress_fields_are_sent_only_when_given() -> None:
    plain = core.create_session("shell", None, None, None, None, None, core.grant(None, None, None))
    assert plain.json == {"template": "shell"}
    g = thaw.SecretGrant("TOKEN", SECRET_VALUE, ["api.example.com"])
    call = core.session_exec("ses-x", ["true"], None, None, None, core.grant(["a.example.com:443"], [], [g]))
    assert call.json == {
        "argv": ["true"],
        "allow_out": ["a.example.com:443"],
        "deny_out": [],
        "secrets": [{"name": "TOKEN", "value": SECRET_VALUE, "hosts": ["api.example.com"]}],
    }
    assert "allow_out" not in core.invoke("shell", None, None, None).json


def test_a_secret_grants_repr_never_shows_its_value() -> None:
    g = thaw.SecretGrant("TOKEN", SECRET_VALUE, ["api.example.com", "*.example.org"])
    for text in (repr(g), str(g), f"{g}", repr([g]), repr({"secrets": (g,)})):
        assert SECRET_VALUE not in text, text
        assert "TOKEN" in text and "api.example.com" in text
    assert "<redacted>" in repr(g)
    assert g.value == SECRET_VALUE and g.hosts == ("api.example.com", "*.example.org")
    assert g == thaw.SecretGrant("TOKEN", SECRET_VALUE, ("api.example.com", "*.example.org"))


def test_grants_are_lists_and_secrets_are_secret_grants(client: thaw.Client) -> None:
    # Each a mistake that would otherwise reach the server in a confusing form (a string
    # sent one character per entry) or put a secret where a repr would show it.
    with pytest.raises(TypeError, match="allow_out"):
        client.create_session("shell", allow_out=GRANTED)
    with pytest.raises(TypeError, match="deny_out"):
        client.exec("shell", ["true"], deny_out="198.51.100.0/24")
    with pytest.raises(TypeError, match="hosts"):
        thaw.SecretGrant("TOKEN", SECRET_VALUE, "api.example.com")
    with pytest.raises(TypeError, match="SecretGrant") as e:
        client.invoke("shell", secrets=[{"name": "TOKEN", "value": SECRET_VALUE, "hosts": ["api.example.com"]}])
    assert SECRET_VALUE not in str(e.value)


# ---- against the server ----


@egress
def test_a_session_with_an_egress_grant_is_accepted(client: thaw.Client, granted: thaw.Session) -> None:
    assert granted.state == "running"
    assert granted.network == thaw.NetworkGrant(allow_out=[GRANTED], deny_out=["198.51.100.0/30"])
    assert client.session(granted.id).network.allow_out == [GRANTED]
    assert [s.network for s in client.sessions() if s.id == granted.id] == [granted.network]
    # It runs as any session does (nothing here uses the grant).
    assert client.session_exec(granted.id, ["sh", "-c", "echo ok"]).stdout == b"ok\n"
    # A call may add to the session's grant.
    out = client.session_exec(granted.id, ["true"], allow_out=["198.51.100.11:443"])
    assert out.exit_code == 0
    # Its forks keep its grant (the fork body takes none of its own).
    fork = client.fork(granted.id, 1)
    try:
        assert [f.network for f in fork.sessions] == [granted.network], fork
    finally:
        for f in fork.sessions:
            client.delete_session(f.id)
    # A session without a grant shows an empty one.
    plain = client.create_session("shell")
    try:
        assert plain.network == thaw.NetworkGrant()
    finally:
        client.delete_session(plain.id)


@egress
def test_calls_in_fresh_sandboxes_take_a_grant(client: thaw.Client) -> None:
    assert client.exec("shell", ["true"], allow_out=[GRANTED]).exit_code == 0
    # CIDRs with a port, and an address kept out of them (the README's example).
    out = client.exec("shell", ["true"], allow_out=["198.51.100.0/24:80"], deny_out=["198.51.100.7"])
    assert out.exit_code == 0
    assert client.invoke("shell", {"n": 1}, allow_out=[GRANTED]).result["payload"] == {"n": 1}
    events = list(client.exec_stream("shell", ["echo", "hi"], allow_out=[GRANTED]))
    assert isinstance(events[-1], thaw.ExitEvent) and events[-1].result.exit_code == 0


def assert_bad_network(err: thaw.ThawError, field: str, entry: str, path: str | None = None) -> None:
    """The server's refusal of a bad grant: a 400 of the caller's, never retried, whose
    ``path`` is the request field at fault (``field`` unless given) and whose message names
    ``field`` and the entry."""
    assert type(err) is thaw.CallerError, repr(err)
    assert (err.status, err.code, err.fault, err.retryable) == (400, "bad_network", "caller", False)
    assert field in err.message and entry in err.message, err.message
    assert err.path == (path or field), err.path
    assert err.attempts == 1


@egress
def test_a_malformed_entry_is_refused_naming_its_field(client: thaw.Client, granted: thaw.Session) -> None:
    before = {s.id for s in client.sessions()}
    with pytest.raises(thaw.CallerError) as e:
        client.create_session("shell", allow_out=["not a host::"])
    assert_bad_network(e.value, "allow_out", "not a host::")
    # deny_out takes addresses only: a domain there is refused, naming deny_out.
    with pytest.raises(thaw.CallerError) as e:
        client.create_session("shell", deny_out=["example.com"])
    assert_bad_network(e.value, "deny_out", "example.com")
    assert {s.id for s in client.sessions()} == before, "a refused grant made a session"

    # The same check on every route that takes a grant, before anything runs.
    with pytest.raises(thaw.CallerError) as e:
        client.exec("shell", ["true"], allow_out=["not a host::"])
    assert_bad_network(e.value, "allow_out", "not a host::")
    with pytest.raises(thaw.CallerError) as e:
        client.invoke("shell", allow_out=[GRANTED, "not a host::"])
    assert_bad_network(e.value, "allow_out", "not a host::")
    with pytest.raises(thaw.CallerError) as e:
        list(client.exec_stream("shell", ["true"], allow_out=["not a host::"]))
    assert_bad_network(e.value, "allow_out", "not a host::")
    with pytest.raises(thaw.CallerError) as e:
        client.session_exec(granted.id, ["true"], allow_out=["not a host::"])
    assert_bad_network(e.value, "allow_out", "not a host::")
    with pytest.raises(thaw.CallerError) as e:
        client.session_invoke(granted.id, allow_out=["not a host::"])
    assert_bad_network(e.value, "allow_out", "not a host::")


@egress
def test_bad_secrets_are_refused_without_their_value(client: thaw.Client) -> None:
    # A secret for a host the grant does not allow: it would go nowhere.
    g = thaw.SecretGrant("TOKEN", SECRET_VALUE, ["api.example.com"])
    with pytest.raises(thaw.CallerError) as e:
        client.create_session("shell", secrets=[g])
    assert_bad_network(e.value, "allow_out", "api.example.com", path="secrets")
    assert "TOKEN" in e.value.message
    # A name that cannot be an environment variable.
    bad = thaw.SecretGrant("bad name", SECRET_VALUE, ["api.example.com"])
    with pytest.raises(thaw.CallerError) as e:
        client.exec("shell", ["true"], allow_out=["api.example.com:443"], secrets=[bad])
    assert_bad_network(e.value, "secret", "bad name", path="secrets")
    assert SECRET_VALUE not in str(e.value) and SECRET_VALUE not in repr(e.value.body)


@egress
def test_a_sandbox_never_holds_a_secrets_value(client: thaw.Client) -> None:
    g = thaw.SecretGrant("API_TOKEN", SECRET_VALUE, ["api.example.com"])
    s = client.create_session("shell", allow_out=["api.example.com:443"], secrets=[g])
    try:
        assert s.network.allow_out == ["api.example.com:443"]
        # Neither the session's record nor the sandbox has it: the sandbox sees a
        # placeholder, which the server's proxy swaps for the value on the way out.
        assert SECRET_VALUE not in repr(s) and SECRET_VALUE not in repr(client.session(s.id))
        out = client.session_exec(s.id, ["sh", "-c", 'printf %s "$API_TOKEN"'])
        assert out.exit_code == 0 and out.stdout, out
        assert SECRET_VALUE.encode() not in out.stdout
        env = client.session_exec(s.id, ["sh", "-c", "cat /proc/1/environ /proc/self/environ; env"])
        assert SECRET_VALUE.encode() not in env.stdout
    finally:
        client.delete_session(s.id)


@egress
@pytest.mark.asyncio
async def test_the_async_client_takes_grants_too(server: Server) -> None:
    async with server.async_client() as c:
        s = await c.create_session("shell", allow_out=[GRANTED])
        try:
            assert s.network.allow_out == [GRANTED]
            out = await c.session_exec(s.id, ["true"], deny_out=["198.51.100.10"])
            assert out.exit_code == 0
            with pytest.raises(thaw.CallerError) as e:
                await c.session_invoke(s.id, allow_out=["not a host::"])
            assert_bad_network(e.value, "allow_out", "not a host::")
        finally:
            await c.delete_session(s.id)
        with pytest.raises(thaw.CallerError) as e:
            await c.exec("shell", ["true"], allow_out=["not a host::"])
        assert_bad_network(e.value, "allow_out", "not a host::")
