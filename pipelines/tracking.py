"""MLflow logging helpers: store setup, the HTTP client's budget and its failures, learning
curves, plots, provenance tags.

The race decides what to log; this module knows how. Against a tracking server, every request
gives up within ``tracking.http_budget_seconds`` (:func:`http_requests`), and a server that
stopped answering ends the race with one :class:`TrackingUnavailable` line, its runs closed
with one quick try each (:func:`end_run`). Figures are built on
``matplotlib.figure.Figure`` rather than pyplot, so no global figure state or GUI backend is
involved.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import mlflow
import numpy as np
import pandas as pd
import requests
from matplotlib import dates
from matplotlib.figure import Figure
from mlflow.entities import Metric
from mlflow.environment_variables import (
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_HTTP_REQUEST_TIMEOUT,
)
from mlflow.exceptions import MlflowException

from forecaster.data import SERIES, TARGET, TIME
from forecaster.trainer import EpochRecord
from pipelines.config import RaceConfig, TrackingConfig
from pipelines.forecasts import POINT, quantile_column, quantile_levels

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
QUICK_TIMEOUT_S = 2  # closing a run once the server stopped answering: one short try
DEFAULT_ARTIFACT_FOLDER = "mlartifacts"
INTERVAL_VARIABLE = "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"

# tags on runs and model versions
TAG_FINGERPRINT = "data_fingerprint"
TAG_COMMIT = "git_commit"
TAG_DIRTY = "git_dirty"


def artifact_uri(tracking: TrackingConfig) -> str | None:
    """Where a new experiment stores artifacts; None lets a tracking server decide."""
    location = tracking.artifact_location
    if location is None:
        if tracking.tracking_uri.startswith(("http://", "https://")):
            return None
        location = DEFAULT_ARTIFACT_FOLDER
    if "://" in location or location.startswith("mlflow-artifacts:"):
        return location
    return Path(location).resolve().as_uri()


def configure_tracking(config: RaceConfig) -> str:
    """Point MLflow at the configured stores and return the race's experiment id (created,
    with its artifact location, on first use)."""
    tracking = config.tracking
    mlflow.set_tracking_uri(tracking.tracking_uri)
    mlflow.set_registry_uri(tracking.registry_uri or tracking.tracking_uri)
    name = config.experiment_name
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        try:
            experiment_id = mlflow.create_experiment(name,
                                                     artifact_location=artifact_uri(tracking))
        except MlflowException:
            # another process created it between our lookup and our create
            experiment = mlflow.get_experiment_by_name(name)
            if experiment is None:
                raise
            experiment_id = experiment.experiment_id
    # runs are started with this id explicitly: mlflow.set_experiment would also set it in the
    # process environment, for whatever runs next in a long-lived process
    return experiment_id


@contextmanager
def scoped_environment(variables: Mapping[str, str]) -> Iterator[None]:
    """Environment variables set for the code inside and restored after, lest one race's
    values outlive it in a long-lived process such as the scheduler. MLflow reads several of
    its settings from the environment at each use (that is all its setters do)."""
    previous = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def system_metrics_interval(seconds: float) -> contextlib.AbstractContextManager[None]:
    """MLflow's system-metrics sampling interval for the runs started inside."""
    return scoped_environment({INTERVAL_VARIABLE: str(seconds)})


def http_requests(tracking: TrackingConfig) -> contextlib.AbstractContextManager[None]:
    """MLflow's HTTP timeout and retries for the requests made inside, from the config."""
    return scoped_environment(tracking.http_environment())


class TrackingUnavailable(RuntimeError):
    """The tracking server did not answer a request within the race's HTTP budget."""


def unreachable(error: BaseException, tracking_uri: str | None = None) -> bool:
    """Whether ``error``, or one it was raised from or while handling, is a failed HTTP
    request (refused, timed out, retried out): the tracking server did not answer. With
    ``tracking_uri``, only a request to that server counts (Ray's own HTTP calls, say, do not;
    a local store has none)."""
    server = urlsplit(tracking_uri).netloc.rpartition("@")[2] if tracking_uri else None
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, requests.RequestException):
            url = getattr(error.request, "url", None)
            if server is None or url is None or urlsplit(url).netloc == server:
                return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def unavailable(error: BaseException, tracking: TrackingConfig) -> TrackingUnavailable:
    """One line saying that the server did not answer, and how long the race waited; the
    URI without credentials."""
    while not isinstance(error, requests.RequestException):
        error = error.__cause__ or error.__context__
    what = ("timed out" if isinstance(error, requests.Timeout) else
            "kept failing" if isinstance(error, requests.exceptions.RetryError) else
            "refused or dropped the connection")
    return TrackingUnavailable(
        f"the tracking server {redact(tracking.tracking_uri)} {what} ({type(error).__name__}; "
        f"each request gives up within {tracking.http_budget_seconds:.0f} s: "
        f"tracking.http_timeout_seconds={tracking.http_timeout_seconds}, "
        f"http_max_retries={tracking.http_max_retries}): the race stopped, the aliases are "
        "untouched")


def redact(uri: str) -> str:
    """``uri`` without the user and password it may carry."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")))


@contextmanager
def ended_on_error() -> Iterator[None]:
    """Inside ``with mlflow.start_run(...)``: when the block raises, the run ends KILLED for an
    interrupt (MLflow's own exit says FAILED for every error), FAILED otherwise, as
    :func:`end_run` ends runs."""
    try:
        yield
    except BaseException as error:
        end_run("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise


def end_run(status: str) -> None:
    """``mlflow.end_run(status)``, for the clean-up of a run. When the tracking server has
    stopped answering (the error in flight says so), one quick try, without retries, whose
    failure is logged, not raised: the caller sees the error that stopped the race, alone."""
    error = sys.exception()
    if error is None or not unreachable(error):
        mlflow.end_run(status)
        return
    with scoped_environment({MLFLOW_HTTP_REQUEST_MAX_RETRIES.name: "0",
                             MLFLOW_HTTP_REQUEST_TIMEOUT.name: str(QUICK_TIMEOUT_S)}):
        try:
            mlflow.end_run(status)
        except Exception as failure:  # noqa: BLE001 - the server is gone; said once, above
            logger.debug("could not mark the run %s: %s", status, failure)


def git_commit() -> tuple[str, bool]:
    """The checkout's commit and whether tracked files differ from it ("unknown" outside git)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=REPO, capture_output=True, text=True, check=True,
                                timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
    return commit, bool(status.strip())


def provenance_tags(fingerprint: str) -> dict[str, str]:
    commit, dirty = git_commit()
    return {TAG_FINGERPRINT: fingerprint, TAG_COMMIT: commit, TAG_DIRTY: str(dirty).lower()}


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as flat MLflow params: ``{"backtest": {"folds": 3}}`` ->
    ``{"backtest.folds": "3"}``."""
    flat: dict[str, str] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def epoch_logger(run_id: str, prefix: str = "",
                 then: Callable[[EpochRecord], None] | None = None
                 ) -> Callable[[EpochRecord], None]:
    """An ``on_epoch`` callback logging the learning curve (step = epoch) to ``run_id``."""
    client = mlflow.MlflowClient()

    def log(record: EpochRecord) -> None:
        client.log_batch(run_id, metrics=[
            Metric(f"{prefix}{name}", float(value), int(time.time() * 1000), record.epoch)
            for name, value in (("train_loss", record.train_loss),
                                ("val_loss", record.val_loss),
                                ("epoch_seconds", record.seconds))])
        if then is not None:
            then(record)

    return log


def log_warnings(caught: Iterable[warnings.WarningMessage], artifact: str) -> int:
    """Log the distinct warnings a step raised as a text artifact; returns how many there were."""
    caught = list(caught)
    if caught:
        counts: dict[str, int] = {}
        for w in caught:
            line = f"{w.category.__name__}: {w.message}"
            counts[line] = counts.get(line, 0) + 1
        mlflow.log_text("\n".join(f"{n} x {line}" for line, n in counts.items()), artifact)
    return len(caught)


def forecast_figure(history: pd.DataFrame, forecast: pd.DataFrame, coverage: float,
                    actual: pd.DataFrame | None = None, series: list[str] | None = None,
                    context: int | None = None, title: str = "") -> Figure:
    """Forecasts against actuals: the end of each series' history, what happened next (when
    known), the median forecast and its central ``coverage`` interval."""
    ids = series if series is not None else list(forecast[SERIES].drop_duplicates())
    horizon = int(forecast.groupby(SERIES).size().max())
    context = context or 3 * horizon
    low, high = (1 - coverage) / 2, (1 + coverage) / 2
    levels = quantile_levels(forecast)
    figure = Figure(figsize=(10, 2.4 * max(len(ids), 1)), layout="constrained")
    axes = figure.subplots(max(len(ids), 1), 1, squeeze=False)[:, 0]
    for ax, key in zip(axes, ids, strict=False):
        past = history.xs(key, level=0)[TARGET].iloc[-context:]
        ax.plot(past.index, past.to_numpy(), color="0.3", lw=1, label="history")
        if actual is not None:
            truth = actual.xs(key, level=0)[TARGET]
            ax.plot(truth.index, truth.to_numpy(), color="black", lw=1.2, label="actual")
        rows = forecast[forecast[SERIES] == key]
        ax.plot(rows[TIME], rows[POINT], color="tab:blue", lw=1.2, label="forecast")
        ax.fill_between(rows[TIME], *_bounds(rows, levels, (low, high)), color="tab:blue",
                        alpha=0.2, label=f"{coverage:.0%} interval")
        ax.set_title(str(key), fontsize=9, loc="left")
    axes[0].legend(loc="upper left", fontsize=8, ncols=4)
    if title:
        figure.suptitle(title)
    return figure


def _bounds(rows: pd.DataFrame, levels: list[float], bounds: Iterable[float]
            ) -> list[np.ndarray]:
    """Each bound's values over the rows of a forecast frame, interpolated between its
    quantile levels."""
    quantiles = rows[[quantile_column(q) for q in levels]].to_numpy()
    return [np.array([np.interp(level, levels, r) for r in quantiles]) for level in bounds]


def explanation_figure(history: pd.Series, forecast: pd.DataFrame, attention: np.ndarray,
                       coverage: float = 0.8, importance: Mapping[str, float] | None = None,
                       title: str = "") -> Figure:
    """One series' forecast above the attention behind it, on one time axis.

    Above: the history the attention covers (its last ``attention.shape[1]`` values, the
    five most-attended marked), the median forecast and its central ``coverage`` interval.
    Below: the heat map, a row per forecast step (``attention.shape[0]``, the first at the
    top) and a column per input time step, under the value it weighs. With ``importance``, a
    bar per covariate at the bottom.
    """
    steps, horizon = attention.shape[1], attention.shape[0]
    shown = history.iloc[-steps:]
    rows = forecast.iloc[:horizon]
    x_history, x_forecast = _positions(shown.index), _positions(pd.Index(rows[TIME]))
    width = float(np.median(np.diff(x_history))) if steps > 1 else 1.0
    levels = quantile_levels(rows)
    low, high = (1 - coverage) / 2, (1 + coverage) / 2
    panels = 3 if importance else 2
    figure = Figure(figsize=(11, 7 + (1.6 if importance else 0)), layout="constrained")
    grid = figure.add_gridspec(panels, 1, height_ratios=[1.0, 1.2, 0.6][:panels])
    top = figure.add_subplot(grid[0])
    top.plot(x_history, shown.to_numpy(), color="0.3", lw=1, label="history")
    top.plot(x_forecast, rows[POINT].to_numpy(), color="tab:blue", lw=1.4, label="forecast")
    top.fill_between(x_forecast, *_bounds(rows, levels, (low, high)), color="tab:blue",
                     alpha=0.2, label=f"{coverage:.0%} interval")
    mean = attention.mean(axis=0)
    most = np.argsort(-mean, kind="stable")[:5]
    top.scatter(x_history[most], shown.to_numpy()[most], s=30 + 400 * mean[most] / mean.max(),
                facecolors="none", edgecolors="tab:red", lw=1.5, zorder=3,
                label="most attended")
    top.set_ylabel("value")
    top.legend(loc="upper left", fontsize=8, ncols=4)
    heat = figure.add_subplot(grid[1], sharex=top)
    image = heat.imshow(attention, aspect="auto", cmap="viridis", interpolation="nearest",
                        extent=(x_history[0] - width / 2, x_history[-1] + width / 2,
                                horizon + 0.5, 0.5))
    heat.set_ylabel("forecast step")
    heat.set_xlabel("input time step (columns)")
    heat.set_title("attention of each forecast step (row) over the input steps; each row sums "
                   "to 1", fontsize=9, loc="left")
    figure.colorbar(image, ax=heat, label="weight", shrink=0.9)
    # imshow narrowed the shared axis to the input steps: widen it to the forecast
    heat.set_xlim(x_history[0] - width / 2, x_forecast[-1] + width / 2)
    if isinstance(shown.index, pd.DatetimeIndex):
        top.xaxis_date()
    if importance:
        bars = figure.add_subplot(grid[2])
        names = list(importance)
        bars.barh(names, [importance[n] for n in names], color="tab:green")
        bars.invert_yaxis()
        bars.set_xlabel("covariate importance (mean variable-selection weight)")
    if title:
        figure.suptitle(title)
    return figure


def _positions(index: pd.Index) -> np.ndarray:
    """x coordinates of times: matplotlib's date numbers for dates, else the numbers."""
    if isinstance(index, pd.DatetimeIndex):
        return dates.date2num(index.to_pydatetime())
    return index.to_numpy(np.float64)


def attention_figure(maps: Mapping[str, np.ndarray], title: str = "") -> Figure:
    """One heat-map per attention module, averaged over heads (queries down, keys across)."""
    figure = Figure(figsize=(4.2 * max(len(maps), 1), 4), layout="constrained")
    axes = figure.subplots(1, max(len(maps), 1), squeeze=False)[0]
    for ax, (name, weights) in zip(axes, maps.items(), strict=False):
        image = ax.imshow(np.asarray(weights).mean(axis=0), aspect="auto", cmap="viridis")
        ax.set_title(f"{name}\n(mean of {np.asarray(weights).shape[0]} heads)", fontsize=8)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        figure.colorbar(image, ax=ax, shrink=0.8)
    if title:
        figure.suptitle(title)
    return figure
