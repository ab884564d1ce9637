"""The backtest every candidate (and the champion) goes through: the same sktime splitter, the
same folds, the same sktime metrics.

Folds come from sktime's ExpandingWindowSplitter or SlidingWindowSplitter applied to the whole
panel (sktime splits each series and stacks the pieces); covariates are cut at the same rows,
so that each fold carries its training covariates and the future values of its test window.
By default the training window is the largest that leaves room for every fold on the
shortest series, so on panels of equal lengths the last fold forecasts the last ``horizon``
observations. On ragged panels sktime counts windows from each series' start, so longer series
are tested before their end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sktime.performance_metrics.forecasting import (
    MeanAbsoluteError,
    MeanAbsolutePercentageError,
    MeanAbsoluteScaledError,
)
from sktime.performance_metrics.forecasting.probabilistic import EmpiricalCoverage
from sktime.split import ExpandingWindowSplitter, SlidingWindowSplitter
from sktime.split.base import BaseSplitter

from pipelines.config import ConfigError, RaceConfig
from pipelines.forecasts import forecast_problems, to_interval_panel, to_point_panel
from pipelines.sources import RaceData

POINT_METRICS = ("mase", "smape", "mae")  # smape in percent, as the M4 competition
METRICS = (*POINT_METRICS, "coverage")


@dataclass(frozen=True)
class Fold:
    number: int  # 1-based, oldest first
    y_train: pd.DataFrame
    y_test: pd.DataFrame
    # the covariates of the training rows and of the test window (their future values), or
    # None when the data have none
    X_train: pd.DataFrame | None = None
    X_test: pd.DataFrame | None = None


@dataclass(frozen=True)
class BacktestPlan:
    splitter: BaseSplitter
    window: int
    step: int
    folds: list[Fold]


@dataclass
class BacktestResult:
    fold_scores: list[dict[str, float]] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)  # mean over folds
    problems: list[str] = field(default_factory=list)  # forecasts that fail validation
    # each fold's forecast frame, oldest first: what an ensemble of the candidates combines
    forecasts: list[pd.DataFrame] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def valid(self) -> bool:
        return not self.problems and all(np.isfinite(v) for v in self.scores.values())

    @property
    def last_forecast(self) -> pd.DataFrame | None:
        """The last fold's forecast, for plots."""
        return self.forecasts[-1] if self.forecasts else None


ForecastFn = Callable[[Fold], pd.DataFrame]  # a fold's training data -> its forecast frame
FoldCallback = Callable[[Fold, dict[str, float]], None]


def make_splitter(config: RaceConfig, window: int, step: int) -> BaseSplitter:
    fh = np.arange(1, config.horizon + 1)
    if config.backtest.splitter == "expanding":
        return ExpandingWindowSplitter(fh=fh, initial_window=window, step_length=step)
    return SlidingWindowSplitter(fh=fh, window_length=window, step_length=step)


def fold_span(config: RaceConfig) -> int:
    """The observations the folds take at the end of a series: every test window."""
    step = config.backtest.step or config.horizon
    return config.horizon + (config.backtest.folds - 1) * step


def required_length(config: RaceConfig, min_train: int, most_demanding: str = "a candidate"
                    ) -> tuple[int, str]:
    """The fewest observations a series needs in the race, and why: the training window (at
    least ``min_train``, what ``most_demanding`` needs), then the folds."""
    window = config.backtest.window or 0
    why = (f"backtest.window {window}" if window >= min_train
           else f"{most_demanding} trains on at least {min_train}")
    span = fold_span(config)
    return max(window, min_train) + span, (
        f"{why}, and {config.backtest.folds} fold(s) of horizon {config.horizon} take "
        f"{span} more")


def plan_backtest(config: RaceConfig, data: RaceData, min_train: int,
                  most_demanding: str = "a candidate") -> BacktestPlan:
    """The folds of the race; raises ConfigError naming ``horizon`` or ``backtest.*`` when the
    data are too short for them, before anything trains."""
    lengths = data.lengths
    shortest_id, shortest = lengths.idxmin(), int(lengths.min())
    folds, horizon = config.backtest.folds, config.horizon
    step = config.backtest.step or horizon
    room = shortest - fold_span(config)  # the largest window that fits every fold
    need = f"{most_demanding} needs at least {min_train} observations to train on"
    if room < min_train and config.backtest.window is None:
        raise ConfigError(
            f"horizon: {horizon} with {folds} fold(s) {step} apart is too large for the "
            f"data: the shortest series ({shortest_id!r}, {shortest} observations) leaves "
            f"{max(room, 0)} for training, and {need}")
    window = config.backtest.window or room
    if window > room:
        raise ConfigError(
            f"backtest.window: {window} leaves no room for {folds} fold(s) of horizon {horizon} "
            f"on the shortest series ({shortest_id!r}, {shortest} observations); at most {room}")
    if window < min_train:
        raise ConfigError(f"backtest.window: {window} is too short: {need}")

    splitter = make_splitter(config, window, step)
    # the folds nearest the end, as positions (what split_series slices y by), so that the
    # covariates are cut at exactly the rows of y
    pieces = list(splitter.split(data.panel.index))[-folds:]
    y, X = data.panel, data.X
    return BacktestPlan(splitter, window, step, [
        Fold(i + 1, y.iloc[train], y.iloc[test],
             None if X is None else X.iloc[train], None if X is None else X.iloc[test])
        for i, (train, test) in enumerate(pieces)])


def point_score(metric: str, fold: Fold, y_pred: pd.DataFrame, config: RaceConfig) -> float:
    """One point metric (mase, smape in percent, or mae) of a fold's point forecasts, an sktime
    panel on the rows of its test window: per series, then averaged over series (as the M4
    competition does)."""
    y_test, per_series = fold.y_test, {"multilevel": "uniform_average"}
    if metric == "mase":
        return float(MeanAbsoluteScaledError(sp=config.season_length, **per_series)(
            y_test, y_pred, y_train=fold.y_train))
    if metric == "smape":
        return 100 * float(MeanAbsolutePercentageError(symmetric=True, **per_series)(
            y_test, y_pred))
    if metric == "mae":
        return float(MeanAbsoluteError(**per_series)(y_test, y_pred))
    raise ValueError(f"unknown point metric {metric!r}; one of mase, smape, mae")


def score_forecast(fold: Fold, forecast: pd.DataFrame, config: RaceConfig) -> dict[str, float]:
    """MASE, sMAPE (percent), MAE and empirical interval coverage of one fold's forecast."""
    y_test = fold.y_test
    y_pred = to_point_panel(forecast).loc[y_test.index]
    coverage = config.selection.interval_coverage
    interval = to_interval_panel(forecast, coverage).loc[y_test.index]
    return {
        **{metric: point_score(metric, fold, y_pred, config) for metric in POINT_METRICS},
        "coverage": float(EmpiricalCoverage(coverage=coverage)(y_test, interval)),
    }


def run_backtest(forecast: ForecastFn, folds: list[Fold], config: RaceConfig,
                 on_fold: FoldCallback | None = None) -> BacktestResult:
    """Forecast and score every fold. A forecast that fails validation is recorded as a
    problem (its fold scores NaN); an exception from ``forecast`` propagates."""
    result = BacktestResult()
    started = time.perf_counter()
    for fold in folds:
        frame = forecast(fold)
        problems = forecast_problems(frame, fold.y_test.index)
        if problems:
            result.problems.extend(f"fold {fold.number}: {p}" for p in problems)
            scores = dict.fromkeys(METRICS, float("nan"))
        else:
            scores = score_forecast(fold, frame, config)
        result.fold_scores.append(scores)
        result.forecasts.append(frame)
        if on_fold is not None:
            on_fold(fold, scores)
    result.scores = {m: float(np.mean([s[m] for s in result.fold_scores])) for m in METRICS}
    result.seconds = time.perf_counter() - started
    return result
