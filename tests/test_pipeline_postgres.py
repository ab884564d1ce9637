"""A whole race against a real ``mlflow server`` on PostgreSQL, over HTTP only.

The server (tests/conftest.py::mlflow_server) stores runs and the registry in a fresh database
and proxies artifacts, so this is the production topology: nothing here touches the server's
files, and every check goes through the REST API.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType

from pipelines.config import RaceConfig, parse_config
from pipelines.race import run_race
from pipelines.registry import CHAMPION
from pipelines.schedule import registry_has_champion

pytestmark = pytest.mark.slow

HORIZON = 6
SERIES_IDS = ("a", "b", "c")
MODEL_NAME = "pg-race"


def write_hourly_csv(path: Path, hours: int = 96) -> pd.DataFrame:
    """Three noisy daily cycles, hourly, as a long CSV."""
    rng = np.random.default_rng(0)
    index = pd.date_range("2024-01-01", periods=hours, freq="h")
    frame = pd.concat(pd.DataFrame({
        "series_id": key,
        "timestamp": index,
        "target": 10 + i + np.sin(2 * np.pi * np.arange(hours) / 24 + i)
        + 0.1 * rng.standard_normal(hours),
    }) for i, key in enumerate(SERIES_IDS))
    frame.to_csv(path, index=False)
    return frame


def tiny_race(data_path: Path) -> RaceConfig:
    """The quick config shrunk further: a seasonal naive baseline and a tiny LSTM, two folds."""
    return parse_config({
        "name": "pg-race",
        "data": {"path": str(data_path)},
        "frequency": "h",
        "horizon": HORIZON,
        "backtest": {"folds": 2},
        "registry": {"model_name": MODEL_NAME},
        # the sampler thread only costs CPU here
        "tracking": {"enable_system_metrics_logging": False},
        "plot_series": 1,
        "candidates": [
            {"name": "snaive", "model": "NaiveForecaster",
             "params": {"strategy": "last", "sp": 24}},
            {"name": "lstm", "model": "LSTMForecaster",
             "params": {"hidden_size": 4, "num_layers": 1, "segment_len": 4, "input_len": 24,
                        "max_epochs": 1, "steps_per_epoch": 2, "batch_size": 8,
                        "random_state": 0}},
        ],
    })


def test_race_on_a_postgres_backed_mlflow_server(mlflow_server: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # the race points MLflow's process-wide URIs at the server: put them back afterwards
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri",
                        mlflow.tracking._tracking_service.utils._tracking_uri)
    monkeypatch.setattr(mlflow.tracking._model_registry.utils, "_registry_uri",
                        mlflow.tracking._model_registry.utils._registry_uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # the override under test
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # anything written to the working directory lands here
    history = write_hourly_csv(tmp_path / "hourly.csv")
    config = tiny_race(tmp_path / "hourly.csv")
    assert config.tracking_uri == mlflow_server

    assert not registry_has_champion(mlflow_server, MODEL_NAME)
    result = run_race(config, progress=False)

    # the two candidates and their ensemble (on by default), each registered
    raced = {"snaive", "lstm", "ensemble"}
    assert result.winner in raced
    assert result.promoted and result.reason == "no champion yet"
    assert result.champion_version == result.winner_version
    assert set(result.versions) == raced

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    # runs: the race's parent run and one nested run per candidate, with their metrics
    experiment = client.get_experiment_by_name(config.experiment_name)
    assert experiment is not None and experiment.experiment_id == result.experiment_id
    runs = client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL)
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["winner"] == result.winner
    children = {r.data.tags["candidate"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == result.run_id}
    assert set(children) == raced
    for name, run in children.items():
        assert run.info.status == "FINISHED", name
        for metric in ("mase", "smape", "mae", "fold_1/mase", "fold_2/mase"):
            assert np.isfinite(run.data.metrics[metric]), (name, metric)
        # artifacts went through the server's proxy, not to a path this process wrote
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"forecasts.png"}
    # the LSTM logged its training curve epoch by epoch
    assert client.get_metric_history(children["lstm"].info.run_id, "train_loss")

    # the registry: one version per candidate, complete, the winner under @champion
    versions = {v.tags["candidate"]: v
                for v in client.search_model_versions(f"name='{MODEL_NAME}'")}
    assert {name: int(v.version) for name, v in versions.items()} == result.versions
    assert all(v.tags["race_complete"] == "true" for v in versions.values())
    winner = versions[result.winner]
    assert winner.tags["decision"] == "promoted"
    champion = client.get_model_version_by_alias(MODEL_NAME, CHAMPION)
    assert int(champion.version) == result.winner_version
    assert registry_has_champion(mlflow_server, MODEL_NAME)
    assert not registry_has_champion(mlflow_server, "no-such-model")

    # serving's view: the champion loads by alias over HTTP and forecasts every series
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@{CHAMPION}")
    forecast = model.predict(history, params={"horizon": HORIZON})
    assert len(forecast) == len(SERIES_IDS) * HORIZON
    assert set(forecast["series_id"]) == set(SERIES_IDS)
    assert np.isfinite(forecast.select_dtypes("number").to_numpy()).all()
