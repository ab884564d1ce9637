"""Prometheus's tools for the monitoring tests, from Debian's packages: ``promtool`` and
``prometheus`` (package ``prometheus``), ``prometheus-pushgateway`` (package of that name).
Tests never install system packages: .ci/run does. A test that lacks them fails, never skips,
with the command that installs them: in CI (CI=true) as anywhere, a missing binary must not
hide the checks that need it."""

from __future__ import annotations

import os
import shutil

import pytest


def find_binary(name: str) -> str | None:
    """``name`` on PATH, else in /usr/bin (where Debian puts it, and PATH may not reach)."""
    found = shutil.which(name)
    if found is None and os.access(f"/usr/bin/{name}", os.X_OK):
        found = f"/usr/bin/{name}"
    return found


def require_binaries(packages: dict[str, str]) -> dict[str, str]:
    """Paths of the binaries named by the keys of ``packages`` (binary -> Debian package);
    ``pytest.fail`` naming the missing ones and how to install them."""
    paths = {name: find_binary(name) for name in packages}
    absent = sorted(name for name, path in paths.items() if path is None)
    if absent:
        missing = sorted({packages[name] for name in absent})
        ci = " (CI=true)" if os.environ.get("CI", "").lower() == "true" else ""
        pytest.fail(f"{', '.join(absent)} not found on PATH or in /usr/bin{ci}. Install them "
                    "with `sudo apt-get install --no-install-recommends "
                    f"{' '.join(missing)}` (Debian/Ubuntu; .ci/run does) or put the binaries "
                    "from Prometheus's releases on PATH.", pytrace=False)
    return {name: path for name, path in paths.items() if path is not None}
