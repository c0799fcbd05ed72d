"""The blocking client. :class:`thaw.AsyncClient` has the same methods, awaited."""

from __future__ import annotations

import time
from typing import Any, Dict, Generator, List, Mapping, Optional, Sequence, TypeVar, Union

import httpx

from . import _core as core
from ._core import Call, PathLike, Retry, StreamCall, When
from ._errors import ThawError
from ._types import (
    AuditHead,
    AuditList,
    AuditVerify,
    BatchEvent,
    BatchResult,
    Checkpoint,
    ExecEvent,
    ExecOutput,
    ForkResult,
    Health,
    Invocation,
    InvokeEvent,
    KillReport,
    LiveSandbox,
    ResetResult,
    Reward,
    SecretGrant,
    Session,
    Template,
)

T = TypeVar("T")
E = TypeVar("E")

__all__ = ["Client"]


class Client:
    """A blocking client of ``thaw serve``.

    Args:
        base_url: e.g. ``http://127.0.0.1:7070``; default ``$THAW_SERVER``, else that.
        api_key: a ``thaw_...`` secret (``thaw keys create``); default ``$THAW_API_KEY``.
        retry: a :class:`thaw.Retry`, or a number of attempts (1: never retry).
        timeout: seconds, or an ``httpx.Timeout``. Default: 10 s to connect, no limit on
            the answer (bound a task with ``timeout_ms``, which the server enforces).
        http: an ``httpx.Client`` of your own (its base URL and headers are left alone;
            ``base_url`` and ``api_key`` still apply to each request).

    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
        *,
        retry: Union[Retry, int, None] = None,
        timeout: Union[float, httpx.Timeout, None] = None,
        http: Optional[httpx.Client] = None,
    ) -> None:
        self.base_url, key = core.resolve(base_url, api_key)
        self.retry = core.as_retry(retry)
        self._headers = core.headers(key)
        self._own_http = http is None
        self._http = http if http is not None else httpx.Client(timeout=core.timeout(timeout))

    def __repr__(self) -> str:
        # Never the key.
        return f"Client({self.base_url!r}, authenticated={'authorization' in self._headers})"

    def close(self) -> None:
        if self._own_http:
            self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- sending ----

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Request:
        headers: Dict[str, str] = dict(self._headers)
        headers.update(kw.pop("headers", None) or {})
        return self._http.build_request(method, self.base_url + path, headers=headers, **kw)

    def _send(self, call: Call[T]) -> T:
        attempt = 0
        while True:
            attempt += 1
            req = self._request(
                call.method, call.path, json=call.json, content=call.content, params=call.params, headers=call.headers
            )
            try:
                resp = self._http.send(req)
            except httpx.HTTPError as e:
                err: ThawError = core.error_from_transport(e, self.base_url, attempt)
                err.__cause__ = e
            else:
                if resp.is_success:
                    return call.parse(resp)
                err = core.error_from_response(resp, attempt)
            if not self.retry.should_retry(err, attempt):
                raise err
            time.sleep(self.retry.before_retry(err, attempt))

    def _stream(self, call: StreamCall[E]) -> Generator[E, None, None]:
        attempt = 0
        while True:
            attempt += 1
            req = self._request(
                call.method, call.path, json=call.json, params=call.params, headers=core.stream_headers()
            )
            try:
                resp = self._http.send(req, stream=True)
                if resp.is_success:
                    break
                try:
                    resp.read()
                finally:
                    resp.close()
                err: ThawError = core.error_from_response(resp, attempt)
            except httpx.HTTPError as e:
                err = core.error_from_transport(e, self.base_url, attempt)
                err.__cause__ = e
            if not self.retry.should_retry(err, attempt):
                raise err
            time.sleep(self.retry.before_retry(err, attempt))
        # Events have started: from here on nothing is retried (they would come twice).
        try:
            core.check_ndjson(resp)
            try:
                for line in resp.iter_lines():
                    ev = core.parse_line(line)
                    if ev is None:
                        continue
                    item, last = call.decode(ev)
                    yield item
                    if last:
                        return
            except httpx.HTTPError as e:
                raise core.stream_lost(e, self.base_url) from e
            raise core.stream_ended()
        finally:
            # Also when the caller stops early: closing the connection cancels the call
            # on the server (its task is killed, its sandbox freed).
            resp.close()

    # ---- service ----

    def health(self) -> Health:
        """``GET /healthz`` (needs no key)."""
        return self._send(core.health())

    def openapi(self) -> Dict[str, Any]:
        """The server's OpenAPI document (what routes and fields it knows)."""
        return self._send(core.openapi())

    def metrics(self) -> str:
        """Prometheus text exposition."""
        return self._send(core.metrics())

    # ---- templates ----

    def deploy(self, directory: PathLike) -> Template:
        """Publishes the template in ``directory`` (``template.toml`` at its root): packs it
        as a tar, uploads it, and returns once it is built, warmed and snapshotted."""
        return self._send(core.deploy_tar(core.pack_dir(directory)))

    def deploy_tar(self, tar: bytes) -> Template:
        """Publishes a template from a tar of its directory."""
        return self._send(core.deploy_tar(tar))

    def templates(self) -> List[Template]:
        return self._send(core.templates())

    def template(self, name: str) -> Template:
        return self._send(core.template(name))

    def delete_template(self, name: str) -> Template:
        """Removes a template and its snapshot; returns what was removed."""
        return self._send(core.delete_template(name))

    def invoke(
        self,
        template: str,
        payload: Any = None,
        *,
        env: Optional[Mapping[str, str]] = None,
        timeout_ms: Optional[int] = None,
        allow_out: Optional[Sequence[str]] = None,
        deny_out: Optional[Sequence[str]] = None,
        secrets: Optional[Sequence[SecretGrant]] = None,
    ) -> Invocation:
        """Runs the template's handler on ``payload`` (JSON) in a fresh sandbox.

        ``allow_out``, ``deny_out`` and ``secrets`` grant this call egress on top of the
        template's ``[network]`` (see :class:`SecretGrant`); a bad entry is a 400 naming it.
        """
        egress = core.grant(allow_out, deny_out, secrets)
        return self._send(core.invoke(template, payload, env, timeout_ms, egress))

    def invoke_stream(
        self,
        template: str,
        payload: Any = None,
        *,
        env: Optional[Mapping[str, str]] = None,
        timeout_ms: Optional[int] = None,
        allow_out: Optional[Sequence[str]] = None,
        deny_out: Optional[Sequence[str]] = None,
        secrets: Optional[Sequence[SecretGrant]] = None,
    ) -> Generator[InvokeEvent, None, None]:
        """Like :meth:`invoke`, yielding the handler's stderr as :class:`OutputEvent` s as
        it comes, then one :class:`ResultEvent`.

        ``allow_out``, ``deny_out`` and ``secrets`` grant this call egress on top of the
        template's ``[network]`` (see :class:`SecretGrant`); a bad entry is a 400 naming it.
        """
        egress = core.grant(allow_out, deny_out, secrets)
        return self._stream(core.invoke_stream(template, payload, env, timeout_ms, egress))

    def exec(
        self,
        template: str,
        argv: Sequence[str],
        *,
        stdin: Union[bytes, str, None] = None,
        env: Optional[Mapping[str, str]] = None,
        timeout_ms: Optional[int] = None,
        allow_out: Optional[Sequence[str]] = None,
        deny_out: Optional[Sequence[str]] = None,
        secrets: Optional[Sequence[SecretGrant]] = None,
    ) -> ExecOutput:
        """Runs ``argv`` (not through a shell) in a fresh sandbox and collects its output.

        ``allow_out``, ``deny_out`` and ``secrets`` grant this call egress on top of the
        template's ``[network]`` (see :class:`SecretGrant`).
        """
        egress = core.grant(allow_out, deny_out, secrets)
        return self._send(core.exec_(template, argv, stdin, env, timeout_ms, egress))

    def exec_stream(
        self,
        template: str,
        argv: Sequence[str],
        *,
        stdin: Union[bytes, str, None] = None,
        env: Optional[Mapping[str, str]] = None,
        timeout_ms: Optional[int] = None,
        allow_out: Optional[Sequence[str]] = None,
        deny_out: Optional[Sequence[str]] = None,
        secrets: Optional[Sequence[SecretGrant]] = None,
    ) -> Generator[ExecEvent, None, None]:
        """Like :meth:`exec`, yielding :class:`OutputEvent` s as output comes, then one
        :class:`ExitEvent`. Stopping early cancels the command.

        ``allow_out``, ``deny_out`` and ``secrets`` grant this call egress on top of the
        template's ``[network]`` (see :class:`SecretGrant`).
        """
        egress = core.grant(allow_out, deny_out, secrets)
        return self._stream(core.exec_stream(template, argv, stdin, env, timeout_ms, egress))

    # ---- sessions ----

    def create_session(
        self,
        template: str,
        *,
        idle_timeout_s: Optional[int] = None,
        max_lifetime_s: Optional[int] = None,
        on_timeout: Optional[str] = None,
        checkpointable: Optional[bool] = None,
        env: Optional[Mapping[str, str]] = None,
        allow_out: Optional[Sequence[str]] = None,
        deny_out: Optional[Sequence[str]] = None,
        secrets: Optional[Sequence[SecretGrant]] = None,
    ) -> Session:
        """Starts a session from the template's snapshot. ``on_timeout``: ``"pause"``
        (default) or ``"stop"``.

        ``checkpointable=False`` (the server's default is ``True``) makes a session that shares
        its memory copy-on-write with its snapshot: it restores and resets faster and holds a
        fraction of the memory, but cannot be paused, checkpointed or forked from its state
        (:class:`ConflictError`), and its timeouts stop it (with ``on_timeout="pause"`` it is
        refused, a 400 whose ``path`` is ``on_timeout``). For rollouts that are only reset.

        ``allow_out`` (domains such as ``example.com`` or ``*.example.com``, IPs and CIDRs, each
        with an optional ``:port``), ``deny_out`` (IPs and CIDRs kept out of a broader allowed
        range) and ``secrets`` (:class:`SecretGrant`) grant the session egress on top of the
        template's ``[network]``, for all its calls; its forks keep ``allow_out`` and
        ``deny_out`` (:meth:`fork` and :meth:`batch` take no grant of their own). A bad entry
        is refused with a 400 ``bad_network`` naming it.
        """
        egress = core.grant(allow_out, deny_out, secrets)
        return self._send(
            core.create_session(template, idle_timeout_s, max_lifetime_s, on_timeout, checkpointable, env, egress)
        )

    def sessions(self) -> List[Session]:
        """This key's sessions, in every state."""
        return self._send(core.sessions())

    def session(self, session_id: str) -> Session:
        return self._send(core.session(session_id))

    def delete_session(self, session_id: str) -> Session:
        """Ends a session in any state; returns it as it ended."""
        return self._send(core.delete_session(session_id))

    def pause_session(self, session_id: str) -> Session:
        """Checkpoints a running session and frees its processes and memory."""
        return self._send(core.pause_session(session_id))

    def resume_session(self, session_id: str) -> Session:
        """Restores a paused session exactly as it was paused."""
        return self._send(core.resume_session(session_id))

    def extend_session(
        self,
        session_id: str,
        *,
        idle_timeout_s: Optional[int] = None,
        max_lifetime_s: Optional[int] = None,
    ) -> Session:
        """Sets a new idle timeout and/or ends the session ``max_lifetime_s`` from now."""
        return self._send(core.extend_session(session_id, idle_timeout_s, max_lifetime_s))

    def session_exec(
        self,
        session_id: str,
        argv: Sequence[str],
        *,
        stdin: Union[bytes, str, None] = None,
        env: Optional[Mapping[str, str]] = None,
        timeout_ms: Optional[int] = None,
        allow_out: Optional[Sequence[str]] = None,
        deny_out: Optional[Sequence[str]] = None,
        secrets: Optional[Sequence[SecretGrant]] = None,
    ) -> ExecOutput:
        """Runs ``argv`` in a running session; its effects stay for the next calls.

        ``allow_out``, ``deny_out`` and ``secrets`` grant this call egress on top of the
        session's own grant.
        """
        egress = core.grant(allow_out, deny_out, secrets)
        return self._send(core.session_exec(session_id, argv, stdin, env, timeout_ms, egress))

    def session_exec_stream(
        self,
        session_id: str,
        argv: Sequence[str],
        *,
        stdin: Union[bytes, str, None] = None,
        env: Optional[Mapping[str, str]] = None,
        timeout_ms: Optional[int] = None,
        allow_out: Optional[Sequence[str]] = None,
        deny_out: Optional[Sequence[str]] = None,
        secrets: Optional[Sequence[SecretGrant]] = None,
    ) -> Generator[ExecEvent, None, None]:
        """Like :meth:`session_exec`, yielding output events as they come, then the exit.

        ``allow_out``, ``deny_out`` and ``secrets`` grant this call egress on top of the
        session's own grant.
        """
        egress = core.grant(allow_out, deny_out, secrets)
        return self._stream(core.session_exec_stream(session_id, argv, stdin, env, timeout_ms, egress))

    def session_invoke(
        self,
        session_id: str,
        payload: Any = None,
        *,
        env: Optional[Mapping[str, str]] = None,
        timeout_ms: Optional[int] = None,
        allow_out: Optional[Sequence[str]] = None,
        deny_out: Optional[Sequence[str]] = None,
        secrets: Optional[Sequence[SecretGrant]] = None,
    ) -> Invocation:
        """Runs the template's handler in a running session (a persistent handler keeps its
        memory between calls).

        ``allow_out``, ``deny_out`` and ``secrets`` grant this call egress on top of the
        session's own grant.
        """
        egress = core.grant(allow_out, deny_out, secrets)
        return self._send(core.session_invoke(session_id, payload, env, timeout_ms, egress))

    def session_invoke_stream(
        self,
        session_id: str,
        payload: Any = None,
        *,
        env: Optional[Mapping[str, str]] = None,
        timeout_ms: Optional[int] = None,
        allow_out: Optional[Sequence[str]] = None,
        deny_out: Optional[Sequence[str]] = None,
        secrets: Optional[Sequence[SecretGrant]] = None,
    ) -> Generator[InvokeEvent, None, None]:
        """Like :meth:`session_invoke`, yielding the handler's stderr as it comes, then one
        :class:`ResultEvent`."""
        egress = core.grant(allow_out, deny_out, secrets)
        return self._stream(core.session_invoke_stream(session_id, payload, env, timeout_ms, egress))

    def put_file(self, session_id: str, path: str, data: Union[bytes, str], *, mode: Optional[int] = None) -> None:
        """Writes ``data`` to the absolute ``path`` in a running session (created or
        replaced); ``mode`` is its permission bits, e.g. ``0o755`` (default ``0o644``)."""
        return self._send(core.put_file(session_id, path, data, mode))

    def get_file(self, session_id: str, path: str) -> bytes:
        """Reads the file at the absolute ``path`` in a running session."""
        return self._send(core.get_file(session_id, path))

    # ---- rollouts ----

    def create_checkpoint(self, session_id: str, name: str) -> Checkpoint:
        """Checkpoints a running session under ``name`` (it keeps running): a point to
        :meth:`reset` to, or to :meth:`fork` or :meth:`batch` from."""
        return self._send(core.create_checkpoint(session_id, name))

    def checkpoints(self, session_id: str) -> List[Checkpoint]:
        return self._send(core.checkpoints(session_id))

    def delete_checkpoint(self, session_id: str, name: str) -> Checkpoint:
        return self._send(core.delete_checkpoint(session_id, name))

    def reset(self, session_id: str, checkpoint: Optional[str] = None) -> ResetResult:
        """Puts the session back to its origin, or to one of its checkpoints. A call
        running in it is cancelled first."""
        return self._send(core.reset(session_id, checkpoint))

    def fork(
        self,
        session_id: str,
        n: int,
        *,
        checkpoint: Optional[str] = None,
        idle_timeout_s: Optional[int] = None,
        max_lifetime_s: Optional[int] = None,
        on_timeout: Optional[str] = None,
        checkpointable: Optional[bool] = None,
        env: Optional[Mapping[str, str]] = None,
    ) -> ForkResult:
        """``n`` new sessions restored from this one: from ``checkpoint``, or from a
        checkpoint taken now (the session keeps running). Each new session's origin is
        that point, so :meth:`reset` brings it back there. ``checkpointable=False``: the new
        sessions share their memory with that point's snapshot (see :meth:`create_session`)."""
        return self._send(
            core.fork(session_id, n, checkpoint, idle_timeout_s, max_lifetime_s, on_timeout, checkpointable, env)
        )

    def batch(
        self,
        n: int,
        *,
        template: Optional[str] = None,
        session: Optional[str] = None,
        checkpoint: Optional[str] = None,
        idle_timeout_s: Optional[int] = None,
        max_lifetime_s: Optional[int] = None,
        on_timeout: Optional[str] = None,
        checkpointable: Optional[bool] = None,
        env: Optional[Mapping[str, str]] = None,
    ) -> BatchResult:
        """``n`` sessions from a template, or from a session (running or paused), or from
        one of its checkpoints; returns when all are made. Failures are per session.
        ``checkpointable``: as in :meth:`create_session`."""
        return self._send(
            core.batch(
                n, template, session, checkpoint, idle_timeout_s, max_lifetime_s, on_timeout, checkpointable, env
            )
        )

    def batch_stream(
        self,
        n: int,
        *,
        template: Optional[str] = None,
        session: Optional[str] = None,
        checkpoint: Optional[str] = None,
        idle_timeout_s: Optional[int] = None,
        max_lifetime_s: Optional[int] = None,
        on_timeout: Optional[str] = None,
        checkpointable: Optional[bool] = None,
        env: Optional[Mapping[str, str]] = None,
    ) -> Generator[BatchEvent, None, None]:
        """Like :meth:`batch`, yielding each session as soon as it is ready
        (:class:`BatchSessionEvent`, :class:`BatchErrorEvent`), then a
        :class:`BatchDoneEvent`."""
        return self._stream(
            core.batch_stream(
                n, template, session, checkpoint, idle_timeout_s, max_lifetime_s, on_timeout, checkpointable, env
            )
        )

    def reward(
        self,
        session_id: str,
        *,
        timeout_ms: Optional[int] = None,
        env: Optional[Mapping[str, str]] = None,
    ) -> Reward:
        """Runs the template's reward command in the session; a non-number output raises
        :class:`TaskError` (``reward_not_a_number``)."""
        return self._send(core.reward(session_id, timeout_ms, env))

    # ---- live sandboxes and kill (`thaw ps`, `thaw kill`) ----

    def sandboxes(self) -> List[LiveSandbox]:
        """The live sandboxes of this key (an admin key's: of every key), each with what it
        uses now and the calls running in it: what ``thaw ps`` shows. A paused session
        holds no sandbox and is not listed (:meth:`sessions` lists it)."""
        return self._send(core.sandboxes())

    def sandbox(self, sandbox_id: str) -> LiveSandbox:
        """One live sandbox, by its id (``sb-...``) or the id of the session it runs."""
        return self._send(core.sandbox(sandbox_id))

    def kill(self, sandbox_id: str) -> KillReport:
        """Ends a live sandbox now, whatever it is doing (``thaw kill ID``): a fork bomb, a
        task ignoring SIGTERM. ``sandbox_id`` is a sandbox's id (``sb-...``) or a session's.

        The call running in it fails with :class:`KilledError` (410). A session ends for
        good, running or paused: it becomes ``stopped`` and only :meth:`delete_session` is
        left for it (a kill of it again reports it with ``sandbox`` ``None``). Another
        key's sandbox is unknown (:class:`NotFoundError`), unless this is an admin key.
        """
        return self._send(core.kill(sandbox_id))

    def kill_all(self, *, key: Optional[str] = None) -> List[KillReport]:
        """Ends every live sandbox of this key, running sessions included (``thaw kill
        --all``); paused sessions are left alone, as they run nothing.

        With an admin key this ends **every key's** sandboxes, or only those of the key
        whose id is ``key``. A key that is not an admin naming another key gets
        :class:`ForbiddenError`.
        """
        return self._send(core.kill_all(key))

    # ---- the audit log ----

    def audit(
        self,
        *,
        key: Optional[str] = None,
        template: Optional[str] = None,
        session: Optional[str] = None,
        sandbox: Optional[str] = None,
        action: Optional[str] = None,
        since: Optional[When] = None,
        until: Optional[When] = None,
        limit: Optional[int] = None,
        order: Optional[str] = None,
    ) -> AuditList:
        """Audit records, newest first: who did what, to which sandbox, when (``thaw audit
        ls``). Every filter given must match.

        A key that is not an admin sees its own records only; ``key`` (an API key's id, or
        ``local`` for the CLI's embedded engine) naming another key is then a
        :class:`ForbiddenError`. An admin key (``thaw keys create --admin``) sees every
        key's.

        Args:
            action: e.g. ``session_create``, ``exec``, ``file_put``, ``kill``,
                ``egress_refused``; an unknown one is a 400 listing the known ones.
            since: records at or after this time: unix seconds or a ``datetime``.
            until: records at or before this time (its whole second included).
            limit: at most this many records (the server's default 100, at most 10000);
                :attr:`AuditList.more` says whether more matched.
            order: ``"newest"`` (the default) or ``"oldest"`` first.
        """
        return self._send(core.audit(key, template, session, sandbox, action, since, until, limit, order))

    def audit_verify(self, head: Union[AuditHead, str, None] = None) -> AuditVerify:
        """Checks the whole audit log's hash chain and reports the first break by position
        (``thaw audit verify``); ``ok`` says whether it is intact. It reads every key's
        records, so it needs an admin key (else :class:`ForbiddenError`).

        ``head``: an :class:`AuditHead` (or its ``SEQ:HASH`` string) kept from an earlier
        verify; the log must still hold that record unchanged, which detects a rewrite of
        the whole chain.
        """
        return self._send(core.audit_verify(head))
