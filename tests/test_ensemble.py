"""The ensemble's parts, without a race: Caruana's greedy selection on hand-made forecasts
whose best weights are known, cross-fitting that never weighs a fold on itself, the combination
of forecast frames, the sktime estimator (quantile averaging, pretrained networks kept as
trained, its shortest history), the logged pyfunc model with a network among its members, and
the ``selection.ensemble`` config."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from sktime.forecasting.naive import NaiveForecaster
from sktime.forecasting.theta import ThetaForecaster

from forecaster import estimators
from forecaster.data import SERIES, TARGET, TIME
from forecaster.ensemble import WeightedEnsembleForecaster, greedy_weights
from pipelines.backtest import Fold, point_score
from pipelines.candidates import min_history
from pipelines.config import ConfigError, RaceConfig, parse_config
from pipelines.ensemble import FoldScores, combine, ensemble_model, select
from pipelines.forecasts import POINT, forecast_frame, quantile_column
from pipelines.pyfunc_model import forecast_history, log_forecaster
from serving.model import VersionMeta, served_model
from tests.conftest import make_panel, tiny
from tests.pipeline_support import clean_mlflow_environment

LEVELS = [0.1, 0.5, 0.9]
HORIZON = 6
MODEL = "ensemble-test"


def _config(**selection: object) -> RaceConfig:
    return parse_config({"name": "ensemble", "data": {"path": "unused.csv"}, "horizon": HORIZON,
                         "candidates": [{"model": "NaiveForecaster"}],
                         "registry": {"model_name": "m"},
                         "selection": {"metric": "mae", **selection}})


def _fold(number: int, seed: int) -> Fold:
    """Two series of 30 training and 6 test values."""
    panel = make_panel({"a": 36, "b": 36}, seed=seed)
    y_train = panel.groupby(level=0).head(30)
    y_test = panel.groupby(level=0).tail(HORIZON)
    return Fold(number, y_train, y_test)


def _forecast(fold: Fold, bias: float) -> pd.DataFrame:
    """The fold's actual values shifted by ``bias``, with quantiles 1 either side."""
    point = fold.y_test[TARGET].to_numpy() + bias
    frame = fold.y_test.index.to_frame(index=False)
    frame[POINT] = point
    for level, shift in zip(LEVELS, (-1.0, 0.0, 1.0), strict=True):
        frame[quantile_column(level)] = point + shift
    return frame


def test_two_complementary_candidates_are_combined_and_beat_both() -> None:
    config, fold = _config(), _fold(1, seed=0)
    biases = {"high": 1.0, "low": -1.0, "far": 3.0}
    selection = select(list(biases), [[_forecast(fold, b)] for b in biases.values()], [fold],
                       config)
    assert selection.members == {"high": 0.5, "low": 0.5}
    combined = combine([_forecast(fold, b) for b in biases.values()], selection.weights, LEVELS)
    score = point_score("mae", fold, combined.set_index([SERIES, TIME])[[POINT]].rename(
        columns={POINT: TARGET}), config)
    assert score == pytest.approx(0.0, abs=1e-12)  # each alone is 1 off
    # the quantiles are averaged as the point is: 1 either side of it still
    assert np.allclose(combined[quantile_column(0.9)] - combined[POINT], 1.0)


def test_the_best_candidate_alone_gets_the_most_weight() -> None:
    # 0.5 too high, 2 too low: four parts of the first to one of the second is exact
    config, fold = _config(), _fold(1, seed=1)
    biases = {"good": 0.5, "low": -2.0, "high": 5.0}
    forecasts = [[_forecast(fold, b)] for b in biases.values()]
    selection = select(list(biases), forecasts, [fold], config)
    assert selection.members == pytest.approx({"good": 0.8, "low": 0.2})
    # too few steps to reach it: the best weights of the steps taken (good, good, low)
    short = select(list(biases), forecasts, [fold], _config(ensemble={"size": 3}))
    assert short.members == pytest.approx({"good": 2 / 3, "low": 1 / 3})


def test_each_fold_is_weighted_on_the_other_folds_only() -> None:
    config = _config()
    first, second = _fold(1, seed=2), _fold(2, seed=3)
    # a is exact on fold 1 and 2 off on fold 2; b the other way round
    forecasts = [[_forecast(first, 0.0), _forecast(second, 2.0)],
                 [_forecast(first, 2.0), _forecast(second, 0.0)]]
    selection = select(["a", "b"], forecasts, [first, second], config)
    # weighed on fold 1 itself, a would take it all: the other fold chooses b
    assert selection.fold_weights[0].tolist() == [0.0, 1.0]
    assert selection.fold_weights[1].tolist() == [1.0, 0.0]
    record = selection.record("mae", 10)
    assert record["folds"][0] == {"fold": 1, "chosen_on_folds": [2], "weights": {"b": 1.0}}


@pytest.mark.parametrize("metric", ["mase", "smape", "mae"])
def test_the_selection_scores_weightings_as_the_leaderboard_does(metric: str) -> None:
    """The vectorised fold scores equal sktime's panel metrics (point_score) on the same
    weighted forecasts."""
    config = _config(metric=metric)
    fold = _fold(1, seed=4)
    rng = np.random.default_rng(0)
    frames = [_forecast(fold, bias) for bias in (0.5, -1.5, 3.0)]
    for frame in frames:  # errors that differ by series and step, not only a constant bias
        frame[POINT] += rng.normal(0, 1, len(frame))
    scores = FoldScores([[frame] for frame in frames], [fold], config)
    for counts in [(1, 0, 0), (2, 1, 0), (1, 3, 2)]:
        weights = np.asarray(counts) / sum(counts)
        mixed = sum(w * frame[POINT].to_numpy() for w, frame in zip(weights, frames,
                                                                    strict=True))
        y_pred = pd.DataFrame({TARGET: mixed}, index=fold.y_test.index)
        assert scores(fold, counts) == pytest.approx(
            point_score(metric, fold, y_pred, config), rel=1e-9)


def test_greedy_selection_needs_a_finite_score() -> None:
    with pytest.raises(ValueError, match="no weighting of the members has a finite score"):
        greedy_weights(lambda counts: float("nan"), 2, 3)


def test_frames_of_other_levels_are_interpolated_to_the_levels_all_reach() -> None:
    fold = _fold(1, seed=4)
    wide = _forecast(fold, 0.0)
    narrow = wide.drop(columns=[quantile_column(0.1)])  # a network trained on 0.5 and 0.9
    combined = combine([wide, narrow], [0.5, 0.5], [0.05, *LEVELS])
    assert [c for c in combined.columns if c.startswith("q_")] == ["q_0.5", "q_0.9"]
    pd.testing.assert_series_equal(combined[quantile_column(0.9)], wide[quantile_column(0.9)])


# ---------------------------------------------------------------------------- the estimator
def test_the_ensemble_averages_points_and_quantiles(sine_panel: pd.DataFrame) -> None:
    members = [("last", NaiveForecaster(sp=12)), ("theta", ThetaForecaster(deseasonalize=False))]
    ensemble = WeightedEnsembleForecaster(members, weights=[3.0, 1.0]).fit(
        sine_panel, fh=range(1, HORIZON + 1))
    got = forecast_frame(ensemble, LEVELS)
    parts = [forecast_frame(f.clone().fit(sine_panel, fh=range(1, HORIZON + 1)), LEVELS)
             for _, f in members]
    columns = [POINT, *map(quantile_column, LEVELS)]
    expected = 0.75 * parts[0][columns] + 0.25 * parts[1][columns]
    np.testing.assert_allclose(got[columns], expected, rtol=1e-12)
    assert min_history(ensemble) == max(min_history(f) for _, f in members) == 13
    with pytest.raises(ValueError, match=r"weights: 1 weights for 2 forecasters"):
        WeightedEnsembleForecaster(members, weights=[1.0]).fit(sine_panel, fh=[1])


@pytest.fixture(scope="module")
def network_and_baseline() -> Iterator[WeightedEnsembleForecaster]:
    """A tiny trained network and a seasonal naive forecast, 2 to 1, unfitted."""
    network = tiny(estimators.ESTIMATORS[0], quantiles=tuple(LEVELS)).fit(
        make_panel(), fh=range(1, HORIZON + 1))
    yield ensemble_model({"network": network, "naive": NaiveForecaster(sp=12)},
                         {"network": 2 / 3, "naive": 1 / 3})


def test_a_network_member_is_never_trained_again(
        network_and_baseline: WeightedEnsembleForecaster) -> None:
    member = dict(network_and_baseline.forecasters)["network"]
    assert member.state == "pretrained" and member.get_params()["on_epoch"] is None
    # a history the network never saw: fitting gives it its context, the weights stay
    history = make_panel({"new": 40}, seed=9)
    fitted = network_and_baseline.clone().fit(history, fh=range(1, HORIZON + 1))
    network = dict(fitted.forecasters_)["network"]
    for before, after in zip(member.network_.parameters(), network.network_.parameters(),
                             strict=True):
        assert torch.equal(before, after)
    assert len(network.history_) == len(member.history_)  # no new epochs
    own = forecast_frame(network, LEVELS)
    np.testing.assert_array_equal(
        own[POINT], member.forecast_histories([history[TARGET].to_numpy()])[0, :, 1])


def test_the_logged_ensemble_forecasts_as_the_estimator_and_is_served(
        network_and_baseline: WeightedEnsembleForecaster, tmp_path: Path) -> None:
    long = make_panel().reset_index()
    with clean_mlflow_environment():
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
        with mlflow.start_run():
            info = log_forecaster(network_and_baseline, horizon=HORIZON, levels=LEVELS,
                                  frequency="h", input_example=long)
        loaded = mlflow.pyfunc.load_model(info.model_uri)
    expected = forecast_history(network_and_baseline, long, HORIZON, LEVELS, "h")
    pd.testing.assert_frame_equal(loaded.predict(long), expected, check_exact=True,
                                  check_dtype=False)
    config = loaded.metadata.flavors["python_function"]["config"]
    assert config["kind"] == "sktime" and config["levels"] == LEVELS
    # the seasonal naive forecast needs a season and one more value; the network less
    assert config["min_history"] == min_history(network_and_baseline) == 13

    # the service serves it as a baseline: each series' history fitted, the network as trained
    served = served_model(loaded, VersionMeta(MODEL, 1, {}, None, None), "champion")
    assert served.info.min_history == 13 and served.info.quantiles == LEVELS
    series = long[long[SERIES] == "a"]
    forecast = served.predict([series[TARGET].to_numpy()])[0]
    alone = forecast_history(network_and_baseline, series, HORIZON, LEVELS, "h")
    np.testing.assert_array_equal(forecast, alone[[POINT, *map(quantile_column, LEVELS)]])


# ---------------------------------------------------------------------------- the config
def test_the_ensemble_config() -> None:
    assert _config().selection.ensemble.enabled
    assert not _config(ensemble=False).selection.ensemble.enabled
    assert _config(ensemble={"size": 5}).selection.ensemble.size == 5
    with pytest.raises(ConfigError, match=r"selection\.ensemble: give true, false or a mapping "
                                          r"of enabled and size, not 'often'"):
        _config(ensemble="often")
    with pytest.raises(ConfigError, match=r"selection\.ensemble\.size: Input should be greater "
                                          r"than 0"):
        _config(ensemble={"size": 0})
    with pytest.raises(ConfigError, match=r"selection\.ensemble\.sise: unknown key"):
        _config(ensemble={"sise": 5})
