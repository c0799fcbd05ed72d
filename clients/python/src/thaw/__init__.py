"""thaw-client: a typed client of thaw's HTTP API (``thaw serve``).

::

    import thaw

    with thaw.Client("http://127.0.0.1:7070", api_key="thaw_...") as c:
        c.deploy("templates/shell")
        s = c.create_session("shell")
        print(c.session_exec(s.id, ["sh", "-c", "echo hi"]).text)
        c.delete_session(s.id)

:class:`Client` blocks; :class:`AsyncClient` has the same methods, awaited. Every failure
is a :class:`ThawError`; see :mod:`thaw._errors` for the hierarchy and :class:`Retry` for
what is retried.
"""

from ._async import AsyncClient
from ._core import NO_RETRY, Retry, RetryAttempt, __version__, pack_dir
from ._errors import (
    CallerError,
    ConflictError,
    ForbiddenError,
    InfrastructureError,
    KilledError,
    NotFoundError,
    ProtocolError,
    RateLimitedError,
    ServerConnectionError,
    TaskError,
    ThawError,
)
from ._sync import Client
from ._types import (
    AuditBreak,
    AuditHead,
    AuditList,
    AuditRecord,
    AuditVerify,
    BatchDoneEvent,
    BatchError,
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
    NetworkGrant,
    Outcome,
    OutputEvent,
    ResetResult,
    ResultEvent,
    Reward,
    RunningTask,
    SandboxFigures,
    SecretGrant,
    Session,
    SnapshotSize,
    Template,
    Timings,
)

__all__ = [
    "__version__",
    "Client",
    "AsyncClient",
    "Retry",
    "RetryAttempt",
    "NO_RETRY",
    "pack_dir",
    # errors
    "ThawError",
    "CallerError",
    "ForbiddenError",
    "NotFoundError",
    "ConflictError",
    "KilledError",
    "TaskError",
    "InfrastructureError",
    "RateLimitedError",
    "ServerConnectionError",
    "ProtocolError",
    # types
    "Health",
    "Template",
    "SnapshotSize",
    "Timings",
    "Outcome",
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
