"""Response types of the HTTP API, as dataclasses.

Every ``from_json`` ignores fields it does not know (a newer server may add some) and
defaults the ones an older server does not send, so a client and a server of different
versions still talk. The field names are the server's (``api/src/types.rs`` and the
engine's records).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Union

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


@dataclass(frozen=True)
class Session:
    """A session: a restored clone that stays alive between calls.

    ``state`` is one of ``creating``, ``running``, ``pausing``, ``paused``, ``resuming``,
    ``stopped``, ``failed``. ``origin``, ``checkpoints`` and ``resets`` come with the
    rollout API (empty from an older server).
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
