"""The forecast frame every candidate, champion and logged model produces, and its checks.

A forecast frame is long: one row per (series_id, timestamp) ahead, with the point forecast in
``y_pred`` and one ``q_<level>`` column per quantile level (``q_0.05``, ``q_0.5``, ...). The
backtest scores it, the pyfunc model returns it, and :func:`forecast_problems` decides whether
it may be promoted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sktime.forecasting.base import BaseForecaster, ForecastingHorizon

from forecaster.data import SERIES, TARGET, TIME

POINT = "y_pred"
QUANTILE_PREFIX = "q_"


def quantile_column(level: float) -> str:
    return f"{QUANTILE_PREFIX}{level:g}"


def quantile_levels(frame: pd.DataFrame) -> list[float]:
    """The levels of a frame's quantile columns, ascending."""
    return sorted(float(c[len(QUANTILE_PREFIX):]) for c in frame.columns
                  if str(c).startswith(QUANTILE_PREFIX))


def horizon_of(steps: int, datetime_index: bool, frequency: str) -> ForecastingHorizon:
    """Relative steps 1..steps; with a frequency for datetime data, since sktime cannot infer
    one from a multi-index panel."""
    return ForecastingHorizon(np.arange(1, steps + 1), is_relative=True,
                              freq=frequency if datetime_index else None)


def forecast_frame(estimator: BaseForecaster, levels: Sequence[float],
                   X: pd.DataFrame | None = None) -> pd.DataFrame:
    """Point and quantile forecasts of a fitted sktime estimator as a forecast frame; ``X``:
    the covariates over the forecast horizon, for an estimator fitted with them."""
    point = estimator.predict(X=X)
    quantiles = estimator.predict_quantiles(X=X, alpha=list(levels))
    frame = pd.DataFrame({POINT: point.iloc[:, 0].to_numpy(np.float64)}, index=point.index)
    values = quantiles.loc[point.index].to_numpy(np.float64)
    for i, level in enumerate(levels):
        frame[quantile_column(level)] = values[:, i]
    frame.index = frame.index.set_names([SERIES, TIME])
    return frame.reset_index()


def to_point_panel(frame: pd.DataFrame) -> pd.DataFrame:
    """The point forecasts as an sktime pd-multiindex panel (column ``target``)."""
    return frame.set_index([SERIES, TIME])[[POINT]].rename(columns={POINT: TARGET})


def to_interval_panel(frame: pd.DataFrame, coverage: float) -> pd.DataFrame:
    """The central ``coverage`` interval in sktime's predict_interval format.

    The bounds are the quantile columns at (1 -/+ coverage) / 2, interpolated linearly between
    the frame's levels when it lacks them (a champion trained with other levels).
    """
    indexed = frame.set_index([SERIES, TIME])
    levels = quantile_levels(frame)
    values = indexed[[quantile_column(level) for level in levels]].to_numpy(np.float64)
    bounds = {}
    for side, level in (("lower", (1 - coverage) / 2), ("upper", (1 + coverage) / 2)):
        if not levels[0] - 1e-9 <= level <= levels[-1] + 1e-9:
            raise ValueError(f"the forecast's quantiles {levels} do not reach {level:g}")
        bounds[side] = [np.interp(level, levels, row) for row in values]
    columns = pd.MultiIndex.from_tuples([(TARGET, coverage, "lower"),
                                         (TARGET, coverage, "upper")])
    return pd.DataFrame(np.column_stack([bounds["lower"], bounds["upper"]]),
                        index=indexed.index, columns=columns)


def forecast_problems(frame: pd.DataFrame, expected: pd.MultiIndex) -> list[str]:
    """Why a forecast frame must not be promoted: an empty list when it is sound.

    Checks that it forecasts exactly the expected (series, timestamp) rows, that every value is
    finite, and that quantiles do not cross (each level at least the one below it).
    """
    problems = []
    levels = quantile_levels(frame)
    if POINT not in frame.columns or not levels:
        return [f"forecast columns {list(frame.columns)} lack {POINT!r} or quantile columns"]
    index = pd.MultiIndex.from_frame(frame[[SERIES, TIME]])
    if len(frame) != len(expected) or not index.sort_values().equals(
            expected.set_names([SERIES, TIME]).sort_values()):
        problems.append(f"wrong shape: {len(frame)} rows for {index.get_level_values(0).nunique()}"
                        f" series; expected {len(expected)} rows for "
                        f"{expected.get_level_values(0).nunique()} series at the horizon")
    values = frame[[POINT, *map(quantile_column, levels)]].to_numpy(np.float64)
    if not np.isfinite(values).all():
        bad = frame.loc[~np.isfinite(values).all(axis=1), SERIES].unique()
        problems.append(f"non-finite forecasts (NaN or inf) for series {list(bad[:5])}")
    quantiles = values[:, 1:]
    # tolerate rounding, not a real inversion
    tolerance = 1e-9 * (1 + np.abs(quantiles).max(initial=0))
    crossing = (np.diff(quantiles, axis=1) < -tolerance).any(axis=1)
    if crossing.any():
        bad = frame.loc[crossing, SERIES].unique()
        problems.append(f"quantiles cross for series {list(bad[:5])}")
    return problems


def future_index(history: pd.DataFrame, steps: int, frequency: str) -> pd.MultiIndex:
    """The (series_id, timestamp) rows ``steps`` ahead of each series of a long history."""
    last = history.groupby(SERIES, sort=True)[TIME].max()
    rows = []
    for series, end in last.items():
        if pd.api.types.is_datetime64_any_dtype(history[TIME]):
            times = pd.date_range(end, periods=steps + 1, freq=frequency)[1:]
        else:
            times = end + np.arange(1, steps + 1)
        rows.extend((series, t) for t in times)
    return pd.MultiIndex.from_tuples(rows, names=[SERIES, TIME])
