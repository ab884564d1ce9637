"""The one data model: a long DataFrame of many series, and its sktime panel twin.

Long format: one row per (series, time) with the columns ``series_id``, ``timestamp``,
``target`` and any numeric covariate columns. sktime's ``pd-multiindex`` panel holds the same
data indexed by (series_id, timestamp): ``long_to_panel`` makes y from the target alone, and
``split_long`` makes y and X (the covariates, named as known-future or static) on one index.
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
    """Long DataFrame -> sktime ``pd-multiindex`` panel y indexed by (series_id, timestamp).

    y holds the target only. Any other column raises ValueError rather than becoming a second
    target: split covariates into X with :func:`split_long`, or drop the columns.
    """
    return split_long(long)[0]


def split_long(long: pd.DataFrame, known_future: Sequence[str] = (),
               static: Sequence[str] = ()) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Long DataFrame -> (y, X) sktime ``pd-multiindex`` panels indexed by (series_id,
    timestamp), rows sorted, X on y's index.

    y holds the target; X the ``known_future`` covariates (values known ahead, such as a
    promotion calendar: ``predict`` needs their future values too) then the ``static`` ones
    (constant per series), or None when neither is named. Raises ValueError listing every
    problem: a missing key column, a named column that is absent, not numeric, named twice or
    (static) not constant per series, and a column that is named nowhere.
    """
    missing = [c for c in (*KEY_COLUMNS, TARGET) if c not in long.columns]
    if missing:
        raise ValueError(f"long data is missing the column(s) {missing}")
    problems = covariate_problems(long, known_future, static)
    named = {*KEY_COLUMNS, TARGET, *known_future, *static}
    other = [c for c in long.columns if c not in named]
    if other:
        problems.append(
            f"column(s) {other} besides {SERIES!r}, {TIME!r} and {TARGET!r} are neither "
            "known_future nor static covariates; name them (split_long(long, known_future=[...],"
            " static=[...])) or drop them: y holds the target only")
    if problems:
        raise ValueError("; ".join(problems))
    covariates = [*known_future, *static]
    panel = long.set_index(list(KEY_COLUMNS))[[TARGET, *covariates]].sort_index()
    y = panel[[TARGET]]
    return y, panel[covariates] if covariates else None


def covariate_problems(long: pd.DataFrame, known_future: Sequence[str] = (),
                       static: Sequence[str] = (), series: str = SERIES) -> list[str]:
    """What is wrong with naming these columns of a long frame as covariates, each problem
    led by the list it concerns (``known_future: ...``, ``static: ...``); empty when sound.
    ``series`` is the column of series ids, by which static covariates must be constant."""
    problems = []
    seen: set[str] = set()
    for kind, names in (("known_future", known_future), ("static", static)):
        for name in names:
            if name in seen:
                problems.append(f"{kind}: column {name!r} is named twice")
                continue
            seen.add(name)
            if name in (*KEY_COLUMNS, TARGET):
                problems.append(f"{kind}: {name!r} is the {name} column, not a covariate")
            elif name not in long.columns:
                problems.append(f"{kind}: column {name!r} not found (columns: "
                                f"{list(map(str, long.columns))})")
            elif not pd.api.types.is_numeric_dtype(long[name]):
                problems.append(f"{kind}: column {name!r} is not numeric "
                                f"(dtype {long[name].dtype})")
            elif kind == "static" and series in long.columns:
                counts = long.groupby(series, sort=True)[name].nunique(dropna=False)
                varying = counts.index[counts > 1]
                if len(varying):
                    problems.append(f"static: column {name!r} varies within series "
                                    f"{[str(v) for v in varying[:5]]}; a static covariate is "
                                    "constant per series")
    return problems


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
