"""A weighted ensemble of sktime forecasters, point forecasts and quantiles alike.

sktime's ``EnsembleForecaster`` takes weights but forecasts points only. Here each forecast,
the point and every quantile level, is the weighted mean of the members' (quantile averaging,
as AutoGluon-TimeSeries' ensembles do): a mean of non-decreasing quantile curves does not
cross.

``fit`` clones and fits every member, as sktime's ensembles do. A member in sktime's
pretrained state keeps what it was pretrained on (sktime's clone carries it over), so that a
global model trained once, such as a network from ``NeuralForecaster.pretrained``, only takes
the new history as its context, while a local model (a baseline) is fitted on it::

    ensemble = WeightedEnsembleForecaster(
        [("lstm", lstm.pretrained()), ("theta", ThetaForecaster(sp=24))], weights=[0.7, 0.3])
    ensemble.fit(history, fh=range(1, 25)).predict_quantiles(alpha=[0.05, 0.95])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from sktime.forecasting.base import ForecastingHorizon
from sktime.forecasting.base._meta import _HeterogenousEnsembleForecaster

GREEDY_STEPS = 10  # greedy_weights' default number of selection steps


def weighted_mean(values: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """``sum_i w_i v_i / sum_i w_i`` over arrays of one shape, in float64, members in order:
    the one combination of every forecast of an ensemble, so that forecasts combined from
    the members' frames equal the estimator's to the last bit."""
    total = np.zeros(np.shape(values[0]), np.float64)
    for weight, value in zip(weights, values, strict=True):
        total += float(weight) * np.asarray(value, np.float64)
    return total / float(sum(weights))


def weighted_frame(forecasts: Sequence[pd.DataFrame], weights: Sequence[float]
                   ) -> pd.DataFrame:
    """The weighted mean (:func:`weighted_mean`) of forecast frames of the same rows and
    columns, rows aligned on the first's."""
    first = forecasts[0]
    values = [forecast.loc[first.index].to_numpy(np.float64) for forecast in forecasts]
    return pd.DataFrame(weighted_mean(values, weights), index=first.index, columns=first.columns)


def greedy_weights(score: Callable[[tuple[int, ...]], float], count: int,
                   size: int = GREEDY_STEPS) -> np.ndarray:
    """Caruana et al.'s (2004) ensemble selection with replacement over ``count`` members, as
    AutoGluon-TimeSeries weighs its ensembles: ``size`` steps, each adding the member whose
    addition scores best (``score`` of the counts, lower is better; a tie goes to the earlier
    member), and the counts of the best step so far, normalised. Raises ValueError when no
    step has a finite score."""
    counts = np.zeros(count, np.int64)
    best, best_counts = math.inf, None
    for _ in range(size):
        trials = []
        for i in range(count):
            counts[i] += 1
            trials.append(score(tuple(int(c) for c in counts)))
            counts[i] -= 1
        scores = np.where(np.isfinite(trials), trials, np.inf)
        pick = int(np.argmin(scores))
        counts[pick] += 1
        if scores[pick] < best:
            best, best_counts = float(scores[pick]), counts.copy()
    if best_counts is None:
        raise ValueError("no weighting of the members has a finite score")
    return best_counts / best_counts.sum()


class WeightedEnsembleForecaster(_HeterogenousEnsembleForecaster):
    """Weighted mean of the point forecasts and of the quantiles of its members.

    Parameters
    ----------
    forecasters : list of (str, estimator) tuples
        The members, by name.
    weights : list of float, optional (default: equal weights)
        One non-negative weight per member, not all zero; they need not sum to one.
    n_jobs : int or None, optional (default None)
        Members fitted in parallel by joblib; None: one after another.

    Examples
    --------
    >>> from sktime.datasets import load_airline
    >>> from sktime.forecasting.naive import NaiveForecaster
    >>> from forecaster.ensemble import WeightedEnsembleForecaster
    >>> ensemble = WeightedEnsembleForecaster(
    ...     [("last", NaiveForecaster(sp=12)), ("mean", NaiveForecaster(strategy="mean"))],
    ...     weights=[0.75, 0.25])
    >>> ensemble.fit(load_airline(), fh=[1, 2, 3])
    WeightedEnsembleForecaster(...)
    >>> quantiles = ensemble.predict_quantiles(alpha=[0.1, 0.9])
    """

    _tags = {
        "authors": ["forecaster team"],
        "y_inner_mtype": ["pd.DataFrame", "pd-multiindex", "pd_multiindex_hier"],
        "X_inner_mtype": ["pd.DataFrame", "pd-multiindex", "pd_multiindex_hier"],
        "capability:exogenous": True,  # set from the members in __init__
        "requires-fh-in-fit": False,  # idem
        "capability:missing_values": False,
        "capability:multivariate": True,  # idem
        "capability:insample": True,  # idem
        "capability:pred_int": True,
        "capability:pred_int:insample": True,  # idem
    }

    def __init__(self, forecasters: list[tuple[str, Any]], weights: list[float] | None = None,
                 n_jobs: int | None = None):
        self.weights = weights
        super().__init__(forecasters=forecasters, n_jobs=n_jobs)
        # what one member needs, the ensemble needs; what one member lacks, it lacks
        members = self._forecasters
        self._anytagis_then_set("capability:exogenous", True, False, members)
        self._anytagis_then_set("requires-fh-in-fit", True, False, members)
        for tag in ("capability:multivariate", "capability:insample",
                    "capability:pred_int:insample"):
            self._anytagis_then_set(tag, False, True, members)

    def _weights(self) -> list[float]:
        count = len(self._forecasters)
        if self.weights is None:
            return [1.0] * count
        weights = [float(w) for w in self.weights]
        if len(weights) != count:
            raise ValueError(f"weights: {len(weights)} weights for {count} forecasters")
        if any(not np.isfinite(w) or w < 0 for w in weights) or not sum(weights) > 0:
            raise ValueError(f"weights: {weights} must be finite, non-negative and not all 0")
        return weights

    def _fit(self, y: pd.DataFrame, X: pd.DataFrame | None, fh: ForecastingHorizon | None
             ) -> WeightedEnsembleForecaster:
        self._weights()  # bad weights fail the fit, not a later forecast
        self._fit_forecasters(None, y, X, fh)
        return self

    def _predict(self, fh: ForecastingHorizon, X: pd.DataFrame | None = None) -> pd.DataFrame:
        return self._combine(self._predict_forecasters(fh, X))

    def _predict_quantiles(self, fh: ForecastingHorizon, X: pd.DataFrame | None,
                           alpha: list[float]) -> pd.DataFrame:
        return self._combine([forecaster.predict_quantiles(fh=fh, X=X, alpha=alpha)
                              for forecaster in self._get_forecaster_list()])

    def _combine(self, forecasts: list[pd.DataFrame]) -> pd.DataFrame:
        return weighted_frame(forecasts, self._weights())

    @classmethod
    def get_test_params(cls, parameter_set: str = "default") -> list[dict[str, Any]]:
        from sktime.forecasting.naive import NaiveForecaster

        return [
            {"forecasters": [("last", NaiveForecaster()),
                             ("mean", NaiveForecaster(strategy="mean"))],
             "weights": [0.25, 0.75]},
            {"forecasters": [("last", NaiveForecaster()),
                             ("drift", NaiveForecaster(strategy="drift"))]},
        ]
