"""The race's ensemble: a weighted mean of its valid candidates, weights chosen on the folds.

Weights come from Caruana et al. (2004), ensemble selection with replacement, as
AutoGluon-TimeSeries chooses its ensembles: starting from none, each of
``selection.ensemble.size`` steps adds the candidate (again, maybe) whose addition gives the
best selection metric (sktime's metrics, as :func:`pipelines.backtest.point_score`) on the folds'
point forecasts; the weights are the counts of the best step, over their sum.

Scored honestly: the ensemble's forecast of fold k weighs the candidates' forecasts of fold k
with weights chosen on the other folds only (cross-fitting), so that each of its fold scores is
out of sample, as the candidates' are, and the leaderboard compares like with like. The weights
registered with the model are chosen on every fold. With one fold nothing is left to choose
weights on: the ensemble is not raced.

The model is a :class:`forecaster.ensemble.WeightedEnsembleForecaster` over the candidates'
refitted estimators: networks in sktime's pretrained state (``NeuralForecaster.pretrained``:
never trained again), baselines as they are, refitted on each history. Fitting it on a history
is then forecasting from it, as for any baseline, which is how the pyfunc model serves it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sktime.forecasting.base import BaseForecaster
from sktime.performance_metrics.forecasting import (
    MeanAbsoluteScaledError,
    mean_absolute_error,
    mean_absolute_percentage_error,
)

from forecaster.data import SERIES, TARGET, TIME
from forecaster.ensemble import WeightedEnsembleForecaster, greedy_weights, weighted_mean
from pipelines.backtest import Fold
from pipelines.candidates import is_neural
from pipelines.config import RaceConfig
from pipelines.forecasts import POINT, quantile_column, quantile_levels, to_point_panel

ENSEMBLE_MODEL = WeightedEnsembleForecaster.__name__
ENSEMBLE_NAME = "ensemble"  # its candidate name, unless a candidate of the config has it
LEVEL_TOLERANCE = 1e-9  # levels read back from column names (``q_0.05``) are rounded


@dataclass(frozen=True)
class Selection:
    """The weights of the candidates ``names`` (in that order): ``weights`` chosen on every
    fold (the model's), and ``fold_weights[k]`` chosen on every fold but fold k + 1 (what that
    fold's forecast is weighted with)."""

    names: list[str]
    weights: np.ndarray
    fold_weights: list[np.ndarray]

    @property
    def members(self) -> dict[str, float]:
        """The candidates of the model, by name, with their weights."""
        return _nonzero(self.names, self.weights)

    def record(self, metric: str, size: int) -> dict[str, Any]:
        """The weights as JSON: the model's, then each fold's and the folds chosen on."""
        folds = range(1, len(self.fold_weights) + 1)
        return {"metric": metric, "size": size, "weights": self.members,
                "folds": [{"fold": k, "chosen_on_folds": [j for j in folds if j != k],
                           "weights": _nonzero(self.names, weights)}
                          for k, weights in zip(folds, self.fold_weights, strict=True)]}


def _nonzero(names: list[str], weights: np.ndarray) -> dict[str, float]:
    return {name: float(w) for name, w in zip(names, weights, strict=True) if w > 0}


def not_raced(config: RaceConfig, candidates: int, folds: int) -> str | None:
    """Why the race has no ensemble, given its valid candidates and folds; None: it has one
    (or ``selection.ensemble`` is off, which needs no saying)."""
    if not config.selection.ensemble.enabled:
        return None
    if candidates < 2:
        return f"{candidates} valid candidate(s): an ensemble needs two"
    if folds < 2:
        return ("one backtest fold: its weights would be scored on the fold they were chosen "
                "on (cross-fitting needs two folds)")
    return None


class FoldScores:
    """The selection metric of the candidates' weighted point forecasts on one fold; each
    fold's score of each weighting computed once, whichever selection asks for it.

    Vectorised: the greedy steps score hundreds of weightings, and sktime's panel metrics loop
    over the series (about 1.5 s a call on 414 M4 Hourly series). Each fold's test window is
    a (horizon, series) array, scored by sktime's metric functions over its columns in one
    call; MASE as the MAE of values divided by each series' scale, which sktime's own MASE
    gives once per fold (:func:`_mase_scales`). The same numbers as
    :func:`pipelines.backtest.point_score`, which the leaderboard's scores come from.
    """

    def __init__(self, forecasts: Sequence[Sequence[pd.DataFrame]], folds: list[Fold],
                 config: RaceConfig):
        self.metric = config.selection.metric
        self.cache: dict[tuple[int, tuple[int, ...]], float] = {}
        self.actual: dict[int, np.ndarray] = {}
        self.points: dict[int, list[np.ndarray]] = {}
        for i, fold in enumerate(folds):
            scale = _mase_scales(fold, config) if self.metric == "mase" else 1.0
            self.actual[fold.number] = _by_series(fold, fold.y_test[TARGET]) / scale
            # each candidate's point forecasts on the rows of the test window
            self.points[fold.number] = [
                _by_series(fold, to_point_panel(candidate[i]).loc[fold.y_test.index, TARGET])
                / scale for candidate in forecasts]

    def __call__(self, fold: Fold, counts: tuple[int, ...]) -> float:
        divisor = math.gcd(*counts)  # weights, not counts: (2, 2) is (1, 1)
        key = (fold.number, tuple(c // divisor for c in counts))
        if key not in self.cache:
            actual = self.actual[fold.number]
            weighted = weighted_mean(self.points[fold.number], counts)
            if self.metric == "smape":
                score = 100 * mean_absolute_percentage_error(
                    actual, weighted, symmetric=True, multioutput="uniform_average")
            else:  # mae, and mase on the scaled values
                score = mean_absolute_error(actual, weighted, multioutput="uniform_average")
            self.cache[key] = float(score)
        return self.cache[key]


def _by_series(fold: Fold, values: pd.Series) -> np.ndarray:
    """A test window's values (rows of ``fold.y_test``) as a (horizon, series) array."""
    series = fold.y_test.index.get_level_values(0)
    rows = series.value_counts()
    if rows.nunique() != 1:
        raise ValueError(f"fold {fold.number}: the series' test windows differ in length "
                         f"({dict(rows)}); the ensemble weighs forecasts of equal horizons")
    return values.to_numpy(np.float64).reshape(len(rows), -1).T


def _mase_scales(fold: Fold, config: RaceConfig) -> np.ndarray:
    """Each series' MASE scale on ``fold`` (its seasonal naive in-sample MAE), from sktime's
    MASE: a forecast off by exactly 1 everywhere scores 1 / scale per series."""
    off_by_one = fold.y_test + 1.0
    per_series = MeanAbsoluteScaledError(sp=config.season_length, multilevel="raw_values")(
        fold.y_test, off_by_one, y_train=fold.y_train)
    return 1.0 / np.asarray(per_series, np.float64).reshape(-1)


def select(names: list[str], forecasts: Sequence[Sequence[pd.DataFrame]], folds: list[Fold],
           config: RaceConfig) -> Selection:
    """The weights of the candidates ``names`` from their forecasts of every fold
    (``forecasts[i][k]``: candidate i, fold k): chosen on all folds, and for each fold on the
    others (none with a single fold)."""
    scores, size = FoldScores(forecasts, folds, config), config.selection.ensemble.size

    def on(chosen: list[Fold]) -> Callable[[tuple[int, ...]], float]:
        return lambda counts: float(np.mean([scores(fold, counts) for fold in chosen]))

    return Selection(
        list(names), greedy_weights(on(folds), len(names), size),
        [greedy_weights(on([f for f in folds if f is not fold]), len(names), size)
         for fold in folds] if len(folds) > 1 else [])


def shared_levels(member_levels: Sequence[Sequence[float]], wanted: Sequence[float]
                  ) -> list[float]:
    """The ``wanted`` quantile levels every member reaches (a network forecasts its own, and
    is interpolated between them), which the ensemble forecasts."""
    return [level for level in wanted if all(
        min(levels) - LEVEL_TOLERANCE <= level <= max(levels) + LEVEL_TOLERANCE
        for levels in member_levels)]


def combine(frames: Sequence[pd.DataFrame], weights: Sequence[float], wanted: Sequence[float]
            ) -> pd.DataFrame:
    """The weighted mean of forecast frames of the same rows: the point forecasts, and each
    quantile level all of them reach (see :func:`shared_levels`), interpolated linearly
    between a frame's own levels as a network's ``predict_quantiles`` does."""
    used = [(frame, float(w)) for frame, w in zip(frames, weights, strict=True) if w > 0]
    levels = shared_levels([quantile_levels(frame) for frame, _ in used], wanted)
    keys = pd.MultiIndex.from_frame(used[0][0][[SERIES, TIME]])
    values = [_at_levels(frame.set_index([SERIES, TIME]).loc[keys], levels)
              for frame, _ in used]
    combined = pd.DataFrame(weighted_mean(values, [w for _, w in used]),
                            columns=[POINT, *map(quantile_column, levels)], index=keys)
    return combined.reset_index()


def _at_levels(frame: pd.DataFrame, levels: list[float]) -> np.ndarray:
    """(rows, 1 + levels): the point forecast, then the quantiles at ``levels``."""
    have = quantile_levels(frame)
    quantiles = frame[[quantile_column(level) for level in have]].to_numpy(np.float64)
    columns = [frame[POINT].to_numpy(np.float64)]
    for level in levels:
        exact = [i for i, h in enumerate(have) if abs(h - level) <= LEVEL_TOLERANCE]
        columns.append(quantiles[:, exact[0]] if exact else
                       np.array([np.interp(level, have, row) for row in quantiles]))
    return np.column_stack(columns)


def ensemble_model(members: Mapping[str, BaseForecaster], weights: Mapping[str, float]
                   ) -> WeightedEnsembleForecaster:
    """The unfitted ensemble of refitted estimators: a network in sktime's pretrained state
    (fitting only gives it its context), a baseline unfitted (it is fitted on each history)."""
    return WeightedEnsembleForecaster(
        [(name, estimator.pretrained() if is_neural(estimator) else estimator.clone())
         for name, estimator in members.items()],
        weights=[float(weights[name]) for name in members])


@dataclass(frozen=True)
class Member:
    """A member as the registry records it (see :func:`recorded_config`)."""

    name: str
    model: str
    params: dict[str, Any]
    weight: float


def recorded_config(configs: Mapping[str, Mapping[str, Any]], weights: Mapping[str, float]
                    ) -> dict[str, Any]:
    """What the registry records of an ensemble (``registry.TAG_CONFIG``): each member's name
    and resolved config (``candidates.resolved_config``), and the weights, so that a later
    race can refit its members on its own folds to score it as champion."""
    return {"model": ENSEMBLE_MODEL, "params": {
        "members": [{"name": name, **configs[name]} for name in weights],
        "weights": [float(w) for w in weights.values()]}}


def recorded_members(params: Mapping[str, Any]) -> list[Member]:
    """The members of a recorded ensemble (:func:`recorded_config`'s params); ValueError when
    they cannot be read."""
    members, weights = params.get("members"), params.get("weights")
    if not (isinstance(members, list) and isinstance(weights, list) and members
            and len(members) == len(weights)):
        raise ValueError("its ensemble config lacks members, or one weight per member")
    read = []
    for member, weight in zip(members, weights, strict=True):
        if not (isinstance(member, dict) and isinstance(member.get("name"), str)
                and isinstance(member.get("model"), str)
                and isinstance(member.get("params"), dict)
                and isinstance(weight, int | float) and weight > 0):
            raise ValueError(f"its ensemble member {member!r} (weight {weight!r}) lacks a name, "
                             "a model, params or a positive weight")
        read.append(Member(member["name"], member["model"], member["params"], float(weight)))
    return read
