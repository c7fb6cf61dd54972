"""Every error Keel raises on purpose, under one root, each with a machine-readable code.

    KeelError                              code                        HTTP  retried in a batch job
    ├── ConfigError                        config_invalid              500   no  (bug)
    ├── BadRequestError                    invalid_request             400   no  (bug)
    │   ├── InvalidJSONError               invalid_json
    │   ├── MissingParameterError          missing_required_parameter
    │   ├── InvalidParameterError          invalid_parameter
    │   ├── UnsupportedParameterError      unsupported_parameter
    │   ├── ContextLengthExceededError     context_length_exceeded
    │   └── InvalidDataClassError          invalid_data_class
    ├── AuthenticationError                invalid_api_key             401
    │   └── MissingAPIKeyError             missing_api_key
    ├── PermissionDeniedError              permission_denied           403   no  (bug)
    │   ├── DataClassNotAllowedError       data_class_not_allowed
    │   ├── ZoneNotAllowedError            zone_not_allowed
    │   └── ResidencyError                 residency
    ├── NotFoundError                      not_found                   404
    │   ├── ModelNotFoundError             model_not_found
    │   ├── SnapshotNotFoundError          snapshot_not_found
    │   └── SourceNotFoundError            source_not_found
    ├── RateLimitError                     rate_limit_exceeded         429   yes (rate_limit)
    │   └── OverloadedError                overloaded
    ├── ServiceUnavailableError            service_unavailable         503   yes (transient)
    │   ├── NoHealthyTargetError           no_healthy_target
    │   ├── AllTargetsFailedError          all_targets_failed
    │   └── TransientError                 transient
    ├── GuardFailedError                   guard_failed                500   no  (bug)
    ├── TargetRejectedError                (the target's)              (the target's 4xx)
    ├── DataQualityError                   data_quality                -     no  (data_quality)
    ├── RegressionError                    regression                  -     no  (regression)
    ├── EvaluationIncompleteError          evaluation_incomplete       -     no  (bug)
    └── StackError                         stack                       -     no  (bug)

Named as OpenAI's own SDK names its errors (BadRequestError, NotFoundError, RateLimitError...).

A new kind of failure is a new class here (its code, its status, its batch kind), never a text
pattern somewhere else. The HTTP status and OpenAI error type of every error come from one table,
`HTTP`, looked up along the class's ancestry; the batch kind from the class's `kind`.
`classify` names the kind of anything else (a dropped connection, a lost Ray actor, the text a
failed Ray job left in its log), since those are not Keel's own classes.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any, ClassVar


class FailureKind(StrEnum):
    """What a failed batch task is, which decides whether it is retried."""

    RATE_LIMIT = "rate_limit"  # a quota or a 429: retry later, with backoff
    TRANSIENT = "transient"  # network, timeouts, a lost Ray node/actor/object: retry with backoff
    DATA_QUALITY = "data_quality"  # bad input or a failed gate: retrying cannot help, a person must look
    REGRESSION = "regression"  # an evaluation fell below its thresholds: retrying re-measures the same model
    BUG = "bug"  # anything else, a residency violation or a bad config included: do not retry

    @property
    def retryable(self) -> bool:
        return self in (FailureKind.RATE_LIMIT, FailureKind.TRANSIENT)


class KeelError(Exception):
    """The root. `code` is machine-readable and stable; the message is for people."""

    code: ClassVar[str] = "keel_error"
    kind: FailureKind = FailureKind.BUG  # by class; a failed Ray job carries the kind its log names

    def __init__(self, message: str, *, param: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.retry_after = message, param, retry_after


class ConfigError(KeelError, ValueError):
    """A configuration that cannot be used; the message names the file or variable, the field and the reason."""

    code = "config_invalid"


class BadRequestError(KeelError):
    code = "invalid_request"


class InvalidJSONError(BadRequestError):
    code = "invalid_json"


class MissingParameterError(BadRequestError):
    code = "missing_required_parameter"


class InvalidParameterError(BadRequestError):
    code = "invalid_parameter"


class UnsupportedParameterError(BadRequestError):
    code = "unsupported_parameter"


class ContextLengthExceededError(BadRequestError):
    code = "context_length_exceeded"


class InvalidDataClassError(BadRequestError):
    code = "invalid_data_class"


class AuthenticationError(KeelError):
    code = "invalid_api_key"


class MissingAPIKeyError(AuthenticationError):
    code = "missing_api_key"


class PermissionDeniedError(KeelError):
    code = "permission_denied"


class DataClassNotAllowedError(PermissionDeniedError):
    code = "data_class_not_allowed"


class ZoneNotAllowedError(PermissionDeniedError):
    code = "zone_not_allowed"


class UnguardedContentError(PermissionDeniedError):
    """Content the PII guard cannot pseudonymize (an image, audio, a file) in a request whose data class
    must be pseudonymized for the targets that may answer it."""

    code = "content_not_pseudonymizable"


class ResidencyError(PermissionDeniedError):
    """Data that would be stored or sent outside the zones its class allows."""

    code = "residency"


class NotFoundError(KeelError):
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


class UnknownURLError(NotFoundError):
    """A path the API does not have."""

    code = "unknown_url"


class MethodNotAllowedError(KeelError):
    """A path the API has, asked with a method it does not take."""

    code = "method_not_allowed"


class SnapshotNotFoundError(NotFoundError):
    """A batch stage's input snapshot that was never committed (or was pruned)."""

    code = "snapshot_not_found"


class SourceNotFoundError(NotFoundError):
    """A configured landing source that is not there."""

    code = "source_not_found"


class RateLimitError(KeelError):
    code = "rate_limit_exceeded"
    kind = FailureKind.RATE_LIMIT


class OverloadedError(RateLimitError):
    """Keel's own capacity (admission, every target busy), not the tenant's quota."""

    code = "overloaded"


class ServiceUnavailableError(KeelError):
    code = "service_unavailable"
    kind = FailureKind.TRANSIENT


class NoHealthyTargetError(ServiceUnavailableError):
    code = "no_healthy_target"


class AllTargetsFailedError(ServiceUnavailableError):
    code = "all_targets_failed"


class TransientError(ServiceUnavailableError):
    code = "transient"


class GuardFailedError(KeelError):
    """The PII guard could not process a request: it fails closed, nothing is sent."""

    code = "guard_failed"


class TargetRejectedError(KeelError):
    """A model target refused a request as the caller's fault (its own 4xx, e.g. a prompt its tokenizer
    finds too long): the caller gets the target's status, code and message, as if it had asked it directly."""

    code = "target_rejected"

    def __init__(self, message: str, *, status: int, target_code: str | None, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.status, self.target_code = status, target_code


class DataQualityError(KeelError):
    """Input or output data that fails a check; the run stops and downstream stays blocked."""

    code = "data_quality"
    kind = FailureKind.DATA_QUALITY


class RegressionError(KeelError):
    """An evaluation run fell below its thresholds (keel.evaluation.gate): each regression names the
    metric, the new value, the baseline value and the runs."""

    code = "regression"
    kind = FailureKind.REGRESSION

    def __init__(self, message: str, regressions: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.regressions = regressions or []


class EvaluationIncompleteError(KeelError):
    """An evaluation run in which some item lacks some metric (a scorer raised, or returned nothing):
    a run with a silently missing metric must never pass the gate."""

    code = "evaluation_incomplete"


class StackError(KeelError):
    """The local stack (`keel up`) cannot start, run or stop a service."""

    code = "stack"


# HTTP status and OpenAI error type, by the nearest class in an error's ancestry. The types are the ones
# OpenAI's API sends: every refused request is an "invalid_request_error" (the status and the `code`, e.g.
# "invalid_api_key" or "model_not_found", say which), a rate limit on requests is "requests", and a
# failure on the server's side "server_error".
HTTP: dict[type[KeelError], tuple[int, str]] = {
    BadRequestError: (400, "invalid_request_error"),
    AuthenticationError: (401, "invalid_request_error"),
    PermissionDeniedError: (403, "invalid_request_error"),
    NotFoundError: (404, "invalid_request_error"),
    MethodNotAllowedError: (405, "invalid_request_error"),
    RateLimitError: (429, "requests"),
    ServiceUnavailableError: (503, "server_error"),
    KeelError: (500, "server_error"),
}


def _type_of_status(status: int) -> str:
    return "requests" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"


def http_status(error: KeelError) -> tuple[int, str]:
    """(HTTP status, OpenAI error type) of an error."""
    if isinstance(error, TargetRejectedError):  # passed on as the target answered
        return error.status, _type_of_status(error.status)
    for cls in type(error).__mro__:
        if cls in HTTP:
            return HTTP[cls]
    return HTTP[KeelError]


def error_body(error: KeelError) -> dict[str, Any]:
    """OpenAI's error object for an error."""
    code = error.target_code if isinstance(error, TargetRejectedError) else error.code
    return {"error": {"message": error.message, "type": http_status(error)[1], "param": error.param, "code": code}}


# -- foreign failures ----------------------------------------------------------------------------
# Not Keel's classes: matched by type name and message, and against a failed Ray job's log tail.
_PATTERNS: list[tuple[FailureKind, re.Pattern[str]]] = [
    (FailureKind.DATA_QUALITY, re.compile(r"failed validation")),
    (FailureKind.RATE_LIMIT, re.compile(r"\b429\b|Too Many Requests|rate.?limit|quota|throttl|SlowDown", re.I)),
    (
        FailureKind.TRANSIENT,
        re.compile(
            r"ConnectionError|ConnectionRefused|ConnectionReset|ConnectTimeout|ReadTimeout|TimeoutError|"
            r"Temporary failure|temporarily unavailable|Service Unavailable|\b50[234]\b|BrokenPipe|"
            r"ActorDiedError|ActorUnavailableError|NodeDiedError|ObjectLostError|OwnerDiedError|RaySystemError|"
            r"WorkerCrashedError|OutOfMemoryError|GetTimeoutError|job supervisor actor died",
        ),
    ),
]


def classify(error: BaseException | str | None) -> FailureKind:
    """The failure kind of an exception (Keel's own by class, through its chain) or of a log text."""
    if error is None:
        return FailureKind.BUG
    if isinstance(error, str):
        return _from_text(error)
    for exc in _chain(error):
        if isinstance(exc, KeelError):
            return exc.kind
        if isinstance(exc, ConnectionError | TimeoutError):
            return FailureKind.TRANSIENT
    return _from_text("\n".join(f"{type(e).__name__}: {e}" for e in _chain(error)))


def _from_text(text: str) -> FailureKind:
    # A traceback of one of Keel's own errors (a Ray job's log) names its class: its kind is the class's.
    classes = _keel_classes()
    for name in _EXCEPTION_LINE.findall(text):
        if name in classes:
            return classes[name].kind
    for kind, pattern in _PATTERNS:
        if pattern.search(text):
            return kind
    return FailureKind.BUG


def _keel_classes() -> dict[str, type[KeelError]]:
    found: dict[str, type[KeelError]] = {}
    todo: list[type[KeelError]] = [KeelError]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


_EXCEPTION_LINE = re.compile(r"\b([A-Z]\w+): ")


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


REASON_CHARS = 500
_RAISED_LINE = re.compile(r"^[\w.]*(Error|Exception|Timeout|Terminated): \S")


def failure_reason(error: BaseException) -> str:
    """`[kind] message`, one line: a Keel error's message, or for a failed Ray job its first line and
    the exception its log ended with (Keel's errors carry no data values)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    raised = [line for line in lines[1:] if _RAISED_LINE.match(line)]
    if raised:
        text = f"{text} ... {raised[-1]}"
    if not isinstance(error, KeelError):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return f"[{classify(error).value}] {text}"[:REASON_CHARS]
