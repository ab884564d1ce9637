"""Dirty data through the race: every problem of a retail-like CSV reported at once, with the
user's store ids and column names (in Python and through the real command line); what each
``data.fill`` mode does to the values; the wide format; and a real race that logs what was
filled and dropped."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from forecaster.data import SERIES, TARGET, TIME, DataError
from pipelines.config import load_config
from pipelines.race import prepare_race, run_race
from tests.pipeline_support import clean_mlflow_environment

ROOT = Path(__file__).resolve().parents[1]
WEEKS = 80  # Sundays from 2023-01-01: enough for a seasonal naive forecast (52) and 2 folds
SHORT_WEEKS = 12
NAIVE = {"name": "snaive", "model": "NaiveForecaster", "params": {"strategy": "last"}}


@pytest.fixture(autouse=True)
def no_mlflow_variables() -> Iterator[None]:
    with clean_mlflow_environment():
        yield


def _sales(store: int, week: int) -> float:
    return round(100.0 * store + 10 * np.sin(2 * np.pi * week / 13) + week, 2)


def _retail(stores: int = 6) -> pd.DataFrame:
    """Weekly sales as a shop exports them, every cell a string; store_05 opened
    ``SHORT_WEEKS`` weeks ago."""
    weeks = pd.date_range("2023-01-01", periods=WEEKS, freq="W-SUN")
    rows = [{"store": f"store_{s:02d}", "week": day.date().isoformat(),
             "sales": str(_sales(s, i))}
            for s in range(1, stores + 1) for i, day in enumerate(weeks)
            if s != 5 or i >= WEEKS - SHORT_WEEKS]
    return pd.DataFrame(rows)


def _at(frame: pd.DataFrame, store: str, week: str) -> pd.Series:
    return (frame["store"] == store) & (frame["week"] == week)


def _fixable() -> pd.DataFrame:
    """Gaps and a short store only: what ``data.fill`` can repair."""
    frame = _retail()
    frame = frame[~_at(frame, "store_01", "2023-03-05")]  # a week never recorded
    frame.loc[_at(frame, "store_02", "2023-04-02"), "sales"] = ""  # an empty cell
    return frame


def _dirty() -> pd.DataFrame:
    """Every kind of problem at once, one store each."""
    frame = _fixable()
    frame = pd.concat([frame, frame[_at(frame, "store_03", "2023-02-12")]])  # entered twice
    frame.loc[_at(frame, "store_04", "2023-05-07"), "sales"] = "12,5"  # a decimal comma
    frame.loc[_at(frame, "store_06", "2023-02-26"), "week"] = "2023-02-30"  # no such day
    frame.loc[_at(frame, "store_06", "2023-06-04"), "week"] = "2023-06-05"  # a Monday
    nobody = pd.DataFrame([{"store": "", "week": "2023-01-01", "sales": "5"}])  # no store
    return pd.concat([frame, nobody])


def _race_file(tmp_path: Path, frame: pd.DataFrame, **data: Any) -> Path:
    """The CSV and a race config beside it, tracked in tmp_path."""
    frame.to_csv(tmp_path / "sales.csv", index=False)
    raw = {
        "name": "retail", "frequency": "W-SUN", "horizon": 4,
        "data": {"path": "sales.csv",
                 "columns": {"series_id": "store", "timestamp": "week", "target": "sales"},
                 **data},
        "candidates": [NAIVE], "backtest": {"folds": 2},
        "registry": {"model_name": "retail"},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                     "artifact_location": str(tmp_path / "artifacts"),
                     "enable_system_metrics_logging": False},
        "plot_series": 1,
    }
    (tmp_path / "race.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "race.yaml"


# seasonal naive at sp 52 trains on sp + 1 (pipelines.candidates.min_history); the folds add 8
NEED = ("the race needs at least 61 (candidate 'snaive' trains on at least 53, and 2 fold(s) "
        "of horizon 4 take 8 more)")
EVERY_PROBLEM = [
    f"data column 'store' is empty in 1 row (data row {len(_dirty())})",
    "data series 'store_01' misses 1 timestamp on frequency 'W-SUN': 2023-03-05",
    "data series 'store_02' has a non-finite value (nan) in column 'sales' at 2023-04-02",
    "data series 'store_03' has duplicate timestamp 2023-02-12",
    "data series 'store_04' has 1 value that is not a number in column 'sales': '12,5' at "
    "2023-05-07",
    f"data series 'store_05' has {SHORT_WEEKS} observations; {NEED}",
    "data series 'store_06' has 1 unreadable timestamp in column 'week': '2023-02-30'",
    "data series 'store_06' has 1 timestamp not on frequency 'W-SUN': 2023-06-05",
    "data series 'store_06' misses 2 timestamps on frequency 'W-SUN': 2023-02-26, 2023-06-04",
]
HINTS = [
    "data.fill.missing: `interpolate` or `zero` fills missing timestamps and NaN values",
    "data.fill.short: `drop` leaves out the series too short for the race",
]


def test_dirty_data_gives_one_error_listing_every_problem(tmp_path: Path) -> None:
    config = load_config(_race_file(tmp_path, _dirty()))
    with pytest.raises(DataError) as error:
        prepare_race(config)
    lines = str(error.value).splitlines()
    assert lines[0] == f"data (csv:{tmp_path / 'sales.csv'}) has 9 problems:"
    assert [line.strip() for line in lines[1:]] == [*EVERY_PROBLEM, *HINTS]
    assert [p.series for p in error.value.problems] == [
        None, "store_01", "store_02", "store_03", "store_04", "store_05", "store_06", "store_06",
        "store_06"]
    # the user's names throughout: store ids as written, never tuples; 'sales', not 'target'
    assert "('" not in str(error.value) and "'target'" not in str(error.value)


@pytest.mark.slow  # a process of its own: ~10 s of imports on a busy CPU
def test_the_cli_prints_every_problem_and_fails(tmp_path: Path) -> None:
    path = _race_file(tmp_path, _dirty())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "cli.main", "train", str(path)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(f"forecaster train: data (csv:{tmp_path / 'sales.csv'}) "
                                  "has 9 problems:\n")
    for line in [*EVERY_PROBLEM, *HINTS]:
        assert f"\n  {line}\n" in done.stderr + "\n", line
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing was tracked


def test_a_long_list_of_problems_is_cut(tmp_path: Path) -> None:
    frame = _retail(stores=30)
    frame = frame[frame["store"] != "store_05"]
    frame.loc[frame["week"] == "2023-04-02", "sales"] = ""  # one empty week in every store
    with pytest.raises(DataError) as error:
        prepare_race(load_config(_race_file(tmp_path, frame)))
    lines = str(error.value).splitlines()
    assert lines[0].endswith("has 29 problems:") and len(error.value.problems) == 29
    assert lines[1] == ("  data series 'store_01' has a non-finite value (nan) in column "
                        "'sales' at 2023-04-02")
    assert lines[21] == "  ... and 9 more" and lines[22:] == [f"  {HINTS[0]}"]


def test_a_frequency_the_data_do_not_have_is_pointed_out(tmp_path: Path) -> None:
    raw = yaml.safe_load(_race_file(tmp_path, _retail(stores=2)).read_text())
    raw["frequency"] = "D"  # weekly data
    (tmp_path / "race.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(DataError) as error:
        prepare_race(load_config(tmp_path / "race.yaml"))
    assert str(error.value.problems[0]) == (
        f"data series 'store_01' misses {6 * (WEEKS - 1)} timestamps on frequency 'D': "
        "2023-01-02, 2023-01-03, 2023-01-04, 2023-01-05, 2023-01-06, ... (474 in all)")
    assert str(error.value).splitlines()[-2] == (
        "  frequency: the race's frequency is 'D', but the data look like 'W-SUN'")


def _week(data: pd.DataFrame, store: str, week: str) -> float:
    return float(data.panel.loc[(store, pd.Timestamp(week)), TARGET])


def test_fill_interpolate_and_drop_repair_the_data(tmp_path: Path) -> None:
    config = load_config(_race_file(tmp_path, _fixable(),
                                    fill={"missing": "interpolate", "short": "drop"}))
    data = prepare_race(config).data
    # the missing week and the empty cell lie halfway between their neighbours' values
    assert _week(data, "store_01", "2023-03-05") == pytest.approx(
        (_sales(1, 8) + _sales(1, 10)) / 2)
    assert _week(data, "store_02", "2023-04-02") == pytest.approx(
        (_sales(2, 12) + _sales(2, 14)) / 2)
    assert _week(data, "store_03", "2023-03-05") == _sales(3, 9)  # the rest as it was
    assert sorted(data.lengths.index) == ["store_01", "store_02", "store_03", "store_04",
                                          "store_06"]  # store_05 is too short: dropped
    assert (data.lengths == WEEKS).all() and np.isfinite(data.long[TARGET]).all()
    assert list(data.long.columns) == [SERIES, TIME, TARGET]
    report = data.report
    assert report.filled == {"store_01": (1, 0), "store_02": (0, 1)}
    assert report.dropped == {"store_05": SHORT_WEEKS} and report.required == 61
    assert report.counts() == {"data.filled_series": 2, "data.filled_timestamps": 1,
                               "data.filled_values": 1, "data.dropped_series": 1,
                               "data.dropped_observations": SHORT_WEEKS}


def test_fill_zero_writes_zeros_and_keeps_short_series_an_error(tmp_path: Path) -> None:
    config = load_config(_race_file(tmp_path, _fixable(), fill={"missing": "zero"}))
    with pytest.raises(DataError) as error:
        prepare_race(config)
    assert [str(p) for p in error.value.problems] == [
        f"data series 'store_05' has {SHORT_WEEKS} observations; {NEED}"]
    frame = _fixable()
    config = load_config(_race_file(tmp_path, frame[frame["store"] != "store_05"],
                                    fill={"missing": "zero"}))
    data = prepare_race(config).data
    assert _week(data, "store_01", "2023-03-05") == 0.0
    assert _week(data, "store_02", "2023-04-02") == 0.0
    assert data.report.filled == {"store_01": (1, 0), "store_02": (0, 1)}
    assert data.report.dropped == {}


def test_a_wide_file_reads_one_series_per_column(tmp_path: Path) -> None:
    days = pd.date_range("2024-03-01", periods=70, freq="D")
    late = np.r_[[np.nan] * 5, np.arange(65.0)]  # opened on day 6: the file pads it
    wide = pd.DataFrame({"note": "x", "north": np.arange(70.0), "south": 2 * late,
                         "day": days.strftime("%Y-%m-%d")})
    wide.to_csv(tmp_path / "wide.csv", index=False)
    raw = yaml.safe_load(_race_file(tmp_path, _fixable()).read_text())
    raw["frequency"] = "D"
    raw["data"] = {"path": "wide.csv", "format": "wide", "columns": {"timestamp": "day"}}
    (tmp_path / "race.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(DataError, match=r"data series 'note' has 70 values that are not "
                                        r"numbers: 'x' at 2024-03-01, 'x' at 2024-03-02"):
        prepare_race(load_config(tmp_path / "race.yaml"))

    wide.drop(columns="note")[["day", "north", "south"]].to_csv(tmp_path / "wide.csv",
                                                                 index=False)
    raw["data"]["columns"] = {}  # the time is the first column
    (tmp_path / "race.yaml").write_text(yaml.safe_dump(raw))
    data = prepare_race(load_config(tmp_path / "race.yaml")).data
    assert data.lengths.to_dict() == {"north": 70, "south": 65}
    assert data.datetime_index
    north, south = data.panel.loc["north", TARGET], data.panel.loc["south", TARGET]
    assert north.index[0] == pd.Timestamp("2024-03-01") and north.tolist() == list(range(70))
    assert south.index[0] == pd.Timestamp("2024-03-06") and south.tolist() == [
        2.0 * i for i in range(65)]


@pytest.mark.slow
def test_a_race_on_repaired_data_logs_what_was_filled_and_dropped(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Weekly data with a missing week and an empty cell, filled by interpolation: the
    seasonal naive baseline backtests and refits (its refit once failed on a missing date for
    want of a frequency), and the race's run records the repairs."""
    config = load_config(_race_file(tmp_path, _fixable(),
                                    fill={"missing": "interpolate", "short": "drop"}))
    with caplog.at_level(logging.WARNING, logger="pipelines.sources"):
        result = run_race(config, progress=False)
    row = result.leaderboard.loc["snaive"]
    assert row["status"] == "ok" and row["valid"], row["note"]
    assert result.winner == "snaive" and result.promoted

    run = MlflowClient().get_run(result.run_id)
    assert run.data.params["data.fill.missing"] == "interpolate"
    assert run.data.params["data.fill.short"] == "drop"
    assert run.data.params["data.series"] == "5"
    assert {k: v for k, v in run.data.metrics.items() if k.startswith("data.")} == {
        "data.filled_series": 2, "data.filled_timestamps": 1, "data.filled_values": 1,
        "data.dropped_series": 1, "data.dropped_observations": SHORT_WEEKS}
    text = mlflow.artifacts.load_text(f"runs:/{result.run_id}/data_report.txt")
    assert "filled 'store_01': 1 timestamp inserted, 0 NaN values filled" in text
    assert "filled 'store_02': 0 timestamps inserted, 1 NaN value filled" in text
    assert f"dropped 'store_05': {SHORT_WEEKS} observations" in text
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("filled 1 missing timestamp and 1 NaN value in 2 series by interpolate "
               "(store_01, store_02); dropped 1 series shorter than the race's 61 "
               "observations (store_05)" in w for w in warnings), warnings
