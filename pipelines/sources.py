"""The race's data: a configured source read into the long format and its sktime panel.

Sources are a CSV or Parquet file with a column mapping, or the bundled M4 Hourly and ETTh1
loaders. Problems with the source itself (a missing file or column) are config errors naming
the key; problems with the values (NaN, duplicate timestamps) name the series.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from forecaster.data import (
    SERIES,
    TARGET,
    TIME,
    covariate_problems,
    split_long,
    validate_panel,
)
from forecaster.datasets import load_m4_hourly, wide_to_long
from pipelines.config import ConfigError, DataConfig

ETTH1_FILE = "ETTh1.csv"


@dataclass(frozen=True)
class RaceData:
    """The training data of a race: long frame, panels, and a fingerprint of them."""

    long: pd.DataFrame  # series_id (str), timestamp, target, then any covariates
    panel: pd.DataFrame  # sktime pd-multiindex (series_id, timestamp) -> target
    fingerprint: str  # sha256 of the values, ids, timestamps and dtypes
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


def _read_file(config: DataConfig) -> pd.DataFrame:
    assert config.path is not None
    if not config.path.is_file():
        raise ConfigError(f"data.path: file {str(config.path)!r} not found")
    if config.path.suffix.lower() == ".csv":
        frame = pd.read_csv(config.path)
    else:
        frame = pd.read_parquet(config.path)
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
    if not pd.api.types.is_numeric_dtype(long[TIME]):
        try:
            long[TIME] = pd.to_datetime(long[TIME])
        except (ValueError, TypeError) as error:
            raise ConfigError(f"data.columns.timestamp: column {mapping[TIME]!r} holds "
                              f"neither numbers nor dates: {error}") from None
    if not pd.api.types.is_numeric_dtype(long[TARGET]):
        raise ConfigError(f"data.columns.target: column {mapping[TARGET]!r} is not numeric")
    return long


def _read_loader(config: DataConfig) -> pd.DataFrame:
    assert config.data_dir is not None
    if not config.data_dir.is_dir():
        raise ConfigError(f"data.data_dir: folder {str(config.data_dir)!r} not found")
    try:
        if config.loader == "m4_hourly":
            train, _test = load_m4_hourly(config.data_dir)  # the test split stays unseen
            return train
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
    return wide_to_long(raw, variables)


def read_source(config: DataConfig) -> pd.DataFrame:
    """The configured data as a long frame, sliced by ``max_series`` and ``last_n``."""
    long = _read_file(config) if config.path is not None else _read_loader(config)
    long = long.assign(**{SERIES: long[SERIES].astype(str),
                          TARGET: long[TARGET].astype(np.float64)})
    long = long.astype(dict.fromkeys(config.columns.covariates, np.float64))
    if config.max_series is not None:
        keep = long[SERIES].drop_duplicates().iloc[: config.max_series]
        long = long[long[SERIES].isin(keep)]
    long = long.sort_values([SERIES, TIME], kind="stable")
    if config.last_n is not None:
        long = long.groupby(SERIES, sort=False).tail(config.last_n)
    return long.reset_index(drop=True)


def load_race_data(config: DataConfig) -> RaceData:
    """Read, slice and validate the data; raises ConfigError or ValueError naming the problem."""
    long = read_source(config)
    if long.empty:
        raise ConfigError("data: the source holds no rows")
    known_future, static = config.columns.known_future, config.columns.static
    panel, X = split_long(long, known_future, static)
    validate_panel(panel, min_length=1, name="data")
    if X is not None:
        validate_panel(X, min_length=1, name="data (covariates)")
    return RaceData(long=long, panel=panel, fingerprint=fingerprint(long), X=X,
                    known_future=tuple(known_future), static=tuple(static))


def source_description(config: DataConfig) -> str:
    """A short human-readable name of the source, for run tags."""
    where = config.path if config.path is not None else Path(config.data_dir or ".")
    kind = config.loader or where.suffix.lstrip(".")
    return f"{kind}:{where}"
