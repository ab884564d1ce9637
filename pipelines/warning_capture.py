"""Warnings the race records instead of printing over its progress bars.

sktime 1.2 warns in every forecaster's constructor that the default of ``remember_data``
changes in 1.3 (it concerns ``update``, which the race never calls), and sktime's vectorisation
builds one forecaster per series, so the notice would repeat hundreds of times. A global
``filterwarnings("ignore")`` does not hold: sktime's own warning-suppression helper re-inserts
a ``default`` filter for FutureWarning every time it exits. So the notice is dropped where
warnings are caught, and the other warnings are kept.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

SKTIME_NOTICE = "The default of config ``remember_data``"


def _noise(caught: warnings.WarningMessage) -> bool:
    return str(caught.message).startswith(SKTIME_NOTICE)


@contextmanager
def recorded_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Record every warning raised inside; the list (filled on exit) leaves out sktime's
    ``remember_data`` notice."""
    kept: list[warnings.WarningMessage] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield kept
        finally:
            kept.extend(w for w in caught if not _noise(w))


@contextmanager
def without_sktime_notice() -> Iterator[None]:
    """Drop sktime's ``remember_data`` notice; raise the other warnings again, once each."""
    with recorded_warnings() as kept:
        yield
    seen = set()
    for w in kept:
        key = (w.category, str(w.message))
        if key not in seen:
            seen.add(key)
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
