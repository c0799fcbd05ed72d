"""One exception hierarchy for every failure of a call.

::

    ThawError
    ├── CallerError            fault "caller": a bad body, an unknown id, a conflict (4xx)
    │   ├── ForbiddenError     403: the key may not (another key's records, an admin's route)
    │   ├── NotFoundError      404
    │   ├── ConflictError      409
    │   └── KilledError        410: ended by ``thaw kill`` (``Client.kill``); not retried
    ├── TaskError              fault "task": the task's own doing (reward output not a
    │                          number, output flood)
    └── InfrastructureError    fault "infrastructure": restore failed, sandbox died, server
        │                      overloaded (5xx, 429, 503)
        ├── RateLimitedError   429: the key's sandbox limit (``Retry-After``)
        ├── ServerConnectionError  the server could not be reached or dropped the connection
        └── ProtocolError      the server answered something this client does not understand

The class comes from the server's ``fault`` field. A server that does not send one (it
predates the rollout API) is classified by the error's ``code`` where this client knows it,
else by the HTTP status: 5xx and 429 are infrastructure, other 4xx the caller's.

Only :class:`InfrastructureError` with ``retryable`` true is retried by the clients
(see :class:`thaw.Retry`); a task fault or a caller error never is.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Type

__all__ = [
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
    "error_from_detail",
]

FAULTS = ("caller", "task", "infrastructure")

# Status of every error code the server sends (server/src/error.rs `classify`, and the
# codes of its extractors, connection cap and slot limits). Used to classify an error that
# has no `fault` and no HTTP status: an `error` event of a stream that had started.
CODE_STATUS: Dict[str, int] = {
    "bad_request": 400,
    "bad_template": 400,
    "bad_payload": 400,
    "bad_network": 400,
    "guest_bad_request": 400,
    "unauthorized": 401,
    "guest_permission_denied": 403,
    "forbidden": 403,
    "unknown_template": 404,
    "unknown_session": 404,
    "unknown_checkpoint": 404,
    "not_found": 404,
    "guest_not_found": 404,
    "request_timeout": 408,
    "template_not_ready": 409,
    "snapshot_corrupt": 409,
    "session_conflict": 409,
    "session_busy": 409,
    "conflict": 409,
    "checkpoint_exists": 409,
    "no_reward_command": 409,
    "killed": 410,
    "too_large": 413,
    "unsupported_media_type": 415,
    "setup_failed": 422,
    "build_refused": 422,
    "warmup_failed": 422,
    "spawn_failed": 422,
    "handler_failed": 422,
    "reward_not_a_number": 422,
    "too_many_sandboxes": 429,
    "cancelled": 499,
    "internal": 500,
    "egress": 500,
    "audit_read": 500,
    "guest_error": 500,
    "runtime": 500,
    "sandbox_not_ready": 500,
    "agent": 500,
    "snapshot_store": 500,
    "criu": 500,
    "vmm": 500,
    "guest_image": 500,
    "metadata_store": 500,
    "io": 500,
    "output_flood": 502,
    "session_lost": 502,
    "missing_dependency": 503,
    "audit_unavailable": 503,
    "too_many_connections": 503,
    "host_timeout": 504,
    "disk_full": 507,
}

# Codes whose fault is the task's own, whatever their status says (the rollout contract
# names them; a server predating `fault` reports them with a 4xx or 5xx status).
TASK_CODES = frozenset({"reward_not_a_number", "output_flood"})

# Statuses retried without a `retryable` field from the server: overload and gateway errors.
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})


class ThawError(Exception):
    """A failed call.

    Attributes:
        status: the HTTP status, or ``None`` (no response, or an ``error`` event of a
            stream that had already answered 200).
        code: machine-readable class, e.g. ``unknown_session``, ``too_many_sandboxes``.
        message: the server's one line for humans: the cause and the fix.
        fault: ``"caller"``, ``"task"`` or ``"infrastructure"`` (the server's, else inferred).
        retryable: whether the same call may succeed later (the server's, else inferred).
        path: for a bad request body, the offending field, e.g. ``argv[0]``.
        retry_after: seconds from ``Retry-After``, when the server sent one.
        attempts: how many times the call was sent before this error was raised.
        body: the decoded JSON error body, when there was one.
    """

    def __init__(
        self,
        message: str,
        *,
        status: Optional[int] = None,
        code: str = "error",
        fault: str = "infrastructure",
        retryable: bool = False,
        path: Optional[str] = None,
        retry_after: Optional[float] = None,
        attempts: int = 1,
        body: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.fault = fault
        self.retryable = retryable
        self.path = path
        self.retry_after = retry_after
        self.attempts = attempts
        self.body = body

    def __str__(self) -> str:
        where = f"HTTP {self.status}" if self.status is not None else "thaw"
        return f"{where} {self.code}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, "
            f"fault={self.fault!r}, retryable={self.retryable!r}, message={self.message!r})"
        )


class CallerError(ThawError):
    """The caller's fault: fix the request (bad body, unknown id, state conflict)."""


class ForbiddenError(CallerError):
    """403: the key may not do this: a key that is not an admin asked for another key's
    audit records or sandboxes, or for an admin's route (``audit_verify``). An admin key
    comes from ``thaw keys create --admin``. (Also a file the sandbox itself refuses to
    read or write: code ``guest_permission_denied``.)"""


class NotFoundError(CallerError):
    """404: no such template, session, checkpoint, file or live sandbox for this key (another
    key's is unknown too, so ids cannot be probed)."""


class ConflictError(CallerError):
    """409: the object is not in a state that allows the call (e.g. a paused session)."""


class KilledError(CallerError):
    """410 (``killed``): the sandbox the call ran in was ended by ``thaw kill``
    (:meth:`thaw.Client.kill`), by this key or an operator's; the message names the key.

    A caller error, never retried: a retry would undo an operator's decision. A killed
    session ends for good (``stopped``): only deleting it is left.
    """


class TaskError(ThawError):
    """The task's own doing: its output broke a rule (reward not a number, output flood)."""


class InfrastructureError(ThawError):
    """thaw or the host failed, or is overloaded: retrying may succeed when ``retryable``."""


class RateLimitedError(InfrastructureError):
    """429: the key holds as many sandboxes as it may; ``retry_after`` says when to retry."""


class ServerConnectionError(InfrastructureError):
    """The server could not be reached, or dropped the connection before answering."""


class ProtocolError(InfrastructureError):
    """The server answered something this client does not understand."""


def _infer_fault(code: str, status: Optional[int]) -> str:
    if code in TASK_CODES:
        return "task"
    if status is None:
        status = CODE_STATUS.get(code)
    if status is None or status >= 500 or status == 429:
        return "infrastructure"
    if 400 <= status < 500:
        return "caller"
    return "infrastructure"


def _class_for(fault: str, status: Optional[int]) -> Type[ThawError]:
    if fault == "caller":
        if status == 403:
            return ForbiddenError
        if status == 404:
            return NotFoundError
        if status == 409:
            return ConflictError
        if status == 410:
            return KilledError
        return CallerError
    if fault == "task":
        return TaskError
    if status == 429:
        return RateLimitedError
    return InfrastructureError


def error_from_detail(
    detail: Dict[str, Any],
    *,
    status: Optional[int] = None,
    retry_after: Optional[float] = None,
    attempts: int = 1,
    body: Optional[Dict[str, Any]] = None,
) -> ThawError:
    """The exception for an ``ErrorDetail`` object (``{"code", "message", ...}``).

    ``status`` is the HTTP status (``None`` for an error event inside a stream).
    """
    code = str(detail.get("code") or (f"http_{status}" if status else "error"))
    message = str(detail.get("message") or code)
    raw_fault = detail.get("fault")
    fault = raw_fault if raw_fault in FAULTS else _infer_fault(code, status)
    raw_retryable = detail.get("retryable")
    if isinstance(raw_retryable, bool):
        retryable = raw_retryable
    else:
        effective = status if status is not None else CODE_STATUS.get(code)
        retryable = fault == "infrastructure" and effective in RETRYABLE_STATUSES
    path = detail.get("path")
    cls = _class_for(fault, status if status is not None else CODE_STATUS.get(code))
    return cls(
        message,
        status=status,
        code=code,
        fault=fault,
        retryable=retryable,
        path=path if isinstance(path, str) else None,
        retry_after=retry_after,
        attempts=attempts,
        body=body,
    )
