"""The audit log (``thaw audit ls``/``verify`` over the API) against the real server: the
records a session's life leaves, the filters, who sees what (a plain key its own records,
an admin key everyone's), and the chain's verification (admin keys only)."""

from __future__ import annotations

import datetime
import re
import time

import pytest

import thaw
from thawtest import Server, lacks_routes, needs_routes  # noqa: F401

audited = needs_routes("the audit routes", "/v1/audit", "/v1/audit/verify")

HEX64 = re.compile(r"^[0-9a-f]{64}$")


@audited
def test_a_sessions_life_is_in_the_audit_log(client: thaw.Client) -> None:
    started = time.time()
    s = client.create_session("shell")
    client.session_exec(s.id, ["sh", "-c", "exit 3"])
    client.delete_session(s.id)

    log = client.audit(session=s.id, order="oldest")
    assert not log.more
    assert [r.action for r in log.records] == ["session_create", "exec", "session_delete"], log
    for r in log.records:
        assert (r.session, r.template, r.actor) == (s.id, "shell", s.owner)
        assert started * 1000 - 5_000 <= r.ts <= time.time() * 1000 + 5_000
        assert HEX64.match(r.hash) and HEX64.match(r.prev)
    # In the order of their place in the whole log (other records may come between).
    seqs = [r.seq for r in log.records]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    exec_detail = log.records[1].detail
    assert isinstance(exec_detail, dict) and exec_detail.get("argv") == ["sh", "-c", "exit 3"], exec_detail
    assert log.records[0].sandbox == s.sandbox

    # Newest first by default; the filters narrow it.
    assert [r.seq for r in client.audit(session=s.id).records] == seqs[::-1]
    (only,) = client.audit(session=s.id, action="exec").records
    assert only.seq == seqs[1]
    one = client.audit(session=s.id, limit=1)
    assert [r.action for r in one.records] == ["session_delete"] and one.more
    assert client.audit(sandbox=str(s.sandbox), action="session_create").records[0].session == s.id
    assert client.audit(template="shell", session=s.id, key=s.owner).records[0].seq == seqs[-1]

    # Time bounds: unix seconds or datetimes; `until` takes in its whole second.
    now = datetime.datetime.now()
    assert len(client.audit(session=s.id, since=started - 60, until=now).records) == 3
    assert client.audit(session=s.id, until=started - 3600).records == []
    assert client.audit(session=s.id, since=now + datetime.timedelta(hours=1)).records == []


@audited
def test_a_kill_is_audited_with_who_did_it(client: thaw.Client) -> None:
    s = client.create_session("shell")
    try:
        client.kill(s.id)
    finally:
        client.delete_session(s.id)
    (rec,) = client.audit(session=s.id, action="kill").records
    assert rec.actor == s.owner and rec.sandbox == s.sandbox
    assert isinstance(rec.detail, dict) and "thaw kill" in str(rec.detail.get("reason")), rec.detail


@audited
def test_a_plain_key_sees_its_own_records_and_an_admin_everyones(
    server: Server, client: thaw.Client, admin_key: str, other_key: str
) -> None:
    with server.client(other_key) as other:
        theirs = other.create_session("shell")
        other.delete_session(theirs.id)
    mine = client.create_session("shell")
    client.delete_session(mine.id)

    # A plain key is held to its own records, without being told more.
    assert client.audit(session=theirs.id).records == []
    assert all(r.actor == mine.owner for r in client.audit(limit=500).records)
    assert client.audit(key=mine.owner, session=mine.id).records
    with pytest.raises(thaw.ForbiddenError) as e:
        client.audit(key=theirs.owner)
    err = e.value
    assert isinstance(err, thaw.CallerError)
    assert (err.status, err.code, err.fault, err.retryable) == (403, "forbidden", "caller", False)
    assert "admin" in err.message

    # An admin key sees every key's, or one key's.
    with server.client(admin_key) as admin:
        assert [r.action for r in admin.audit(session=theirs.id, order="oldest").records] == [
            "session_create",
            "session_delete",
        ]
        actors = {r.actor for r in admin.audit(limit=1000).records}
        assert {mine.owner, theirs.owner} <= actors
        assert {r.actor for r in admin.audit(key=theirs.owner).records} == {theirs.owner}


@audited
def test_verifying_the_chain_needs_an_admin_key(server: Server, client: thaw.Client, admin_key: str) -> None:
    with pytest.raises(thaw.ForbiddenError) as e:
        client.audit_verify()
    assert e.value.status == 403 and "admin" in e.value.message
    with server.client(admin_key) as admin:
        v = admin.audit_verify()
        assert v.ok and v.first_break is None and v.breaks == [], v
        assert v.records >= 1 and v.segments >= 1 and v.head is not None
        assert HEX64.match(v.head.hash) and str(v.head) == f"{v.head.seq}:{v.head.hash}"
        # A head kept from before: the log still holds it.
        # Chained: each record's `prev` is the hash of the record before it.
        whole = admin.audit(order="oldest", limit=10_000).records
        assert [r.seq for r in whole] == list(range(1, len(whole) + 1))
        assert all(b.prev == a.hash for a, b in zip(whole, whole[1:]))
        assert whole[0].prev == "0" * 64
        assert admin.audit_verify(v.head).ok
        assert admin.audit_verify(str(v.head)).ok
        with pytest.raises(thaw.CallerError) as ce:
            admin.audit_verify("12")
        assert (ce.value.status, ce.value.path) == (400, "head")


@audited
def test_bad_audit_parameters_name_themselves(client: thaw.Client) -> None:
    for kw, field in (({"order": "up"}, "order"), ({"action": "exce"}, "action"), ({"limit": 0}, "limit")):
        with pytest.raises(thaw.CallerError) as e:
            client.audit(**kw)  # type: ignore[arg-type]
        assert (e.value.status, e.value.code, e.value.path) == (400, "bad_request", field), e.value
    with pytest.raises(thaw.CallerError) as e:
        client.audit(action="exce")
    assert "exec" in e.value.message  # the known actions are listed
    with pytest.raises(TypeError):
        client.audit(since="yesterday")  # type: ignore[arg-type]


@audited
@pytest.mark.asyncio
async def test_the_async_client_reads_the_log(server: Server, admin_key: str) -> None:
    async with server.async_client() as c:
        s = await c.create_session("shell")
        await c.delete_session(s.id)
        log = await c.audit(session=s.id, order="oldest")
        assert [r.action for r in log.records] == ["session_create", "session_delete"]
        with pytest.raises(thaw.ForbiddenError):
            await c.audit_verify()
    async with server.async_client(admin_key) as admin:
        assert (await admin.audit_verify()).ok
