"""Failure kinds: every failed task is classified at once, and only transient kinds are retried.

Pure code: `classify` looks at an exception (its type, its chain) or at the text a Ray job left in
its log, and names one of four kinds:

* rate_limit   - a quota or 429 from a provider or a service: retry later, with backoff;
* transient    - network errors, timeouts, a lost Ray node/actor/object: retry with backoff;
* data_quality - bad input or a failed quality gate: retrying cannot help, a person must look;
* bug          - anything else (including a residency violation or a bad config): do not retry.
"""

from __future__ import annotations

import re
from enum import Enum


class FailureKind(str, Enum):
    RATE_LIMIT = "rate_limit"
    TRANSIENT = "transient"
    DATA_QUALITY = "data_quality"
    BUG = "bug"

    @property
    def retryable(self) -> bool:
        return self in (FailureKind.RATE_LIMIT, FailureKind.TRANSIENT)


class KeelFailure(Exception):
    kind = FailureKind.BUG


class DataQualityError(KeelFailure):
    """Input or output data that fails a check; the run stops and downstream stays blocked."""

    kind = FailureKind.DATA_QUALITY


class TransientError(KeelFailure):
    kind = FailureKind.TRANSIENT


class RateLimitError(KeelFailure):
    kind = FailureKind.RATE_LIMIT


# Matched against exception type names and messages, and against a failed Ray job's log tail.
_PATTERNS: list[tuple[FailureKind, re.Pattern[str]]] = [
    (FailureKind.DATA_QUALITY, re.compile(r"DataQualityError|failed validation")),
    (FailureKind.RATE_LIMIT, re.compile(r"RateLimitError|\b429\b|Too Many Requests|rate.?limit|quota|throttl|SlowDown", re.I)),
    (
        FailureKind.TRANSIENT,
        re.compile(
            r"TransientError|ConnectionError|ConnectionRefused|ConnectionReset|ConnectTimeout|ReadTimeout|TimeoutError|"
            r"Temporary failure|temporarily unavailable|Service Unavailable|\b50[234]\b|BrokenPipe|"
            r"ActorDiedError|ActorUnavailableError|NodeDiedError|ObjectLostError|OwnerDiedError|RaySystemError|"
            r"WorkerCrashedError|OutOfMemoryError|GetTimeoutError|job supervisor actor died",
        ),
    ),
]


def classify(error: BaseException | str | None) -> FailureKind:
    if error is None:
        return FailureKind.BUG
    if isinstance(error, str):
        return _from_text(error)
    for exc in _chain(error):
        if isinstance(exc, KeelFailure):
            return exc.kind
        if isinstance(exc, ConnectionError | TimeoutError):
            return FailureKind.TRANSIENT
    return _from_text("\n".join(f"{type(e).__name__}: {e}" for e in _chain(error)))


def _from_text(text: str) -> FailureKind:
    for kind, pattern in _PATTERNS:
        if pattern.search(text):
            return kind
    return FailureKind.BUG


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen
