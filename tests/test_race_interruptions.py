"""``forecaster train`` when its tracking server dies and when it is told to stop, against real
``mlflow server`` processes on PostgreSQL and a real Pushgateway.

A tracking server killed mid-race ends the race, non-zero, within the HTTP budget of its config
(tracking.http_budget_seconds), with one line that says so and no traceback. SIGTERM mid-race
leaves no run RUNNING (the race's runs are KILLED), the champion where it was, exit code 143,
and a failed run on the Pushgateway.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import ViewType
from prometheus_client.parser import text_string_to_metric_families

from pipelines import registry
from pipelines.config import RaceConfig
from pipelines.race import run_race
from pipelines.schedule import PUSH_JOB
from tests.conftest import MlflowBackend, _free_port, mlflow_server_process
from tests.monitoring_support import require_binaries
from tests.pipeline_support import LSTM, SNAIVE, clean_mlflow_environment, race_config
from tests.serving_support import clean_environment, started

pytestmark = pytest.mark.slow
# a network that trains for minutes, logging its learning curve to the server every epoch
LONG_LSTM = {**LSTM, "params": {**LSTM["params"], "max_epochs": 1000, "patience": 1000}}
REPO = Path(__file__).resolve().parents[1]


def config_for(server: str, store: Path, data_dir: Path, model: str,
               candidates: list[dict[str, Any]]) -> RaceConfig:
    """A race of ``candidates`` into the server under ``model`` (its own experiment)."""
    with clean_mlflow_environment():
        return race_config(store, data_dir, candidates, registry={"model_name": model},
                           tracking={"tracking_uri": server, "artifact_location": None,
                                     "experiment_name": model,
                                     "enable_system_metrics_logging": False})


def train(config: RaceConfig, folder: Path, *arguments: str) -> subprocess.Popen[str]:
    """``forecaster train`` on ``config`` (written to ``folder``), its output piped."""
    path = folder / "race.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return subprocess.Popen([sys.executable, "-m", "cli.main", "train", str(path),
                             "--no-progress", *arguments], cwd=REPO, env=clean_environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_a_running_candidate(server: str, model: str, race: subprocess.Popen[str]) -> None:
    """Until the race is training a candidate (its nested run is RUNNING)."""
    client = MlflowClient(server, server)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert race.poll() is None, race.communicate()
        experiment = client.get_experiment_by_name(model)
        if experiment is not None and any(
                "candidate" in run.data.tags for run in client.search_runs(
                    [experiment.experiment_id], "attributes.status = 'RUNNING'")):
            time.sleep(2)  # well inside the candidate's training
            return
        time.sleep(0.5)
    pytest.fail("the race never started a candidate")


@pytest.fixture
def doomed_server(mlflow_backend: MlflowBackend) -> Iterator[tuple[str, subprocess.Popen]]:
    """A second MLflow server on the session's store, for a test to kill."""
    with mlflow_server_process(mlflow_backend, "doomed-server") as (uri, process):
        yield uri, process


def test_a_dead_tracking_server_ends_the_race_within_its_budget(
        doomed_server: tuple[str, subprocess.Popen], tmp_path: Path, data_dir: Path) -> None:
    server, process = doomed_server
    config = config_for(server, tmp_path, data_dir, "dies-with-its-server", [LONG_LSTM])
    budget = config.tracking.http_budget_seconds
    assert budget < 60
    race = train(config, tmp_path)
    try:
        wait_for_a_running_candidate(server, "dies-with-its-server", race)
        os.killpg(process.pid, signal.SIGKILL)  # the server and its workers, at once
        process.wait()
        killed = time.monotonic()
        _, stderr = race.communicate(timeout=budget + 60)
        took = time.monotonic() - killed
    finally:
        if race.poll() is None:
            race.kill()
            race.wait()
    assert race.returncode == 1, stderr[-3000:]
    assert took < budget, f"the race took {took:.0f} s after its server died (budget {budget})"
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    # Killed between requests the server refuses (ConnectionError); killed while answering one,
    # it cuts the body short (ChunkedEncodingError). Both are a dropped connection.
    assert re.match(f"forecaster train: the tracking server {re.escape(server)} refused or "
                    r"dropped the connection \((ConnectionError|ChunkedEncodingError); each "
                    f"request gives up within {budget:.0f} s", last), last
    assert last.endswith("the race stopped, the aliases are untouched")


def test_sigterm_kills_the_runs_and_pushes_a_failure(
        mlflow_server: str, tmp_path: Path, data_dir: Path) -> None:
    binary = require_binaries({"prometheus-pushgateway": "prometheus-pushgateway"})
    model = "stopped-by-sigterm"
    with clean_mlflow_environment():  # a champion first, which the stopped race must keep
        first = run_race(config_for(mlflow_server, tmp_path, data_dir, model, [SNAIVE]),
                         progress=False)
    client = MlflowClient(mlflow_server, mlflow_server)
    before = client.get_registered_model(model).aliases
    assert before == {registry.CHAMPION: str(first.champion_version)}
    gateway = f"127.0.0.1:{_free_port()}"
    with started([binary["prometheus-pushgateway"], f"--web.listen-address={gateway}"],
                 tmp_path / "pushgateway.log"):
        config = config_for(mlflow_server, tmp_path, data_dir, model, [LONG_LSTM])
        race = train(config, tmp_path, "--pushgateway", gateway)
        try:
            wait_for_a_running_candidate(mlflow_server, model, race)
            race.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            _, stderr = race.communicate(timeout=60)
            took = time.monotonic() - stopped
        finally:
            if race.poll() is None:
                race.kill()
                race.wait()
        assert race.returncode == 143, stderr[-3000:]
        assert took < 30 and "Traceback" not in stderr, stderr[-3000:]
        assert stderr.strip().splitlines()[-1] == (
            "forecaster train: received SIGTERM: the race's runs are marked KILLED, the "
            "aliases are untouched")
        text = urllib.request.urlopen(f"http://{gateway}/metrics", timeout=10).read().decode()
    pushed = {(sample.name, sample.labels.get("outcome")): sample.value
              for family in text_string_to_metric_families(text) for sample in family.samples
              if sample.labels.get("job") == PUSH_JOB}
    assert pushed[("forecaster_training_runs_total", "failure")] == 1
    assert pushed[("forecaster_training_runs_total", "success")] == 0
    assert pushed[("forecaster_training_last_failure_timestamp_seconds", None)] > 0

    experiment = client.get_experiment_by_name(model).experiment_id
    runs = client.search_runs([experiment], run_view_type=ViewType.ALL)
    assert not [run for run in runs if run.info.status == "RUNNING"]
    [parent] = [run for run in runs if run.info.run_id != first.run_id
                and "mlflow.parentRunId" not in run.data.tags]
    children = [run for run in runs
                if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "KILLED"
    assert [(run.data.tags["candidate"], run.info.status) for run in children] == \
        [("lstm", "KILLED")]
    assert client.get_registered_model(model).aliases == before
