"""A small MLflow registry for the serving tests: tiny LSTMs logged and registered the way
the race does it, in a SQLite store under a temporary folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient

from forecaster import LSTMForecaster, NeuralForecaster
from forecaster.data import panel_to_long
from pipelines import registry
from pipelines.pyfunc_model import log_forecaster
from tests.conftest import tiny

MODEL_NAME = "serving-test"
HORIZON = 6


@dataclass
class Registry:
    uri: str
    client: MlflowClient
    estimators: dict[int, NeuralForecaster]  # version -> the estimator it was logged from


def train_lstm(panel: pd.DataFrame, seed: int) -> NeuralForecaster:
    model = tiny(LSTMForecaster, input_len=24, random_state=seed)
    return model.fit(panel, fh=list(range(1, HORIZON + 1)))


def register(estimator: NeuralForecaster, panel: pd.DataFrame, tags: dict | None = None
             ) -> int:
    """Log and register ``estimator`` in the active tracking store; its version number."""
    example = panel_to_long(panel).groupby("series_id").tail(30)
    with mlflow.start_run():
        info = log_forecaster(estimator, horizon=HORIZON, levels=list(estimator.levels_),
                              frequency="h", input_example=example)
    version = registry.register_version(info, MODEL_NAME, {
        registry.TAG_CANDIDATE: "lstm", registry.TAG_MODEL_CLASS: "LSTMForecaster",
        "mase": "0.75", "smape": "12.5", **(tags or {})})
    return int(version.version)


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
