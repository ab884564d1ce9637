"""The MLflow pyfunc model of a race candidate: a long history in, a forecast frame out.

Input: a DataFrame with ``series_id``, ``timestamp`` and ``target`` (each series' history).
A model trained with covariates also takes their columns (the model's signature names them):
static covariates repeat the series' value on every row, and with known-future covariates each
series ends with ``horizon`` future rows whose ``target`` is empty (NaN) and whose covariates
hold the values ahead (see :func:`future_layout`). Output: the forecast frame of
:mod:`pipelines.forecasts`: ``series_id``, ``timestamp``, ``y_pred`` and one ``q_<level>``
column per quantile level. The ``horizon`` param (at most the trained horizon for neural
models) sets how many steps ahead. The model config records the shortest
history the model forecasts from (``min_history``, see ``pipelines.candidates.min_history``),
which the service reads.

The model is logged as "models from code": MLflow copies this file into the model and runs it
when the model loads, so no class of ours is pickled. What the file reads is the artifact
``model``:

* neural forecasters: ``weights.pt`` (tensors) and ``config.json`` from
  ``NeuralForecaster.save_model``; forecasts come from ``forecast_histories``, the stateless
  inference path, so concurrent requests cannot disturb one another;
* sktime baselines and ensembles (``forecaster.ensemble``): the estimator's unfitted clone,
  serialised with cloudpickle (sktime estimators are plain sklearn-style objects). These are
  local models: each request fits a clone on the history it brings, as their ``fit`` would;
  an ensemble's networks are in sktime's pretrained state, so that fitting only gives them
  their context.

Loading needs this repository's packages (``forecaster`` and ``pipelines``) installed; the
third-party pins are in the model's requirements.
"""

from __future__ import annotations

import importlib.metadata
import tempfile
import warnings
from collections.abc import Sequence
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
from forecaster.data import SERIES, TARGET, TIME, split_long, validate_panel
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


def future_layout(long: pd.DataFrame, horizon: int) -> pd.DataFrame:
    """A long frame whose last ``horizon`` rows per series become future rows (target NaN):
    the input of a covariate model, made from data that hold those rows' covariates."""
    ordered = long.sort_values([SERIES, TIME], kind="stable").reset_index(drop=True)
    future = ordered.groupby(SERIES, sort=False).cumcount(ascending=False) < horizon
    return ordered.assign(**{TARGET: ordered[TARGET].mask(future)})


def _history(model_input: pd.DataFrame, covariates: list[str]) -> pd.DataFrame:
    columns = [SERIES, TIME, TARGET, *covariates]
    missing = [c for c in columns if c not in model_input.columns]
    if missing:
        raise ValueError(f"the input lacks the column(s) {missing}; expected {columns}")
    history = model_input[columns].astype({SERIES: str, **dict.fromkeys(
        [TARGET, *covariates], np.float64)})
    return history.sort_values([SERIES, TIME], kind="stable").reset_index(drop=True)


def _split_future(history: pd.DataFrame, horizon: int, frequency: str
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The observed rows and the ``horizon`` future rows (empty target) that end each series."""
    series = history[SERIES]
    empty = history[TARGET].isna().astype(np.int64)
    # a row is a future row when it and every later row of its series have no target
    trailing = empty[::-1].groupby(series[::-1], sort=False).cumprod()[::-1].astype(bool)
    counts = trailing.groupby(series, sort=True).sum()
    wrong = counts[counts != horizon]
    if len(wrong):
        raise ValueError(
            f"series {wrong.index[0]!r} ends with {wrong.iloc[0]} future row(s) (empty target, "
            f"with the known-future covariates' values ahead); the model takes known-future "
            f"covariates, so each series needs exactly horizon = {horizon}")
    past, future = history[~trailing], history[trailing]
    expected = future_index(past, horizon, frequency)
    given = pd.MultiIndex.from_frame(future[[SERIES, TIME]])
    if not given.equals(expected.set_names([SERIES, TIME])):
        bad = next(i for i, (a, b) in enumerate(zip(given, expected, strict=True)) if a != b)
        raise ValueError(f"series {given[bad][0]!r}: future row at {given[bad][1]}, but the "
                         f"step after its history at frequency {frequency!r} is "
                         f"{expected[bad][1]}")
    return past, future


def forecast_history(estimator: BaseForecaster, model_input: pd.DataFrame, horizon: int,
                     levels: list[float], frequency: str, known_future: Sequence[str] = (),
                     static: Sequence[str] = ()) -> pd.DataFrame:
    """The forecast frame ``horizon`` steps past each series of a long history.

    ``estimator`` is a trained neural forecaster, or an sktime baseline or ensemble, whose
    clone is fitted on the history; neither is modified, so one loaded model can serve
    concurrent requests. ``known_future`` and
    ``static`` name the covariates it was trained with: the input then carries them, in the
    layout of the module doc.
    """
    known_future, static = list(known_future), list(static)
    history = _history(model_input, [*known_future, *static])
    future = None
    if known_future:
        history, future = _split_future(history, horizon, frequency)
    panel, X = split_long(history, known_future, static)
    validate_panel(panel, min_length=1, name="history")
    if X is not None:
        validate_panel(X, min_length=1, name="covariates")
    if isinstance(estimator, NeuralForecaster):
        if horizon > estimator.horizon_:
            raise ValueError(f"horizon {horizon} is beyond the {estimator.horizon_} steps the "
                             "network was trained for")
        if (known_future, static) != (estimator.covariates_, estimator.static_covariates_):
            raise ValueError(f"the network was trained with the covariates "
                             f"{estimator.covariates_} and {estimator.static_covariates_} "
                             f"(static), not {known_future} and {static}")
        groups = history.groupby(SERIES, sort=True)
        arrays = [group[TARGET].to_numpy(np.float32) for _, group in groups]
        covariates = None if not known_future else [
            np.concatenate([past, ahead]) for (_, past), (_, ahead) in zip(
                groups[known_future], future.groupby(SERIES, sort=True)[known_future],
                strict=True)]
        rows = groups[static].first().to_numpy(np.float32) if static else None
        quantiles = estimator.forecast_histories(
            arrays, list(groups.groups), covariates=covariates, static=rows)[:, :horizon]
        quantiles = quantiles.reshape(-1, quantiles.shape[-1]).astype(np.float64)
        index = future_index(history, horizon, frequency)
        median = estimator.levels_.index(0.5)
        frame = pd.DataFrame({POINT: quantiles[:, median]}, index=index)
        for i, level in enumerate(estimator.levels_):
            frame[quantile_column(level)] = quantiles[:, i]
        return frame.reset_index()
    datetime_index = pd.api.types.is_datetime64_any_dtype(history[TIME])
    X_future = None if future is None else future.set_index([SERIES, TIME])[X.columns]
    with without_sktime_notice():
        model = estimator.clone().fit(panel, X=X,
                                      fh=horizon_of(horizon, datetime_index, frequency))
        return forecast_frame(model, levels, X=X_future)


class ForecasterModel(PythonModel):
    """The pyfunc wrapper; its settings come from the model config written at logging."""

    def load_context(self, context: PythonModelContext) -> None:
        config = context.model_config
        self.kind, self.horizon = config["kind"], int(config["horizon"])
        self.levels, self.frequency = list(config["levels"]), config["frequency"]
        # the covariates the model takes (models logged before covariates existed take none)
        self.known_future = list(config.get("known_future", []))
        self.static = list(config.get("static", []))
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
                                self.frequency, self.known_future, self.static)


def requirements() -> list[str]:
    """Pins of the installed third-party packages the model needs (a local version label such
    as torch's ``+cpu`` is dropped: it names a build, not an index release)."""
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}"
            for name in REQUIREMENTS]


def log_forecaster(estimator: BaseForecaster, *, horizon: int, levels: list[float],
                   frequency: str, input_example: pd.DataFrame,
                   example_output: pd.DataFrame | None = None, known_future: Sequence[str] = (),
                   static: Sequence[str] = (), name: str = ARTIFACT) -> ModelInfo:
    """Log a trained estimator as this pyfunc model in the active run (not registered).

    ``known_future`` and ``static`` name the covariates the estimator was fitted with; the
    input example (in the layout of the module doc) is cut to the columns the model takes, so
    that the signature, inferred from it and its forecast ``example_output`` (computed here
    when not given) with the ``horizon`` param, names exactly those.
    """
    neural = isinstance(estimator, NeuralForecaster)
    levels = model_levels(estimator, levels)
    known_future, static = list(known_future), list(static)
    columns = [SERIES, TIME, TARGET, *known_future, *static]
    missing = [c for c in columns if c not in input_example.columns]
    if missing:
        raise ValueError(f"the input example lacks the column(s) {missing} the model takes")
    input_example = input_example[columns]
    with tempfile.TemporaryDirectory() as tmp:
        if neural:
            path = estimator.save_model(Path(tmp) / ARTIFACT)
        else:
            # what forecast_history fits on each history: no training data, and no member
            # network moved to a GPU by the race's own forecasts
            path = Path(tmp) / "estimator.pkl"
            path.write_bytes(cloudpickle.dumps(estimator.clone()))
        if example_output is None:
            example_output = forecast_history(estimator, input_example, horizon, levels,
                                              frequency, known_future, static)
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
                              "known_future": known_future, "static": static,
                              "min_history": min_history(estimator)},
                signature=signature,
                input_example=input_example,
                # explicit pins: inferring them would load the model again in a subprocess
                pip_requirements=requirements(),
            )


# models from code: MLflow runs this file on load and takes the model set here
mlflow.models.set_model(ForecasterModel())
