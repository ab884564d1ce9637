"""The networks' default ("auto") sizes on short series of other frequencies than hourly,
against sktime's Theta and the seasonal naive forecast.

    python -m benchmarks.short_series [--data daily monthly hourly] [--models LSTM Theta ...]
                                      [--seeds N] [--series N] [--max-epochs E] [--data-dir DIR]

Three data sets, each a panel of short series with a time index the networks read their season
from (nothing is downloaded):

* ``daily``: M4 Hourly's training series summed per day (whole 24-hour blocks counted back
  from each series' end): 414 series of 29 or 40 days, season 7, horizon 7, the last 7 days
  held out;
* ``monthly``: sktime's bundled monthly series (airline passengers, shampoo sales and the four
  series of the hierarchical sales toy data): 6 series of 36 to 144 months, season 12,
  horizon 12, the last 12 months held out;
* ``hourly``: M4 Hourly's training series cut short, the tuning set of the "auto" rules (the
  two above are held out from tuning, as the defaults are tuned on M4 Hourly and ETTh1 only):
  each series' last 96 to 252 hours (4 to 10.5 seasons, as M3 Monthly's 48 to 126 months),
  horizon 36 (1.5 seasons, as M3 Monthly's 18), the last 36 hours held out. Not M4's test.

Every network runs with its default arguments (as ``forecaster bench m4-hourly`` runs them:
``forecaster.benchmark.network``, on log values), fitted globally on the panel; ``--max-epochs``
shortens training for a smoke run. Scores are sMAPE and MASE (seasonal naive scale of the
season) per series, averaged over series; with ``--seeds N`` each network is fitted with
``random_state`` 0 to N - 1 and each column is the median over those runs, as ``forecaster bench
--seeds`` reports (on sets this small one seed moves a network's sMAPE by several per cent). The
table is markdown, with the sizes each network resolved.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import pandas as pd
from sktime.datasets import load_airline, load_hierarchical_sales_toydata, load_shampoo_sales
from sktime.forecasting.base import BaseForecaster
from sktime.forecasting.naive import NaiveForecaster
from sktime.forecasting.theta import ThetaForecaster

from forecaster.benchmark import NETWORKS, median_over_seeds, network
from forecaster.data import SERIES, TARGET, TIME
from forecaster.datasets import default_data_dir, load_m4_hourly
from forecaster.evaluation import smape_mase
from pipelines.warning_capture import without_sktime_notice

HOURS_PER_DAY = 24
SHORT_HOURS = (96, 252)  # the hourly set's shortest and longest series
SHORT_HOURS_HORIZON = 36  # and its horizon: 1.5 seasons, as M3 Monthly's 18 months


@dataclass(frozen=True)
class ShortSeries:
    """A panel split into its training part and the last ``horizon`` values of each series."""

    name: str
    season: int
    horizon: int
    y_train: pd.DataFrame
    y_test: pd.DataFrame


def _panel(series: dict[str, pd.Series]) -> pd.DataFrame:
    """A pd-multiindex panel (series_id, timestamp) of the given series, in that order."""
    frames = [pd.DataFrame({SERIES: key, TIME: values.index, TARGET: values.to_numpy(float)})
              for key, values in series.items()]
    return pd.concat(frames, ignore_index=True).set_index([SERIES, TIME])


def _split(name: str, season: int, horizon: int, panel: pd.DataFrame) -> ShortSeries:
    test = panel.groupby(level=0, sort=False).cumcount(ascending=False) < horizon
    return ShortSeries(name, season, horizon, panel[~test.to_numpy()], panel[test.to_numpy()])


def _m4_hourly_dated(data_dir: Path, count: int | None,
                     reshape: Callable[[int, np.ndarray], np.ndarray], freq: str
                     ) -> dict[str, pd.Series]:
    """The first ``count`` (all: None) M4 Hourly training series, each reshaped by
    ``reshape(position, values)`` and dated at ``freq`` (the files carry no dates)."""
    train, _ = load_m4_hourly(data_dir / "m4")
    groups = islice(train.groupby(SERIES, sort=False)[TARGET], count)
    series = {}
    for i, (key, hours) in enumerate(groups):
        values = reshape(i, hours.to_numpy())
        series[key] = pd.Series(values, pd.period_range("2000-01-01", periods=len(values),
                                                        freq=freq))
    return series


def daily_m4(data_dir: Path, count: int | None) -> ShortSeries:
    """M4 Hourly's training series as daily totals (whole days counted back from the end)."""
    def days(_: int, hours: np.ndarray) -> np.ndarray:
        return hours[len(hours) % HOURS_PER_DAY:].reshape(-1, HOURS_PER_DAY).sum(axis=1)

    return _split("daily", 7, 7, _panel(_m4_hourly_dated(data_dir, count, days, "D")))


def monthly_sktime(count: int | None) -> ShortSeries:
    """sktime's bundled monthly series, each under its own name."""
    series = {"airline": load_airline(), "shampoo": load_shampoo_sales()}
    toy = load_hierarchical_sales_toydata().iloc[:, 0]
    for key, values in toy.groupby(level=[0, 1], sort=False):
        series["/".join(key)] = values.droplevel([0, 1])
    chosen = dict(list(series.items())[:count])
    return _split("monthly", 12, 12, _panel(chosen))


def short_hourly_m4(data_dir: Path, count: int | None) -> ShortSeries:
    """Each M4 Hourly training series' last 96 to 252 hours (the lengths spread evenly over the
    series), dated by the hour."""
    shortest, longest = SHORT_HOURS

    def last_hours(i: int, hours: np.ndarray) -> np.ndarray:
        # 37 steps through the 157 lengths (a prime number of them) evenly, series by series
        return hours[-(shortest + i * 37 % (longest - shortest + 1)):]

    series = _m4_hourly_dated(data_dir, count, last_hours, "h")
    return _split("hourly", HOURS_PER_DAY, SHORT_HOURS_HORIZON, _panel(series))


def baselines(season: int) -> dict[str, Callable[[], BaseForecaster]]:
    return {"sNaive": lambda: NaiveForecaster(strategy="last", sp=season),
            "Theta": lambda: ThetaForecaster(sp=season)}


def score(data: ShortSeries, model: BaseForecaster) -> dict[str, float]:
    """sMAPE and MASE of ``model`` fitted on ``data``'s training part, and the seconds it took."""
    fh = np.arange(1, data.horizon + 1)
    started = time.perf_counter()
    y_pred = model.fit(data.y_train, fh=fh).predict()
    seconds = time.perf_counter() - started
    return {**smape_mase(data.y_test, y_pred, data.y_train, data.season), "seconds": seconds}


def resolved_sizes(model: BaseForecaster) -> str:
    """The sizes a fitted network (inside the log transform) resolved; "" for a baseline."""
    fitted = dict(getattr(model, "steps_", [])).get("model")
    sizes = getattr(fitted, "resolved_params_", None)
    return "" if sizes is None else ", ".join(f"{k} {v}" for k, v in sizes.items())


def score_row(data: ShortSeries, name: str, make: Callable[[], BaseForecaster],
              seeds: int = 1) -> dict[str, object]:
    """A table row: the median scores of ``make()``'s model over ``seeds`` seeds (one run for a
    baseline, which has none) and the sizes it resolved (the same for every seed)."""
    fitted: list[BaseForecaster] = []

    def fit_and_score(model: BaseForecaster) -> dict[str, float]:
        fitted.append(model)
        return score(data, model)

    scores = median_over_seeds(fit_and_score, make, seeds)
    return {"data": data.name, "model": name, **scores, "sizes": resolved_sizes(fitted[0])}


# name -> loader(data folder, first N series)
DATA_SETS: dict[str, Callable[[Path, int | None], ShortSeries]] = {
    "daily": daily_m4,
    "monthly": lambda _, count: monthly_sktime(count),
    "hourly": short_hourly_m4,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", choices=list(DATA_SETS),
                        default=["daily", "monthly"])
    parser.add_argument("--models", nargs="+", choices=["sNaive", "Theta", *NETWORKS],
                        help="default: the two baselines and every network")
    parser.add_argument("--seeds", type=int, default=1,
                        help="each network's median over this many seeds (default 1)")
    parser.add_argument("--series", type=int, help="the first N series of each data set")
    parser.add_argument("--max-epochs", type=int,
                        help="train the networks this many epochs at most (a smoke run)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder holding m4/ (default: $FORECASTER_DATA_DIR, else "
                             "../shared/data beside the checkout)")
    args = parser.parse_args(argv)
    data_dir = args.data_dir or default_data_dir()
    overrides = {} if args.max_epochs is None else {"max_epochs": args.max_epochs}
    rows = []
    # the baselines build a sktime forecaster per series, each with its remember_data notice
    with without_sktime_notice():
        for which in args.data:
            data = DATA_SETS[which](data_dir, args.series)
            models: dict[str, Callable[[], BaseForecaster]] = {
                **baselines(data.season),
                **{name: (lambda name=name: network(name, **overrides)) for name in NETWORKS}}
            for name in args.models or list(models):
                rows.append(score_row(data, name, models[name], args.seeds))
                print(rows[-1], file=sys.stderr)
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
