"""The bearer token that guards what writes (``POST /actuals`` on the service, ``POST /retrain``
on the scheduler) and, with ``FORECASTER_PROTECT_READS=true``, the service's forecasts.

``FORECASTER_API_TOKEN`` unset or empty: no token is asked for (``make demo``, which says so in
its log). Set: a request must carry ``Authorization: Bearer TOKEN``, else it gets a 401.
"""

from __future__ import annotations

import hmac
import os

TOKEN_VARIABLE = "FORECASTER_API_TOKEN"
PROTECT_READS_VARIABLE = "FORECASTER_PROTECT_READS"
NO_TOKEN_NOTE = (f"{TOKEN_VARIABLE} is not set: POST /actuals and POST /retrain accept "
                 "requests without a token; set it wherever the port is reachable by others")


def api_token() -> str | None:
    """The token requests must carry, or None when none is configured."""
    return os.environ.get(TOKEN_VARIABLE) or None


def reads_protected() -> bool:
    """Whether ``/forecast`` and ``/explain`` ask for the token too."""
    value = os.environ.get(PROTECT_READS_VARIABLE, "false").strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"{PROTECT_READS_VARIABLE}={value!r}: expected true or false")
    return value in ("true", "1", "yes")


def authorization_problem(header: str | None, token: str | None) -> str | None:
    """Why a request with this ``Authorization`` header is refused, or None when it may pass
    (always, when ``token`` is None). Compared in constant time."""
    if token is None:
        return None
    if not header:
        return "missing Authorization header: send 'Authorization: Bearer <token>'"
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return "the Authorization header must be 'Bearer <token>'"
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        return "invalid token"
    return None
