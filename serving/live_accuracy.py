"""POST /actuals and GET /accuracy as plain functions, tested without a server: the observations
of a request, and the accuracy report with each version's backtest figures beside it.

The store (pipelines.forecast_store) keeps the actuals and computes the live accuracy from
them and the forecast log; the counters of the matches are in serving.metrics. Both compute
the error terms with the store's functions, so Prometheus and /accuracy agree.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from mlflow import MlflowClient

from pipelines.forecast_store import Observation, VersionAccuracy
from serving.inference import step_index
from serving.model import backtest_metrics
from serving.schemas import (
    AccuracyResponse,
    ActualSeries,
    BacktestFigures,
    VersionReport,
)

logger = logging.getLogger(__name__)

STORE_OFF_MESSAGE = ("the forecast store is off (FORECASTER_STORE_URL=none): this service "
                     "logs no forecasts and takes no actuals")
STORE_RETRY_AFTER_S = 5  # a store that is down: when a client may post its actuals again


def observations(series: Sequence[ActualSeries]) -> list[Observation]:
    """Each value of each series at its time; RequestError naming the series whose times are
    out of range."""
    points = []
    for i, one in enumerate(series):
        times = step_index(one.start, one.freq, 0, len(one.values), ("series", i))
        points.extend(Observation(one.id, moment, value)
                      for moment, value in zip(times.to_pydatetime(), one.values, strict=True))
    return points


def backtest_figures(metrics: Mapping[str, float]) -> BacktestFigures:
    """The backtest's MASE, sMAPE and MAE among a version's recorded metrics."""
    return BacktestFigures(**{name: metrics.get(name) for name in BacktestFigures.model_fields})


def registry_backtest(client: MlflowClient, name: str, version: str) -> BacktestFigures:
    """A registered version's backtest figures, from its tags; none when the registry does not
    answer or has no such version (the live figures are reported all the same)."""
    try:
        tags = client.get_model_version(name, version).tags
    except Exception as error:  # noqa: BLE001 - any failure of the registry: no figures
        logger.warning("no backtest figures for %s v%s: %s", name, version,
                       str(error).splitlines()[0] if str(error) else type(error).__name__)
        return BacktestFigures()
    return backtest_figures(backtest_metrics(dict(tags)))


def accuracy_report(versions: Sequence[VersionAccuracy],
                    backtests: Mapping[tuple[str, str], BacktestFigures]) -> AccuracyResponse:
    """The store's live accuracy per version, each with its backtest figures (by name and
    version; none when missing)."""
    return AccuracyResponse(versions=[
        VersionReport(**{**version.model_dump(), "backtest": backtests.get(
            (version.model_name, version.model_version), BacktestFigures())})
        for version in versions])
