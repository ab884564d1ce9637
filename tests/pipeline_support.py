"""Helpers shared by the pipeline tests: small race configs against a SQLite store in a
temporary folder, and an environment free of MLflow variables."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import fluent
from mlflow.tracking._model_registry import utils as registry_utils
from mlflow.tracking._tracking_service import utils as tracking_utils

from pipelines.config import RaceConfig, parse_config
from pipelines.race import RaceResult

MLFLOW_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME",
                    "MLFLOW_EXPERIMENT_ID", "MLFLOW_ARTIFACT_LOCATION",
                    "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING",
                    "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")

TINY_NEURAL = {"input_len": 48, "max_epochs": 2, "steps_per_epoch": 3, "batch_size": 16}
LSTM = {"name": "lstm", "model": "LSTMForecaster",
        "params": {"hidden_size": 8, "num_layers": 1, "segment_len": 4, **TINY_NEURAL}}
TRANSFORMER = {"name": "transformer", "model": "TransformerForecaster",
               "params": {"d_model": 8, "n_heads": 2, "encoder_layers": 1, "patch_len": 8,
                          "patch_stride": 4, **TINY_NEURAL}}
HYBRID = {"name": "hybrid", "model": "HybridForecaster",
          "params": {"d_model": 8, "n_heads": 2, "segment_len": 4, **TINY_NEURAL}}
SNAIVE = {"name": "snaive", "model": "NaiveForecaster", "params": {"strategy": "last"}}
THETA = {"name": "theta", "model": "ThetaForecaster"}
# the non-seasonal naive forecast: on hourly data, clearly worse than the seasonal one
NAIVE = {"name": "naive", "model": "NaiveForecaster", "params": {"strategy": "last", "sp": 1}}


@contextmanager
def clean_mlflow_environment() -> Iterator[None]:
    """No MLFLOW_* variable of the machine running the tests may redirect a test's store, nor an
    experiment left active by an earlier test's ``mlflow.set_experiment`` (its id belongs to
    another store); the process-wide URIs a race sets are put back afterwards."""
    saved = {name: os.environ.get(name) for name in MLFLOW_VARIABLES}
    with pytest.MonkeyPatch.context() as patch:
        for name in MLFLOW_VARIABLES:
            patch.delenv(name, raising=False)
        patch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
        patch.setattr(registry_utils, "_registry_uri", registry_utils._registry_uri)
        patch.setattr(fluent, "_active_experiment_id", None)
        try:
            yield
        finally:
            # mlflow.set_tracking_uri and set_registry_uri also export MLFLOW_*_URI to the
            # environment, which the monkeypatch does not undo for variables absent before
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


MODEL = "test-forecaster"  # the registered model of race_config's races


@dataclass
class Race:
    """A race a test module runs once and its tests read: its config, result and store."""

    config: RaceConfig
    result: RaceResult
    store: Path


def race_config(store: Path, data_dir: Path, candidates: list[dict[str, Any]],
                **overrides: Any) -> RaceConfig:
    """Eight M4 Hourly series cut to their last 200 hours, horizon 24, two folds, no ensemble,
    tracked in ``store``/mlflow.db with artifacts in ``store``/artifacts. A dict in
    ``overrides`` is merged into its section, except a ``data`` naming a ``loader`` or
    ``path``: that one is the whole data section."""
    raw: dict[str, Any] = {
        "name": "test-race",
        "data": {"loader": "m4_hourly", "data_dir": str(data_dir / "m4"), "max_series": 8,
                 "last_n": 200},
        "frequency": "h",
        "horizon": 24,
        "candidates": candidates,
        "backtest": {"splitter": "expanding", "folds": 2},
        # each test races the candidates it names; the ensemble's tests turn it on
        "selection": {"metric": "mase", "promotion_margin": 0.01, "ensemble": False},
        "registry": {"model_name": MODEL},
        "tracking": {"tracking_uri": f"sqlite:///{store / 'mlflow.db'}",
                     "artifact_location": str(store / "artifacts"),
                     "system_metrics_sampling_interval": 1},
        "plot_series": 2,
    }
    for key, value in overrides.items():
        # a data section naming its own source replaces the M4 slice, not merged into it
        replaces = key == "data" and isinstance(value, dict) and {"loader", "path"} & set(value)
        if isinstance(value, dict) and isinstance(raw.get(key), dict) and not replaces:
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return parse_config(raw)
