"""The benchmarks' seeds (each network fitted once per seed and scored by the median, a
deterministic baseline once), the networks' ensemble row, and the Ray benchmark's baseline."""

from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from sktime.forecasting.base import BaseForecaster

from benchmarks.ray_race import naive_forecast, tiled_panel
from forecaster import NeuralForecaster, benchmark
from forecaster.benchmark import (
    ENSEMBLE,
    M4_MODELS,
    NETWORKS,
    ensemble_run,
    last_rows,
    median_over_seeds,
    network,
    seeded,
)
from forecaster.datasets import M4_HOURLY_HORIZON
from forecaster.ensemble import weighted_frame
from forecaster.evaluation import ett_scores, m4_scores
from pipelines.warning_capture import SKTIME_NOTICE
from tests.conftest import make_panel


def test_a_network_takes_each_seed_and_a_baseline_runs_once() -> None:
    for name in NETWORKS:
        model = seeded(network(name), 2)
        assert model is not None and model.get_params()["model__random_state"] == 2, name
    baseline = M4_MODELS["sNaive"]()
    assert seeded(baseline, 0) is baseline
    assert seeded(M4_MODELS["sNaive"](), 1) is None


def test_scores_are_the_median_over_the_seeds() -> None:
    def fit_and_score(model: BaseForecaster) -> dict[str, float]:
        seed = model.get_params().get("model__random_state", 0)
        return {"owa": [0.5, 0.2, 0.9][seed], "seconds": 10.0 * (seed + 1)}

    assert median_over_seeds(fit_and_score, M4_MODELS["GRU"], 3) == {
        "owa": 0.5, "seconds": 20.0, "runs": 3}
    assert median_over_seeds(fit_and_score, M4_MODELS["Theta"], 3) == {
        "owa": 0.5, "seconds": 10.0, "runs": 1}


def test_last_rows_split_every_series_at_its_own_end() -> None:
    y = make_panel({"a": 80, "b": 64})
    head, tail = last_rows(y, 10)
    assert tail.groupby(level=0).size().to_dict() == {"a": 10, "b": 10}
    assert head.groupby(level=0).size().to_dict() == {"a": 70, "b": 54}
    assert pd.concat([head, tail]).sort_index().equals(y.sort_index())


def test_the_ensemble_is_weighted_on_the_held_out_rows_and_scored_on_test() -> None:
    """Two members: one exact on the held-out last horizon of train, one off by a lot. The
    greedy weights go to the first, so the ensemble's test scores are its test forecast's,
    however good the second's test forecast is."""
    y = make_panel({"a": 200, "b": 150}) + 10.0  # positive, as sMAPE wants
    y_train, y_test = last_rows(y, M4_HOURLY_HORIZON)
    y_fit, held_out = last_rows(y_train, M4_HOURLY_HORIZON)
    members = {"exact": (held_out, y_test * 1.05, 3.0),
               "off": (held_out * 2.0, y_test, 4.0)}
    scores = ensemble_run(members, lambda f: m4_scores(held_out, f, y_fit)["owa"],
                          lambda f: m4_scores(y_test, f, y_train), weighted_frame)
    assert scores == {**m4_scores(y_test, y_test * 1.05, y_train), "seconds": 7.0}
    assert scores["owa"] > 0.0  # the other member's perfect test forecast weighed nothing


def test_the_m4_ensembles_members_do_not_refit_on_the_hours_that_weigh_them(
        monkeypatch) -> None:
    """The ensemble row's weights come from the members' forecasts of the last 48 hours of
    train, so its members keep their early-stopped networks (refit_full=False); without the
    ensemble the networks resolve refit_full as their defaults do: on this panel, 48 held-out
    rows of a median 127, a refit. Two tiny networks on a small panel stand in for M4 Hourly
    (its 414 series take an hour)."""
    y = make_panel({"a": 200, "b": 150}) + 10.0
    y_train, y_test = last_rows(y, M4_HOURLY_HORIZON)
    monkeypatch.setattr(benchmark, "load_m4_hourly",
                        lambda _: (y_train.reset_index(), y_test.reset_index()))
    for name in ("GRU", "LSTM"):
        monkeypatch.setitem(M4_MODELS, name, partial(
            network, name, season_length=24, input_len=24, hidden_size=4, num_layers=1,
            max_epochs=1, steps_per_epoch=2, batch_size=8))
    refits: list[bool] = []
    train_network = NeuralForecaster._train_network

    def spy(self: NeuralForecaster, *args: object) -> None:
        train_network(self, *args)
        refits.append(self.resolved_params_["refit_full"])

    monkeypatch.setattr(NeuralForecaster, "_train_network", spy)
    table = benchmark.bench_m4_hourly("unused", ["GRU", "LSTM", ENSEMBLE])
    assert list(table.index) == ["GRU", "LSTM", ENSEMBLE] and refits == [False, False]
    refits.clear()
    benchmark.bench_m4_hourly("unused", ["GRU", "LSTM"])
    assert refits == [True, True]


def test_the_ensemble_mixes_members_whose_errors_cancel() -> None:
    """Arrays, as the ETTh1 rows weigh them: one member too high and one too low by the same
    amount on the held-out rows average to the truth, so each gets half the weight."""
    truth = np.linspace(0.0, 1.0, 20).reshape(4, 5)
    members = {"high": (truth + 1.0, np.full((4, 5), 2.0), 1.0),
               "low": (truth - 1.0, np.full((4, 5), 4.0), 1.0)}
    scores = ensemble_run(members, lambda f: ett_scores(f, truth)["mse"],
                          lambda f: ett_scores(f, np.full((4, 5), 3.0)))
    assert scores == {"mse": 0.0, "mae": 0.0, "seconds": 2.0}


def test_the_ray_benchmarks_baseline_forecasts_its_series_without_sktimes_notice(
        data_dir: Path) -> None:
    panel = tiled_panel(data_dir, 3)
    ids = list(panel.index.unique(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = naive_forecast(panel, ids[:2])
    assert rows == 2 * M4_HOURLY_HORIZON
    # sktime warns once per series it builds a forecaster for: thousands over the table
    assert not [w for w in caught if str(w.message).startswith(SKTIME_NOTICE)]
