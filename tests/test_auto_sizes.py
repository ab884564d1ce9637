"""The "auto" sizes of the networks: what ``resolved_params`` derives from a panel's frequency,
horizon and series lengths (M4 Hourly: exactly the published benchmark's settings; monthly
and daily data: inputs of a few seasons that the short series can fill), that explicit values
are kept as they are, that training and saved models use the resolved values, and what the
race logs of them."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmarks.short_series import (
    SHORT_HOURS,
    daily_m4,
    main,
    monthly_sktime,
    score,
    short_hourly_m4,
)
from forecaster import LSTMForecaster, NeuralForecaster, TransformerForecaster
from forecaster.benchmark import M4_MODELS, network
from forecaster.data import SERIES, TARGET, TIME, long_to_panel
from forecaster.datasets import M4_HOURLY_HORIZON, load_m4_hourly
from forecaster.seasonality import panel_season_length, season_length_of
from pipelines.candidates import (
    build_estimator,
    loggable_params,
    loggable_sizes,
    params_from_logged,
)
from pipelines.warning_capture import SKTIME_NOTICE
from tests.conftest import estimator_classes, make_panel, tiny
from tests.pipeline_support import race_config

# each family's own sizes, per data set; season_length, input_len and validation_rows besides
M4_HOURLY = {  # the published M4 Hourly table's settings (docs/benchmarks.md)
    "RNNForecaster": {"input_len": 168, "segment_len": 24},
    "LSTMForecaster": {"input_len": 168, "segment_len": 24},
    "GRUForecaster": {"input_len": 168, "segment_len": 24},
    "TCNForecaster": {"input_len": 168, "segment_len": 4},
    "TransformerForecaster": {"input_len": 336, "patch_len": 24, "patch_stride": 12},
    "HybridForecaster": {"input_len": 168, "segment_len": 24},
}
# monthly, 48 to 126 values, horizon 18: three years of input, a year per segment or patch
MONTHLY = {
    "RNNForecaster": {"input_len": 36, "segment_len": 12},
    "LSTMForecaster": {"input_len": 36, "segment_len": 12},
    "GRUForecaster": {"input_len": 36, "segment_len": 12},
    "TCNForecaster": {"input_len": 36, "segment_len": 2},
    "TransformerForecaster": {"input_len": 36, "patch_len": 12, "patch_stride": 6},
    "HybridForecaster": {"input_len": 36, "segment_len": 12},
}
# daily totals of M4 Hourly: 22 or 33 days each after a week held out, horizon 7
SHORT_DAILY = {
    "RNNForecaster": {"input_len": 14, "segment_len": 7},
    "LSTMForecaster": {"input_len": 14, "segment_len": 7},
    "GRUForecaster": {"input_len": 14, "segment_len": 7},
    "TCNForecaster": {"input_len": 14, "segment_len": 1},
    "TransformerForecaster": {"input_len": 14, "patch_len": 7, "patch_stride": 3},
    "HybridForecaster": {"input_len": 14, "segment_len": 7},
}
# long daily series (M4 Daily's horizon 14): seven weeks, the Transformer fourteen
LONG_DAILY = {
    "RNNForecaster": {"input_len": 49, "segment_len": 7},
    "LSTMForecaster": {"input_len": 49, "segment_len": 7},
    "GRUForecaster": {"input_len": 49, "segment_len": 7},
    "TCNForecaster": {"input_len": 49, "segment_len": 1},
    "TransformerForecaster": {"input_len": 98, "patch_len": 7, "patch_stride": 3},
    "HybridForecaster": {"input_len": 49, "segment_len": 7},
}


def _expected(table: dict[str, dict[str, int]], cls: type, season: int, horizon: int,
              refit_full: bool) -> dict[str, int]:
    if cls.__name__ not in table:
        pytest.fail(f"{cls.__name__}: add its expected sizes to this test's tables")
    return {"season_length": season, "validation_rows": horizon, "refit_full": refit_full,
            **table[cls.__name__]}


def _panel(lengths: list[int], times: pd.Index | None = None) -> pd.DataFrame:
    """A panel of series of ``lengths``, each starting at the first of ``times`` (integer
    timestamps without)."""
    frames = []
    for i, length in enumerate(lengths):
        index = np.arange(length) if times is None else times[:length]
        frames.append(pd.DataFrame({SERIES: f"s{i}", TIME: index,
                                    TARGET: 10.0 + np.sin(np.arange(length)) + i}))
    return pd.concat(frames).set_index([SERIES, TIME])


def _m4_estimator(cls: type) -> NeuralForecaster:
    """The network of ``forecaster bench m4-hourly`` for ``cls``, as the benchmark builds it."""
    for factory in M4_MODELS.values():
        model = factory().get_params().get("model")
        if type(model) is cls:
            return model
    pytest.fail(f"forecaster.benchmark.M4_MODELS has no {cls.__name__}")


@pytest.mark.parametrize("cls", estimator_classes())
def test_m4_hourly_resolves_to_the_published_settings(cls, data_dir: Path) -> None:
    """HARD requirement: the M4 Hourly benchmark's networks (default sizes, the season given
    as the M4 files carry integer hours) train exactly as the published rows were."""
    y = long_to_panel(load_m4_hourly(data_dir / "m4")[0])
    resolved = _m4_estimator(cls).resolved_params(y, M4_HOURLY_HORIZON)
    assert resolved == _expected(M4_HOURLY, cls, 24, 48, refit_full=False)  # 48 of 960 held out


@pytest.mark.parametrize("cls", estimator_classes())
def test_hourly_dates_of_m4_lengths_resolve_to_the_published_settings(cls) -> None:
    """The same sizes when the season comes from hourly dates: M4 Hourly's 169 series of 700
    hours and 245 of 960 (median 960; the Transformer's 336 needs a median of 672)."""
    times = pd.date_range("2020-01-01", periods=960, freq="h")
    y = _panel([700] * 169 + [960] * 245, times)
    assert cls().resolved_params(y, 48) == _expected(M4_HOURLY, cls, 24, 48, refit_full=False)


@pytest.mark.parametrize("cls", estimator_classes())
@pytest.mark.parametrize("times", [pd.period_range("1990-01", periods=126, freq="M"),
                                   pd.date_range("1990-01-01", periods=126, freq="MS")],
                         ids=["period", "datetime"])
def test_monthly_short_series_resolve_to_a_few_years(cls, times) -> None:
    y = _panel(list(range(48, 127)), times)  # median 87: half of it holds three years
    # 18 validation rows of a median 87: a refit
    assert cls().resolved_params(y, 18) == _expected(MONTHLY, cls, 12, 18, refit_full=True)


@pytest.mark.parametrize("cls", estimator_classes())
def test_daily_series_resolve_to_weeks(cls) -> None:
    times = pd.date_range("2020-01-01", periods=1000, freq="D")
    short = _panel([22] * 169 + [33] * 245, times)  # median 33: two weeks fit in its half
    assert cls().resolved_params(short, 7) == _expected(SHORT_DAILY, cls, 7, 7, refit_full=True)
    long = _panel([500, 800, 1000], times)
    assert cls().resolved_params(long, 14) == _expected(LONG_DAILY, cls, 7, 14, refit_full=False)


def test_the_short_series_benchmark_reads_its_season_from_dates(data_dir: Path) -> None:
    """benchmarks/short_series.py: M4 Hourly as daily totals is the short daily panel above,
    and sktime's monthly series are dated by month."""
    daily = daily_m4(data_dir, None)
    lengths = daily.y_train.groupby(level=0).size()
    assert lengths.value_counts().to_dict() == {33: 245, 22: 169}
    assert (daily.y_test.groupby(level=0).size() == 7).all()
    assert LSTMForecaster().resolved_params(daily.y_train, 7) == \
        _expected(SHORT_DAILY, LSTMForecaster, 7, 7, refit_full=True)
    monthly = monthly_sktime(None)
    assert panel_season_length(monthly.y_train) == monthly.season == 12
    assert sorted(monthly.y_train.groupby(level=0).size()) == [24, 48, 48, 48, 48, 132]


def test_the_short_hourly_tuning_set_cuts_m4_hourly_train(data_dir: Path) -> None:
    """benchmarks/short_series.py --data hourly: every M4 Hourly training series, cut to 96 to
    252 hours spread evenly, the last 36 held out; the rule gives it an input of two days."""
    hourly = short_hourly_m4(data_dir, None)
    lengths = hourly.y_train.groupby(level=0).size() + 36
    assert len(lengths) == 414 and (hourly.y_test.groupby(level=0).size() == 36).all()
    assert (lengths.min(), lengths.max()) == SHORT_HOURS
    assert lengths.nunique() == SHORT_HOURS[1] - SHORT_HOURS[0] + 1
    train = long_to_panel(load_m4_hourly(data_dir / "m4")[0])
    first = hourly.y_train.index.get_level_values(0)[0]
    whole = train.loc[first, TARGET].to_numpy()
    held_out = hourly.y_test.loc[first, TARGET].to_numpy()
    np.testing.assert_array_equal(held_out, whole[-36:])  # the series' own last hours
    assert panel_season_length(hourly.y_train) == hourly.season == 24
    resolved = LSTMForecaster().resolved_params(hourly.y_train, 36)
    assert resolved["input_len"] == 48 and resolved["refit_full"]  # 36 held out of a median 137


def printed_rows(out: str) -> list[dict[str, str]]:
    """The rows of the markdown table the short-series benchmark prints, by column name."""
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    header, *rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return [dict(zip(header, row, strict=True)) for row in rows]


def test_the_short_series_benchmark_prints_a_row_per_data_set_and_model(
        data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["--data", "hourly", "monthly", "--models", "sNaive", "GRU", "--series", "3",
              "--max-epochs", "1", "--data-dir", str(data_dir)])
    # sktime's remember_data notice, once per series the baseline fits, stays off the output
    assert not [w for w in caught if str(w.message).startswith(SKTIME_NOTICE)]
    rows = printed_rows(capsys.readouterr().out)
    assert [(row["data"], row["model"]) for row in rows] == [
        ("hourly", "sNaive"), ("hourly", "GRU"), ("monthly", "sNaive"), ("monthly", "GRU")]
    assert all(float(row["smape"]) > 0 for row in rows)
    resolved = LSTMForecaster().resolved_params(short_hourly_m4(data_dir, 3).y_train, 36)
    assert rows[1]["sizes"] == ", ".join(f"{name} {value}" for name, value in resolved.items())
    assert rows[0]["sizes"] == ""  # a baseline has no sizes


def test_the_short_series_benchmark_reports_each_networks_median_over_seeds(
        capsys: pytest.CaptureFixture[str]) -> None:
    main(["--data", "monthly", "--models", "sNaive", "GRU", "--seeds", "3", "--series", "2",
          "--max-epochs", "1"])
    rows = printed_rows(capsys.readouterr().out)
    assert [(row["model"], row["runs"]) for row in rows] == [("sNaive", "1"), ("GRU", "3")]
    data = monthly_sktime(2)
    runs = [score(data, network("GRU", max_epochs=1, random_state=seed)) for seed in range(3)]
    assert len({run["smape"] for run in runs}) == 3  # the seeds differ, so the median means one
    assert float(rows[1]["smape"]) == pytest.approx(np.median([run["smape"] for run in runs]),
                                                    abs=5e-4)  # the table prints 3 decimals
    assert float(rows[1]["mase"]) == pytest.approx(np.median([run["mase"] for run in runs]),
                                                   abs=5e-4)


def test_the_season_comes_from_the_time_index_or_is_given() -> None:
    assert season_length_of("h") == 24 and season_length_of("15min") == 1
    assert season_length_of(pd.period_range("2000Q1", periods=4, freq="Q").freq) == 4
    assert panel_season_length(make_panel(freq="W")) == 52
    assert panel_season_length(make_panel(freq="YE")) == 1
    assert panel_season_length(make_panel()) == 1  # integer timestamps
    y = make_panel({"a": 300, "b": 300})
    # no season: two horizons of input, one step per segment
    assert LSTMForecaster().resolved_params(y, 24) == {
        "season_length": 1, "validation_rows": 24, "refit_full": False, "input_len": 48,
        "segment_len": 1}
    assert LSTMForecaster(season_length=24).resolved_params(y, 24) == {
        "season_length": 24, "validation_rows": 24, "refit_full": False, "input_len": 144,
        "segment_len": 24}


@pytest.mark.parametrize("cls", estimator_classes())
def test_explicit_sizes_are_kept_exactly(cls) -> None:
    y = make_panel({"a": 60, "b": 50}, freq="h")  # short: "auto" would choose less
    resolved = cls().resolved_params(y, 6)
    explicit = {name: value + 1 for name, value in resolved.items() if name != "refit_full"}
    explicit |= {"validation_rows": 40, "refit_full": False}  # "auto" refits: 40 of a median 55
    assert cls(**explicit).resolved_params(y, 6) == explicit
    # None, the validation default before "auto", is still the horizon
    assert cls(validation_rows=None).resolved_params(y, 6)["validation_rows"] == 6


@pytest.mark.parametrize(("name", "value"), [("input_len", "long"), ("segment_len", 0),
                                             ("season_length", -1), ("validation_rows", 2.5),
                                             ("input_len", True)])
def test_invalid_sizes_are_refused_naming_the_parameter(name, value) -> None:
    message = rf"{name} must be a positive integer or 'auto', got {value!r}"
    with pytest.raises(ValueError, match=message):
        tiny(LSTMForecaster, **{name: value}).fit(make_panel(), fh=[1, 2])
    with pytest.raises(ValueError, match=message):
        LSTMForecaster(**{name: value}).min_train_length(2)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_an_invalid_refit_full_is_refused_naming_it(value) -> None:
    message = rf"refit_full must be True, False or 'auto', got {value!r}"
    with pytest.raises(ValueError, match=message):
        tiny(LSTMForecaster, refit_full=value).fit(make_panel(), fh=[1, 2])
    with pytest.raises(ValueError, match=message):
        LSTMForecaster(refit_full=value).min_train_length(2)


def test_an_explicit_segment_longer_than_the_auto_input_sets_its_floor() -> None:
    y = make_panel({"a": 30, "b": 30}, freq="h")
    assert LSTMForecaster(segment_len=24).resolved_params(y, 4)["input_len"] == 24
    assert TransformerForecaster(patch_len=20).resolved_params(y, 4)["input_len"] == 20


def test_training_saving_and_forecasting_use_the_resolved_sizes(tmp_path: Path) -> None:
    y = _panel(list(range(48, 127, 6)), pd.period_range("1990-01", periods=126, freq="M"))
    model = tiny(LSTMForecaster, input_len="auto", segment_len="auto").fit(y, fh=range(1, 19))
    assert model.resolved_params_ == {"season_length": 12, "validation_rows": 18,
                                      "refit_full": True, "input_len": 36, "segment_len": 12}
    assert (model.model_kwargs_["input_len"], model.model_kwargs_["segment_len"]) == (36, 12)
    assert model.network_.segments.length == 12 and model.network_.highway.linear.in_features \
        == 36
    assert (model.input_len, model.segment_len) == ("auto", "auto")  # the params stay as set
    forecast = model.predict()
    loaded = NeuralForecaster.load_model(model.save_model(tmp_path / "model"))
    assert loaded.resolved_params_ == model.resolved_params_
    pd.testing.assert_frame_equal(loaded.fit(y, fh=range(1, 19)).predict(), forecast)


def test_the_race_passes_its_season_and_logs_auto_and_the_resolved_sizes(
        tmp_path: Path, data_dir: Path) -> None:
    config = race_config(tmp_path, data_dir, [{"name": "tcn", "model": "TCNForecaster",
                                                "params": {"max_epochs": 1}}])
    estimator = build_estimator(config.candidates[0], config)
    assert estimator.season_length == config.season_length == 24
    logged = loggable_params(estimator)
    assert logged["input_len"] == logged["segment_len"] == logged["validation_rows"] == "auto"
    params = params_from_logged("TCNForecaster", logged)
    assert params["input_len"] == "auto" and params["season_length"] == 24
    y = make_panel({"a": 200, "b": 200})  # integer hours, as the race's M4 data: 4 days
    estimator.set_params(steps_per_epoch=1, verbose=False).fit(y, fh=range(1, 25))
    assert loggable_sizes(estimator) == {
        "resolved.season_length": "24", "resolved.validation_rows": "24",
        "resolved.refit_full": "True", "resolved.input_len": "96", "resolved.segment_len": "4"}
    assert loggable_sizes(build_estimator(config.seasonal_naive, config)) == {}
