"""keel.errors: one root, one code per error, one table to HTTP, one batch kind per class."""

from __future__ import annotations

import pytest

from keel import errors
from keel.errors import FailureKind, KeelError


def _all() -> list[type[KeelError]]:
    found, todo = [], [KeelError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_error_has_its_own_code() -> None:
    codes = [cls.code for cls in _all() if cls.__module__ == "keel.errors"]
    assert len(codes) == len(set(codes)), sorted(c for c in codes if codes.count(c) > 1)


@pytest.mark.parametrize(("error", "status", "kind"), [
    (errors.InvalidJSONError("x"), 400, "invalid_request_error"),
    (errors.ContextLengthExceededError("x"), 400, "invalid_request_error"),
    (errors.MissingAPIKeyError("x"), 401, "invalid_request_error"),
    (errors.ResidencyError("x"), 403, "invalid_request_error"),
    (errors.ZoneNotAllowedError("x"), 403, "invalid_request_error"),
    (errors.ModelNotFoundError("x"), 404, "invalid_request_error"),
    (errors.OverloadedError("x"), 429, "requests"),
    (errors.NoHealthyTargetError("x"), 503, "server_error"),
    (errors.GuardFailedError("x"), 500, "server_error"),
    (errors.ConfigError("x"), 500, "server_error"),
])
def test_http_status_comes_from_the_nearest_class_in_the_table(error: KeelError, status: int, kind: str) -> None:
    assert errors.http_status(error) == (status, kind)


def test_error_body_is_openais_shape() -> None:
    body = errors.error_body(errors.ZoneNotAllowedError("no", param="x-keel-zone"))
    assert body == {"error": {"message": "no", "type": "invalid_request_error", "param": "x-keel-zone",
                              "code": "zone_not_allowed"}}


def test_a_new_error_class_is_classified_by_its_class_not_a_pattern() -> None:
    class QuotaGone(errors.RateLimitError):
        code = "quota_gone_test"

    assert errors.classify(QuotaGone("x")) is FailureKind.RATE_LIMIT
    assert errors.classify(RuntimeError("wrapped")) is FailureKind.BUG
    # in a failed Ray job's log, its traceback names the class
    assert errors.classify("Traceback ...\nQuotaGone: the provider said no") is FailureKind.RATE_LIMIT
    try:
        raise RuntimeError("outer") from QuotaGone("inner")
    except RuntimeError as e:
        assert errors.classify(e) is FailureKind.RATE_LIMIT


def test_only_rate_limits_and_transient_failures_are_retried() -> None:
    assert {k for k in FailureKind if k.retryable} == {FailureKind.RATE_LIMIT, FailureKind.TRANSIENT}
    assert errors.DataQualityError.kind is FailureKind.DATA_QUALITY
    assert errors.ResidencyError.kind is FailureKind.BUG
