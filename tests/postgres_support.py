"""A private PostgreSQL server for the tests that stop and restart their database (the shared
one on 5432 serves every other test and is never stopped): initdb into a folder of its own, on a
free loopback port, trust authentication; run as the ``postgres`` user when the tests run as
root (PostgreSQL refuses to run as root)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import _free_port

PG_TIMEOUT_S = 60


def _binaries() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                   key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    return found[-1].parent if found else None


@dataclass(frozen=True)
class PrivatePostgres:
    folder: Path
    port: int
    bin: Path
    run_as: tuple[str, ...]  # the command prefix that runs as the server's owner

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *arguments: str) -> None:
        subprocess.run([*self.run_as, str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"),
                        "-w", "-t", str(PG_TIMEOUT_S), *arguments], check=True,
                       capture_output=True, timeout=PG_TIMEOUT_S + 10)

    def start(self) -> None:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder} "
                   "-c fsync=off -c synchronous_commit=off")
        self._ctl("-o", options, "-l", str(self.folder / "server.log"), "start")

    def stop(self) -> None:
        """A fast shutdown: open connections are ended, as when a database goes down."""
        self._ctl("-m", "fast", "stop")


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A started private server (skipped where PostgreSQL's binaries are not installed),
    stopped and removed afterwards."""
    binaries = _binaries()
    if binaries is None:
        pytest.skip("PostgreSQL's server binaries (/usr/lib/postgresql/*/bin) are not installed")
    # not under pytest's tmp_path: its folders are private to root, and the server runs as
    # postgres
    folder = Path(tempfile.mkdtemp(prefix="forecaster-pg-"))
    run_as: tuple[str, ...] = ()
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        run_as = ("runuser", "-u", "postgres", "--")
    server = PrivatePostgres(folder, _free_port(), binaries, run_as)
    try:
        subprocess.run([*run_as, str(binaries / "initdb"), "-D", str(folder / "data"),
                        "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"],
                       check=True, capture_output=True, timeout=120)
        server.start()
        yield server
    finally:
        with contextlib.suppress(subprocess.SubprocessError):  # never started, or stopped
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)
