"""For the serving tests: a small MLflow registry (tiny LSTMs or a seasonal naive baseline
logged and registered the way the race does it, in a SQLite store under a temporary folder), or
a real race into one, and a real ``forecaster serve`` on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from prometheus_client.parser import text_string_to_metric_families
from sktime.forecasting.base import BaseForecaster

from forecaster import LSTMForecaster, NeuralForecaster
from forecaster.data import SERIES, TARGET, panel_to_long
from pipelines import registry, signing
from pipelines.config import RaceConfig
from pipelines.pyfunc_model import log_forecaster
from pipelines.race import RaceResult, run_race
from pipelines.sources import load_race_data
from serving.config import ENV_PREFIX
from serving.first_forecast import wait_for_ok
from tests.conftest import _free_port, _stop, tiny
from tests.pipeline_support import clean_mlflow_environment, race_config

MODEL_NAME = "serving-test"
HORIZON = 6
SERVICE_START_TIMEOUT_S = 180  # bentoml serve imports torch and MLflow in each process
PORT_ATTEMPTS = 3  # starts of a service whose port another process took first


@dataclass
class Registry:
    uri: str
    client: MlflowClient
    estimators: dict[int, NeuralForecaster]  # version -> the estimator it was logged from


def train_lstm(panel: pd.DataFrame, seed: int) -> NeuralForecaster:
    model = tiny(LSTMForecaster, input_len=24, random_state=seed)
    return model.fit(panel, fh=list(range(1, HORIZON + 1)))


def register(estimator: BaseForecaster, panel: pd.DataFrame, tags: dict | None = None,
             name: str = MODEL_NAME, levels: list[float] | None = None) -> int:
    """Log and register ``estimator`` in the active tracking store as a version of ``name``
    (a network's levels are its own; a baseline's are ``levels``), vouched for as a race
    vouches for its versions (:func:`vouch_like_a_race`); its version number."""
    example = panel_to_long(panel).groupby("series_id").tail(30)
    model_class = type(estimator).__name__
    with mlflow.start_run():
        info = log_forecaster(estimator, horizon=HORIZON,
                              levels=levels or list(estimator.levels_), frequency="h",
                              input_example=example)
    version = registry.register_version(info, name, {
        registry.TAG_CANDIDATE: model_class.removesuffix("Forecaster").lower(),
        registry.TAG_MODEL_CLASS: model_class, "mase": "0.75", "smape": "12.5",
        **(tags or {})})
    vouch_like_a_race(name, int(version.version))
    return int(version.version)


def vouch_like_a_race(name: str, version: int, key: bytes | None = None) -> None:
    """The tags a completed race writes on a valid version it registered: its files' digest
    (of the files as stored, downloaded back), valid, then its signature (keyed by ``key``,
    default $FORECASTER_SIGNING_KEY) and race_complete."""
    client = MlflowClient()
    with tempfile.TemporaryDirectory() as folder:
        files = signing.download(client.get_model_version_download_uri(name, str(version)),
                                 Path(folder), client.tracking_uri)
        claims = {signing.TAG_FILES: signing.files_digest(files), registry.TAG_VALID: "true"}
    registry.tag_version(name, version, {**claims, **signing.vouch(
        name, version, claims, key if key is not None else signing.signing_key())})


def make_registry(store: Path, panel: pd.DataFrame, seeds: tuple[int, ...] = (0, 1)
                  ) -> Registry:
    """One version per seed; @champion on the first."""
    uri = f"sqlite:///{store / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.create_experiment("serving-test",
                                          artifact_location=str(store / "artifacts"))
    mlflow.set_experiment(experiment_id=experiment)
    estimators = {}
    for seed in seeds:
        estimator = train_lstm(panel, seed)
        estimators[register(estimator, panel)] = estimator
    registry.set_alias(MODEL_NAME, registry.CHAMPION, min(estimators))
    return Registry(uri, MlflowClient(uri, uri), estimators)


def race(store: Path, data_dir: Path, candidates: list[dict[str, Any]], **overrides: Any
         ) -> tuple[RaceConfig, RaceResult, pd.DataFrame]:
    """A real race of ``candidates`` (the config of tests.pipeline_support.race_config, with
    ``overrides``) into ``store``: its config, its result and the panel it trained on."""
    with clean_mlflow_environment():
        config = race_config(store, data_dir, candidates, **overrides)
        result = run_race(config, progress=False)
        panel = load_race_data(config.data).panel
    return config, result, panel


def clean_environment(**variables: str) -> dict[str, str]:
    """The environment for a subprocess, without the machine's MLFLOW_* and FORECASTER_*
    variables (they would redirect its store or model), plus ``variables``; one torch thread,
    as the machine's CPUs are shared."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "FORECASTER_"))}
    return env | {"OMP_NUM_THREADS": "1", **variables}


@contextmanager
def started(command: list[str], log: Path, env: dict[str, str] | None = None
            ) -> Iterator[subprocess.Popen[bytes]]:
    """``command`` running in a session of its own, output to ``log``; its process group
    (BentoML's workers, ...) is stopped on exit."""
    with log.open("wb") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        yield process
    finally:
        _stop(process)


@contextmanager
def running_service(config: RaceConfig, log: Path, **settings: str) -> Iterator[str]:
    """``forecaster serve`` on a free loopback port, serving the champion of the race that
    ``config`` describes; ``settings``: more serving settings by field name (workers="2"),
    passed as FORECASTER_* variables. Yields its URL once /readyz answers."""
    with serving(config.tracking_uri, log, ["--model-name", config.registered_model],
                 **settings) as url:
        yield url


@contextmanager
def serving(tracking_uri: str, log: Path, arguments: list[str], ready: str = "/readyz",
            environment: dict[str, str] | None = None, **settings: str) -> Iterator[str]:
    """``forecaster serve ARGUMENTS`` on a free loopback port of the registry at
    ``tracking_uri`` (``settings`` as in running_service, then more variables from
    ``environment``); yields its URL once ``ready`` answers 200, and for /readyz once every
    worker has loaded its model (/readyz reaches one worker). Its forecast store is SQLite
    beside ``log`` unless ``store_url`` is set."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = _free_port()
        # a BentoML home of its own (its default model cache folder, serving.config)
        env = clean_environment(**{"MLFLOW_TRACKING_URI": tracking_uri,
                                   "BENTOML_HOME": str(log.parent / f"bentoml-home-{port}"),
                                   f"{ENV_PREFIX}STORE_URL":
                                       f"sqlite:///{log.parent / 'forecaster-store.db'}",
                                   **{f"{ENV_PREFIX}{name.upper()}": v
                                      for name, v in settings.items()},
                                   **(environment or {})})
        command = [sys.executable, "-m", "cli.main", "serve", "--host", "127.0.0.1",
                   "--port", str(port), *arguments]
        url = f"http://127.0.0.1:{port}"
        with started(command, log, env) as server:
            try:
                wait_for_ok(url + ready, timeout=SERVICE_START_TIMEOUT_S,
                            alive=lambda: server.poll() is None)
                if ready == "/readyz":
                    _wait_for_loads(url, int(settings.get("workers", "1")), server)
            except TimeoutError:
                text = log.read_text(errors="replace")
                # the port was free when picked, but BentoML's process manager picks its own
                # control ports the same way and may take it first: start again elsewhere
                if (attempt < PORT_ATTEMPTS and server.poll() is not None
                        and "Address already in use" in text):
                    continue
                pytest.fail(f"the service did not answer {ready}:\n{text[-3000:]}")
            yield url
            return


def _wait_for_loads(url: str, workers: int, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + SERVICE_START_TIMEOUT_S
    while time.monotonic() < deadline and server.poll() is None:
        text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
        loads = sum(sample.value for family in text_string_to_metric_families(text)
                    for sample in family.samples
                    if sample.name == "forecaster_model_loads_total"
                    and sample.labels.get("outcome") == "loaded")
        if loads >= workers:
            return
        time.sleep(0.5)
    raise TimeoutError(f"not every one of {workers} workers loaded a model")


def call(url: str, body: bytes | dict | None = None, method: str | None = None,
         timeout: float = 30, headers: dict[str, str] | None = None) -> tuple[int, dict | str]:
    """Its status and its body, parsed when JSON: a 4xx is an answer here, not an error."""
    status, text, _ = call_with_headers(url, body, method, timeout, headers)
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def call_with_headers(url: str, body: bytes | dict | None = None, method: str | None = None,
                      timeout: float = 30, headers: dict[str, str] | None = None
                      ) -> tuple[int, str, dict[str, str]]:
    """Its status, its body as text and its headers (names in lower case); ``headers``: more
    request headers."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"content-type": "application/json",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, text, headers = response.status, response.read().decode(), response.headers
    except urllib.error.HTTPError as error:
        status, text, headers = error.code, error.read().decode(), error.headers
    return status, text, {k.lower(): v for k, v in headers.items()}


def series_of(panel: pd.DataFrame) -> list[dict]:
    """The series of a panel as /forecast takes them."""
    return [{"id": str(key), "values": group[TARGET].tolist()}
            for key, group in panel.reset_index().groupby(SERIES)]
