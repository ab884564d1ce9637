"""Loaders for the two reference data sets. They read a local path; nothing is downloaded."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from forecaster.data import SERIES, TARGET, TIME

M4_HOURLY_HORIZON = 48
M4_HOURLY_SEASONALITY = 24
ETT_TRAIN_ROWS = 12 * 30 * 24  # the standard 12/4/4-month split of the Informer paper
ETT_VAL_ROWS = 4 * 30 * 24
ETT_TEST_ROWS = 4 * 30 * 24

DATA_DIR_VARIABLE = "FORECASTER_DATA_DIR"  # docker-compose mounts the data sets from it too


def default_data_dir() -> Path:
    """Where the reference data sets live: ``$FORECASTER_DATA_DIR``, else ``../shared/data``
    beside the repository checkout."""
    if os.environ.get(DATA_DIR_VARIABLE):
        return Path(os.environ[DATA_DIR_VARIABLE])
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def _read_m4(path: Path) -> pd.DataFrame:
    wide = pd.read_csv(path, index_col=0)
    long = wide.stack().dropna().rename(TARGET).reset_index()  # drop the ragged padding
    long.columns = [SERIES, "column", TARGET]
    long[TIME] = long.groupby(SERIES, sort=False).cumcount()
    return long[[SERIES, TIME, TARGET]]


def load_m4_hourly(data_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """M4 Hourly as long (train, test) frames; test timestamps continue each train series.

    ``data_dir`` holds ``Hourly-train.csv`` and ``Hourly-test.csv`` (the M4 ``Dataset/`` files).
    Timestamps are integer hour offsets, since the files carry no dates.
    """
    data_dir = Path(data_dir)
    train = _read_m4(data_dir / "Hourly-train.csv")
    test = _read_m4(data_dir / "Hourly-test.csv")
    lengths = train.groupby(SERIES, sort=False)[TIME].size()
    test[TIME] += test[SERIES].map(lengths).to_numpy()
    return train, test


@dataclass(frozen=True)
class ETTSplits:
    """ETTh1 standardised with the train split's statistics, and the split borders (row numbers)."""

    frame: pd.DataFrame  # DatetimeIndex, one column per variable, z-scored
    mean: pd.Series
    std: pd.Series
    train_end: int
    val_end: int
    test_end: int

    def bounds(self, split: str) -> tuple[int, int]:
        """The first row of a split ("train", "val" or "test") and the row after its last."""
        return {
            "train": (0, self.train_end),
            "val": (self.train_end, self.val_end),
            "test": (self.val_end, self.test_end),
        }[split]

    def rows(self, split: str, input_len: int = 0) -> pd.DataFrame:
        """Rows of a split, preceded by ``input_len`` rows of context as in reference loaders."""
        start, end = self.bounds(split)
        return self.frame.iloc[max(start - input_len, 0) : end]


def load_etth1(path: str | Path) -> ETTSplits:
    """ETTh1.csv split 12/4/4 months and z-scored with the train split's mean and std."""
    raw = pd.read_csv(path, parse_dates=["date"], index_col="date").astype(np.float64)
    train_end, val_end = ETT_TRAIN_ROWS, ETT_TRAIN_ROWS + ETT_VAL_ROWS
    test_end = val_end + ETT_TEST_ROWS
    if len(raw) < test_end:
        raise ValueError(f"{path} has {len(raw)} rows; the standard split needs {test_end}")
    mean, std = raw.iloc[:train_end].mean(), raw.iloc[:train_end].std(ddof=0)
    return ETTSplits((raw - mean) / std, mean, std, train_end, val_end, test_end)


def wide_to_long(wide: pd.DataFrame, columns: list[str] | None = None) -> pd.DataFrame:
    """Each column of a wide frame as its own series (channel independence)."""
    columns = list(wide.columns) if columns is None else columns
    long = wide[columns].rename_axis(TIME).reset_index().melt(
        id_vars=TIME, var_name=SERIES, value_name=TARGET
    )
    return long[[SERIES, TIME, TARGET]]
