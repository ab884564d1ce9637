"""Prometheus's tools for the monitoring tests, from Debian's packages: ``promtool`` and
``prometheus`` (package ``prometheus``), ``prometheus-pushgateway`` (package of that name).
Missing ones are installed with apt-get; a test that cannot have them fails, never skips: in CI
(CI=true) as anywhere, a missing binary must not hide the checks that need it."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

APT_TIMEOUT_S = 900


def find_binary(name: str) -> str | None:
    """``name`` on PATH, else in /usr/bin (where Debian puts it, and PATH may not reach)."""
    found = shutil.which(name)
    if found is None and os.access(f"/usr/bin/{name}", os.X_OK):
        found = f"/usr/bin/{name}"
    return found


def apt_install(*packages: str) -> str:
    """apt-get install ``packages``, with ``apt-get update`` and a second try when the first
    fails (stale package lists); returns what went wrong, or "" on success."""
    if shutil.which("apt-get") is None:
        return "apt-get not found (not a Debian-based system)"
    sudo: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            return "not root and sudo not found"
        sudo = ["sudo", "-n"]  # -n: fail rather than wait for a password
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # no recommends: the binaries are all that is needed, not node-exporter & co
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
    problem = ""
    for commands in ([install], [["apt-get", "update", "-qq"], install]):
        for command in commands:
            try:
                result = subprocess.run(sudo + command, capture_output=True, text=True,
                                        env=env, timeout=APT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                problem = f"`{' '.join(sudo + command)}` timed out"
                break
            if result.returncode != 0:
                problem = (f"`{' '.join(sudo + command)}` exited with {result.returncode}:\n"
                           + (result.stdout + result.stderr)[-2000:])
                break
        else:
            return ""
    return problem


def require_binaries(packages: dict[str, str]) -> dict[str, str]:
    """Paths of the binaries named by the keys of ``packages`` (binary -> Debian package),
    installing the packages of the missing ones; ``pytest.fail`` when that does not bring
    them all."""
    paths = {name: find_binary(name) for name in packages}
    missing = sorted({packages[name] for name, path in paths.items() if path is None})
    if missing:
        problem = apt_install(*missing)
        paths = {name: find_binary(name) for name in packages}
        absent = sorted(name for name, path in paths.items() if path is None)
        if absent:
            ci = " (CI=true)" if os.environ.get("CI", "").lower() == "true" else ""
            pytest.fail(f"{', '.join(absent)} not found and could not be installed{ci}: "
                        f"{problem or 'apt-get succeeded but they are not on PATH'}. Install "
                        f"them with `sudo apt-get install {' '.join(missing)}` (Debian/Ubuntu) "
                        "or put the binaries from Prometheus's releases on PATH.")
    return {name: path for name, path in paths.items() if path is not None}
