"""The one data model: a long DataFrame of many series, and its sktime panel twin.

Long format: one row per (series, time) with the columns ``series_id``, ``timestamp``,
``target`` and any numeric covariate columns. sktime's ``pd-multiindex`` panel holds the same
data indexed by (series_id, timestamp): ``long_to_panel`` makes y from the target alone, and
``split_long`` makes y and X (the covariates, named as known-future or static) on one index.

Validation reports every problem at once (:class:`DataError`, a ValueError listing up to
:data:`MAX_REPORTED` of them), each naming the series by its id: non-finite values, duplicate
timestamps, series too short and, given a frequency, missing or off-frequency timestamps.
:func:`fill_gaps` repairs missing timestamps and NaN values instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

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


MAX_REPORTED = 20  # problems listed in one error; any more are counted, not listed
SHOWN = 5  # timestamps or values quoted per problem


@dataclass(frozen=True)
class DataProblem:
    """One thing wrong with the data, in words that name the series and the column."""

    kind: str  # column, duplicate, missing_value, infinite, missing_timestamp, irregular, ...
    series: object  # the series id as the user wrote it; None for the data as a whole
    message: str

    def __str__(self) -> str:
        return self.message


class DataError(ValueError):
    """Every problem found in a data set at once (up to :data:`MAX_REPORTED` of them listed)."""

    def __init__(self, problems: Sequence[DataProblem], subject: str,
                 hints: Sequence[str] = ()):
        self.problems = list(problems)
        lines = [p.message for p in self.problems[:MAX_REPORTED]]
        if len(self.problems) > MAX_REPORTED:
            lines.append(f"... and {len(self.problems) - MAX_REPORTED} more")
        if len(self.problems) == 1 and not hints:
            super().__init__(lines[0])
        else:
            super().__init__(f"{subject} has {counted(len(self.problems), 'problem')}:\n  "
                             + "\n  ".join([*lines, *hints]))


def series_id(key: object) -> object:
    """A series id as the user wrote it: the group key of a one-level panel is a 1-tuple."""
    return key[0] if isinstance(key, tuple) and len(key) == 1 else key


def series_label(name: str, key: object) -> str:
    """``y series 'store_12'`` (or just ``y`` for a frame that is one series)."""
    return name if key is None else f"{name} series {series_id(key)!r}"


def counted(count: int, noun: str) -> str:
    """``1 timestamp``, ``2 timestamps``."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


def timestamp_text(value: object) -> str:
    """A timestamp as users write it: a date alone when it is midnight."""
    if isinstance(value, pd.Timestamp) and value == value.normalize():
        return value.date().isoformat()
    return str(value)


def listed(values: Sequence[object]) -> str:
    """The first :data:`SHOWN` values (timestamps as :func:`timestamp_text` writes them)."""
    shown = ", ".join(map(timestamp_text, values[:SHOWN]))
    return shown + (f", ... ({len(values)} in all)" if len(values) > SHOWN else "")


def expected_timestamps(index: pd.Index, frequency: str) -> pd.Index | None:
    """The regular timestamps from a series' first to its last: dates on ``frequency``,
    integers in steps of 1 (the frequency then only names the unit); None for other kinds of
    index, which have no regularity to check."""
    if isinstance(index, pd.DatetimeIndex):
        return pd.date_range(index.min(), index.max(), freq=frequency, unit=index.unit,
                             name=index.name)
    if pd.api.types.is_numeric_dtype(index) and len(index):
        first, last = np.ceil(index.min()), np.floor(index.max())
        return pd.Index(np.arange(int(first), int(last) + 1), name=index.name)
    return None


def _timestamp_problems(label: str, key: object, index: pd.Index, frequency: str
                        ) -> list[DataProblem]:
    grid = expected_timestamps(index, frequency)
    if grid is None:
        return []
    unit = f"on frequency {frequency!r}" if isinstance(index, pd.DatetimeIndex) \
        else "in steps of 1"
    problems = []
    off_grid = index.difference(grid)
    if len(off_grid):
        problems.append(DataProblem("irregular", series_id(key), (
            f"{label} has {counted(len(off_grid), 'timestamp')} not {unit}: "
            f"{listed(list(off_grid))}")))
    missing = grid.difference(index)
    if len(missing):
        problems.append(DataProblem("missing_timestamp", series_id(key), (
            f"{label} misses {counted(len(missing), 'timestamp')} {unit}: "
            f"{listed(list(missing))}")))
    return problems


def panel_problems(
    panel: pd.DataFrame | pd.Series,
    min_length: int = 1,
    allowed_columns: Iterable[str] | None = None,
    name: str = "y",
    *,
    frequency: str | None = None,
    column_names: Mapping[str, str | None] | None = None,
) -> list[DataProblem]:
    """Every problem of a panel, series by series; see :func:`validate_panel`."""
    frame = panel.to_frame() if isinstance(panel, pd.Series) else panel
    shown: dict[str, str | None] = {c: c for c in map(str, frame.columns)}
    shown.update(column_names or {})
    problems = []
    if allowed_columns is not None:
        allowed = sorted(map(str, allowed_columns))
        unknown = sorted(set(map(str, frame.columns)) - set(allowed))
        if unknown:
            problems.append(DataProblem("column", None, (
                f"{name} has unknown column(s) {unknown}; expected only {allowed}")))
    for key, series in series_groups(frame):
        label = series_label(name, key)
        if series.index.has_duplicates:
            duplicated = list(series.index[series.index.duplicated()].unique())
            problems.append(DataProblem("duplicate", series_id(key), (
                f"{label} has duplicate timestamp {timestamp_text(duplicated[0])}"
                if len(duplicated) == 1 else
                f"{label} has {len(duplicated)} duplicate timestamps: {listed(duplicated)}")))
        elif frequency is not None:  # gaps are only meaningful once timestamps are unique
            problems += _timestamp_problems(label, key, series.index, frequency)
        values = series.to_numpy(dtype=float, na_value=np.nan)
        for col, column in enumerate(series.columns):
            problems += _non_finite(label, key, shown[str(column)], series.index,
                                    values[:, col])
        if len(series) < min_length:
            problems.append(DataProblem("short", series_id(key), (
                f"{label} has {len(series)} observations; the model needs at least "
                f"{min_length}")))
    return problems


def _non_finite(label: str, key: object, column: str | None, index: pd.Index,
                values: np.ndarray) -> list[DataProblem]:
    """NaN (a missing value) and +-inf, each reported with where it is."""
    where = "" if column is None else f" in column {column!r}"
    problems = []
    for kind, bad, text in (("missing_value", np.isnan(values), "nan"),
                            ("infinite", np.isposinf(values), "inf"),
                            ("infinite", np.isneginf(values), "-inf")):
        count = int(bad.sum())
        if count == 1:
            message = (f"{label} has a non-finite value ({text}){where} at "
                       f"{timestamp_text(index[bad][0])}")
        elif count:
            message = (f"{label} has {count} non-finite values ({text}){where} at "
                       f"{listed(list(index[bad]))}")
        else:
            continue
        problems.append(DataProblem(kind, series_id(key), message))
    return problems


def validate_panel(
    panel: pd.DataFrame | pd.Series,
    min_length: int = 1,
    allowed_columns: Iterable[str] | None = None,
    name: str = "y",
    *,
    frequency: str | None = None,
    column_names: Mapping[str, str | None] | None = None,
) -> None:
    """Raise :class:`DataError` (a ValueError) listing every problem of the panel at once.

    Checks NaN/inf values, duplicate timestamps, series shorter than ``min_length`` and,
    when ``allowed_columns`` is given, columns the model does not know. With ``frequency``,
    timestamps must also be regular: dates on that pandas frequency, integers in steps of 1;
    missing and off-grid ones are reported. ``column_names`` renames columns in the messages
    (the user's name for ``target``, say; None leaves the column unnamed, as in a wide file
    where the series is the column); series are named by their ids.
    """
    problems = panel_problems(panel, min_length, allowed_columns, name, frequency=frequency,
                              column_names=column_names)
    if problems:
        raise DataError(problems, name)


FillMethod = Literal["interpolate", "zero"]


def fill_gaps(panel: pd.DataFrame, frequency: str | None, method: FillMethod
              ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Insert the missing timestamps of every series and fill them, and NaN values, by
    ``method``: ``interpolate`` (linear in time; a series' edges take its nearest value) or
    ``zero``. Without ``frequency`` only NaN values are filled. Series with duplicate or
    off-grid timestamps are left as they are, for :func:`validate_panel` to report.

    Returns the filled panel and, per series filled (index: series id), the counts
    ``missing_timestamps`` (rows inserted) and ``missing_values`` (NaN values filled).
    """
    if method not in get_args(FillMethod):
        raise ValueError(f"method {method!r}: choose one of {list(get_args(FillMethod))}")
    pieces, counts = [], {}
    for key, series in series_groups(panel):
        grid = None if frequency is None else expected_timestamps(series.index, frequency)
        if series.index.has_duplicates or (grid is not None
                                           and len(series.index.difference(grid))):
            pieces.append((key, series))
            continue
        grid = series.index if grid is None else grid
        full = series.reindex(grid)
        gaps = int(full.isna().to_numpy().sum()) - (len(grid) - len(series)) * full.shape[1]
        filled = (full.interpolate(method="linear", limit_direction="both")
                  if method == "interpolate" else full.fillna(0.0))
        if len(grid) > len(series) or gaps:
            counts[series_id(key)] = (len(grid) - len(series), gaps)
        pieces.append((key, filled))
    multi = isinstance(panel.index, pd.MultiIndex)
    if not pieces:
        result = panel
    elif not multi:
        result = pieces[0][1]
    else:
        result = pd.concat([_keyed(key, frame, panel.index.names) for key, frame in pieces])
    report = pd.DataFrame.from_dict(counts, orient="index",
                                    columns=["missing_timestamps", "missing_values"])
    return result, report.rename_axis(panel.index.names[0] if multi else SERIES)


def _keyed(key: object, frame: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """A series' frame indexed by time, back under its series key."""
    levels = key if isinstance(key, tuple) else (key,)
    frame = frame.copy()
    frame.index = pd.MultiIndex.from_arrays(
        [*[[level] * len(frame) for level in levels], frame.index], names=names)
    return frame


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
