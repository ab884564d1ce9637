"""The service's own Prometheus metrics, exposed on BentoML's /metrics beside its built-ins.

``bentoml serve`` sets PROMETHEUS_MULTIPROC_DIR before its workers import this module, so each
worker writes its samples to files there and /metrics sums them over workers: counters and
histograms add up, the served-version gauge reports the most recent value of a live worker, and
the cache and divergence gauges the highest (1 when any worker is in that state).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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


def observe_forward(model_version: int, series: int, seconds: float) -> None:
    BATCH_SIZE.observe(series)
    FORWARD_SECONDS.observe(seconds)
    SERIES_FORECAST.labels(model_version=str(model_version)).inc(series)
