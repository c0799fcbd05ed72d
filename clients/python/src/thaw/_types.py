"""Response types of the HTTP API, as dataclasses.

Every ``from_json`` ignores fields it does not know (a newer server may add some) and
defaults the ones an older server does not send, so a client and a server of different
versions still talk. The field names are the server's (``api/src/types.rs`` and the
engine's records).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ._errors import ThawError, error_from_detail

__all__ = [
    "Health",
    "SnapshotSize",
    "Timings",
    "Outcome",
    "Template",
    "Invocation",
    "ExecResult",
    "ExecOutput",
    "OutputEvent",
    "ExitEvent",
    "ResultEvent",
    "ExecEvent",
    "InvokeEvent",
    "SecretGrant",
    "NetworkGrant",
    "Session",
    "ErrorInfo",
    "Checkpoint",
    "ResetResult",
    "BatchError",
    "ForkResult",
    "BatchResult",
    "BatchSessionEvent",
    "BatchErrorEvent",
    "BatchDoneEvent",
    "BatchEvent",
    "Reward",
    "LiveSandbox",
    "RunningTask",
    "SandboxFigures",
    "KillReport",
    "AuditRecord",
    "AuditList",
    "AuditHead",
    "AuditBreak",
    "AuditVerify",
]

Json = Dict[str, Any]


def _f(d: Mapping[str, Any], key: str, default: float = 0.0) -> float:
    v = d.get(key)
    return float(v) if isinstance(v, (int, float)) else default


def _i(d: Mapping[str, Any], key: str, default: int = 0) -> int:
    v = d.get(key)
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default


def _s(d: Mapping[str, Any], key: str, default: str = "") -> str:
    v = d.get(key)
    return v if isinstance(v, str) else default


def _os(d: Mapping[str, Any], key: str) -> Optional[str]:
    v = d.get(key)
    return v if isinstance(v, str) else None


def _oi(d: Mapping[str, Any], key: str) -> Optional[int]:
    v = d.get(key)
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _of(d: Mapping[str, Any], key: str) -> Optional[float]:
    v = d.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _strs(v: Any) -> List[str]:
    return [str(x) for x in v] if isinstance(v, list) else []


def _b64(s: str) -> bytes:
    return base64.b64decode(s.encode("ascii"), validate=True)


@dataclass(frozen=True)
class Health:
    """``GET /healthz``."""

    status: str

    @classmethod
    def from_json(cls, d: Json) -> "Health":
        return cls(status=_s(d, "status"))


@dataclass(frozen=True)
class SnapshotSize:
    """Raw size of a checkpoint, the bytes it added to the store, and how long it took."""

    raw_bytes: int = 0
    stored_bytes: int = 0
    checkpoint_ms: int = 0

    @classmethod
    def from_json(cls, d: Optional[Json]) -> "SnapshotSize":
        d = d or {}
        return cls(_i(d, "raw_bytes"), _i(d, "stored_bytes"), _i(d, "checkpoint_ms"))


@dataclass(frozen=True)
class Timings:
    """Where a call's time went, in milliseconds."""

    start_ms: float = 0.0
    warm_ms: float = 0.0
    run_ms: float = 0.0
    total_ms: float = 0.0

    @classmethod
    def from_json(cls, d: Optional[Json]) -> "Timings":
        d = d or {}
        return cls(_f(d, "start_ms"), _f(d, "warm_ms"), _f(d, "run_ms"), _f(d, "total_ms"))


@dataclass(frozen=True)
class Outcome:
    """How a task ended: ``kind`` is ``exited`` (with ``code``), ``signaled`` (with
    ``signal``), ``timeout`` or ``oom``."""

    kind: str
    code: Optional[int] = None
    signal: Optional[int] = None

    @property
    def success(self) -> bool:
        return self.kind == "exited" and self.code == 0

    @classmethod
    def from_json(cls, d: Json) -> "Outcome":
        return cls(kind=_s(d, "kind", "unknown"), code=_oi(d, "code"), signal=_oi(d, "signal"))


@dataclass(frozen=True)
class Template:
    """A published template (the server's ``TemplateRecord``)."""

    name: str
    state: str
    tier: str
    snapshot: Optional[str]
    published_at: int
    publish_ms: int
    warm_ms: int
    snapshot_size: SnapshotSize
    note: Optional[str]
    layer_key: str
    source_dir: str
    layers: List[str]
    spec: Json
    """The parsed ``template.toml`` (handler, limits, env, ...)."""

    @classmethod
    def from_json(cls, d: Json) -> "Template":
        return cls(
            name=_s(d, "name"),
            state=_s(d, "state"),
            tier=_s(d, "tier", "container"),
            snapshot=_os(d, "snapshot"),
            published_at=_i(d, "published_at"),
            publish_ms=_i(d, "publish_ms"),
            warm_ms=_i(d, "warm_ms"),
            snapshot_size=SnapshotSize.from_json(d.get("snapshot_size")),
            note=_os(d, "note"),
            layer_key=_s(d, "layer_key"),
            source_dir=_s(d, "source_dir"),
            layers=[str(x) for x in d.get("layers") or []],
            spec=dict(d.get("spec") or {}),
        )


@dataclass(frozen=True)
class Invocation:
    """The result of running a template's handler on a payload.

    ``status`` is ``ok``, ``error`` (the handler crashed, exited non-zero or wrote
    something that is not JSON), ``timeout`` or ``oom``; ``result`` is the handler's JSON.
    """

    template: str
    sandbox_id: str
    start: str
    status: str
    result: Any
    raw_output: Optional[str]
    stderr_tail: str
    outcome: Optional[Outcome]
    duration_ms: int
    truncated: bool
    timings: Timings

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def from_json(cls, d: Json) -> "Invocation":
        oc = d.get("outcome")
        return cls(
            template=_s(d, "template"),
            sandbox_id=_s(d, "sandbox_id"),
            start=_s(d, "start"),
            status=_s(d, "status"),
            result=d.get("result"),
            raw_output=_os(d, "raw_output"),
            stderr_tail=_s(d, "stderr_tail"),
            outcome=Outcome.from_json(oc) if isinstance(oc, dict) else None,
            duration_ms=_i(d, "duration_ms"),
            truncated=bool(d.get("truncated", False)),
            timings=Timings.from_json(d.get("timings")),
        )


@dataclass(frozen=True)
class ExecResult:
    """How a command ended. ``exit_code`` is shell-style: the code, 128+signal, 124 for a
    timeout, 137 for OOM."""

    template: str
    sandbox_id: str
    start: str
    outcome: Outcome
    exit_code: int
    truncated: bool
    timings: Timings

    @classmethod
    def from_json(cls, d: Json) -> "ExecResult":
        oc = d.get("outcome")
        return cls(
            template=_s(d, "template"),
            sandbox_id=_s(d, "sandbox_id"),
            start=_s(d, "start"),
            outcome=Outcome.from_json(oc) if isinstance(oc, dict) else Outcome("unknown"),
            exit_code=_i(d, "exit_code", -1),
            truncated=bool(d.get("truncated", False)),
            timings=Timings.from_json(d.get("timings")),
        )


@dataclass(frozen=True)
class ExecOutput:
    """A buffered exec: how it ended, and its whole output (up to the template's cap)."""

    result: ExecResult
    stdout: bytes
    stderr: bytes

    @property
    def exit_code(self) -> int:
        return self.result.exit_code

    @property
    def text(self) -> str:
        """stdout decoded as UTF-8 (invalid bytes replaced)."""
        return self.stdout.decode("utf-8", errors="replace")

    @classmethod
    def from_json(cls, d: Json) -> "ExecOutput":
        return cls(
            result=ExecResult.from_json(d.get("result") or {}),
            stdout=_b64(_s(d, "stdout_b64")),
            stderr=_b64(_s(d, "stderr_b64")),
        )


@dataclass(frozen=True)
class OutputEvent:
    """A chunk of a streamed call's output, as it came. ``stream`` is ``stdout`` or
    ``stderr`` (an invoke streams only its handler's stderr)."""

    stream: str
    data: bytes

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class ExitEvent:
    """The last event of a streamed exec."""

    result: ExecResult


@dataclass(frozen=True)
class ResultEvent:
    """The last event of a streamed invoke."""

    invocation: Invocation


ExecEvent = Union[OutputEvent, ExitEvent]
InvokeEvent = Union[OutputEvent, ResultEvent]


@dataclass(frozen=True, repr=False)
class SecretGrant:
    """A credential for some destinations, handed to a session or a call (``secrets=``).

    The sandbox never holds ``value``: it sees a placeholder in the environment variable
    ``name``, and the server's egress proxy puts ``value`` in the placeholder's place in
    HTTPS requests to ``hosts`` alone (domains, e.g. ``api.example.com`` or
    ``*.example.com``, which the grant's ``allow_out`` must allow). The server keeps it in
    memory only: it is in no record, log or audit entry.

    Its ``repr`` (and so ``str``, tracebacks and log lines) never shows ``value``; that is
    why the client takes this type rather than a dict.

    Args:
        name: ``A-Z``, ``0-9`` and ``_`` (not starting with a digit), 1 to 64 characters.
        value: 1 to 8192 bytes without control characters (it goes into a header).
        hosts: the domains whose requests get it (a list: a lone string is refused, as it
            would be read one character at a time).
    """

    name: str
    value: str
    hosts: Tuple[str, ...]

    def __init__(self, name: str, value: str, hosts: Sequence[str]) -> None:
        if isinstance(hosts, str):
            raise TypeError(f"SecretGrant hosts must be a list of domains, e.g. [{hosts!r}], not a string")
        object.__setattr__(self, "name", str(name))
        object.__setattr__(self, "value", str(value))
        object.__setattr__(self, "hosts", tuple(str(h) for h in hosts))

    def __repr__(self) -> str:
        return f"SecretGrant(name={self.name!r}, value=<redacted>, hosts={list(self.hosts)!r})"

    __str__ = __repr__

    def to_json(self) -> Json:
        """The request body's form (``{"name", "value", "hosts"}``)."""
        return {"name": self.name, "value": self.value, "hosts": list(self.hosts)}


@dataclass(frozen=True)
class NetworkGrant:
    """The egress a session was granted on top of its template's ``[network]``: entries of
    ``allow_out`` (domains, IPs, CIDRs, each with an optional ``:port``) and ``deny_out``
    (IPs and CIDRs kept out of a broader allowed range). Never its secrets."""

    allow_out: List[str] = field(default_factory=list)
    deny_out: List[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, d: Optional[Json]) -> "NetworkGrant":
        d = d or {}
        return cls(allow_out=_strs(d.get("allow_out")), deny_out=_strs(d.get("deny_out")))


@dataclass(frozen=True)
class Session:
    """A session: a restored clone that stays alive between calls.

    ``state`` is one of ``creating``, ``running``, ``pausing``, ``paused``, ``resuming``,
    ``stopped``, ``failed``. ``origin``, ``checkpoints`` and ``resets`` come with the
    rollout API (empty from an older server). ``network`` is its egress grant (a fork keeps
    its source's); ``sandbox`` the live sandbox it runs in now (``None`` while it holds
    none: paused, stopped, failed), as :meth:`thaw.Client.sandboxes` lists it.
    ``checkpointable`` is false for a session made with ``checkpointable=False`` (its memory
    shared with its snapshot; it cannot be paused, checkpointed or forked from its state),
    true otherwise and from a server that predates it.
    """

    id: str
    owner: str
    template: str
    state: str
    created_at: int
    last_active_at: int
    expires_at: int
    idle_timeout_s: int
    on_timeout: str
    env: Dict[str, str]
    error: Optional[str]
    snapshot: Optional[str]
    snapshot_size: Optional[SnapshotSize]
    pauses: int
    last_pause_ms: Optional[int]
    last_resume_ms: Optional[int]
    origin: Optional[str] = None
    checkpoints: List[str] = field(default_factory=list)
    resets: int = 0
    network: NetworkGrant = field(default_factory=NetworkGrant)
    sandbox: Optional[str] = None
    checkpointable: bool = True

    @property
    def running(self) -> bool:
        return self.state == "running"

    @classmethod
    def from_json(cls, d: Json) -> "Session":
        ss = d.get("snapshot_size")
        return cls(
            id=_s(d, "id"),
            owner=_s(d, "owner"),
            template=_s(d, "template"),
            state=_s(d, "state"),
            created_at=_i(d, "created_at"),
            last_active_at=_i(d, "last_active_at"),
            expires_at=_i(d, "expires_at"),
            idle_timeout_s=_i(d, "idle_timeout_s"),
            on_timeout=_s(d, "on_timeout", "pause"),
            env={str(k): str(v) for k, v in (d.get("env") or {}).items()},
            error=_os(d, "error"),
            snapshot=_os(d, "snapshot"),
            snapshot_size=SnapshotSize.from_json(ss) if isinstance(ss, dict) else None,
            pauses=_i(d, "pauses"),
            last_pause_ms=_oi(d, "last_pause_ms"),
            last_resume_ms=_oi(d, "last_resume_ms"),
            origin=_os(d, "origin"),
            checkpoints=[str(c) for c in d.get("checkpoints") or []],
            resets=_i(d, "resets"),
            network=NetworkGrant.from_json(d.get("network") if isinstance(d.get("network"), dict) else None),
            sandbox=_os(d, "sandbox"),
            checkpointable=bool(d.get("checkpointable", True)),
        )


@dataclass(frozen=True)
class ErrorInfo:
    """An ``ErrorDetail`` that is data, not an exception: one failed item of a batch."""

    code: str
    message: str
    path: Optional[str] = None
    fault: Optional[str] = None
    retryable: Optional[bool] = None

    def exception(self) -> ThawError:
        """The exception a call failing this way raises (classified the same way)."""
        d: Json = {"code": self.code, "message": self.message}
        if self.path is not None:
            d["path"] = self.path
        if self.fault is not None:
            d["fault"] = self.fault
        if self.retryable is not None:
            d["retryable"] = self.retryable
        return error_from_detail(d)

    @classmethod
    def from_json(cls, d: Json) -> "ErrorInfo":
        r = d.get("retryable")
        return cls(
            code=_s(d, "code", "error"),
            message=_s(d, "message"),
            path=_os(d, "path"),
            fault=_os(d, "fault"),
            retryable=r if isinstance(r, bool) else None,
        )


@dataclass(frozen=True)
class Checkpoint:
    """A named checkpoint of a session (``POST /v1/sessions/{id}/checkpoints``)."""

    name: str
    session: str
    created_at: int
    raw_bytes: int
    stored_bytes: int
    checkpoint_ms: int

    @classmethod
    def from_json(cls, d: Json) -> "Checkpoint":
        return cls(
            name=_s(d, "name"),
            session=_s(d, "session"),
            created_at=_i(d, "created_at"),
            raw_bytes=_i(d, "raw_bytes"),
            stored_bytes=_i(d, "stored_bytes"),
            checkpoint_ms=_i(d, "checkpoint_ms"),
        )


@dataclass(frozen=True)
class ResetResult:
    """``POST /v1/sessions/{id}/reset``: the session as reset, what it went back to
    (``"origin"`` or ``"checkpoint <name>"``) and how many running calls were cancelled."""

    session: Session
    from_: str
    cancelled_calls: int
    reset_ms: float

    @classmethod
    def from_json(cls, d: Json) -> "ResetResult":
        return cls(
            session=Session.from_json(d.get("session") or {}),
            from_=_s(d, "from"),
            cancelled_calls=_i(d, "cancelled_calls"),
            reset_ms=_f(d, "reset_ms"),
        )


@dataclass(frozen=True)
class BatchError:
    """One session of a batch or fork that could not be made."""

    index: int
    error: ErrorInfo

    @classmethod
    def from_json(cls, d: Json) -> "BatchError":
        return cls(index=_i(d, "index"), error=ErrorInfo.from_json(d.get("error") or {}))


@dataclass(frozen=True)
class ForkResult:
    """``POST /v1/sessions/{id}/fork``."""

    sessions: List[Session]
    errors: List[BatchError]
    fork_ms: float

    @classmethod
    def from_json(cls, d: Json) -> "ForkResult":
        return cls(
            sessions=[Session.from_json(s) for s in d.get("sessions") or []],
            errors=[BatchError.from_json(e) for e in d.get("errors") or []],
            # `batch_ms` from a server that answers a fork as a batch.
            fork_ms=_f(d, "fork_ms", _f(d, "batch_ms")),
        )


@dataclass(frozen=True)
class BatchResult:
    """``POST /v1/sessions/batch`` (buffered)."""

    sessions: List[Session]
    errors: List[BatchError]
    batch_ms: float

    @classmethod
    def from_json(cls, d: Json) -> "BatchResult":
        return cls(
            sessions=[Session.from_json(s) for s in d.get("sessions") or []],
            errors=[BatchError.from_json(e) for e in d.get("errors") or []],
            batch_ms=_f(d, "batch_ms"),
        )


@dataclass(frozen=True)
class BatchSessionEvent:
    """A streamed batch: session number ``index`` is ready."""

    index: int
    session: Session


@dataclass(frozen=True)
class BatchErrorEvent:
    """A streamed batch: session number ``index`` could not be made."""

    index: int
    error: ErrorInfo


@dataclass(frozen=True)
class BatchDoneEvent:
    """The last event of a streamed batch."""

    created: int
    failed: int
    batch_ms: float


BatchEvent = Union[BatchSessionEvent, BatchErrorEvent, BatchDoneEvent]


@dataclass(frozen=True)
class Reward:
    """``POST /v1/sessions/{id}/reward``: the template's reward command's verdict."""

    reward: float
    exit_code: int
    output: str
    run_ms: float

    @classmethod
    def from_json(cls, d: Json) -> "Reward":
        return cls(
            reward=_f(d, "reward", float("nan")),
            exit_code=_i(d, "exit_code", -1),
            output=_s(d, "output"),
            run_ms=_f(d, "run_ms"),
        )


# ---- live sandboxes (`thaw ps`, `thaw kill`) ----


@dataclass(frozen=True)
class RunningTask:
    """A call running in a live sandbox: ``kind`` is ``invoke`` or ``exec`` (in a session
    also ``write_file``, ``read_file``, ``reward``), ``argv`` the command (an invoke's: the
    handler's), ``since_ms`` when it started (unix milliseconds)."""

    kind: str
    argv: List[str]
    since_ms: int

    @classmethod
    def from_json(cls, d: Json) -> "RunningTask":
        return cls(kind=_s(d, "kind"), argv=_strs(d.get("argv")), since_ms=_i(d, "since_ms"))


@dataclass(frozen=True)
class SandboxFigures:
    """What a sandbox uses now, read by the host's kernel (never from inside the sandbox,
    which its code may control). ``None``: the host cannot tell for this sandbox (a
    microvm's guest processes; network figures where no egress proxy counts them), never 0.
    """

    cpu_seconds: Optional[float] = None
    memory_bytes: Optional[int] = None
    pids: Optional[int] = None
    disk_bytes: Optional[int] = None
    net_rx_bytes: Optional[int] = None
    net_tx_bytes: Optional[int] = None
    connections_open: Optional[int] = None
    connections_total: Optional[int] = None

    @classmethod
    def from_json(cls, d: Optional[Json]) -> "SandboxFigures":
        d = d or {}
        return cls(
            cpu_seconds=_of(d, "cpu_seconds"),
            memory_bytes=_oi(d, "memory_bytes"),
            pids=_oi(d, "pids"),
            disk_bytes=_oi(d, "disk_bytes"),
            net_rx_bytes=_oi(d, "net_rx_bytes"),
            net_tx_bytes=_oi(d, "net_tx_bytes"),
            connections_open=_oi(d, "connections_open"),
            connections_total=_oi(d, "connections_total"),
        )


@dataclass(frozen=True)
class LiveSandbox:
    """A sandbox alive now (``GET /v1/sandboxes``, what ``thaw ps`` shows): a fresh one
    running an invoke or exec, or a session's. A paused session holds none and is not
    listed.

    ``id`` is the sandbox's (``sb-...``); ``session`` the session it runs, if any;
    ``owner`` the key's id whose it is; ``state`` is ``running`` for a call's sandbox, else
    the session's state (``running``, ``creating``, ``pausing``, ``resuming``);
    ``started_at`` unix seconds (``None``: unknown).
    """

    id: str
    tier: str
    template: str
    owner: str
    session: Optional[str]
    state: str
    started_at: Optional[int]
    tasks: List[RunningTask]
    figures: SandboxFigures

    @classmethod
    def from_json(cls, d: Json) -> "LiveSandbox":
        return cls(
            id=_s(d, "id"),
            tier=_s(d, "tier", "container"),
            template=_s(d, "template"),
            owner=_s(d, "owner"),
            session=_os(d, "session"),
            state=_s(d, "state"),
            started_at=_oi(d, "started_at"),
            tasks=[RunningTask.from_json(t) for t in d.get("tasks") or [] if isinstance(t, dict)],
            figures=SandboxFigures.from_json(d.get("figures") if isinstance(d.get("figures"), dict) else None),
        )


@dataclass(frozen=True)
class KillReport:
    """What one kill ended (``POST /v1/sandboxes/{id}/kill``, and each item of a kill-all).

    ``sandbox`` is ``None`` when nothing ran (a paused session, or one killed already);
    ``was`` what it was before: ``running`` for a call's sandbox, else the session's state.
    ``kill_ms`` runs until no process of the sandbox was left.
    """

    sandbox: Optional[str]
    session: Optional[str]
    template: str
    owner: str
    was: str
    killed_processes: int
    kill_ms: float

    @classmethod
    def from_json(cls, d: Json) -> "KillReport":
        return cls(
            sandbox=_os(d, "sandbox"),
            session=_os(d, "session"),
            template=_s(d, "template"),
            owner=_s(d, "owner"),
            was=_s(d, "was"),
            killed_processes=_i(d, "killed_processes"),
            kill_ms=_f(d, "kill_ms"),
        )


# ---- the audit log ----


@dataclass(frozen=True)
class AuditRecord:
    """One record of the audit log: who (``actor``: an API key's id, or ``local`` for the
    CLI's embedded engine) did what (``action``, e.g. ``session_create``, ``exec``,
    ``kill``, ``egress_refused``; a newer server may send actions this client does not
    know, so it is a string), to which template, session and sandbox, when (``ts``, unix
    milliseconds).

    ``detail`` is what is particular to the action (an exec's argv and exit code, a file's
    path, size and sha256, an egress destination), never secrets, payloads or file
    contents. ``prev`` and ``hash`` chain the record to the one before it
    (:meth:`thaw.Client.audit_verify` checks the chain).
    """

    seq: int
    ts: int
    actor: str
    action: str
    template: Optional[str]
    session: Optional[str]
    sandbox: Optional[str]
    detail: Any
    prev: str
    hash: str

    @classmethod
    def from_json(cls, d: Json) -> "AuditRecord":
        return cls(
            seq=_i(d, "seq"),
            ts=_i(d, "ts"),
            actor=_s(d, "actor"),
            action=_s(d, "action", "unknown"),
            template=_os(d, "template"),
            session=_os(d, "session"),
            sandbox=_os(d, "sandbox"),
            detail=d.get("detail"),
            prev=_s(d, "prev"),
            hash=_s(d, "hash"),
        )


@dataclass(frozen=True)
class AuditList:
    """``GET /v1/audit``: the matching records (newest first unless ``order="oldest"``),
    and whether more matched than the ``limit``."""

    records: List[AuditRecord]
    more: bool

    @classmethod
    def from_json(cls, d: Json) -> "AuditList":
        return cls(
            records=[AuditRecord.from_json(r) for r in d.get("records") or [] if isinstance(r, dict)],
            more=bool(d.get("more", False)),
        )


@dataclass(frozen=True)
class AuditHead:
    """The last record of the chain. Keep ``str(head)`` (``SEQ:HASH``) somewhere else and
    hand it back to :meth:`thaw.Client.audit_verify` later: that detects a rewrite of the
    whole log, which the chain alone cannot."""

    seq: int
    hash: str

    def __str__(self) -> str:
        return f"{self.seq}:{self.hash}"

    @classmethod
    def from_json(cls, d: Json) -> "AuditHead":
        return cls(seq=_i(d, "seq"), hash=_s(d, "hash"))


@dataclass(frozen=True)
class AuditBreak:
    """Where the audit chain breaks: ``kind`` is ``edited``, ``removed``, ``reordered``,
    ``truncated`` or ``rewritten``; ``segment`` and ``line`` say where; ``acknowledged``
    that thaw found it itself when it opened the log and started a fresh segment."""

    segment: str
    line: int
    kind: str
    expected_seq: int
    found_seq: Optional[int]
    message: str
    acknowledged: bool

    @classmethod
    def from_json(cls, d: Json) -> "AuditBreak":
        return cls(
            segment=_s(d, "segment"),
            line=_i(d, "line"),
            kind=_s(d, "kind"),
            expected_seq=_i(d, "expected_seq"),
            found_seq=_oi(d, "found_seq"),
            message=_s(d, "message"),
            acknowledged=bool(d.get("acknowledged", False)),
        )


@dataclass(frozen=True)
class AuditVerify:
    """``GET /v1/audit/verify`` (admin keys): the whole chain checked. ``ok`` is false when
    anything breaks it; ``first_break`` is the first break by position, ``breaks`` the
    first ones found (up to 100), ``resumed_at`` the record from which the chain verifies
    again."""

    ok: bool
    records: int
    segments: int
    head: Optional[AuditHead]
    first_break: Optional[AuditBreak]
    breaks: List[AuditBreak]
    resumed_at: Optional[int]

    @classmethod
    def from_json(cls, d: Json) -> "AuditVerify":
        head, first = d.get("head"), d.get("first_break")
        return cls(
            ok=bool(d.get("ok", False)),
            records=_i(d, "records"),
            segments=_i(d, "segments"),
            head=AuditHead.from_json(head) if isinstance(head, dict) else None,
            first_break=AuditBreak.from_json(first) if isinstance(first, dict) else None,
            breaks=[AuditBreak.from_json(b) for b in d.get("breaks") or [] if isinstance(b, dict)],
            resumed_at=_oi(d, "resumed_at"),
        )
