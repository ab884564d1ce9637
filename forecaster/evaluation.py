"""The reference scoring protocols: M4 Hourly (sMAPE, MASE, OWA) and ETTh1 (MSE, MAE)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sktime.performance_metrics.forecasting import (
    MeanAbsolutePercentageError,
    MeanAbsoluteScaledError,
)

from forecaster.datasets import M4_HOURLY_SEASONALITY, ETTSplits
from forecaster.estimators import NeuralForecaster

# Naive2 on M4 Hourly, the competition's OWA reference
M4_HOURLY_NAIVE2 = {"smape": 18.383, "mase": 2.395}


def smape_mase(y_test: pd.DataFrame, y_pred: pd.DataFrame, y_train: pd.DataFrame,
               season_length: int) -> dict[str, float]:
    """sMAPE (in percent) and MASE (scaled by the in-sample seasonal naive error of
    ``season_length``) as the M competitions score them: per series, averaged over series."""
    y_pred = y_pred.loc[y_test.index]
    smape = 100 * MeanAbsolutePercentageError(symmetric=True, multilevel="uniform_average")(
        y_test, y_pred)
    mase = MeanAbsoluteScaledError(sp=season_length, multilevel="uniform_average")(
        y_test, y_pred, y_train=y_train)
    return {"smape": float(smape), "mase": float(mase)}


def m4_scores(y_test: pd.DataFrame, y_pred: pd.DataFrame, y_train: pd.DataFrame
              ) -> dict[str, float]:
    """sMAPE, MASE (seasonal period 24) and OWA as the M4 competition scores them."""
    scores = smape_mase(y_test, y_pred, y_train, M4_HOURLY_SEASONALITY)
    owa = 0.5 * (scores["smape"] / M4_HOURLY_NAIVE2["smape"]
                 + scores["mase"] / M4_HOURLY_NAIVE2["mase"])
    return {**scores, "owa": float(owa)}


def ett_forecasts(model: NeuralForecaster, splits: ETTSplits, columns: list[str],
                  split: str = "test", batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The median forecasts and the truths, each (windows, horizon), of every window (stride 1)
    whose horizon lies in ``split`` ("val" or "test"), for the given columns in z-score units.

    Each window's input is the ``input_len`` rows before its origin, as in the reference
    loaders; each column is forecast from its own history (channel independence).
    """
    values = splits.frame[columns].to_numpy(np.float32)  # (T, C)
    horizon, input_len = model.horizon_, model.resolved_params_["input_len"]
    first, end = splits.bounds(split)
    origins = np.arange(first, end - horizon + 1)
    per_chunk = max(1, batch // len(columns))
    medians, truths = [], []
    for start in range(0, len(origins), per_chunk):
        chunk = origins[start: start + per_chunk]
        histories = [values[o - input_len: o, c] for o in chunk for c in range(len(columns))]
        medians.append(model.forecast_histories(histories)[..., model.levels_.index(0.5)])
        truths.append(np.stack([values[o: o + horizon, c] for o in chunk
                                for c in range(len(columns))]))
    return np.concatenate(medians), np.concatenate(truths)


def ett_scores(forecast: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """MSE and MAE over every value of the windows."""
    error = np.asarray(forecast, np.float64) - truth
    return {"mse": float((error ** 2).mean()), "mae": float(np.abs(error).mean())}
