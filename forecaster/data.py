"""The one data model: a long DataFrame of many series, and its sktime panel twin.

Long format: one row per (series, time) with the columns ``series_id``, ``timestamp``,
``target`` and any numeric covariate columns. sktime's ``pd-multiindex`` panel holds the same
data indexed by (series_id, timestamp); the two convert losslessly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

SERIES = "series_id"
TIME = "timestamp"
TARGET = "target"
KEY_COLUMNS = (SERIES, TIME)


def long_to_panel(long: pd.DataFrame) -> pd.DataFrame:
    """Long DataFrame -> sktime ``pd-multiindex`` panel indexed by (series_id, timestamp)."""
    missing = [c for c in (*KEY_COLUMNS, TARGET) if c not in long.columns]
    if missing:
        raise ValueError(f"long data is missing the column(s) {missing}")
    value_columns = [TARGET] + [c for c in long.columns if c not in (*KEY_COLUMNS, TARGET)]
    panel = long.set_index(list(KEY_COLUMNS))[value_columns].sort_index()
    return panel


def panel_to_long(panel: pd.DataFrame | pd.Series) -> pd.DataFrame:
    """sktime ``pd-multiindex`` panel (or a single series) -> long DataFrame."""
    frame = panel.to_frame(TARGET) if isinstance(panel, pd.Series) else panel
    if not isinstance(frame.index, pd.MultiIndex):
        frame = pd.concat({"0": frame}, names=[SERIES])
    frame = frame.rename_axis([SERIES, TIME])
    if TARGET not in frame.columns:
        frame = frame.rename(columns={frame.columns[0]: TARGET})
    return frame.reset_index()


def series_groups(panel: pd.DataFrame | pd.Series) -> list[tuple[object, pd.DataFrame]]:
    """(series id, frame indexed by time) for each series of a panel, in index order."""
    frame = panel.to_frame() if isinstance(panel, pd.Series) else panel
    if not isinstance(frame.index, pd.MultiIndex):
        return [(None, frame)]
    return [
        (key, group.droplevel(list(range(frame.index.nlevels - 1))))
        for key, group in frame.groupby(level=list(range(frame.index.nlevels - 1)), sort=False)
    ]


def validate_panel(
    panel: pd.DataFrame | pd.Series,
    min_length: int = 1,
    allowed_columns: Iterable[str] | None = None,
    name: str = "y",
) -> None:
    """Raise ValueError, naming the series and the problem, if the panel cannot be used.

    Checks NaN/inf values, duplicate timestamps, series shorter than ``min_length`` and,
    when ``allowed_columns`` is given, columns the model does not know.
    """
    frame = panel.to_frame() if isinstance(panel, pd.Series) else panel
    if allowed_columns is not None:
        allowed = sorted(map(str, allowed_columns))
        unknown = sorted(set(map(str, frame.columns)) - set(allowed))
        if unknown:
            raise ValueError(f"{name} has unknown column(s) {unknown}; expected only {allowed}")
    for key, series in series_groups(frame):
        label = f"{name} series {key!r}" if key is not None else name
        if series.index.has_duplicates:
            dup = series.index[series.index.duplicated()][0]
            raise ValueError(f"{label} has duplicate timestamp {dup}")
        values = series.to_numpy(dtype=float, na_value=np.nan)
        bad = ~np.isfinite(values)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise ValueError(
                f"{label} has a non-finite value ({values[row, col]}) in column "
                f"{series.columns[col]!r} at {series.index[row]}"
            )
        if len(series) < min_length:
            raise ValueError(
                f"{label} has {len(series)} observations; the model needs at least {min_length}"
            )


def panel_arrays(
    panel: pd.DataFrame | pd.Series, columns: Sequence[str] | None = None
) -> tuple[list[object], list[np.ndarray]]:
    """Series ids and one float32 array (time, columns) per series."""
    ids, arrays = [], []
    for key, series in series_groups(panel):
        frame = series if columns is None else series[list(columns)]
        ids.append(key)
        arrays.append(frame.to_numpy(dtype=np.float32))
    return ids, arrays
