"""The bearer-token rule shared by POST /actuals and POST /retrain (pipelines.api_token)."""

from __future__ import annotations

import pytest

from pipelines.api_token import api_token, authorization_problem, reads_protected


def test_no_token_configured_lets_every_request_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORECASTER_API_TOKEN", raising=False)
    assert api_token() is None
    monkeypatch.setenv("FORECASTER_API_TOKEN", "")  # an empty secret is no token, not ""
    assert api_token() is None
    assert authorization_problem(None, None) is None


@pytest.mark.parametrize(("header", "reason"), [
    (None, "missing Authorization header"),
    ("", "missing Authorization header"),
    ("Basic czNjcjN0", "must be 'Bearer <token>'"),
    ("Bearer ", "must be 'Bearer <token>'"),
    ("Bearer wrong", "invalid token"),
    ("Bearer s3cr3tX", "invalid token"),
])
def test_a_request_without_the_token_is_refused_with_the_reason(header: str | None,
                                                                reason: str) -> None:
    problem = authorization_problem(header, "s3cr3t")
    assert problem is not None and reason in problem


@pytest.mark.parametrize("header", ["Bearer s3cr3t", "bearer s3cr3t", "Bearer  s3cr3t "])
def test_the_token_passes(header: str) -> None:
    assert authorization_problem(header, "s3cr3t") is None


def test_protect_reads_is_a_boolean_named_in_its_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORECASTER_PROTECT_READS", raising=False)
    assert reads_protected() is False
    monkeypatch.setenv("FORECASTER_PROTECT_READS", "TRUE")
    assert reads_protected() is True
    monkeypatch.setenv("FORECASTER_PROTECT_READS", "maybe")
    with pytest.raises(ValueError, match="FORECASTER_PROTECT_READS='maybe'"):
        reads_protected()
