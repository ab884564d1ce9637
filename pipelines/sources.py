"""The race's data: a configured source read into the long format and its sktime panel.

Sources are a CSV or Parquet file, long (``columns`` maps the id, time and target columns)
or wide (one column per series, the time in the first column or ``columns.timestamp``), the
bundled M4 Hourly and ETTh1 loaders, or the forecast store's actuals (``loader: store``: what
the service was sent, so that a retrain learns from what was observed). Problems with the
source itself (a missing file or column, a store that does not answer) are config errors
naming the key. Problems with the values are all collected and raised together as one
:class:`~forecaster.data.DataError`, naming each series by its id and each column by the
file's own name: unreadable numbers or dates, missing ids, NaN and infinite values,
duplicate, missing and off-frequency timestamps, series too short for the race.
``data.fill`` turns gaps (``missing``: interpolate or zero) and short series (``short``:
drop) from errors into repairs, which :class:`DataReport` records.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from forecaster.data import (
    SERIES,
    TARGET,
    TIME,
    DataError,
    DataProblem,
    counted,
    covariate_problems,
    expected_timestamps,
    fill_gaps,
    listed,
    panel_problems,
    panel_to_long,
    series_id,
    split_long,
    timestamp_text,
)
from forecaster.datasets import load_m4_hourly, wide_to_long
from pipelines.config import ConfigError, DataConfig
from pipelines.forecast_store import (
    STORE_URL_VARIABLE,
    ForecastStore,
    StoreUnavailable,
    shown_url,
    store_url_from_environment,
)

logger = logging.getLogger(__name__)

ETTH1_FILE = "ETTh1.csv"
RAW = "_raw"  # a target cell's text where it is not a number, while the source is read


@dataclass(frozen=True)
class DataReport:
    """What loading did to the data under ``data.fill``: gaps filled, short series dropped."""

    missing: str = "error"  # data.fill.missing
    short: str = "error"  # data.fill.short
    required: int = 1  # the observations a series needs in the race
    # series id -> (timestamps inserted, NaN values filled)
    filled: dict[str, tuple[int, int]] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)  # series id -> its observations

    @property
    def changed(self) -> bool:
        return bool(self.filled or self.dropped)

    def counts(self) -> dict[str, int]:
        """Counts per action, as run metrics."""
        return {
            "data.filled_series": len(self.filled),
            "data.filled_timestamps": sum(t for t, _ in self.filled.values()),
            "data.filled_values": sum(v for _, v in self.filled.values()),
            "data.dropped_series": len(self.dropped),
            "data.dropped_observations": sum(self.dropped.values()),
        }

    def summary(self) -> str:
        """One line: what was filled and dropped, with the first ids."""
        counts = self.counts()
        parts = []
        if self.filled:
            parts.append(f"filled {counted(counts['data.filled_timestamps'], 'missing timestamp')}"
                         f" and {counted(counts['data.filled_values'], 'NaN value')} in "
                         f"{len(self.filled)} series by {self.missing} "
                         f"({listed(list(self.filled))})")
        if self.dropped:
            parts.append(f"dropped {len(self.dropped)} series shorter than the race's "
                         f"{self.required} observations ({listed(list(self.dropped))})")
        return "; ".join(parts) or "nothing filled or dropped"

    def text(self) -> str:
        """The whole account, one line per affected series."""
        lines = [f"data.fill.missing: {self.missing}", f"data.fill.short: {self.short}",
                 f"observations a series needs: {self.required}",
                 *(f"{key}: {value}" for key, value in self.counts().items())]
        lines += [f"filled {key!r}: {counted(t, 'timestamp')} inserted, "
                  f"{counted(v, 'NaN value')} filled" for key, (t, v) in self.filled.items()]
        lines += [f"dropped {key!r}: {n} observations" for key, n in self.dropped.items()]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class RaceData:
    """The training data of a race: long frame, panels, a fingerprint of them, and what
    ``data.fill`` changed."""

    long: pd.DataFrame  # series_id (str), timestamp, target, then any covariates
    panel: pd.DataFrame  # sktime pd-multiindex (series_id, timestamp) -> target
    fingerprint: str  # sha256 of the values, ids, timestamps and dtypes
    report: DataReport = field(default_factory=DataReport)
    X: pd.DataFrame | None = None  # the covariates on the panel's index: known-future, static
    known_future: tuple[str, ...] = ()
    static: tuple[str, ...] = ()

    @property
    def lengths(self) -> pd.Series:
        return self.long.groupby(SERIES, sort=False).size()

    @property
    def datetime_index(self) -> bool:
        return pd.api.types.is_datetime64_any_dtype(self.long[TIME])


def fingerprint(long: pd.DataFrame) -> str:
    """A content hash of a long frame: equal data give equal hashes, across runs and machines."""
    ordered = long.sort_values([SERIES, TIME]).reset_index(drop=True)
    digest = hashlib.sha256()
    digest.update(repr([(c, str(t)) for c, t in ordered.dtypes.items()]).encode())
    digest.update(pd.util.hash_pandas_object(ordered, index=False).to_numpy().tobytes())
    return digest.hexdigest()


# the file's own names for our columns, for messages; None where the series is the column
Names = dict[str, str | None]


def _read_file(config: DataConfig) -> tuple[pd.DataFrame, Names]:
    assert config.path is not None
    if not config.path.is_file():
        raise ConfigError(f"data.path: file {str(config.path)!r} not found")
    if config.path.suffix.lower() == ".csv":
        frame = pd.read_csv(config.path)
    else:
        frame = pd.read_parquet(config.path)
    if config.format == "wide":
        explicit = "timestamp" in config.columns.model_fields_set
        time = config.columns.timestamp if explicit else frame.columns[0]
        if time not in frame.columns:
            raise ConfigError(f"data.columns.timestamp: column {time!r} not found in "
                              f"{config.path.name} (its columns: {list(map(str, frame.columns))})")
        return wide_to_long(frame.set_index(time)), {SERIES: None, TIME: str(time),
                                                     TARGET: None}
    columns = config.columns
    mapping = {SERIES: columns.series_id, TIME: columns.timestamp, TARGET: columns.target}
    missing = [f"data.columns.{ours}: column {theirs!r} not found in {config.path.name} "
               f"(its columns: {list(map(str, frame.columns))})"
               for ours, theirs in mapping.items() if theirs not in frame.columns]
    # covariates keep their own names: those are the names the served model asks for
    problems = [f"data.columns.{problem}" for problem in covariate_problems(
        frame, columns.known_future, columns.static, series=columns.series_id)]
    if missing or problems:
        raise ConfigError(missing + problems)
    long = frame[[*mapping.values(), *columns.covariates]].rename(
        columns={v: k for k, v in mapping.items()})
    return long, dict(mapping)


def store_url(config: DataConfig) -> str | None:
    """The store a ``loader: store`` source reads: ``url``, else the environment's."""
    return config.url if config.url is not None else store_url_from_environment()


def _read_store(config: DataConfig) -> tuple[pd.DataFrame, Names]:
    url = store_url(config)
    if url is None:
        raise ConfigError(f"data.url: not given, and {STORE_URL_VARIABLE}=none turns the "
                          "store off")
    try:
        parsed = make_url(url)
    except ArgumentError:
        parsed = None  # ForecastStore.open says what is wrong with it
    if parsed is not None and parsed.get_backend_name() == "sqlite" and parsed.database \
            and parsed.database != ":memory:" and not Path(parsed.database).is_file():
        # reading must not leave an empty store where there was none
        raise ConfigError(f"data.url: no store at {shown_url(url)} (file {parsed.database!r} "
                          "not found)")
    try:
        with ForecastStore.open(url) as store:
            return store.read_panel(), {}
    except (ValueError, StoreUnavailable) as error:
        raise ConfigError(f"data.url: {error}") from None


def _read_loader(config: DataConfig) -> tuple[pd.DataFrame, Names]:
    if config.loader == "store":
        return _read_store(config)
    assert config.data_dir is not None
    if not config.data_dir.is_dir():
        raise ConfigError(f"data.data_dir: folder {str(config.data_dir)!r} not found")
    try:
        if config.loader == "m4_hourly":
            train, _test = load_m4_hourly(config.data_dir)  # the test split stays unseen
            return train, {}
        # the raw file rather than load_etth1's z-scores: the race forecasts loads and
        # temperatures in their own units, and keeps the rows after the standard test split
        raw = pd.read_csv(config.data_dir / ETTH1_FILE, parse_dates=["date"], index_col="date")
    except FileNotFoundError as error:
        raise ConfigError(f"data.data_dir: {error}") from None
    variables = config.variables or list(raw.columns)
    unknown = [v for v in variables if v not in raw.columns]
    if unknown:
        raise ConfigError(f"data.variables: {unknown} are not ETTh1 columns "
                          f"{list(raw.columns)}")
    return wide_to_long(raw, variables), {TIME: "date", TARGET: None}


def _parse_times(raw: pd.Series, column: str) -> pd.Series:
    """Numbers or dates, whichever reads more of the column; NaN/NaT where a cell reads as
    neither."""
    if pd.api.types.is_numeric_dtype(raw) or pd.api.types.is_datetime64_any_dtype(raw):
        return raw
    numbers = pd.to_numeric(raw, errors="coerce")
    with warnings.catch_warnings():  # a format that cannot be inferred is retried cell by cell
        warnings.simplefilter("ignore", UserWarning)
        dates = pd.to_datetime(raw, errors="coerce")
    retry = dates.isna() & raw.notna()
    if retry.any():
        dates[retry] = pd.to_datetime(raw[retry], errors="coerce", format="mixed")
    if max(numbers.notna().sum(), dates.notna().sum()) == 0 and raw.notna().any():
        raise ConfigError(f"data.columns.timestamp: column {column!r} holds neither numbers "
                          f"nor dates (e.g. {raw.dropna().iloc[0]!r})")
    return numbers if numbers.notna().sum() > dates.notna().sum() else dates


def _parse(long: pd.DataFrame, names: Names) -> tuple[pd.DataFrame, list[DataProblem]]:
    """Ids as strings, timestamps as numbers or dates, targets as floats: rows without an id
    or a readable timestamp are left out and reported; a target that is not a number is
    reported and kept (its text in ``RAW``) until the slices are taken."""
    problems = []
    id_column, time_column = names.get(SERIES, SERIES), names.get(TIME, TIME)
    no_id = long[SERIES].isna()
    if no_id.any():
        rows = [int(row) for row in np.flatnonzero(no_id.to_numpy()) + 1]  # 1 = first data row
        problems.append(DataProblem("unreadable", None, (
            f"data column {id_column!r} is empty in {counted(len(rows), 'row')} "
            f"(data {'row' if len(rows) == 1 else 'rows'} {listed(rows)})")))
    long = long[~no_id].assign(**{SERIES: lambda f: f[SERIES].astype(str)})

    times = _parse_times(long[TIME], str(time_column))
    unreadable = times.isna()
    for key, cells in long.loc[unreadable, TIME].groupby(long.loc[unreadable, SERIES],
                                                         sort=False):
        texts = [repr(c) for c in cells if not pd.isna(c)]
        what = (f"{counted(len(texts), 'unreadable timestamp')} in column {time_column!r}: "
                f"{listed(texts)}" if texts else "")
        blank = len(cells) - len(texts)
        what += ("; " if what and blank else "") + (
            f"{counted(blank, 'row')} without a timestamp" if blank else "")
        problems.append(DataProblem("unreadable", key, f"data series {key!r} has {what}"))
    long = long[~unreadable].assign(**{TIME: times[~unreadable]})
    if pd.api.types.is_float_dtype(long[TIME]) and (long[TIME] % 1 == 0).all():
        long[TIME] = long[TIME].astype(np.int64)  # integers read as floats beside blanks

    raw = long[TARGET]
    values = pd.to_numeric(raw, errors="coerce") if not pd.api.types.is_numeric_dtype(raw) \
        else raw
    not_a_number = values.isna() & raw.notna()
    long = long.assign(**{TARGET: values.astype(np.float64),
                          RAW: raw.where(not_a_number).astype(object)})
    return long, problems


def _trim_ragged(long: pd.DataFrame) -> tuple[pd.DataFrame, list[DataProblem]]:
    """A wide file pads series that start late or end early with empty cells: each series
    runs from its first value to its last; a column with none is reported."""
    present = long[TARGET].notna() | long[RAW].notna()
    by_series = present.groupby(long[SERIES], sort=False)
    started = by_series.cummax()
    ended = present[::-1].groupby(long[SERIES][::-1], sort=False).cummax()[::-1]
    empty = [key for key, any_value in by_series.any().items() if not any_value]
    problems = [DataProblem("unreadable", key, f"data series {key!r} has no values")
                for key in empty]
    return long[started & ended], problems


def read_source(config: DataConfig) -> tuple[pd.DataFrame, list[DataProblem], Names]:
    """The configured data as a long frame, sliced by ``max_series`` and ``last_n``; the
    cells that could not be read (missing ids and unreadable timestamps are left out; a
    target that is not a number reads as 0 here, its problem reported); the file's names of
    the columns."""
    long, names = _read_file(config) if config.path is not None else _read_loader(config)
    long, problems = _parse(long, names)
    long = long.astype(dict.fromkeys(config.columns.covariates, np.float64))
    if config.max_series is not None:
        keep = set(long[SERIES].drop_duplicates().iloc[: config.max_series])
        long = long[long[SERIES].isin(keep)]
        problems = [p for p in problems if p.series is None or p.series in keep]
    long = long.sort_values([SERIES, TIME], kind="stable")
    if config.format == "wide":
        long, empty = _trim_ragged(long)
        problems += empty
    if config.last_n is not None:
        long = long.groupby(SERIES, sort=False).tail(config.last_n)
    target = names.get(TARGET, TARGET)
    where = "" if target is None else f" in column {target!r}"
    bad = long[long[RAW].notna()]
    for key, rows in bad.groupby(SERIES, sort=False):
        cells = [f"{text!r} at {timestamp_text(time)}"
                 for text, time in zip(rows[RAW], rows[TIME], strict=True)]
        problems.append(DataProblem("unreadable", key, (
            f"data series {key!r} has {counted(len(cells), 'value')} that "
            f"{'is not a number' if len(cells) == 1 else 'are not numbers'}{where}: "
            f"{listed(cells)}")))
    # the rest of the data is still checked, so that every problem is reported at once; a
    # frame with unreadable values is never trained on
    long = long.assign(**{TARGET: long[TARGET].where(long[RAW].isna(), 0.0)})
    return long.drop(columns=RAW).reset_index(drop=True), problems, names


def load_race_data(config: DataConfig, frequency: str | None = None, *, min_length: int = 1,
                   need: str = "") -> RaceData:
    """Read, slice, check and (as ``config.fill`` says) repair the data.

    With ``frequency`` (the race's), timestamps must be regular: dates on it, integers in
    steps of 1. A series shorter than ``min_length`` (what the race needs; ``need`` says
    why) is a problem, or dropped with ``fill.short: drop``; when every series is that short,
    the horizon and folds are the problem, left to the backtest plan to report. Raises
    ConfigError for the source itself, else one DataError listing every problem of the values.
    """
    long, problems, names = read_source(config)
    if long.empty and not problems:
        raise ConfigError("data: the source holds no rows")
    fill = config.fill
    covariates = config.columns.covariates
    # the target and any covariates, filled together so that X keeps y's rows
    panel = long.set_index([SERIES, TIME])[[TARGET, *covariates]].sort_index()
    filled = pd.DataFrame(columns=["missing_timestamps", "missing_values"])
    if fill.missing != "error":
        panel, filled = fill_gaps(panel, frequency, fill.missing)
        if config.columns.static:  # a filled row keeps its series' static values
            statics = list(config.columns.static)
            panel[statics] = panel[statics].groupby(level=0, sort=False).transform("first")
    problems += panel_problems(panel, name="data", frequency=frequency,
                               column_names={TARGET: names.get(TARGET, TARGET)})
    # a series' length once its gaps are filled: a gap is reported as such, not as shortness
    observed = panel.groupby(level=0, sort=False).size()
    lengths = pd.Series({key: _span(series.index, frequency)
                         for key, series in panel.groupby(level=0, sort=False)}, dtype=int)
    short = lengths[lengths < min_length]
    dropped: dict[str, int] = {}
    if 0 < len(short) < len(lengths):
        if fill.short == "drop":
            dropped = {str(key): int(observed[key]) for key in short.index}
            panel = panel.drop(index=short.index, level=0)
        else:
            problems += [DataProblem("short", key, (
                f"data series {key!r} has {observed[key]} observations"
                + (f" over {n} timestamps" if n != observed[key] else "")
                + f"; the race needs at least {min_length}{need and f' ({need})'}"))
                for key, n in short.items()]
    if problems:
        raise DataError(_by_series(problems, list(lengths.index)),
                        f"data ({source_description(config)})",
                        _hints(problems, config, frequency, panel))
    report = DataReport(fill.missing, fill.short, min_length, {
        str(key): (int(row.missing_timestamps), int(row.missing_values))
        for key, row in filled.iterrows()}, dropped)
    if report.changed:  # the canonical frame again: series back in order, no emptied level
        long = panel_to_long(panel).astype({SERIES: str})
        logger.warning("data (%s): %s", source_description(config), report.summary())
    known_future, static = config.columns.known_future, config.columns.static
    y, X = split_long(long, known_future, static)
    return RaceData(long=long, panel=y, fingerprint=fingerprint(long), report=report, X=X,
                    known_future=tuple(known_future), static=tuple(static))


def _span(index: pd.MultiIndex, frequency: str | None) -> int:
    """How many timestamps a series covers from its first to its last (its rows, where
    they have no regular grid)."""
    times = index.get_level_values(-1)
    grid = None if frequency is None or times.has_duplicates else \
        expected_timestamps(times, frequency)
    return len(times) if grid is None else len(grid.union(times))


def _by_series(problems: list[DataProblem], order: list[object]) -> list[DataProblem]:
    """Problems of the data as a whole first, then series by series in the data's order."""
    position = {series_id(key): i for i, key in enumerate(order)}
    return sorted(problems, key=lambda p: -1 if p.series is None
                  else position.get(p.series, len(position)))


def _hints(problems: list[DataProblem], config: DataConfig, frequency: str | None,
           panel: pd.DataFrame) -> list[str]:
    """What the config could do about them."""
    kinds = {p.kind for p in problems}
    hints = []
    if kinds & {"missing_timestamp", "irregular"} and frequency is not None:
        inferred = _inferred_frequency(panel)
        if inferred is not None and pd.tseries.frequencies.to_offset(inferred) != \
                pd.tseries.frequencies.to_offset(frequency):
            hints.append(f"frequency: the race's frequency is {frequency!r}, but the data "
                         f"look like {inferred!r}")
    if kinds & {"missing_timestamp", "missing_value"} and config.fill.missing == "error":
        hints.append("data.fill.missing: `interpolate` or `zero` fills missing timestamps "
                     "and NaN values")
    if "short" in kinds and config.fill.short == "error":
        hints.append("data.fill.short: `drop` leaves out the series too short for the race")
    return hints


def _inferred_frequency(panel: pd.DataFrame) -> str | None:
    """The frequency pandas reads off the first series regular enough to tell."""
    for _, series in panel.groupby(level=0, sort=False):
        times = series.index.get_level_values(-1)
        if isinstance(times, pd.DatetimeIndex) and len(times) >= 3 and times.is_unique:
            inferred = pd.infer_freq(times.sort_values())
            if inferred is not None:
                return inferred
    return None


def source_description(config: DataConfig) -> str:
    """A short human-readable name of the source, for run tags."""
    if config.loader == "store":
        url = store_url(config)
        return f"store:{url and shown_url(url)}"
    where = config.path if config.path is not None else Path(config.data_dir or ".")
    kind = config.loader or where.suffix.lstrip(".")
    return f"{kind}:{where}"
