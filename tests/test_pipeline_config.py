"""Race configs: the shipped ones load, every kind of mistake fails before training with an
error naming its key, the environment overrides tracking settings; plus the pure parts of the
race (forecast validation, the promotion rule)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import yaml
from mlflow.exceptions import MlflowException

from cli.main import main
from forecaster.data import SERIES, TIME
from pipelines import registry
from pipelines.config import ConfigError, TrackingConfig, load_config, parse_config
from pipelines.forecasts import POINT, forecast_problems, quantile_column
from pipelines.race import prepare_race, run_race
from pipelines.tracking import redact, unavailable, unreachable
from tests.pipeline_support import LSTM, SNAIVE, clean_mlflow_environment, race_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(autouse=True)
def no_mlflow_variables() -> Iterator[None]:
    with clean_mlflow_environment():
        yield


def _raw(tmp_path: Path, data_dir: Path) -> dict:
    return race_config(tmp_path, data_dir, [SNAIVE]).model_dump(mode="json")


@pytest.mark.parametrize("name", ["quick.yaml", "m4_hourly.yaml", "etth1.yaml"])
def test_shipped_configs_load_and_fit_their_data(name: str, data_dir: Path) -> None:
    config = load_config(CONFIGS / name)
    assert config.candidates and config.registry.model_name
    # the relative data path is resolved from the config file's folder
    assert config.data.data_dir is not None and config.data.data_dir.is_dir()
    prepared = prepare_race(config)  # loads the data and plans the folds: no error
    assert len(prepared.plan.folds) == config.backtest.folds


def test_an_unknown_model_is_named(tmp_path: Path, data_dir: Path) -> None:
    raw = _raw(tmp_path, data_dir)
    raw["candidates"].append({"model": "ProphetForecaster"})
    with pytest.raises(ConfigError, match=r"candidates\.1\.model: unknown model "
                                          r"'ProphetForecaster'; choose one of"):
        parse_config(raw)


def test_an_unknown_key_is_named(tmp_path: Path, data_dir: Path) -> None:
    raw = _raw(tmp_path, data_dir)
    raw["backtest"]["foldz"] = 3
    with pytest.raises(ConfigError, match=r"backtest\.foldz: unknown key"):
        parse_config(raw)


def test_an_unknown_model_parameter_is_named(tmp_path: Path, data_dir: Path) -> None:
    raw = _raw(tmp_path, data_dir)
    raw["candidates"] = [{**LSTM, "params": {"hiden_size": 8}}]
    with pytest.raises(ConfigError, match=r"candidates\.0\.params: unknown parameter\(s\) "
                                          r"\['hiden_size'\] for LSTMForecaster"):
        parse_config(raw)


def test_every_problem_is_reported_at_once(tmp_path: Path, data_dir: Path) -> None:
    raw = _raw(tmp_path, data_dir)
    raw["horizon"] = 0
    raw["selection"]["metric"] = "rmse"
    with pytest.raises(ConfigError) as error:
        parse_config(raw)
    keys = [line.split(":")[0] for line in error.value.problems]
    assert keys == ["horizon", "selection.metric"]


def test_a_horizon_too_large_fails_before_training(tmp_path: Path, data_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    config = race_config(tmp_path, data_dir, [SNAIVE, LSTM], horizon=120)

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was built for training")

    monkeypatch.setattr("pipelines.race._race_candidate", no_training)
    with pytest.raises(ConfigError, match=r"horizon: 120 with 2 fold\(s\) 120 apart is too "
                                          r"large for the data: the shortest series"):
        run_race(config, progress=False)
    assert not (tmp_path / "mlflow.db").exists()  # MLflow was never touched


def test_a_missing_column_is_named(tmp_path: Path) -> None:
    rows = [{"store": s, "day": f"2024-01-{d:02d}", "sales": float(d)}
            for s in ("a", "b") for d in range(1, 29)]
    pd.DataFrame(rows).to_csv(tmp_path / "sales.csv", index=False)
    raw = {
        "name": "sales", "horizon": 3, "frequency": "D",
        "data": {"path": "sales.csv",
                 "columns": {"series_id": "store", "timestamp": "day", "target": "revenue"}},
        "candidates": [SNAIVE], "registry": {"model_name": "sales"},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    (tmp_path / "race.yaml").write_text(yaml.safe_dump(raw))
    config = load_config(tmp_path / "race.yaml")
    with pytest.raises(ConfigError, match=r"data\.columns\.target: column 'revenue' not found "
                                          r"in sales\.csv"):
        run_race(config, progress=False)
    assert not (tmp_path / "mlflow.db").exists()

    # with the right column the same file plans a race: daily data, seasonality 7
    raw["data"]["columns"]["target"] = "sales"
    (tmp_path / "race.yaml").write_text(yaml.safe_dump(raw))
    config = load_config(tmp_path / "race.yaml")
    assert config.season_length == 7
    prepared = prepare_race(config)
    assert prepared.data.datetime_index and len(prepared.plan.folds) == 3


@pytest.mark.parametrize(("data", "problem"), [
    ({"fill": {"missing": "mean"}},
     r"data\.fill\.missing: Input should be 'error', 'interpolate' or 'zero'"),
    ({"fill": {"short": "pad"}}, r"data\.fill\.short: Input should be 'error' or 'drop'"),
    ({"fill": {"gaps": "zero"}}, r"data\.fill\.gaps: unknown key"),
    ({"format": "tall"}, r"data\.format: Input should be 'long' or 'wide'"),
    ({"format": "wide"}, r"data: `format` applies to `path` sources only"),
], ids=["missing", "short", "unknown-key", "format", "format-with-loader"])
def test_data_fill_and_format_mistakes_are_named(tmp_path: Path, data_dir: Path, data: dict,
                                                 problem: str) -> None:
    raw = _raw(tmp_path, data_dir)
    raw["data"].update(data)
    with pytest.raises(ConfigError, match=problem):
        parse_config(raw)


def test_a_wide_file_maps_only_its_time_column(tmp_path: Path) -> None:
    raw = {"name": "wide", "horizon": 2, "candidates": [SNAIVE], "registry": {"model_name": "w"},
           "data": {"path": str(tmp_path / "wide.csv"), "format": "wide",
                    "columns": {"timestamp": "day", "series_id": "store"}}}
    with pytest.raises(ConfigError, match=r"data: `columns` \['series_id'\] apply to the long "
                                          r"format only"):
        parse_config(raw)
    raw["data"]["columns"] = {"timestamp": "day"}
    config = parse_config(raw)
    assert config.data.format == "wide" and config.data.fill.missing == "error"
    assert config.data.fill.short == "error"  # both default to failing


def test_the_cli_reports_a_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "bad.yaml").write_text("name: x\nhorizon: 24\ncandidates: []\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(tmp_path / "bad.yaml")])
    message = str(exit_info.value.code)
    assert message.startswith("forecaster train: invalid race config")
    for key in ("data: Field required", "registry: Field required", "candidates: List should"):
        assert key in message


def test_the_environment_overrides_tracking(tmp_path: Path, data_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    config = race_config(tmp_path, data_dir, [SNAIVE])
    assert config.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "nightly")
    config = race_config(tmp_path, data_dir, [SNAIVE])
    assert config.tracking.tracking_uri == "http://mlflow.internal:5000"
    assert config.experiment_name == "nightly"
    assert config.tracking.artifact_location == str(tmp_path / "artifacts")  # from the file


def test_the_http_budget_is_under_a_minute_and_follows_the_environment(
        tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tracking = race_config(tmp_path, data_dir, [SNAIVE]).tracking
    # 3 tries, each 5 s to connect and 5 s per read, backing off 0 s then 2 s (+ 1 s jitter)
    assert tracking.http_budget_seconds == 33 < 60
    assert tracking.http_environment() == {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
                                           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                                           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    tracking = race_config(tmp_path, data_dir, [SNAIVE]).tracking
    assert (tracking.http_timeout_seconds, tracking.http_max_retries) == (2, 0)
    assert tracking.http_budget_seconds == 4
    with pytest.raises(ConfigError, match="tracking.http_max_retries: Input should be less "
                                          "than or equal to 10"):
        race_config(tmp_path, data_dir, [SNAIVE], tracking={"http_max_retries": 11})


def test_a_tracking_failure_is_told_in_one_line_without_credentials() -> None:
    tracking = TrackingConfig(tracking_uri="http://trainer:s3cret@mlflow.internal:5000")
    try:
        try:
            raise requests.ConnectionError("Connection refused")
        except requests.ConnectionError as cause:
            raise MlflowException("API request to http://trainer:s3cret@... failed") from cause
    except MlflowException as error:
        assert unreachable(error)
        message = str(unavailable(error, tracking))
    assert "s3cret" not in message and "\n" not in message
    assert message.startswith("the tracking server http://mlflow.internal:5000 refused or "
                              "dropped the connection (ConnectionError; each request gives up "
                              "within 33 s")
    assert not unreachable(ValueError("a model's own error"))
    # a failed request elsewhere (Ray's own HTTP calls) is not the tracking server's
    elsewhere = requests.exceptions.RetryError(
        "retried out", request=requests.Request("GET", "http://127.0.0.2:8265/api").prepare())
    assert unreachable(elsewhere) and not unreachable(elsewhere, tracking.tracking_uri)
    assert not unreachable(elsewhere, "sqlite:///mlflow.db")
    to_server = requests.exceptions.RetryError(
        "retried out", request=requests.Request("GET", "http://mlflow.internal:5000/api").prepare())
    assert unreachable(to_server, tracking.tracking_uri)
    assert redact("sqlite:///mlflow.db") == "sqlite:///mlflow.db"


# ---------------------------------------------------------------------------- pure rules
def _frame(values: np.ndarray, levels: list[float]) -> pd.DataFrame:
    """A forecast frame of one series 'a' over timestamps 10.. with given quantile rows."""
    frame = pd.DataFrame({SERIES: "a", TIME: 10 + np.arange(len(values)),
                          POINT: values[:, len(levels) // 2]})
    for i, level in enumerate(levels):
        frame[quantile_column(level)] = values[:, i]
    return frame


def test_forecast_validation() -> None:
    levels = [0.1, 0.5, 0.9]
    expected = pd.MultiIndex.from_tuples([("a", 10), ("a", 11)], names=[SERIES, TIME])
    good = np.array([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    assert forecast_problems(_frame(good, levels), expected) == []
    nan = good.copy()
    nan[1, 2] = np.nan
    assert "non-finite" in forecast_problems(_frame(nan, levels), expected)[0]
    crossed = good.copy()
    crossed[0] = [3.0, 2.0, 1.0]
    assert "quantiles cross" in forecast_problems(_frame(crossed, levels), expected)[0]
    assert "wrong shape" in forecast_problems(_frame(good[:1], levels), expected)[0]


def test_the_promotion_rule() -> None:
    assert registry.decide("mase", 0.9, None, None, 0.01).promoted  # no champion yet
    assert registry.decide("mase", 0.9, 3, 1.0, 0.05).promoted  # 10% better, margin 5%
    kept = registry.decide("mase", 0.97, 3, 1.0, 0.05)  # 3% better: not enough
    assert not kept.promoted and "margin of 5.0%" in kept.reason
    assert not registry.decide("mase", 1.0, 3, 1.0, 0.0).promoted  # a tie keeps the champion
    assert not registry.decide("mase", None, 3, 1.0, 0.0).promoted  # nothing valid to promote
    unscored = registry.decide("mase", 2.0, 3, None, 0.0, "horizon 48 is beyond the 24 steps")
    assert unscored.promoted and "could not be scored" in unscored.reason
