"""The service's own Prometheus metrics, exposed on BentoML's /metrics beside its built-ins.

``bentoml serve`` sets PROMETHEUS_MULTIPROC_DIR before its workers import this module, so each
worker writes its samples to files there and /metrics sums them over workers: counters and
histograms add up, the served-version gauge reports the most recent value of a live worker, and
the cache and divergence gauges the highest (1 when any worker is in that state).

The live accuracy is counted as sums and counts (per model name, version and horizon bucket),
so that PromQL divides them over any window and across workers and pods: the live MASE is
``forecaster_live_scaled_error_total / forecaster_live_scaled_points_total``, the MAE and sMAPE
divide by ``forecaster_live_points_total``, the coverage of a level is
``forecaster_live_interval_hits_total / forecaster_live_interval_points_total``.
"""

from __future__ import annotations

import math
from collections import defaultdict

from prometheus_client import Counter, Gauge, Histogram

from pipelines.forecast_store import (
    HORIZON_BUCKETS,
    ActualsOutcome,
    horizon_bucket,
    interval_hit,
    interval_levels,
    point_errors,
)

SERIES_FORECAST = Counter(
    "forecaster_series_forecast", "Series forecast, by the model version that answered",
    ["model_version"])
BATCH_SIZE = Histogram(
    "forecaster_inference_batch_size", "Series per model forward pass",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
FORWARD_SECONDS = Histogram(
    "forecaster_forward_seconds", "Wall time of one model forward pass",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
VALIDATION_FAILURES = Counter(
    "forecaster_validation_failures", "Requests refused as invalid, by reason", ["reason"])
REQUESTS_REFUSED = Counter(
    "forecaster_requests_refused", "Requests answered 503 before their forecast: overloaded "
    "(shed from the batch queue), busy (work in progress would delay them past the timeout), "
    "too_costly (over the timeout alone)", ["reason"])
NONFINITE_FORECASTS = Counter(
    "forecaster_nonfinite_forecasts", "Requests answered 500 because the model forecast NaN "
    "or infinite values", ["model_version"])
MODEL_LOADS = Counter(
    "forecaster_model_loads", "Model loads by outcome: loaded (first), swapped, failed",
    ["outcome"])
MODEL_REFUSALS = Counter(
    "forecaster_model_refusals", "Versions refused before any of their code was imported, by "
    "reason: incomplete, invalid, no_digest (tags of a race missing), files (files differ "
    "from the race's digest), unsigned, signature (HMAC missing or wrong)", ["reason"])
SERVED_VERSION = Gauge(
    "forecaster_served_model_version", "Registry version of the model being served",
    ["model_name", "alias"], multiprocess_mode="livemostrecent")
# 1 while some worker serves a model from the cache of its last good one: the registry was
# unreachable when it started, or its version failed to load
SERVED_FROM_CACHE = Gauge(
    "forecaster_served_from_cache", "1 while the served model comes from the replica's cache "
    "of its last good model rather than from the registry", multiprocess_mode="livemax")
REGISTRY_DIVERGENCE = Gauge(
    "forecaster_registry_divergence", "1 while the served version (or none) differs from the "
    "version the registry alias names", multiprocess_mode="livemax")


LIVE_LABELS = ("model_name", "model_version", "horizon")  # horizon: a HORIZON_BUCKETS value
LIVE_ABS_ERROR = Counter(
    "forecaster_live_abs_error", "Sum of |actual - mean| over the actuals that met a logged "
    "forecast", LIVE_LABELS)
LIVE_SCALED_ERROR = Counter(
    "forecaster_live_scaled_error", "Sum of |actual - mean| / scale (the history's in-sample "
    "seasonal naive MAE) over the matched points that had a scale", LIVE_LABELS)
LIVE_SMAPE = Counter(
    "forecaster_live_smape", "Sum of the sMAPE terms (M4, percent) of the matched points",
    LIVE_LABELS)
LIVE_POINTS = Counter(
    "forecaster_live_points", "Actuals that met a logged forecast (forecast steps matched)",
    LIVE_LABELS)
LIVE_SCALED_POINTS = Counter(
    "forecaster_live_scaled_points", "Matched points that had a scale: the MASE's count",
    LIVE_LABELS)
LIVE_INTERVAL_HITS = Counter(
    "forecaster_live_interval_hits", "Matched points inside the central interval of `level`",
    (*LIVE_LABELS, "level"))
LIVE_INTERVAL_POINTS = Counter(
    "forecaster_live_interval_points", "Matched points of forecasts with the central interval "
    "of `level`", (*LIVE_LABELS, "level"))
ACTUALS_RECEIVED = Counter(
    "forecaster_actuals_received", "Observations stored by POST /actuals (new or not)")
ACTUALS_MATCHED = Counter(
    "forecaster_actuals_matched", "Observations posted that met at least one logged forecast")
FORECAST_LOG_DROPPED = Counter(
    "forecaster_forecast_log_dropped", "Forecast log rows (forecast steps) not written, the "
    "forecast itself answered: queue_full (the worker's queue was full), store_unavailable "
    "(the store was down), error", ["reason"])
# prometheus_client cannot remove a child in multiprocess mode (its samples stay in the
# worker's file): the version no longer served is set to NaN, which no alert comparison passes
BACKTEST_MASE = Gauge(
    "forecaster_backtest_mase", "Backtest MASE of the served version (its registry tag); NaN "
    "for a version no longer served", ["model_name", "model_version"],
    multiprocess_mode="livemostrecent")
ACCURACY_ALERT_FACTOR = Gauge(
    "forecaster_accuracy_alert_factor", "ForecastAccuracyDegraded fires when the live MASE "
    "exceeds this many times the backtest MASE", multiprocess_mode="livemax")
ACCURACY_ALERT_MIN_POINTS = Gauge(
    "forecaster_accuracy_alert_min_points", "ForecastAccuracyDegraded needs at least this many "
    "matched points over its window", multiprocess_mode="livemax")
_backtest_shown: list[tuple[str, str]] = []  # the labels BACKTEST_MASE was last set for


def observe_forward(model_version: int, series: int, seconds: float) -> None:
    BATCH_SIZE.observe(series)
    FORWARD_SECONDS.observe(seconds)
    SERIES_FORECAST.labels(model_version=str(model_version)).inc(series)


def show_backtest_mase(model_name: str, model_version: int, mase: float | None) -> None:
    """The served version's backtest MASE (None: not recorded); the previous version's, NaN."""
    labels = (model_name, str(model_version))
    for old in _backtest_shown:
        if old != labels:
            BACKTEST_MASE.labels(*old).set(math.nan)
    _backtest_shown[:] = []
    if mase is not None:
        BACKTEST_MASE.labels(*labels).set(mase)
        _backtest_shown.append(labels)


def start_live_series(model_name: str, model_version: int, quantiles: list[float]) -> None:
    """The served version's live accuracy series, at 0 for every horizon bucket and interval
    level it serves: Prometheus's ``increase()`` never counts a series' first sample, so a
    series born holding its first matches would leave them out of the drift alert."""
    levels = interval_levels({str(q): q for q in quantiles})
    for bucket in HORIZON_BUCKETS:
        labels = (model_name, str(model_version), bucket)
        for counter in (LIVE_ABS_ERROR, LIVE_SCALED_ERROR, LIVE_SMAPE, LIVE_POINTS,
                        LIVE_SCALED_POINTS):
            counter.labels(*labels)
        for level in levels:
            LIVE_INTERVAL_HITS.labels(*labels, level)
            LIVE_INTERVAL_POINTS.labels(*labels, level)


def observe_actuals(outcome: ActualsOutcome) -> None:
    """Count the posted actuals, and each new (forecast, actual) pair's error terms."""
    ACTUALS_RECEIVED.inc(outcome.accepted)
    ACTUALS_MATCHED.inc(outcome.matched)
    # summed per series of samples first: one increment each, not one per point
    increments: dict[tuple[Counter, tuple[str, ...]], float] = defaultdict(float)
    for match in outcome.new_matches:
        labels = (match.model_name, str(match.model_version), horizon_bucket(match.step))
        errors = point_errors(match.actual, match.mean, match.scale)
        increments[LIVE_ABS_ERROR, labels] += errors.abs_error
        increments[LIVE_SMAPE, labels] += errors.smape
        increments[LIVE_POINTS, labels] += 1
        if errors.scaled_error is not None:
            increments[LIVE_SCALED_ERROR, labels] += errors.scaled_error
            increments[LIVE_SCALED_POINTS, labels] += 1
        for level, hit in interval_hit(match.actual, match.quantiles).items():
            increments[LIVE_INTERVAL_HITS, (*labels, level)] += hit
            increments[LIVE_INTERVAL_POINTS, (*labels, level)] += 1
    for (counter, labels), amount in increments.items():
        counter.labels(*labels).inc(amount)
