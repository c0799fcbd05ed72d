"""What the sync and asyncio clients share: each route as a request description and a
parser of its answer, the retry policy, error decoding, stream decoding and template
packing. The clients only send and wait.
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import io
import json
import logging
import os
import random
import tarfile
import time
from dataclasses import dataclass
from typing import (
    Any,
    Callable,
    Dict,
    Generic,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)
from urllib.parse import quote

import httpx

from ._errors import (
    ProtocolError,
    ServerConnectionError,
    ThawError,
    error_from_detail,
)
from ._types import (
    AuditHead,
    AuditList,
    AuditVerify,
    BatchDoneEvent,
    BatchErrorEvent,
    BatchEvent,
    BatchResult,
    BatchSessionEvent,
    Checkpoint,
    ErrorInfo,
    ExecEvent,
    ExecOutput,
    ExecResult,
    ExitEvent,
    ForkResult,
    Health,
    Invocation,
    InvokeEvent,
    KillReport,
    LiveSandbox,
    OutputEvent,
    ResetResult,
    ResultEvent,
    Reward,
    SecretGrant,
    Session,
    Template,
)

__version__ = "0.1.0"

log = logging.getLogger("thaw")

T = TypeVar("T")
E = TypeVar("E")
Json = Dict[str, Any]
PathLike = Union[str, "os.PathLike[str]"]

NDJSON = "application/x-ndjson"
TAR = "application/x-tar"
DEFAULT_URL = "http://127.0.0.1:7070"


# ---- retries ----


@dataclass(frozen=True)
class RetryAttempt:
    """Handed to :attr:`Retry.on_retry` before each retry."""

    attempt: int
    """The attempt that failed (1 for the first)."""
    error: ThawError
    delay: float
    """Seconds slept before the next attempt."""


@dataclass(frozen=True)
class Retry:
    """When and how often a call is sent again.

    A call is retried only on an :class:`~thaw.InfrastructureError` that is ``retryable``:
    connection refused or reset, 429 and 503 (after their ``Retry-After``), 502, 504, and
    whatever the server marks ``retryable``. A task fault or a caller error never is.

    Attributes:
        attempts: tries in all, the first included (1: never retry).
        backoff: seconds before the first retry; doubled at each next one.
        max_backoff: the longest computed delay.
        max_retry_after: the longest ``Retry-After`` honoured (a longer one is cut to it).
        jitter: spread each computed delay randomly over [delay/2, delay].
        on_retry: called before each retry's sleep (logging, metrics).
    """

    attempts: int = 4
    backoff: float = 0.5
    max_backoff: float = 10.0
    max_retry_after: float = 60.0
    jitter: bool = True
    on_retry: Optional[Callable[[RetryAttempt], None]] = None

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("Retry.attempts must be at least 1 (1: never retry)")
        if self.backoff < 0 or self.max_backoff < 0 or self.max_retry_after < 0:
            raise ValueError("Retry delays must not be negative")

    def should_retry(self, err: ThawError, attempt: int) -> bool:
        return attempt < self.attempts and err.fault == "infrastructure" and err.retryable

    def delay(self, err: ThawError, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        if err.retry_after is not None:
            return min(max(err.retry_after, 0.0), self.max_retry_after)
        d: float = min(self.backoff * 2.0 ** (attempt - 1), self.max_backoff)
        if self.jitter:
            d = random.uniform(d / 2, d)
        return d

    def before_retry(self, err: ThawError, attempt: int) -> float:
        d = self.delay(err, attempt)
        log.info("thaw: attempt %d failed (%s: %s), retrying in %.2f s", attempt, err.code, err.message, d)
        if self.on_retry is not None:
            self.on_retry(RetryAttempt(attempt=attempt, error=err, delay=d))
        return d


NO_RETRY = Retry(attempts=1)


def as_retry(retry: Union[Retry, int, None]) -> Retry:
    if retry is None:
        return Retry()
    if isinstance(retry, int):
        return Retry(attempts=retry)
    return retry


# ---- requests ----


@dataclass
class Call(Generic[T]):
    """One route: what to send, and how to read a successful answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: Any = None
    content: Optional[bytes] = None
    params: Optional[Dict[str, str]] = None
    headers: Optional[Dict[str, str]] = None


@dataclass
class StreamCall(Generic[E]):
    """A route answering with an NDJSON stream; ``decode`` turns a line into an event and
    says whether it is the last one, or raises for an ``error`` line."""

    method: str
    path: str
    json: Any
    decode: Callable[[Json], Tuple[E, bool]]
    params: Optional[Dict[str, str]] = None


def seg(*parts: str) -> str:
    """``/``-joined, each part percent-encoded (an id with ``/`` stays one segment)."""
    return "/" + "/".join(quote(p, safe="") for p in parts)


def body(**fields: Any) -> Json:
    """A request body of the fields that are set: the server refuses unknown fields, and an
    absent optional field means its default."""
    return {k: v for k, v in fields.items() if v is not None}


def _json(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError as e:
        raise ProtocolError(
            f"expected a JSON answer from {resp.request.method} {resp.request.url.path}, got "
            f"{resp.headers.get('content-type', 'no content type')}: {e}",
            status=resp.status_code,
            code="bad_response",
        ) from None


def _obj(resp: httpx.Response) -> Json:
    v = _json(resp)
    if not isinstance(v, dict):
        raise ProtocolError(
            f"expected a JSON object from {resp.request.url.path}", status=resp.status_code, code="bad_response"
        )
    return v


def _p(cls: Any) -> Callable[[httpx.Response], Any]:
    return lambda r: cls.from_json(_obj(r))


def _none(resp: httpx.Response) -> None:
    return None


def _bytes(resp: httpx.Response) -> bytes:
    return resp.content


def _text(resp: httpx.Response) -> str:
    return resp.text


def _stdin(stdin: Union[bytes, str, None]) -> Optional[str]:
    if stdin is None:
        return None
    if isinstance(stdin, str):
        stdin = stdin.encode("utf-8")
    return base64.b64encode(stdin).decode("ascii")


def _argv(argv: Union[Sequence[str], str]) -> List[str]:
    if isinstance(argv, str):
        # A string is one program name, never a shell line: say so instead of guessing.
        raise TypeError("argv must be a list of strings, e.g. ['sh', '-c', 'echo hi'] (it is not run through a shell)")
    return [str(a) for a in argv]


def _env(env: Optional[Mapping[str, str]]) -> Optional[Dict[str, str]]:
    return None if env is None else {str(k): str(v) for k, v in env.items()}


def _entries(name: str, v: Optional[Sequence[str]]) -> Optional[List[str]]:
    if v is None:
        return None
    if isinstance(v, str):
        # A lone string would be sent one character per entry: say so instead.
        raise TypeError(f"{name} must be a list of entries, e.g. [{v!r}], not a string")
    return [str(e) for e in v]


def grant(
    allow_out: Optional[Sequence[str]],
    deny_out: Optional[Sequence[str]],
    secrets: Optional[Sequence[SecretGrant]],
) -> Json:
    """The egress fields of a body (``allow_out``, ``deny_out``, ``secrets``), each only
    when given: the server checks every entry and answers 400 ``bad_network`` naming it."""
    if secrets is not None:
        if isinstance(secrets, SecretGrant):
            raise TypeError("secrets must be a list of SecretGrant, e.g. [SecretGrant(...)]")
        for g in secrets:
            if not isinstance(g, SecretGrant):
                # A dict would show its value wherever it is printed; a SecretGrant never does.
                raise TypeError(
                    f"secrets takes thaw.SecretGrant(name, value, hosts) items, not {type(g).__name__}"
                )
    return body(
        allow_out=_entries("allow_out", allow_out),
        deny_out=_entries("deny_out", deny_out),
        secrets=None if secrets is None else [g.to_json() for g in secrets],
    )


NO_GRANT: Json = {}


# ---- error decoding ----


def retry_after(resp: httpx.Response) -> Optional[float]:
    v = resp.headers.get("retry-after")
    if v is None:
        return None
    v = v.strip()
    try:
        return max(float(v), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(v)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def error_from_response(resp: httpx.Response, attempts: int = 1) -> ThawError:
    """The exception for a non-2xx answer whose body has been read."""
    ra = retry_after(resp)
    try:
        doc = json.loads(resp.content)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        return error_from_detail(doc["error"], status=resp.status_code, retry_after=ra, attempts=attempts, body=doc)
    # Not thaw's error format (a proxy in between, or a wrong URL): say what came.
    text = resp.text.strip()[:200]
    msg = f"HTTP {resp.status_code} from {resp.request.url}" + (f": {text}" if text else "")
    return error_from_detail(
        {"code": f"http_{resp.status_code}", "message": msg},
        status=resp.status_code,
        retry_after=ra,
        attempts=attempts,
    )


def error_from_transport(e: httpx.HTTPError, base_url: str, attempts: int = 1) -> ThawError:
    """The exception for a request that got no answer."""
    if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout)):
        code, retryable = "connect_failed", True
        msg = (
            f"cannot reach the thaw server at {base_url}: {e}. Fix: start it with `thaw serve`, "
            "or point THAW_SERVER / base_url at it"
        )
    elif isinstance(e, httpx.PoolTimeout):
        code, retryable = "pool_timeout", True
        msg = f"no free connection to {base_url} in time: {e}"
    elif isinstance(e, httpx.TimeoutException):
        # The caller's own read or write timeout: the call may still be running.
        code, retryable = "timeout", False
        msg = f"the thaw server at {base_url} did not answer in time: {e}"
    elif isinstance(e, (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)):
        code, retryable = "connection_lost", True
        msg = f"the connection to the thaw server at {base_url} was lost before an answer: {e}"
    else:
        code, retryable = "transport", False
        msg = f"request to the thaw server at {base_url} failed: {e}"
    return ServerConnectionError(msg, code=code, fault="infrastructure", retryable=retryable, attempts=attempts)


def stream_lost(e: httpx.HTTPError, base_url: str) -> ThawError:
    """A stream that broke after it had started: not retried, the call's end is unknown."""
    return ServerConnectionError(
        f"the stream from the thaw server at {base_url} broke before its last event ({e}); "
        "the call's outcome is unknown",
        code="stream_lost",
        retryable=False,
    )


def check_ndjson(resp: httpx.Response) -> None:
    ct = resp.headers.get("content-type", "")
    if not ct.startswith(NDJSON):
        raise ProtocolError(
            f"expected an {NDJSON} stream from {resp.request.url.path}, got `{ct}`",
            status=resp.status_code,
            code="bad_response",
        )


def parse_line(line: str) -> Optional[Json]:
    if not line.strip():
        return None
    try:
        v = json.loads(line)
    except ValueError as e:
        raise ProtocolError(f"bad stream line ({e}): {line[:200]!r}", code="bad_response") from None
    if not isinstance(v, dict) or not isinstance(v.get("event"), str):
        raise ProtocolError(f"stream line without an `event`: {line[:200]!r}", code="bad_response")
    return v


def stream_ended() -> ProtocolError:
    return ProtocolError("the stream ended before its last event", code="stream_truncated")


# ---- stream decoders ----


def _chunk(ev: Json) -> bytes:
    data = ev.get("data")
    if isinstance(data, str):
        return data.encode("utf-8")
    b = ev.get("data_b64")
    if isinstance(b, str):
        try:
            return base64.b64decode(b.encode("ascii"), validate=True)
        except ValueError:
            raise ProtocolError("a stream chunk's data_b64 is not base64", code="bad_response") from None
    return b""


def _stream_error(ev: Json) -> ThawError:
    detail = ev.get("error")
    return error_from_detail(detail if isinstance(detail, dict) else {"code": "error", "message": str(detail)})


def decode_exec(ev: Json) -> Tuple[ExecEvent, bool]:
    kind = ev["event"]
    if kind in ("stdout", "stderr"):
        return OutputEvent(stream=kind, data=_chunk(ev)), False
    if kind == "exit":
        return ExitEvent(result=ExecResult.from_json(ev.get("result") or {})), True
    if kind == "error":
        raise _stream_error(ev)
    raise ProtocolError(f"unexpected event `{kind}` in an exec stream", code="bad_response")


def decode_invoke(ev: Json) -> Tuple[InvokeEvent, bool]:
    kind = ev["event"]
    if kind in ("stdout", "stderr"):
        return OutputEvent(stream=kind, data=_chunk(ev)), False
    if kind == "result":
        return ResultEvent(invocation=Invocation.from_json(ev.get("invocation") or {})), True
    if kind == "error":
        raise _stream_error(ev)
    raise ProtocolError(f"unexpected event `{kind}` in an invoke stream", code="bad_response")


def decode_batch(ev: Json) -> Tuple[BatchEvent, bool]:
    kind = ev["event"]
    if kind == "session":
        return BatchSessionEvent(
            index=int(ev.get("index", 0)), session=Session.from_json(ev.get("session") or {})
        ), False
    if kind == "error":
        if "index" in ev:
            return BatchErrorEvent(index=int(ev["index"]), error=ErrorInfo.from_json(ev.get("error") or {})), False
        # No index: the batch as a whole failed after it had started.
        raise _stream_error(ev)
    if kind == "aborted":
        # The batch as a whole failed (its fork point could not be taken); sessions
        # already yielded exist and are the caller's to delete.
        raise _stream_error(ev)
    if kind == "done":
        return (
            BatchDoneEvent(
                created=int(ev.get("created", 0)),
                failed=int(ev.get("failed", 0)),
                batch_ms=float(ev.get("batch_ms", 0.0)),
            ),
            True,
        )
    raise ProtocolError(f"unexpected event `{kind}` in a batch stream", code="bad_response")


# ---- template packing ----


def pack_dir(directory: PathLike) -> bytes:
    """A tar of a template directory as ``POST /v1/templates`` takes it: paths relative to
    the directory, symlinks stored as symlinks (never followed, so nothing outside the
    directory is sent by accident), permission bits kept, hard links stored as files."""
    root = os.fspath(directory)
    if not os.path.isfile(os.path.join(root, "template.toml")):
        raise FileNotFoundError(f"{root} is not a template directory: it has no template.toml")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:

        def add(full: str, arc: str) -> None:
            ti = tar.gettarinfo(full, arcname=arc)
            if ti is None:  # a socket: nothing a template can hold
                return
            if ti.islnk():
                # The server refuses hard links; the second name gets the content too.
                ti.type = tarfile.REGTYPE
                ti.linkname = ""
                ti.size = os.stat(full).st_size
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = ""
            ti.mtime = int(ti.mtime)
            if ti.isreg():
                with open(full, "rb") as f:
                    tar.addfile(ti, f)
            else:
                tar.addfile(ti)

        add(root, ".")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel = os.path.relpath(dirpath, root)
            for name in sorted(dirnames + filenames):
                full = os.path.join(dirpath, name)
                arc = "./" + (name if rel == "." else f"{rel}/{name}")
                add(full, arc)
            # os.walk does not descend into symlinked directories (followlinks=False).
    return buf.getvalue()


# ---- the routes ----


def health() -> Call[Health]:
    return Call("GET", "/healthz", _p(Health))


def openapi() -> Call[Json]:
    return Call("GET", "/openapi.json", _obj)


def metrics() -> Call[str]:
    return Call("GET", "/metrics", _text)


def deploy_tar(tar: bytes) -> Call[Template]:
    return Call("POST", "/v1/templates", _p(Template), content=tar, headers={"content-type": TAR})


def templates() -> Call[List[Template]]:
    return Call("GET", "/v1/templates", lambda r: [Template.from_json(t) for t in _obj(r).get("templates") or []])


def template(name: str) -> Call[Template]:
    return Call("GET", seg("v1", "templates", name), _p(Template))


def delete_template(name: str) -> Call[Template]:
    return Call("DELETE", seg("v1", "templates", name), _p(Template))


def _invoke_body(payload: Any, env: Optional[Mapping[str, str]], timeout_ms: Optional[int], egress: Json) -> Json:
    return {**body(payload=payload, env=_env(env), timeout_ms=timeout_ms), **egress}


def _exec_body(
    argv: Union[Sequence[str], str],
    stdin: Union[bytes, str, None],
    env: Optional[Mapping[str, str]],
    timeout_ms: Optional[int],
    egress: Json,
) -> Json:
    return {**body(argv=_argv(argv), stdin_b64=_stdin(stdin), env=_env(env), timeout_ms=timeout_ms), **egress}


def invoke(
    name: str, payload: Any, env: Optional[Mapping[str, str]], timeout_ms: Optional[int], egress: Json = NO_GRANT
) -> Call[Invocation]:
    return Call(
        "POST",
        seg("v1", "templates", name, "invoke"),
        _p(Invocation),
        json=_invoke_body(payload, env, timeout_ms, egress),
    )


def invoke_stream(
    name: str, payload: Any, env: Optional[Mapping[str, str]], timeout_ms: Optional[int], egress: Json = NO_GRANT
) -> StreamCall[InvokeEvent]:
    return StreamCall(
        "POST", seg("v1", "templates", name, "invoke"), _invoke_body(payload, env, timeout_ms, egress), decode_invoke
    )


def exec_(
    name: str,
    argv: Union[Sequence[str], str],
    stdin: Union[bytes, str, None],
    env: Optional[Mapping[str, str]],
    timeout_ms: Optional[int],
    egress: Json = NO_GRANT,
) -> Call[ExecOutput]:
    return Call(
        "POST",
        seg("v1", "templates", name, "exec"),
        _p(ExecOutput),
        json=_exec_body(argv, stdin, env, timeout_ms, egress),
    )


def exec_stream(
    name: str,
    argv: Union[Sequence[str], str],
    stdin: Union[bytes, str, None],
    env: Optional[Mapping[str, str]],
    timeout_ms: Optional[int],
    egress: Json = NO_GRANT,
) -> StreamCall[ExecEvent]:
    return StreamCall(
        "POST", seg("v1", "templates", name, "exec"), _exec_body(argv, stdin, env, timeout_ms, egress), decode_exec
    )


def _session_opts(
    idle_timeout_s: Optional[int],
    max_lifetime_s: Optional[int],
    on_timeout: Optional[str],
    checkpointable: Optional[bool],
    env: Optional[Mapping[str, str]],
) -> Json:
    if on_timeout is not None and on_timeout not in ("pause", "stop"):
        raise ValueError(f"on_timeout must be 'pause' or 'stop', not {on_timeout!r}")
    # `on_timeout="pause"` with `checkpointable=False` is left to the server: its 400 names
    # the field (`path` "on_timeout") and says why.
    return body(
        idle_timeout_s=idle_timeout_s,
        max_lifetime_s=max_lifetime_s,
        on_timeout=on_timeout,
        checkpointable=checkpointable,
        env=_env(env),
    )


def create_session(
    template: str,
    idle_timeout_s: Optional[int],
    max_lifetime_s: Optional[int],
    on_timeout: Optional[str],
    checkpointable: Optional[bool],
    env: Optional[Mapping[str, str]],
    egress: Json = NO_GRANT,
) -> Call[Session]:
    b = {
        "template": template,
        **_session_opts(idle_timeout_s, max_lifetime_s, on_timeout, checkpointable, env),
        **egress,
    }
    return Call("POST", "/v1/sessions", _p(Session), json=b)


def sessions() -> Call[List[Session]]:
    return Call("GET", "/v1/sessions", lambda r: [Session.from_json(s) for s in _obj(r).get("sessions") or []])


def session(sid: str) -> Call[Session]:
    return Call("GET", seg("v1", "sessions", sid), _p(Session))


def delete_session(sid: str) -> Call[Session]:
    return Call("DELETE", seg("v1", "sessions", sid), _p(Session))


def pause_session(sid: str) -> Call[Session]:
    return Call("POST", seg("v1", "sessions", sid, "pause"), _p(Session))


def resume_session(sid: str) -> Call[Session]:
    return Call("POST", seg("v1", "sessions", sid, "resume"), _p(Session))


def extend_session(sid: str, idle_timeout_s: Optional[int], max_lifetime_s: Optional[int]) -> Call[Session]:
    return Call(
        "POST",
        seg("v1", "sessions", sid, "extend"),
        _p(Session),
        json=body(idle_timeout_s=idle_timeout_s, max_lifetime_s=max_lifetime_s),
    )


def session_exec(
    sid: str,
    argv: Union[Sequence[str], str],
    stdin: Union[bytes, str, None],
    env: Optional[Mapping[str, str]],
    timeout_ms: Optional[int],
    egress: Json = NO_GRANT,
) -> Call[ExecOutput]:
    return Call(
        "POST",
        seg("v1", "sessions", sid, "exec"),
        _p(ExecOutput),
        json=_exec_body(argv, stdin, env, timeout_ms, egress),
    )


def session_exec_stream(
    sid: str,
    argv: Union[Sequence[str], str],
    stdin: Union[bytes, str, None],
    env: Optional[Mapping[str, str]],
    timeout_ms: Optional[int],
    egress: Json = NO_GRANT,
) -> StreamCall[ExecEvent]:
    return StreamCall(
        "POST", seg("v1", "sessions", sid, "exec"), _exec_body(argv, stdin, env, timeout_ms, egress), decode_exec
    )


def session_invoke(
    sid: str, payload: Any, env: Optional[Mapping[str, str]], timeout_ms: Optional[int], egress: Json = NO_GRANT
) -> Call[Invocation]:
    return Call(
        "POST",
        seg("v1", "sessions", sid, "invoke"),
        _p(Invocation),
        json=_invoke_body(payload, env, timeout_ms, egress),
    )


def session_invoke_stream(
    sid: str, payload: Any, env: Optional[Mapping[str, str]], timeout_ms: Optional[int], egress: Json = NO_GRANT
) -> StreamCall[InvokeEvent]:
    return StreamCall(
        "POST", seg("v1", "sessions", sid, "invoke"), _invoke_body(payload, env, timeout_ms, egress), decode_invoke
    )


def put_file(sid: str, path: str, data: Union[bytes, str], mode: Optional[int]) -> Call[None]:
    if isinstance(data, str):
        data = data.encode("utf-8")
    params = {"path": path}
    if mode is not None:
        params["mode"] = format(mode, "04o")
    return Call(
        "PUT",
        seg("v1", "sessions", sid, "files"),
        _none,
        content=bytes(data),
        params=params,
        headers={"content-type": "application/octet-stream"},
    )


def get_file(sid: str, path: str) -> Call[bytes]:
    return Call("GET", seg("v1", "sessions", sid, "files"), _bytes, params={"path": path})


# rollout routes (issue 15)


def create_checkpoint(sid: str, name: str) -> Call[Checkpoint]:
    return Call("POST", seg("v1", "sessions", sid, "checkpoints"), _p(Checkpoint), json={"name": name})


def checkpoints(sid: str) -> Call[List[Checkpoint]]:
    return Call(
        "GET",
        seg("v1", "sessions", sid, "checkpoints"),
        lambda r: [Checkpoint.from_json(c) for c in _obj(r).get("checkpoints") or []],
    )


def delete_checkpoint(sid: str, name: str) -> Call[Checkpoint]:
    return Call("DELETE", seg("v1", "sessions", sid, "checkpoints", name), _p(Checkpoint))


def reset(sid: str, checkpoint: Optional[str]) -> Call[ResetResult]:
    return Call("POST", seg("v1", "sessions", sid, "reset"), _p(ResetResult), json=body(checkpoint=checkpoint))


def fork(
    sid: str,
    n: int,
    checkpoint: Optional[str],
    idle_timeout_s: Optional[int],
    max_lifetime_s: Optional[int],
    on_timeout: Optional[str],
    checkpointable: Optional[bool],
    env: Optional[Mapping[str, str]],
) -> Call[ForkResult]:
    b = {
        "n": n,
        **body(checkpoint=checkpoint),
        **_session_opts(idle_timeout_s, max_lifetime_s, on_timeout, checkpointable, env),
    }
    return Call("POST", seg("v1", "sessions", sid, "fork"), _p(ForkResult), json=b)


def _batch_body(
    n: int,
    template: Optional[str],
    session: Optional[str],
    checkpoint: Optional[str],
    idle_timeout_s: Optional[int],
    max_lifetime_s: Optional[int],
    on_timeout: Optional[str],
    checkpointable: Optional[bool],
    env: Optional[Mapping[str, str]],
) -> Json:
    if (template is None) == (session is None):
        raise ValueError("a batch needs exactly one source: template=... or session=...")
    if checkpoint is not None and session is None:
        raise ValueError("checkpoint= goes with session= (a checkpoint belongs to a session)")
    return {
        "n": n,
        **body(template=template, session=session, checkpoint=checkpoint),
        **_session_opts(idle_timeout_s, max_lifetime_s, on_timeout, checkpointable, env),
    }


def batch(
    n: int,
    template: Optional[str],
    session: Optional[str],
    checkpoint: Optional[str],
    idle_timeout_s: Optional[int],
    max_lifetime_s: Optional[int],
    on_timeout: Optional[str],
    checkpointable: Optional[bool],
    env: Optional[Mapping[str, str]],
) -> Call[BatchResult]:
    b = _batch_body(n, template, session, checkpoint, idle_timeout_s, max_lifetime_s, on_timeout, checkpointable, env)
    return Call("POST", "/v1/sessions/batch", _p(BatchResult), json=b)


def batch_stream(
    n: int,
    template: Optional[str],
    session: Optional[str],
    checkpoint: Optional[str],
    idle_timeout_s: Optional[int],
    max_lifetime_s: Optional[int],
    on_timeout: Optional[str],
    checkpointable: Optional[bool],
    env: Optional[Mapping[str, str]],
) -> StreamCall[BatchEvent]:
    b = _batch_body(n, template, session, checkpoint, idle_timeout_s, max_lifetime_s, on_timeout, checkpointable, env)
    return StreamCall("POST", "/v1/sessions/batch", b, decode_batch)


def reward(sid: str, timeout_ms: Optional[int], env: Optional[Mapping[str, str]]) -> Call[Reward]:
    return Call(
        "POST", seg("v1", "sessions", sid, "reward"), _p(Reward), json=body(timeout_ms=timeout_ms, env=_env(env))
    )


# live sandboxes and kill (`thaw ps`, `thaw kill`)


def sandboxes() -> Call[List[LiveSandbox]]:
    return Call(
        "GET", "/v1/sandboxes", lambda r: [LiveSandbox.from_json(s) for s in _obj(r).get("sandboxes") or []]
    )


def sandbox(sandbox_id: str) -> Call[LiveSandbox]:
    return Call("GET", seg("v1", "sandboxes", sandbox_id), _p(LiveSandbox))


def kill(sandbox_id: str) -> Call[KillReport]:
    return Call("POST", seg("v1", "sandboxes", sandbox_id, "kill"), _p(KillReport))


def kill_all(key: Optional[str]) -> Call[List[KillReport]]:
    return Call(
        "POST",
        "/v1/sandboxes/kill",
        lambda r: [KillReport.from_json(k) for k in _obj(r).get("killed") or []],
        params=None if key is None else {"key": key},
    )


# the audit log

When = Union[int, float, datetime.datetime]


def _unix_s(name: str, t: Optional[When]) -> Optional[str]:
    """Unix seconds for the query (``since`` and ``until`` are whole seconds, ``until``
    inclusive of its second): a datetime (naive: local time) or a number, floored."""
    if t is None:
        return None
    if isinstance(t, datetime.datetime):
        t = t.timestamp()
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise TypeError(f"{name} must be unix seconds or a datetime, not {type(t).__name__}")
    return str(int(t // 1))


def audit(
    key: Optional[str],
    template: Optional[str],
    session: Optional[str],
    sandbox: Optional[str],
    action: Optional[str],
    since: Optional[When],
    until: Optional[When],
    limit: Optional[int],
    order: Optional[str],
) -> Call[AuditList]:
    q = body(
        key=key,
        template=template,
        session=session,
        sandbox=sandbox,
        action=action,
        since=_unix_s("since", since),
        until=_unix_s("until", until),
        limit=None if limit is None else str(int(limit)),
        order=order,
    )
    return Call("GET", "/v1/audit", _p(AuditList), params=q or None)


def audit_verify(head: Union[AuditHead, str, None]) -> Call[AuditVerify]:
    return Call(
        "GET", "/v1/audit/verify", _p(AuditVerify), params=None if head is None else {"head": str(head)}
    )


# ---- client settings ----


def resolve(base_url: Optional[str], api_key: Optional[str]) -> Tuple[str, Optional[str]]:
    url = base_url or os.environ.get("THAW_SERVER") or DEFAULT_URL
    if not (url.startswith("http://") or url.startswith("https://")):
        raise ValueError(f"invalid thaw server URL `{url}`: expected http://host:port or https://host:port")
    key = api_key if api_key is not None else os.environ.get("THAW_API_KEY")
    if key is not None:
        key = key.strip()
        if any(c in key for c in "\r\n\0"):
            raise ValueError("the API key contains characters not allowed in a header")
    return url.rstrip("/"), key


def headers(key: Optional[str]) -> Dict[str, str]:
    h = {"user-agent": f"thaw-client-python/{__version__}", "accept": "application/json"}
    if key:
        h["authorization"] = f"Bearer {key}"
    return h


def timeout(t: Union[float, httpx.Timeout, None]) -> httpx.Timeout:
    """Default: 10 s to connect, no limit on the answer (a deploy takes minutes, an exec
    as long as its task: bound those with ``timeout_ms``, which the server enforces)."""
    if isinstance(t, httpx.Timeout):
        return t
    if t is None:
        return httpx.Timeout(None, connect=10.0)
    return httpx.Timeout(t)


def stream_headers() -> Dict[str, str]:
    return {"accept": NDJSON}
