"""Shared fixtures: a small synthetic panel, and every estimator of the library with the tiny
settings of its ``get_test_params`` (as sktime's own suite takes them), which train in well under
a second on a CPU."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from forecaster import NeuralForecaster, estimators
from forecaster.data import SERIES, TARGET, TIME
from forecaster.datasets import default_data_dir
from serving.first_forecast import wait_for_ok

DATA_DIR = default_data_dir()


@pytest.fixture(autouse=True)
def _mlflow_uris_restored() -> Iterator[None]:
    """Whatever a test points MLflow at stays with that test: ``mlflow.set_tracking_uri`` and
    ``set_registry_uri`` export ``MLFLOW_*_URI``, which a later test's subprocess (a race, a
    Ray node) would otherwise inherit, pointed at a server long stopped."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    uris = tracking_utils._tracking_uri, registry_utils._registry_uri
    yield
    for name in [k for k in os.environ if k.startswith("MLFLOW_")]:
        os.environ.pop(name)
    os.environ.update(saved)
    tracking_utils._tracking_uri, registry_utils._registry_uri = uris

PERIOD = 12
LENGTHS = {"a": 80, "b": 64, "c": 48}  # different lengths: a ragged panel

# training settings shared by every estimator in the suite, over those of get_test_params: the
# tests' numbers follow from them (the shortest usable history is 12 // 4 = 3, for one)
TINY_TRAINING: dict[str, Any] = {
    "input_len": 12,
    "max_epochs": 2,
    "steps_per_epoch": 3,
    "batch_size": 16,
    "verbose": False,
    "random_state": 0,
}


def estimator_classes() -> list[Any]:
    """Every estimator class of the library, ``forecaster.estimators.ESTIMATORS``, as pytest
    parameters: a class added there is covered by every test parametrised with these, with no
    list of ours to edit. Read when called, so that a plugin may extend ESTIMATORS first."""
    return [pytest.param(cls, id=cls.__name__) for cls in estimators.ESTIMATORS]


def estimator_variants() -> list[Any]:
    """(class, settings) for every estimator class of the library and each of its tiny test
    settings (``get_test_params``), as pytest parameters with ids ``<class>-<index>``."""
    return [pytest.param(cls, settings, id=f"{cls.__name__}-{i}")
            for cls in estimators.ESTIMATORS for i, settings in enumerate(cls.get_test_params())]


def tiny(cls: type[NeuralForecaster], settings: dict[str, Any] | None = None,
         **overrides: Any) -> NeuralForecaster:
    """A tiny, fast, seeded estimator of the given class: ``settings`` from its
    ``get_test_params`` (the first by default), then the suite's TINY_TRAINING, then
    ``overrides``."""
    settings = cls.get_test_params()[0] if settings is None else settings
    return cls(**{**settings, **TINY_TRAINING, **overrides})


def sine_series(length: int, phase: float = 0.0, level: float = 0.0, noise: float = 0.05,
                seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(length)
    return level + np.sin(2 * np.pi * t / PERIOD + phase) + noise * rng.standard_normal(length)


def make_panel(lengths: dict[str, int] | None = None, seed: int = 0,
               freq: str | None = None) -> pd.DataFrame:
    """pd-multiindex panel (series_id, timestamp) of noisy sines with integer timestamps, or
    dates on ``freq`` from 2024-01-01."""
    lengths = LENGTHS if lengths is None else lengths
    frames = []
    for i, (key, length) in enumerate(lengths.items()):
        frames.append(pd.DataFrame({
            SERIES: key,
            TIME: np.arange(length) if freq is None else pd.date_range("2024-01-01",
                                                                        periods=length, freq=freq),
            TARGET: sine_series(length, phase=0.7 * i, level=0.5 * i, seed=seed + i),
        }))
    return pd.concat(frames).set_index([SERIES, TIME])


@pytest.fixture(scope="session")
def sine_panel() -> pd.DataFrame:
    """Three noisy sines (period 12) of lengths 80, 64 and 48, ids "a", "b", "c". Shared by
    every test: copy it before changing it."""
    return make_panel()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"reference data not found at {DATA_DIR} (expected ../shared/data beside "
                    "the repository root)")
    return DATA_DIR


def pytest_configure(config: pytest.Config) -> None:
    # the tiny test networks are far faster on one thread: with several, torch's thread pool
    # spins against whatever else shares the CPU (10x slower on a busy 2-core machine)
    torch.set_num_threads(1)


# --- a real MLflow tracking server on PostgreSQL, for the pipeline tests -----------------------

POSTGRES_DSN = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
MLFLOW_START_TIMEOUT_S = 180  # a fresh database runs every MLflow migration on a busy CPU


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _postgres_admin() -> Any:
    """An autocommit connection to the ``postgres`` database (CREATE/DROP DATABASE need one),
    or a skip when PostgreSQL is not reachable; in CI (CI=true) a failure instead, as .ci/run
    starts PostgreSQL and a silent skip would hide the pipeline tests."""
    import psycopg2

    try:
        connection = psycopg2.connect(dbname="postgres", connect_timeout=5, **POSTGRES_DSN)
    except psycopg2.OperationalError as error:
        where = f"{POSTGRES_DSN['host']}:{POSTGRES_DSN['port']}"
        message = (f"PostgreSQL not reachable as user {POSTGRES_DSN['user']} on {where} "
                   f"({str(error).strip()}); start it (see .ci/run) to run the MLflow server "
                   "tests")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    connection.autocommit = True
    return connection


@dataclass(frozen=True)
class MlflowBackend:
    """A fresh PostgreSQL database for MLflow servers, and their artifacts folder."""

    store_uri: str
    artifacts: Path
    root: Path


@contextmanager
def postgres_database(prefix: str = "forecaster_test") -> Iterator[str]:
    """A new, uniquely named PostgreSQL database, as its SQLAlchemy URL; dropped afterwards
    (a skip, or in CI a failure, when PostgreSQL is not reachable)."""
    admin = _postgres_admin()
    database = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{database}"')
    try:
        # +psycopg2: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which is not
        # installed; psycopg2-binary is
        yield "postgresql+psycopg2://{user}@{host}:{port}/".format(**POSTGRES_DSN) + database
    finally:
        with admin.cursor() as cursor:
            # FORCE (PostgreSQL 13+): ends connections a killed server may have left behind
            cursor.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def mlflow_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowBackend]:
    """A new PostgreSQL database (dropped at the end of the session) and an artifacts folder,
    for ``mlflow_server`` and for any further server a test starts on the same store."""
    with postgres_database() as store:
        root = tmp_path_factory.mktemp("mlflow_server")
        yield MlflowBackend(store, root / "artifacts", root)


@pytest.fixture(scope="session")
def mlflow_server(mlflow_backend: MlflowBackend) -> Iterator[str]:
    """URI of a fresh ``mlflow server`` backed by a new PostgreSQL database, with artifacts
    proxied through the server (clients upload and download over HTTP only). The database is
    dropped and the server stopped at the end of the session."""
    with mlflow_server_process(mlflow_backend, "server") as (uri, _):
        yield uri


@contextmanager
def mlflow_server_process(backend: MlflowBackend, name: str
                          ) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """An ``mlflow server`` on ``backend`` (its log ``name``.log in the backend's folder): its
    URI and its process, stopped on exit unless a test killed it first. A second server on the
    session's store starts in seconds (the database is migrated) and may be killed freely."""
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    log_path = backend.root / f"{name}.log"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend.store_uri,
        "--artifacts-destination", str(backend.artifacts),
        "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1",  # one process: the machine's CPUs are shared
    ]
    # no job runner: it starts seven huey consumer processes (GenAI evaluation jobs, trace
    # roll-ups) that nothing here uses, on a machine with two shared CPUs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log_path, "ab") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                  cwd=backend.root, start_new_session=True)
    try:
        _wait_for_health(server, uri, log_path)
        yield uri, server
    finally:
        _stop(server)


def _wait_for_health(server: subprocess.Popen[bytes], uri: str, log_path: Path) -> None:
    try:
        wait_for_ok(f"{uri}/health", MLFLOW_START_TIMEOUT_S,
                    alive=lambda: server.poll() is None)
    except TimeoutError:
        why = (f"exited with {server.returncode}" if server.poll() is not None
               else f"not healthy after {MLFLOW_START_TIMEOUT_S} s")
        raise RuntimeError(f"mlflow server {why}:\n"
                           + log_path.read_text(errors="replace")[-4000:]) from None


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (uvicorn runs workers as children), then SIGKILL."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
