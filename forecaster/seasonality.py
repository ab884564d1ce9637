"""The seasonal period of time series, from their frequency: what the race's MASE and seasonal
baselines use, and the unit the networks' "auto" window sizes are counted in."""

from __future__ import annotations

import pandas as pd
from pandas.tseries.offsets import BaseOffset

from forecaster.data import series_groups

# seasonal period implied by a pandas frequency (its rule code, anchor left out); others: 1
SEASONALITY = {"h": 24, "min": 60, "D": 7, "B": 5, "W": 52, "MS": 12, "ME": 12, "M": 12,
               "QS": 4, "QE": 4, "Q": 4}


def season_length_of(frequency: str | BaseOffset) -> int:
    """The seasonal period a pandas ``frequency`` implies (1: none): hourly 24, daily 7,
    monthly 12, ...; a multiple such as "15min" has none."""
    offset = pd.tseries.frequencies.to_offset(frequency)
    # rule codes carry an anchor ("W-SUN", "QE-DEC"); a multiple ("15min") has none
    code = offset.rule_code.split("-")[0]
    return SEASONALITY.get(code, 1) if offset.n == 1 else 1


def index_frequency(index: pd.Index) -> BaseOffset | str | None:
    """A time index's frequency: its own (a PeriodIndex's, a DatetimeIndex's ``freq``), else
    the one pandas infers from regular dates; None for integers or irregular dates."""
    own = getattr(index, "freq", None)
    if own is not None:
        return own
    if isinstance(index, pd.DatetimeIndex) and len(index) > 2:
        return pd.infer_freq(index)
    return None


def panel_season_length(panel: pd.DataFrame) -> int:
    """The seasonal period the frequency of a panel's time index implies: that of its first
    series with a frequency; 1 when none has one (integer timestamps, irregular dates)."""
    for _, series in series_groups(panel):
        frequency = index_frequency(series.index)
        if frequency is not None:
            return season_length_of(frequency)
    return 1
