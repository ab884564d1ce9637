"""The long <-> panel data model, panel validation and the reference data loaders."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from forecaster.data import (
    MAX_REPORTED,
    SERIES,
    TARGET,
    TIME,
    DataError,
    fill_gaps,
    long_to_panel,
    panel_arrays,
    panel_to_long,
    series_groups,
    split_long,
    validate_panel,
)
from forecaster.datasets import (
    M4_HOURLY_HORIZON,
    load_etth1,
    load_m4_hourly,
    wide_to_long,
)


def _long_frame() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    frames = []
    for key, length in {"x": 7, "y": 5, "z": 9}.items():
        frames.append(pd.DataFrame({
            SERIES: key,
            TIME: np.arange(length),
            TARGET: rng.standard_normal(length),
            "temperature": rng.uniform(-5, 30, length),
        }))
    # rows deliberately out of order: the panel sorts them, the round trip must not lose any
    return pd.concat(frames).sample(frac=1.0, random_state=0).reset_index(drop=True)


# ---------------------------------------------------------------- long <-> panel
def test_long_to_panel_builds_a_sorted_multiindex_panel() -> None:
    long = _long_frame().drop(columns="temperature")
    panel = long_to_panel(long)
    assert list(panel.index.names) == [SERIES, TIME]
    assert list(panel.columns) == [TARGET]
    assert panel.index.is_monotonic_increasing
    assert len(panel) == len(long) == 21
    assert panel.loc[("y", 3), TARGET] == long.query("series_id == 'y' and timestamp == 3")[
        TARGET].item()


def test_long_to_panel_refuses_a_column_it_would_not_keep() -> None:
    """A covariate never becomes a second target in y: the error says how to split it off."""
    with pytest.raises(ValueError, match=r"column\(s\) \['temperature'\] besides .* are neither "
                                         r"known_future nor static covariates.*split_long"):
        long_to_panel(_long_frame())


def test_split_long_gives_y_and_x_on_one_index() -> None:
    long = _long_frame().assign(size=lambda f: f[SERIES].map({"x": 1.0, "y": 2.0, "z": 3.0}))
    y, X = split_long(long, known_future=["temperature"], static=["size"])
    assert list(y.columns) == [TARGET]
    assert list(X.columns) == ["temperature", "size"]  # known-future, then static
    pd.testing.assert_index_equal(X.index, y.index)
    assert y.index.is_monotonic_increasing and list(y.index.names) == [SERIES, TIME]
    row = long.query("series_id == 'z' and timestamp == 4")
    assert y.loc[("z", 4), TARGET] == row[TARGET].item()
    assert X.loc[("z", 4), "temperature"] == row["temperature"].item()
    assert (X.loc["y", "size"] == 2.0).all()
    # the target and the covariates round-trip through the long format
    back = panel_to_long(y.join(X))
    expected = long.sort_values([SERIES, TIME]).reset_index(drop=True)
    pd.testing.assert_frame_equal(back, expected[[SERIES, TIME, TARGET, "temperature", "size"]])


def test_split_long_without_covariates_has_no_x() -> None:
    y, X = split_long(_long_frame().drop(columns="temperature"))
    assert X is None and list(y.columns) == [TARGET]


def test_split_long_reports_every_covariate_problem_at_once() -> None:
    long = _long_frame().assign(
        label="a", size=lambda f: np.arange(len(f), dtype=float), region=1.0)
    with pytest.raises(ValueError) as error:
        split_long(long, known_future=["temperature", "promo", "label"],
                   static=["size", "temperature", TARGET])
    message = str(error.value)
    assert "known_future: column 'promo' not found" in message
    assert "known_future: column 'label' is not numeric (dtype" in message
    assert "static: column 'size' varies within series ['x', 'y', 'z']" in message
    assert "static: column 'temperature' is named twice" in message
    assert "static: 'target' is the target column, not a covariate" in message
    assert "column(s) ['region'] besides" in message


def test_panel_long_round_trip_is_lossless() -> None:
    panel = long_to_panel(_long_frame().drop(columns="temperature"))
    pd.testing.assert_frame_equal(long_to_panel(panel_to_long(panel)), panel)


def test_panel_to_long_accepts_a_single_series() -> None:
    series = pd.Series([1.0, 2.0, 3.0], index=pd.Index([10, 11, 12]))
    long = panel_to_long(series)
    assert list(long.columns) == [SERIES, TIME, TARGET]
    assert long[TIME].tolist() == [10, 11, 12]
    assert long[TARGET].tolist() == [1.0, 2.0, 3.0]
    assert long[SERIES].nunique() == 1


def test_long_to_panel_rejects_missing_key_columns() -> None:
    with pytest.raises(ValueError, match="timestamp"):
        long_to_panel(_long_frame().drop(columns=[TIME]))


def test_series_groups_and_panel_arrays_keep_order_and_values() -> None:
    panel = _valid_panel()
    groups = series_groups(panel)
    assert [len(frame) for _, frame in groups] == [7, 5, 9]
    ids, arrays = panel_arrays(panel, [TARGET])
    assert [a.shape for a in arrays] == [(7, 1), (5, 1), (9, 1)]
    assert all(a.dtype == np.float32 for a in arrays)
    np.testing.assert_allclose(arrays[1][:, 0], panel.loc["y", TARGET].to_numpy(), rtol=1e-6)
    assert len(ids) == 3


# ---------------------------------------------------------------- validate_panel
def _valid_panel() -> pd.DataFrame:
    y, X = split_long(_long_frame(), known_future=["temperature"])
    return y.join(X)


def test_validate_panel_accepts_a_clean_panel() -> None:
    validate_panel(_valid_panel(), min_length=5, allowed_columns=[TARGET, "temperature"])


def _with_value(value: float) -> pd.DataFrame:
    panel = _valid_panel()
    panel.loc[("y", 2), TARGET] = value
    return panel


def _with_duplicate() -> pd.DataFrame:
    panel = _valid_panel()
    return pd.concat([panel, panel.loc[[("y", 3)]]]).sort_index()


@pytest.mark.parametrize(
    ("make", "kwargs", "problem"),
    [
        (lambda: _with_value(np.nan), {}, r"non-finite value \(nan\) in column 'target' at 2"),
        (lambda: _with_value(np.inf), {}, r"non-finite value \(inf\) in column 'target' at 2"),
        (lambda: _with_value(-np.inf), {}, r"non-finite value \(-inf\)"),
        (_with_duplicate, {}, "duplicate timestamp 3"),
        (_valid_panel, {"min_length": 6}, "has 5 observations; the model needs at least 6"),
    ],
    ids=["nan", "inf", "-inf", "duplicate-timestamp", "too-short"],
)
def test_validate_panel_names_the_series_and_the_problem(make, kwargs, problem) -> None:
    with pytest.raises(ValueError, match=problem) as error:
        validate_panel(make(), **kwargs)
    assert "'y'" in str(error.value)  # the offending series, by id
    assert "'x'" not in str(error.value) and "'z'" not in str(error.value)


def test_validate_panel_names_an_unknown_column() -> None:
    panel = _valid_panel()
    panel["humidity"] = 1.0
    with pytest.raises(ValueError, match=r"unknown column\(s\) \['humidity'\]"):
        validate_panel(panel, allowed_columns=[TARGET, "temperature"], name="X")


def test_validate_panel_accepts_any_iterable_of_allowed_columns() -> None:
    """``allowed_columns`` is typed Iterable: a generator must work as well as a list."""
    panel = _valid_panel()
    panel["humidity"] = 1.0
    with pytest.raises(ValueError, match=r"expected only \['target', 'temperature'\]"):
        validate_panel(panel, allowed_columns=(c for c in [TARGET, "temperature"]))


def test_validate_panel_uses_the_given_name() -> None:
    with pytest.raises(ValueError, match=r"^X series .*'y'"):
        validate_panel(_with_value(np.nan), name="X")


def test_validate_panel_checks_a_single_series() -> None:
    series = pd.Series([1.0, np.inf, 3.0])
    with pytest.raises(ValueError, match=r"^y has a non-finite value \(inf\)"):
        validate_panel(series)


def test_validate_panel_reports_every_problem_at_once() -> None:
    panel = _valid_panel()
    panel.loc[("x", 1), TARGET] = np.nan
    panel.loc[("x", 4), TARGET] = np.nan
    panel.loc[("z", 0), "temperature"] = np.inf
    panel = pd.concat([panel, panel.loc[[("y", 3)]]]).sort_index()
    with pytest.raises(DataError) as error:
        validate_panel(panel, min_length=7, name="data", column_names={TARGET: "sales"})
    message = str(error.value)
    assert message.splitlines() == [
        "data has 4 problems:",
        "  data series 'x' has 2 non-finite values (nan) in column 'sales' at 1, 4",
        "  data series 'y' has duplicate timestamp 3",
        "  data series 'y' has 6 observations; the model needs at least 7",
        "  data series 'z' has a non-finite value (inf) in column 'temperature' at 0",
    ]
    assert [(p.kind, p.series) for p in error.value.problems] == [
        ("missing_value", "x"), ("duplicate", "y"), ("short", "y"), ("infinite", "z")]
    assert "('" not in message and "'target'" not in message  # ids and the user's names


def test_validate_panel_lists_at_most_max_reported_problems() -> None:
    count = MAX_REPORTED + 5
    panel = long_to_panel(pd.DataFrame({
        SERIES: np.repeat([f"store_{i:02d}" for i in range(count)], 3),
        TIME: np.tile(np.arange(3), count),
        TARGET: np.tile([1.0, np.nan, 2.0], count)}))
    with pytest.raises(DataError) as error:
        validate_panel(panel, name="data")
    lines = str(error.value).splitlines()
    assert lines[0] == f"data has {count} problems:"
    assert lines[1] == ("  data series 'store_00' has a non-finite value (nan) in column "
                        "'target' at 1")
    assert len(lines) == 1 + MAX_REPORTED + 1 and lines[-1] == "  ... and 5 more"
    assert len(error.value.problems) == count


def _weekly(gaps: dict[str, list[int]], weeks: int = 10) -> pd.DataFrame:
    """Weekly (Sunday) series 'a', 'b', 'c' with values 0, 1, 2, ... and the given weeks
    left out."""
    dates = pd.date_range("2024-01-07", periods=weeks, freq="W-SUN")
    return long_to_panel(pd.concat([pd.DataFrame({SERIES: key, TIME: dates, TARGET: np.arange(
        weeks, dtype=float)}).drop(index=gaps.get(key, [])) for key in "abc"]))


def test_missing_and_off_frequency_timestamps_are_found_per_series() -> None:
    panel = _weekly({"a": [3, 4, 5, 6, 7, 8]})
    monday = panel.loc[[("c", pd.Timestamp("2024-01-14"))]].rename(
        index={pd.Timestamp("2024-01-14"): pd.Timestamp("2024-01-15")})
    panel = pd.concat([panel, monday]).sort_index()
    validate_panel(panel)  # without a frequency, regularity is not asked for
    with pytest.raises(DataError) as error:
        validate_panel(panel, name="data", frequency="W-SUN")
    assert [str(p) for p in error.value.problems] == [
        "data series 'a' misses 6 timestamps on frequency 'W-SUN': 2024-01-28, 2024-02-04, "
        "2024-02-11, 2024-02-18, 2024-02-25, ... (6 in all)",
        "data series 'c' has 1 timestamp not on frequency 'W-SUN': 2024-01-15",
    ]
    assert [p.kind for p in error.value.problems] == ["missing_timestamp", "irregular"]


def test_integer_timestamps_go_in_steps_of_one() -> None:
    panel = _valid_panel().drop(index=[("x", 2), ("x", 3)])
    with pytest.raises(DataError, match=r"^data series 'x' misses 2 timestamps in steps of 1: "
                                        r"2, 3$"):
        validate_panel(panel, name="data", frequency="h")  # the unit of integers is one step


def test_fill_gaps_interpolates_missing_timestamps_and_nan() -> None:
    panel = _weekly({"a": [2, 3], "b": [9]})
    panel.loc[("b", pd.Timestamp("2024-01-07")), TARGET] = np.nan  # a first value
    panel.loc[("c", pd.Timestamp("2024-01-28")), TARGET] = np.nan
    filled, counts = fill_gaps(panel, "W-SUN", "interpolate")
    validate_panel(filled, frequency="W-SUN")
    np.testing.assert_allclose(filled.loc["a", TARGET], np.arange(10.0))  # a straight line
    # a series' edges take its nearest value; the last week of 'b' was never there
    np.testing.assert_allclose(filled.loc["b", TARGET], [1.0, *range(1, 9)])
    np.testing.assert_allclose(filled.loc["c", TARGET], np.arange(10.0))
    assert counts.to_dict("index") == {
        "a": {"missing_timestamps": 2, "missing_values": 0},
        "b": {"missing_timestamps": 0, "missing_values": 1},
        "c": {"missing_timestamps": 0, "missing_values": 1}}
    assert list(filled.index.names) == [SERIES, TIME]


def test_fill_gaps_with_zero_and_without_a_frequency() -> None:
    panel = _weekly({"a": [2, 3]})
    panel.loc[("c", pd.Timestamp("2024-01-28")), TARGET] = np.nan
    filled, counts = fill_gaps(panel, "W-SUN", "zero")
    np.testing.assert_allclose(filled.loc["a", TARGET], [0, 1, 0, 0, 4, 5, 6, 7, 8, 9])
    assert filled.loc[("c", pd.Timestamp("2024-01-28")), TARGET] == 0.0
    assert counts.loc["a", "missing_timestamps"] == 2 and counts.loc["c", "missing_values"] == 1
    # with no frequency to tell what is missing, only NaN values are filled
    filled, counts = fill_gaps(panel, None, "zero")
    assert len(filled) == len(panel) and counts["missing_timestamps"].sum() == 0


def test_fill_gaps_leaves_duplicates_and_off_grid_series_to_validation() -> None:
    panel = _weekly({"a": [2]})
    duplicated = pd.concat([panel, panel.loc[[("a", pd.Timestamp("2024-01-07"))]]]).sort_index()
    filled, counts = fill_gaps(duplicated, "W-SUN", "interpolate")
    assert len(filled.loc["a"]) == 10 and "a" not in counts.index  # untouched
    with pytest.raises(DataError, match="duplicate timestamp 2024-01-07"):
        validate_panel(filled, frequency="W-SUN")


# ---------------------------------------------------------------- loaders
@pytest.fixture(scope="module")
def m4(data_dir):
    if not (data_dir / "m4" / "Hourly-train.csv").is_file():
        pytest.skip(f"M4 Hourly files not found under {data_dir / 'm4'}")
    return load_m4_hourly(data_dir / "m4")


def test_m4_hourly_has_414_series_of_the_documented_lengths(m4) -> None:
    train, test = m4
    assert list(train.columns) == [SERIES, TIME, TARGET]
    assert list(test.columns) == [SERIES, TIME, TARGET]
    lengths = train.groupby(SERIES)[TIME].size()
    assert len(lengths) == 414
    assert lengths.min() == 700 and lengths.max() == 960
    assert set(test[SERIES]) == set(train[SERIES])
    assert (test.groupby(SERIES)[TIME].size() == M4_HOURLY_HORIZON).all()
    assert np.isfinite(train[TARGET]).all() and np.isfinite(test[TARGET]).all()


def test_m4_hourly_timestamps_count_hours_and_test_continues_train(m4) -> None:
    train, test = m4
    for key, series in train.groupby(SERIES):
        assert series[TIME].tolist() == list(range(len(series))), key
    lengths = train.groupby(SERIES)[TIME].size()
    last = train.groupby(SERIES)[TIME].max()
    for key, series in test.groupby(SERIES):
        start = lengths[key]
        assert series[TIME].tolist() == list(range(start, start + M4_HOURLY_HORIZON)), key
        assert series[TIME].min() == last[key] + 1
    assert lengths["H1"] == 700
    # the first values of H1 as they stand in the M4 files
    assert train.query("series_id == 'H1'")[TARGET].iloc[:2].tolist() == [605.0, 586.0]
    assert test.query("series_id == 'H1'")[TARGET].iloc[:2].tolist() == [619.0, 565.0]


def test_m4_hourly_converts_to_a_valid_panel(m4) -> None:
    train, _ = m4
    panel = long_to_panel(train)
    validate_panel(panel, min_length=700, allowed_columns=[TARGET])
    assert panel.index.get_level_values(SERIES).nunique() == 414


@pytest.fixture(scope="module")
def etth1_path(data_dir):
    path = data_dir / "ett" / "ETTh1.csv"
    if not path.is_file():
        pytest.skip(f"ETTh1.csv not found at {path}")
    return path


def test_etth1_split_borders(etth1_path) -> None:
    splits = load_etth1(etth1_path)
    assert (splits.train_end, splits.val_end, splits.test_end) == (8640, 11520, 14400)
    assert len(splits.frame) == 17420
    assert list(splits.frame.columns) == ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
    assert isinstance(splits.frame.index, pd.DatetimeIndex)
    assert len(splits.rows("train")) == 8640
    assert len(splits.rows("val")) == 2880
    assert len(splits.rows("test")) == 2880
    test = splits.rows("test", input_len=336)
    assert len(test) == 2880 + 336
    assert test.index[336] == splits.frame.index[11520]


def test_etth1_train_split_is_z_scored(etth1_path) -> None:
    splits = load_etth1(etth1_path)
    train = splits.frame.iloc[: splits.train_end]
    np.testing.assert_allclose(train.mean().to_numpy(), 0.0, atol=1e-9)
    np.testing.assert_allclose(train.std(ddof=0).to_numpy(), 1.0, atol=1e-9)
    # validation and test use the train statistics, so they are not exactly standardised
    assert not np.allclose(splits.rows("test").mean().to_numpy(), 0.0, atol=1e-3)
    raw = pd.read_csv(etth1_path, parse_dates=["date"], index_col="date")
    np.testing.assert_allclose((splits.frame * splits.std + splits.mean).to_numpy(),
                               raw.to_numpy(), rtol=1e-9, atol=1e-9)


def test_wide_to_long_makes_one_series_per_column() -> None:
    wide = pd.DataFrame({"u": [1.0, 2.0], "v": [3.0, 4.0]},
                        index=pd.date_range("2020-01-01", periods=2, freq="h"))
    long = wide_to_long(wide)
    assert list(long.columns) == [SERIES, TIME, TARGET]
    assert long[SERIES].tolist() == ["u", "u", "v", "v"]
    assert long[TARGET].tolist() == [1.0, 2.0, 3.0, 4.0]
    validate_panel(long_to_panel(long))
