"""Covariates from the data to HTTP: the race's config and folds, a race with a covariate
model and a baseline, the logged pyfunc model and its signature, the service's checks (pure
functions), and end to end a promotion calendar that moves the served forecast.

The synthetic data: stores whose sales are a level set by their size (a static covariate), a
weekly cycle, noise, and a lift of ``LIFT`` on promotion days (a known-future covariate)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from forecaster import LSTMForecaster, NeuralForecaster
from forecaster.data import SERIES, TARGET, TIME, split_long
from pipelines import registry
from pipelines.config import ConfigError, RaceConfig, parse_config
from pipelines.pyfunc_model import future_layout, log_forecaster
from pipelines.race import format_leaderboard, prepare_race, run_race
from serving.inference import RequestError, forward, prepare, render
from serving.model import ServedModel, load_version, resolve_alias
from serving.schemas import ForecastRequest
from tests.pipeline_support import SNAIVE, clean_mlflow_environment
from tests.serving_support import call, running_service, vouch_like_a_race

LIFT = 5.0
HORIZON = 7
COLUMNS = {"series_id": "store", "timestamp": "day", "target": "sales",
           "known_future": ["promo"], "static": ["size"]}
TINY_LSTM = {"name": "lstm", "model": "LSTMForecaster",
             "params": {"hidden_size": 16, "num_layers": 1, "segment_len": 7, "input_len": 28,
                        "max_epochs": 8, "steps_per_epoch": 30, "batch_size": 32}}
MODEL_NAME = "promo"


def promo_sales(stores: int = 6, days: int = 120, seed: int = 0) -> pd.DataFrame:
    """Daily sales of ``stores`` stores, in the file's own column names."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(stores):
        promo = (rng.random(days) < 0.25).astype(float)
        size = 1.0 + 0.5 * i
        sales = (10 * size + 2 * np.sin(2 * np.pi * np.arange(days) / 7 + i) + LIFT * promo
                 + 0.3 * rng.standard_normal(days))
        frames.append(pd.DataFrame({
            "store": f"s{i}", "day": pd.date_range("2024-01-01", periods=days, freq="D"),
            "sales": sales, "promo": promo, "size": size}))
    return pd.concat(frames, ignore_index=True)


def long_frame(sales: pd.DataFrame) -> pd.DataFrame:
    return sales.rename(columns={"store": SERIES, "day": TIME, "sales": TARGET})


def promo_config(store: Path, csv: Path, candidates: list[dict[str, Any]],
                 **columns: Any) -> RaceConfig:
    return parse_config({
        "name": "promo-race", "horizon": HORIZON, "frequency": "D",
        "data": {"path": str(csv), "columns": {**COLUMNS, **columns}},
        "candidates": candidates, "backtest": {"folds": 2},
        "registry": {"model_name": MODEL_NAME},
        "tracking": {"tracking_uri": f"sqlite:///{store / 'mlflow.db'}",
                     "artifact_location": str(store / "artifacts"),
                     "enable_system_metrics_logging": False},
        "plot_series": 1,
    })


@pytest.fixture(autouse=True)
def no_mlflow_variables() -> Iterator[None]:
    with clean_mlflow_environment():
        yield


@pytest.fixture(scope="module")
def sales_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("promo-data") / "sales.csv"
    promo_sales().to_csv(path, index=False)
    return path


# ---------------------------------------------------------------- config and folds
def test_covariate_columns_are_checked_against_the_file(tmp_path: Path) -> None:
    sales = promo_sales(stores=2, days=60).assign(
        label="x", size=lambda f: np.arange(len(f), dtype=float))
    sales.to_csv(tmp_path / "sales.csv", index=False)
    config = promo_config(tmp_path, tmp_path / "sales.csv", [SNAIVE],
                          known_future=["promo", "holiday", "label"], static=["size"])
    with pytest.raises(ConfigError) as error:
        prepare_race(config)
    assert error.value.problems == [
        "data.columns.known_future: column 'holiday' not found (columns: ['store', 'day', "
        "'sales', 'promo', 'size', 'label'])",
        "data.columns.known_future: column 'label' is not numeric (dtype str)",
        "data.columns.static: column 'size' varies within series ['s0', 's1']; a static "
        "covariate is constant per series",
    ]
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("columns, candidate, problem", [
    ({"static": ["sales"]}, SNAIVE,
     "data.columns.static: 'sales' is the target column, not a covariate"),
    ({"known_future": ["promo", "promo"]}, SNAIVE,
     "data.columns.known_future: 'promo' is named twice"),
    ({"static": ["promo"]}, SNAIVE, "data.columns.static: 'promo' is named twice"),
    ({"known_future": ["target"]}, SNAIVE,
     "data.columns.known_future: 'target' is reserved for the target column"),
    ({}, {**TINY_LSTM, "params": {"static_covariates": ["size"]}},
     "candidates.0.params: ['static_covariates'] are set from the data section, not here: "
     "data.columns.static"),
], ids=["target", "twice", "in-both", "reserved", "in-params"])
def test_covariate_config_mistakes_name_the_key(tmp_path: Path, columns: dict,
                                                candidate: dict, problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        promo_config(tmp_path, tmp_path / "sales.csv", [candidate], **columns)
    assert any(line.startswith(problem) for line in error.value.problems), error.value.problems


def test_folds_carry_the_covariates_of_their_rows(tmp_path: Path, sales_csv: Path) -> None:
    prepared = prepare_race(promo_config(tmp_path, sales_csv, [TINY_LSTM, SNAIVE]))
    data = prepared.data
    assert list(data.X.columns) == ["promo", "size"] and data.static == ("size",)
    assert len(prepared.plan.folds) == 2
    for fold in prepared.plan.folds:
        pd.testing.assert_index_equal(fold.X_train.index, fold.y_train.index)
        pd.testing.assert_index_equal(fold.X_test.index, fold.y_test.index)
        pd.testing.assert_frame_equal(fold.X_test, data.X.loc[fold.y_test.index])
    # the last fold's test window is the data's last horizon: its promotions are the future
    last = prepared.plan.folds[-1]
    assert last.X_test.groupby(level=0).size().eq(HORIZON).all()
    assert last.y_test.index.equals(data.panel.groupby(level=0).tail(HORIZON).index)


# ---------------------------------------------------------------- the logged model, served
@pytest.fixture(scope="module")
def covariate_lstm() -> tuple[NeuralForecaster, pd.DataFrame]:
    """A tiny LSTM fitted on all but the last week, which holds the future's promotions."""
    long = long_frame(promo_sales())
    y, X = split_long(long, ["promo"], ["size"])
    past = long.groupby(SERIES).head(-HORIZON)
    y_past, X_past = split_long(past, ["promo"], ["size"])
    model = LSTMForecaster(hidden_size=16, num_layers=1, segment_len=7, input_len=28,
                           max_epochs=8, steps_per_epoch=30, batch_size=32,
                           static_covariates=("size",), verbose=False)
    model.fit(y_past, X=X_past, fh=range(1, HORIZON + 1))
    assert y.index.equals(X.index)
    return model, long


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory,
           covariate_lstm: tuple[NeuralForecaster, pd.DataFrame]) -> Iterator[str]:
    """The LSTM logged and registered as the race does it, @champion; its tracking URI."""
    store = tmp_path_factory.mktemp("promo-registry")
    model, long = covariate_lstm
    uri = f"sqlite:///{store / 'mlflow.db'}"
    with clean_mlflow_environment():
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        mlflow.set_experiment(experiment_id=mlflow.create_experiment(
            "promo", artifact_location=str(store / "artifacts")))
        example = future_layout(long, HORIZON).groupby(SERIES).tail(40 + HORIZON)
        with mlflow.start_run():
            info = log_forecaster(model, horizon=HORIZON, levels=list(model.levels_),
                                  frequency="D", input_example=example,
                                  known_future=["promo"], static=["size"])
        version = registry.register_version(info, MODEL_NAME, {})
        vouch_like_a_race(MODEL_NAME, int(version.version))
        registry.set_alias(MODEL_NAME, registry.CHAMPION, int(version.version))
        yield uri


def test_the_pyfunc_model_takes_covariates_and_names_them(
        logged: str, covariate_lstm: tuple[NeuralForecaster, pd.DataFrame]) -> None:
    model, long = covariate_lstm
    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    assert pyfunc.metadata.signature.inputs.input_names() == [
        SERIES, TIME, TARGET, "promo", "size"]
    got = pyfunc.predict(future_layout(long, HORIZON))
    # the estimator's own sktime forecast with the last week's promotions as X
    future = split_long(long, ["promo"], ["size"])[1].groupby(level=0).tail(HORIZON)
    expected = model.predict(X=future)
    np.testing.assert_array_equal(got["y_pred"].to_numpy(),
                                  expected[TARGET].to_numpy(np.float64))
    assert list(zip(got[SERIES], got[TIME], strict=True)) == list(expected.index)
    with pytest.raises(Exception, match=r"series 's0' ends with 0 future row\(s\).*exactly "
                                        r"horizon = 7"):
        pyfunc.predict(long)


@pytest.fixture(scope="module")
def served(logged: str) -> ServedModel:
    client = mlflow.MlflowClient(logged, logged)
    return load_version(client, resolve_alias(client, MODEL_NAME, "champion"), "champion",
                        warmup_batch=4)


def _request(long: pd.DataFrame, horizon: int = HORIZON, history: int = 40,
             promo: list[float] | None = None, drop: tuple[str, ...] = ()) -> ForecastRequest:
    """The stores' last ``history`` days before the final week, and the promotions of the
    ``horizon`` days ahead (the data's, or ``promo`` for every store)."""
    series = []
    for key, group in long.groupby(SERIES):
        past = group.iloc[-HORIZON - history:-HORIZON]
        future = group["promo"].iloc[-HORIZON:].tolist() if promo is None else promo
        entry = {"id": key, "values": past[TARGET].tolist(),
                 "covariates": {"promo": past["promo"].tolist() + future[:horizon]},
                 "static": {"size": float(group["size"].iloc[0])}}
        for field in drop:
            entry.pop(field)
        series.append(entry)
    return ForecastRequest.model_validate({"series": series, "horizon": horizon})


def _answer(request: ForecastRequest, model: ServedModel) -> dict:
    prepared = prepare(request, model, max_series=100)
    return json.loads(render(prepared, forward([prepared.items()])[0]))


def test_the_served_model_lists_and_uses_its_covariates(
        served: ServedModel, covariate_lstm: tuple[NeuralForecaster, pd.DataFrame]) -> None:
    model, long = covariate_lstm
    assert (served.info.covariates, served.info.static) == (["promo"], ["size"])
    body = _answer(_request(long), served)
    # a global model: the last 40 days are a context the network reads like any other
    histories = [g[TARGET].to_numpy()[-HORIZON - 40:-HORIZON] for _, g in long.groupby(SERIES)]
    known = [g["promo"].to_numpy()[-HORIZON - 40:] for _, g in long.groupby(SERIES)]
    static = long.groupby(SERIES)["size"].first().to_numpy()[:, None]
    expected = model.forecast_histories(histories, covariates=known, static=static)
    median = model.levels_.index(0.5)
    for i, forecast in enumerate(body["forecasts"]):
        np.testing.assert_allclose(forecast["mean"], expected[i, :, median], rtol=1e-6)
    # a shorter horizon takes fewer promotions: the later steps hold the last one
    short = _answer(_request(long, horizon=3), served)
    assert [len(f["mean"]) for f in short["forecasts"]] == [3] * len(body["forecasts"])


def _two_days_too_many(request: ForecastRequest) -> ForecastRequest:
    request.series[0].covariates["promo"] += [0.0, 0.0]
    return request


@pytest.mark.parametrize("make, loc, reason, message", [
    (lambda long: _request(long, drop=("covariates",)), ("series", 0, "covariates", "promo"),
     "missing_covariate", "lacks the known-future covariate 'promo': 47 values, "
     "len(values) + horizon"),
    (lambda long: _two_days_too_many(_request(long, horizon=5)),
     ("series", 0, "covariates", "promo"), "covariate_length",
     "47 values; expected len(values) + horizon = 40 + 5 = 45"),
    (lambda long: _request(long, drop=("static",)), ("series", 0, "static", "size"),
     "missing_covariate", "lacks the static covariate 'size'"),
], ids=["no-covariates", "wrong-length", "no-static"])
def test_covariate_mistakes_are_400s_naming_the_field(
        served: ServedModel, covariate_lstm: tuple[NeuralForecaster, pd.DataFrame],
        make: Any, loc: tuple, reason: str, message: str) -> None:
    with pytest.raises(RequestError) as caught:
        prepare(make(covariate_lstm[1]), served, max_series=100)
    assert (caught.value.loc, caught.value.reason) == (loc, reason)
    assert message in caught.value.message
    assert caught.value.body()["error"].startswith(".".join(map(str, loc)) + ": ")


def test_unknown_covariates_are_400s(served: ServedModel,
                                     covariate_lstm: tuple[NeuralForecaster, pd.DataFrame]
                                     ) -> None:
    _, long = covariate_lstm
    request = _request(long)
    request.series[1].covariates["holiday"] = [0.0] * 47
    with pytest.raises(RequestError) as caught:
        prepare(request, served, max_series=100)
    assert caught.value.loc == ("series", 1, "covariates", "holiday")
    assert "takes no covariates 'holiday'; it takes ['promo']" in caught.value.message
    request = _request(long)
    request.series[0].static["region"] = 3.0
    with pytest.raises(RequestError, match=r"takes no static 'region'; it takes \['size'\]"):
        prepare(request, served, max_series=100)


def test_the_request_schema_stays_strict() -> None:
    series = {"id": "a", "values": [1.0, 2.0], "covariates": {"promo": [0.0, 1.0, 1.0]},
              "static": {"size": 2.0}}
    ForecastRequest.model_validate({"series": [series], "horizon": 1})
    for bad, loc, kind in [
        ({**series, "covariatez": {}}, ("series", 0, "covariatez"), "extra_forbidden"),
        ({**series, "covariates": {"promo": [0.0, "x", 1.0]}},
         ("series", 0, "covariates", "promo", 1), "float_type"),  # strict: no strings
        ({**series, "static": {"size": float("nan")}}, ("series", 0, "static", "size"),
         "finite_number"),
    ]:
        with pytest.raises(ValidationError) as caught:
            ForecastRequest.model_validate_json(json.dumps({"series": [bad], "horizon": 1}))
        assert (loc, kind) in [(e["loc"], e["type"]) for e in caught.value.errors()]


# ---------------------------------------------------------------- the race, end to end
@pytest.mark.slow
def test_a_covariate_race_is_served_and_follows_the_promotion_calendar(
        tmp_path: Path, sales_csv: Path) -> None:
    """The race backtests and refits the LSTM with the promotions and the store sizes (the
    seasonal naive ignores them, and says so), logs a model that takes them, and a real
    ``forecaster serve`` forecasts higher on the promotion days of the request, by about the
    lift, than for the same request without promotions."""
    config = promo_config(tmp_path, sales_csv, [TINY_LSTM, SNAIVE])
    result = run_race(config, progress=False)
    board = result.leaderboard
    assert result.winner == "lstm" and result.promoted, format_leaderboard(result)
    assert board.loc["snaive", "note"] == "ignores covariates"
    assert board.loc["lstm", "note"] == "" and bool(board.loc["lstm", "valid"])
    assert board.loc["lstm", "mase"] < 0.5 * board.loc["snaive", "mase"]
    run = mlflow.MlflowClient(config.tracking_uri).search_runs(
        [result.experiment_id], "tags.candidate = 'lstm'")[0]
    assert run.data.params["covariates"] == "promo,size"
    info = mlflow.models.get_model_info(f"models:/{MODEL_NAME}/{result.winner_version}")
    assert info.signature.inputs.input_names() == [SERIES, TIME, TARGET, "promo", "size"]

    long = long_frame(promo_sales())
    calendar = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    with running_service(config, tmp_path / "serve.log") as url:
        status, model = call(f"{url}/model")
        assert status == 200 and (model["covariates"], model["static"]) == (["promo"], ["size"])
        answers = {}
        for name, promo in (("promo", calendar), ("none", [0.0] * HORIZON)):
            body = _request(long, promo=promo).model_dump(mode="json", exclude_none=True)
            status, answers[name] = call(f"{url}/forecast", body)
            assert status == 200, answers[name]
        bare = _request(long, drop=("covariates",)).model_dump(mode="json", exclude_none=True)
        status, refused = call(f"{url}/forecast", bare)
    assert status == 400 and refused["detail"][0]["loc"] == ["series", 0, "covariates", "promo"]
    assert "47 values" in refused["error"]
    lift = np.array([f["mean"] for f in answers["promo"]["forecasts"]]) \
        - np.array([f["mean"] for f in answers["none"]["forecasts"]])  # (stores, days)
    on = np.array(calendar, bool)
    assert np.all(lift[:, on] > 0.6 * LIFT) and np.all(lift[:, on] < 1.4 * LIFT), lift
    assert np.all(np.abs(lift[:, ~on]) < 0.25 * LIFT), lift
