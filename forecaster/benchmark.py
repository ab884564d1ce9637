"""Accuracy benchmarks on the reference data: ``forecaster bench m4-hourly`` and ``... etth1``.

Every model is trained with the settings below (defaults unless listed), scored with the
standard protocol of its data set, and timed; the result is one table.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from functools import cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sktime.forecasting.base import BaseForecaster
from sktime.forecasting.compose import TransformedTargetForecaster
from sktime.forecasting.ets import AutoETS
from sktime.forecasting.naive import NaiveForecaster
from sktime.forecasting.theta import ThetaForecaster
from sktime.transformations.series.boxcox import LogTransformer
from tqdm.auto import tqdm

from forecaster import (
    GRUForecaster,
    HybridForecaster,
    LSTMForecaster,
    NeuralForecaster,
    RNNForecaster,
    TCNForecaster,
    TransformerForecaster,
)
from forecaster.data import long_to_panel
from forecaster.datasets import (
    M4_HOURLY_HORIZON,
    M4_HOURLY_SEASONALITY,
    load_etth1,
    load_m4_hourly,
    wide_to_long,
)
from forecaster.ensemble import greedy_weights, weighted_frame, weighted_mean
from forecaster.evaluation import ett_forecasts, ett_scores, m4_scores

SP = M4_HOURLY_SEASONALITY


def log_target(model: BaseForecaster) -> BaseForecaster:
    """The model on log values (M4 Hourly is positive and mostly multiplicative-seasonal).

    Quantiles survive the monotone log and exp transforms, so the median stays the median.
    """
    return TransformedTargetForecaster([("log", LogTransformer()), ("model", model)])


# name -> (network class, settings other than its defaults): every benchmark's networks; the
# plain Elman RNN diverges at the family default of 1e-2 (exploding gradients)
NETWORKS: dict[str, tuple[type[NeuralForecaster], dict[str, Any]]] = {
    "RNN": (RNNForecaster, {"learning_rate": 3e-3}),
    "LSTM": (LSTMForecaster, {}),
    "GRU": (GRUForecaster, {}),
    "TCN": (TCNForecaster, {}),
    "Transformer": (TransformerForecaster, {}),
    "Hybrid": (HybridForecaster, {}),
}


def network(name: str, **params: Any) -> BaseForecaster:
    """The benchmark network ``name`` with ``params`` over its settings, on log values."""
    cls, settings = NETWORKS[name]
    return log_target(cls(**{**settings, "verbose": False, **params}))


# name -> estimator factory. The networks run with their defaults on log values, told the season
# as the baselines are (the M4 files carry integer hours, not dates): their "auto" sizes come
# out as input 168 (the Transformer 336), segments of 24 (TCN 4), patches of 24 every 12
M4_MODELS: dict[str, Callable[[], BaseForecaster]] = {
    "sNaive": lambda: NaiveForecaster(strategy="last", sp=SP),
    "Theta": lambda: ThetaForecaster(sp=SP),
    # additive_only: the full automatic search takes over 20 minutes here on 414 series
    "AutoETS": lambda: AutoETS(auto=True, sp=SP, additive_only=True, n_jobs=-1),
    **{name: partial(network, name, season_length=SP) for name in NETWORKS},
}

# ETTh1: input 336 as in the published tables, MSE loss since MSE is the headline metric,
# early stopping on the validation split and no refit on it (the published models train on the
# training split alone); the Transformer has PatchTST's ETTh1 patches and dropout (a small set:
# 8,640 training hours)
ETT_SETTINGS: dict[str, Any] = {"input_len": 336, "loss": "mse", "refit_full": False,
                                "verbose": False}
ETT_MODELS: dict[str, Callable[..., BaseForecaster]] = {
    "Transformer": lambda **kw: TransformerForecaster(
        patch_len=16, patch_stride=8, d_model=32, encoder_layers=2, dropout=0.3,
        learning_rate=1e-3, batch_size=128, **kw),
    "LSTM": lambda **kw: LSTMForecaster(**kw),
    "Hybrid": lambda **kw: HybridForecaster(**kw),
}

# the last row of each table: the networks' greedy ensemble, weighted on what they held out
ENSEMBLE = "Ensemble"
BENCH_MODELS: dict[str, dict[str, Callable[..., BaseForecaster]]] = {
    "m4-hourly": M4_MODELS, "etth1": ETT_MODELS}

# one ensemble member: (forecast of the held-out rows, test forecast, fit seconds)
Member = tuple[Any, Any, float]


def seeded(model: BaseForecaster, seed: int) -> BaseForecaster | None:
    """``model`` with every ``random_state`` it holds set to ``seed``; None when it has none
    (a deterministic model, whose other seeds would repeat its first run)."""
    keys = [key for key in model.get_params()
            if key == "random_state" or key.endswith("__random_state")]
    return model.set_params(**dict.fromkeys(keys, seed)) if keys or not seed else None


def median_over_seeds(fit_and_score: Callable[[BaseForecaster], dict[str, float]],
                      make: Callable[[], BaseForecaster], seeds: int) -> dict[str, float]:
    """Each score's median over the runs with seeds 0 .. ``seeds`` - 1 (one run for a model
    without a seed), with the number of runs; seed 0 is every model's default."""
    return median_of([fit_and_score(model) for seed in range(seeds)
                      if (model := seeded(make(), seed)) is not None])


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each score's median over ``runs``, with their number."""
    scores = {key: float(np.median([run[key] for run in runs])) for key in runs[0]}
    return {**scores, "runs": len(runs)}


def last_rows(y: pd.DataFrame, rows: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each series of the panel ``y`` split into (all but its last ``rows``, its last ``rows``)."""
    position = y.groupby(level=0).cumcount(ascending=False)
    return y[position >= rows], y[position < rows]


def ensemble_run(members: dict[str, Member], held_out_loss: Callable[[Any], float],
                 test_scores: Callable[[Any], dict[str, float]],
                 combine: Callable[[list[Any], Sequence[float]], Any] = weighted_mean
                 ) -> dict[str, float]:
    """The test scores of the networks' ensemble: weights by greedy selection
    (:func:`greedy_weights`) on the ``held_out_loss`` of the members' combined forecasts of
    the rows each network held out for early stopping and never trained on, then the
    members' test forecasts combined with those weights. The seconds are the members' sum."""
    names = list(members)

    @cache
    def loss(counts: tuple[int, ...]) -> float:
        return held_out_loss(combine([members[name][0] for name in names], counts))

    weights = greedy_weights(loss, len(names))
    tqdm.write(f"{ENSEMBLE}: " + ", ".join(f"{name} {w:.2f}" for name, w in
                                             zip(names, weights, strict=True) if w > 0),
               file=sys.stderr)
    return {**test_scores(combine([members[name][1] for name in names], weights)),
            "seconds": sum(seconds for *_, seconds in members.values())}


def check_rows(dataset: str, names: list[str]) -> None:
    """ValueError unless ``names`` are rows that the benchmark of ``dataset`` can compute."""
    models = BENCH_MODELS[dataset]
    unknown = [name for name in names if name not in models and name != ENSEMBLE]
    if unknown:
        raise ValueError(f"{', '.join(unknown)} not benchmarked on {dataset}; choose from "
                         f"{', '.join([*models, ENSEMBLE])}")
    networks = [name for name in models if name in NETWORKS]
    if ENSEMBLE in names and sum(name in networks for name in names) < 2:
        raise ValueError(f"{ENSEMBLE} weighs the networks benchmarked with it: name two or more "
                         f"of {', '.join(networks)}")


def _ensemble_last(names: list[str]) -> list[str]:
    return sorted(names, key=lambda name: name == ENSEMBLE)


def bench_m4_hourly(data_dir: str | Path, models: list[str] | None = None,
                    seeds: int = 1) -> pd.DataFrame:
    """Train each model on M4 Hourly train, forecast 48 hours, score against M4 test; with
    ``seeds``, the median over that many seeds (see :func:`median_over_seeds`). The
    ``Ensemble`` row, computed last, weighs the networks benchmarked with it, seed by seed,
    on the OWA of their forecasts of the last 48 hours of train (:func:`ensemble_run`)."""
    names = models or [*M4_MODELS, ENSEMBLE]
    check_rows("m4-hourly", names)
    train, test = load_m4_hourly(data_dir)
    y_train, y_test = long_to_panel(train), long_to_panel(test)
    y_fit, y_held_out = last_rows(y_train, M4_HOURLY_HORIZON)
    fh = np.arange(1, M4_HOURLY_HORIZON + 1)
    members: dict[int, dict[str, Member]] = {}  # seed -> network -> member

    def fit_and_score(model: BaseForecaster) -> dict[str, float]:
        started = time.perf_counter()
        y_pred = model.fit(y_train, fh=fh).predict()
        seconds = time.perf_counter() - started
        if ENSEMBLE in names and name in NETWORKS:  # forecast the horizon it held out
            network = model.steps_[-1][1]
            held_out = log_target(network.pretrained()).fit(y_fit, fh=fh).predict()
            members.setdefault(network.random_state, {})[name] = (held_out, y_pred, seconds)
        return {**m4_scores(y_test, y_pred, y_train), "seconds": seconds}

    rows = []
    for name in tqdm(_ensemble_last(names), desc="M4 Hourly", unit="model"):
        if name == ENSEMBLE:
            scores = median_of([ensemble_run(
                networks, lambda f: m4_scores(y_held_out, f, y_fit)["owa"],
                lambda f: m4_scores(y_test, f, y_train), weighted_frame)
                for networks in members.values()])
        else:
            make = M4_MODELS[name]
            if ENSEMBLE in names and name in NETWORKS:  # its members must not train on the
                make = partial(make, refit_full=False)  # held-out hours that choose their weights
            scores = median_over_seeds(fit_and_score, make, seeds)
        rows.append({"model": name, **scores})
        tqdm.write(str(rows[-1]), file=sys.stderr)
    return pd.DataFrame(rows).set_index("model")


def bench_etth1(path: str | Path, horizons: tuple[int, ...] = (96, 336),
                models: list[str] | None = None, seeds: int = 1) -> pd.DataFrame:
    """Multivariate (all 7 variables) and univariate (OT) MSE/MAE on the ETTh1 test split;
    with ``seeds``, the median over that many seeds. The ``Ensemble`` rows weigh the models
    benchmarked with them, seed by seed, on the MSE of their forecasts of the validation
    split (:func:`ensemble_run`)."""
    names = models or [*ETT_MODELS, ENSEMBLE]
    check_rows("etth1", names)
    splits = load_etth1(path)
    rows = []
    jobs = [(name, setting, h) for h in horizons for setting in ("multivariate", "univariate")
            for name in _ensemble_last(names)]
    # (setting, horizon) -> seed -> network -> member; and the truths of its windows
    members: dict[tuple[str, int], dict[int, dict[str, Member]]] = {}
    truths: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    for name, setting, horizon in tqdm(jobs, desc="ETTh1", unit="model"):
        columns = list(splits.frame.columns) if setting == "multivariate" else ["OT"]
        # train and validation rows; the validation split is held out for early stopping
        y = long_to_panel(wide_to_long(splits.frame.iloc[: splits.val_end], columns))
        key = (setting, horizon)

        def fit_and_score(model: BaseForecaster, y: pd.DataFrame = y, horizon: int = horizon,
                          columns: list[str] = columns, key: tuple[str, int] = key,
                          name: str = name) -> dict[str, float]:
            started = time.perf_counter()
            model.fit(y, fh=np.arange(1, horizon + 1))
            seconds = time.perf_counter() - started
            test, test_truth = ett_forecasts(model, splits, columns)
            if ENSEMBLE in names:  # its forecasts of the validation split it held out
                val, val_truth = ett_forecasts(model, splits, columns, "val")
                truths[key] = {"val": val_truth, "test": test_truth}
                members.setdefault(key, {}).setdefault(model.random_state, {})[name] = (
                    val, test, seconds)
            return {**ett_scores(test, test_truth), "seconds": seconds}

        if name == ENSEMBLE:
            scores = median_of([ensemble_run(
                networks, lambda f, key=key: ett_scores(f, truths[key]["val"])["mse"],
                lambda f, key=key: ett_scores(f, truths[key]["test"]))
                for networks in members[key].values()])
        else:
            make = partial(ETT_MODELS[name], validation_rows=splits.val_end - splits.train_end,
                           **ETT_SETTINGS)
            scores = median_over_seeds(fit_and_score, make, seeds)
        rows.append({"model": name, "setting": setting, "horizon": horizon, **scores})
        tqdm.write(str(rows[-1]), file=sys.stderr)  # the table comes at the end of long runs
    return pd.DataFrame(rows).set_index(["setting", "horizon", "model"])
