"""The MLflow pyfunc model of a race candidate: a long history in, a forecast frame out.

Input: a DataFrame with ``series_id``, ``timestamp`` and ``target`` (each series' history).
Output: the forecast frame of :mod:`pipelines.forecasts`: ``series_id``, ``timestamp``,
``y_pred`` and one ``q_<level>`` column per quantile level. The ``horizon`` param (at most the
trained horizon for neural models) sets how many steps ahead. The model config records the
shortest history the model forecasts from (``min_history``, see
``pipelines.candidates.min_history``), which the service reads.

The model is logged as "models from code": MLflow copies this file into the model and runs it
when the model loads, so no class of ours is pickled. What the file reads is the artifact
``model``:

* neural forecasters: ``weights.pt`` (tensors) and ``config.json`` from
  ``NeuralForecaster.save_model``; forecasts come from ``forecast_histories``, the stateless
  inference path, so concurrent requests cannot disturb one another;
* sktime baselines: the fitted estimator, serialised with cloudpickle (sktime estimators are
  plain sklearn-style objects). These are local models: each request refits a clone on the
  history it brings, as their ``fit`` would.

Loading needs this repository's packages (``forecaster`` and ``pipelines``) installed; the
third-party pins are in the model's requirements.
"""

from __future__ import annotations

import importlib.metadata
import tempfile
import warnings
from pathlib import Path
from typing import Any

import cloudpickle
import mlflow
import numpy as np
import pandas as pd
from mlflow.models import infer_signature
from mlflow.models.model import ModelInfo
from mlflow.pyfunc import PythonModel, PythonModelContext
from sktime.forecasting.base import BaseForecaster

from forecaster import NeuralForecaster
from forecaster.data import SERIES, TARGET, TIME, long_to_panel, validate_panel
from pipelines.candidates import min_history
from pipelines.forecasts import (
    POINT,
    forecast_frame,
    future_index,
    horizon_of,
    quantile_column,
)
from pipelines.warning_capture import without_sktime_notice

ARTIFACT = "model"
NEURAL, SKTIME = "neural", "sktime"
REQUIREMENTS = ("mlflow", "torch", "sktime", "statsmodels", "scipy", "pandas", "numpy",
                "cloudpickle")


def model_levels(estimator: BaseForecaster, levels: list[float]) -> list[float]:
    """The quantile levels a model forecasts: a network's own, else the race's."""
    if isinstance(estimator, NeuralForecaster):
        return [float(level) for level in estimator.levels_]
    return [float(level) for level in levels]


def _history(model_input: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in (SERIES, TIME, TARGET) if c not in model_input.columns]
    if missing:
        raise ValueError(f"the input lacks the column(s) {missing}; expected {SERIES!r}, "
                         f"{TIME!r} and {TARGET!r}")
    history = model_input[[SERIES, TIME, TARGET]].astype({SERIES: str, TARGET: np.float64})
    return history.sort_values([SERIES, TIME], kind="stable").reset_index(drop=True)


def forecast_history(estimator: BaseForecaster, model_input: pd.DataFrame, horizon: int,
                     levels: list[float], frequency: str) -> pd.DataFrame:
    """The forecast frame ``horizon`` steps past each series of a long history.

    ``estimator`` is a trained neural forecaster or a fitted sktime baseline; neither is
    modified, so one loaded model can serve concurrent requests.
    """
    history = _history(model_input)
    panel = long_to_panel(history)
    validate_panel(panel, min_length=1, name="history")
    if isinstance(estimator, NeuralForecaster):
        if horizon > estimator.horizon_:
            raise ValueError(f"horizon {horizon} is beyond the {estimator.horizon_} steps the "
                             "network was trained for")
        arrays = [group[TARGET].to_numpy(np.float32)
                  for _, group in history.groupby(SERIES, sort=True)]
        quantiles = estimator.forecast_histories(arrays)[:, :horizon]  # (series, H, levels)
        quantiles = quantiles.reshape(-1, quantiles.shape[-1]).astype(np.float64)
        index = future_index(history, horizon, frequency)
        median = estimator.levels_.index(0.5)
        frame = pd.DataFrame({POINT: quantiles[:, median]}, index=index)
        for i, level in enumerate(estimator.levels_):
            frame[quantile_column(level)] = quantiles[:, i]
        return frame.reset_index()
    datetime_index = pd.api.types.is_datetime64_any_dtype(history[TIME])
    with without_sktime_notice():
        model = estimator.clone().fit(panel, fh=horizon_of(horizon, datetime_index, frequency))
        return forecast_frame(model, levels)


class ForecasterModel(PythonModel):
    """The pyfunc wrapper; its settings come from the model config written at logging."""

    def load_context(self, context: PythonModelContext) -> None:
        config = context.model_config
        self.kind, self.horizon = config["kind"], int(config["horizon"])
        self.levels, self.frequency = list(config["levels"]), config["frequency"]
        self.min_history = int(config["min_history"])  # the shortest history it forecasts from
        path = Path(context.artifacts[ARTIFACT])
        if self.kind == NEURAL:
            self.estimator: BaseForecaster = NeuralForecaster.load_model(path)
        else:
            with path.open("rb") as file:
                self.estimator = cloudpickle.load(file)

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        horizon = int((params or {}).get("horizon") or self.horizon)
        return forecast_history(self.estimator, model_input, horizon, self.levels,
                                self.frequency)


def requirements() -> list[str]:
    """Pins of the installed third-party packages the model needs (a local version label such
    as torch's ``+cpu`` is dropped: it names a build, not an index release)."""
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}"
            for name in REQUIREMENTS]


def log_forecaster(estimator: BaseForecaster, *, horizon: int, levels: list[float],
                   frequency: str, input_example: pd.DataFrame,
                   example_output: pd.DataFrame | None = None,
                   name: str = ARTIFACT) -> ModelInfo:
    """Log a trained estimator as this pyfunc model in the active run (not registered).

    The signature is inferred from ``input_example`` and its forecast ``example_output``
    (computed here when not given), with the ``horizon`` param.
    """
    neural = isinstance(estimator, NeuralForecaster)
    levels = model_levels(estimator, levels)
    with tempfile.TemporaryDirectory() as tmp:
        if neural:
            path = estimator.save_model(Path(tmp) / ARTIFACT)
        else:
            path = Path(tmp) / "estimator.pkl"
            path.write_bytes(cloudpickle.dumps(estimator))
        if example_output is None:
            example_output = forecast_history(estimator, input_example, horizon, levels,
                                              frequency)
        with warnings.catch_warnings():
            # MLflow hints that integer columns cannot hold missing values: timestamps never do
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
            signature = infer_signature(input_example, example_output,
                                        params={"horizon": horizon})
            return mlflow.pyfunc.log_model(
                name=name,
                python_model=Path(__file__),
                artifacts={ARTIFACT: str(path)},
                model_config={"kind": NEURAL if neural else SKTIME, "horizon": horizon,
                              "levels": levels, "frequency": frequency,
                              "min_history": min_history(estimator)},
                signature=signature,
                input_example=input_example,
                # explicit pins: inferring them would load the model again in a subprocess
                pip_requirements=requirements(),
            )


# models from code: MLflow runs this file on load and takes the model set here
mlflow.models.set_model(ForecasterModel())
