"""The shortest history each sktime baseline forecasts from, found by experiment: for each
configuration, ``pipelines.candidates.min_history`` is the exact minimum (one value fewer fails
or gives non-finite intervals) and longer histories, up to two more seasons, work."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from sktime.forecasting.base import BaseForecaster
from sktime.forecasting.ets import AutoETS
from sktime.forecasting.naive import NaiveForecaster
from sktime.forecasting.theta import ThetaForecaster

from forecaster.data import SERIES, TARGET, TIME
from pipelines.candidates import BASELINE_MIN_HISTORY, BASELINE_MODELS, min_history
from pipelines.pyfunc_model import forecast_history

LEVELS = [0.05, 0.1, 0.5, 0.9, 0.95]
HORIZON = 6

BASELINES = [
    NaiveForecaster(strategy="last", sp=1),
    NaiveForecaster(strategy="last", sp=7),
    NaiveForecaster(strategy="last", sp=24),
    NaiveForecaster(strategy="last", sp=4, window_length=8),
    NaiveForecaster(strategy="mean", sp=1),
    NaiveForecaster(strategy="mean", sp=12),
    NaiveForecaster(strategy="mean", sp=1, window_length=5),
    NaiveForecaster(strategy="drift", sp=1),
    NaiveForecaster(strategy="drift", sp=4),
    ThetaForecaster(sp=1),
    ThetaForecaster(sp=7),
    ThetaForecaster(sp=24),
    ThetaForecaster(sp=12, deseasonalize=False),
    AutoETS(),
    AutoETS(trend="add", damped_trend=True),
    AutoETS(initialization_method="heuristic"),
    AutoETS(seasonal="add", sp=7),
    # the race's configs: heuristic seasonal ETS (the weekly champion needed 16, not 14)
    AutoETS(error="add", seasonal="add", initialization_method="heuristic", sp=4),
    AutoETS(error="add", seasonal="add", initialization_method="heuristic", sp=7),
    AutoETS(error="add", seasonal="add", initialization_method="heuristic", sp=24),
    AutoETS(auto=True, additive_only=True, sp=1),
    AutoETS(auto=True, additive_only=True, sp=7),
]


def forecasts_finite(estimator: BaseForecaster, length: int, sp: int) -> bool:
    """Whether the served path (refit, then point and interval forecasts) succeeds on a noisy
    seasonal history of ``length`` values, with finite values."""
    t = np.arange(length)
    rng = np.random.default_rng(length)
    values = 10 + np.sin(2 * np.pi * t / max(sp, 2)) + 0.1 * rng.standard_normal(length)
    frame = pd.DataFrame({SERIES: "s", TIME: t, TARGET: values})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            forecast = forecast_history(estimator, frame, HORIZON, LEVELS, "h")
    except Exception:  # noqa: BLE001 - any failure means "too short" here
        return False
    return bool(np.isfinite(forecast.drop(columns=[SERIES, TIME]).to_numpy(float)).all())


@pytest.mark.parametrize("estimator", BASELINES, ids=lambda e: repr(e).replace(" ", ""))
def test_the_rule_is_the_exact_minimum(estimator: BaseForecaster) -> None:
    need = min_history(estimator)
    sp = estimator.get_params()["sp"] or 1
    if need > 1:
        assert not forecasts_finite(estimator, need - 1, sp), f"{need - 1} values suffice"
    longer = sorted({need, need + 1, need + 2, need + sp, need + sp + 1, need + 2 * sp})
    assert [n for n in longer if not forecasts_finite(estimator, n, sp)] == []


def test_every_baseline_has_a_rule() -> None:
    assert set(BASELINE_MIN_HISTORY) == set(BASELINE_MODELS)
