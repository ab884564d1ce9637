"""The BentoML service: a thin HTTP layer over :mod:`serving.inference`.

    POST /forecast   forecasts for one or more series (adaptively batched)
    POST /explain    the same body: each forecast step's attention over the input time steps,
                     for a network with attention (batched the same way; serving.explain)
    POST /actuals    observed values: stored, and met with the forecasts logged for their
                     times (serving.forecast_log) into the live accuracy counters
    GET  /accuracy   the live accuracy per model version, from the store, beside the backtest's
    GET  /model      the served model: registry version, horizon, levels, backtest metrics
    GET  /readyz     200 once a model is loaded and warmed up, else 503 saying why;
                     /livez, /metrics: BentoML's

The model comes from the registry, checked before any of its code is imported
(serving.model_watcher, serving.model); a replica whose registry is unreachable at start, or
whose version fails, serves its last good model from its cache (serving.model_cache). A 5xx
body never carries a URI, a path or a credential: it says what failed, with an ``error_id``
that names the log line holding the details.

A network's series go through the batching dispatcher (serving.batching); a model refitted on
each series (an sktime baseline) runs them on a pool of threads shared fairly between requests
(serving.fair_pool), and a request it would not answer within the timeout is refused before
any work starts. A refused request is a 503 with the reason (and Retry-After when waiting
helps), logged as one WARNING line.

Each forecast with timestamps is logged to the forecast store (FORECASTER_STORE_URL; ``none``
turns the log, /actuals and /accuracy off) by a thread of the worker, never delaying the
answer. ``FORECASTER_API_TOKEN`` guards POST /actuals, and with ``FORECASTER_PROTECT_READS=true``
/forecast, /explain and /accuracy too (pipelines.api_token).

Run it with ``forecaster serve`` (or ``bentoml serve serving.service:Forecaster``); settings
come from :mod:`serving.config`.
"""

from __future__ import annotations

import gc
import logging
import math
import os
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import anyio
import bentoml
import mlflow
import numpy as np
import pydantic
import torch
from fastapi import FastAPI
from mlflow import MlflowClient
from pydantic import ConfigDict
from starlette.responses import JSONResponse, Response

from pipelines import signing
from pipelines.api_token import NO_TOKEN_NOTE, api_token, reads_protected
from pipelines.config import TrackingConfig
from pipelines.forecast_store import StoreUnavailable
from serving import metrics
from serving.batching import batched
from serving.config import load_serving_config
from serving.explain import explain_forward, prepare_explanation, render_explanations
from serving.fair_pool import FairPool
from serving.forecast_log import ForecastLog, Served
from serving.http_limits import BearerToken, BodySizeLimit, ExplainNotReady
from serving.inference import (
    Item,
    ModelOutputError,
    PreparedRequest,
    RequestError,
    ServiceBusy,
    admit,
    forward,
    prepare,
    render,
)
from serving.live_accuracy import (
    STORE_OFF_MESSAGE,
    STORE_RETRY_AFTER_S,
    accuracy_report,
    backtest_figures,
    observations,
    registry_backtest,
)
from serving.model import (
    Explanations,
    Forecasts,
    ServedModel,
    load_bento_model,
    load_cached,
    load_version,
)
from serving.model_cache import ModelCache
from serving.model_watcher import ModelWatcher, PinnedModel, new_error_id
from serving.schemas import (
    AccuracyResponse,
    ActualSeries,
    ActualsRequest,
    ActualsResponse,
    BacktestFigures,
    ErrorResponse,
    ExplainResponse,
    ForecastRequest,
    ForecastResponse,
    ModelInfo,
    Series,
)
from serving.store_access import StoreAccess

logger = logging.getLogger(__name__)
# BentoML's logging passes WARNING and above from other packages; ours say at INFO what the
# service did (a model loaded or swapped, a last good model kept)
logging.getLogger("serving").setLevel(logging.INFO)
CONFIG = load_serving_config()
# a registry that does not answer must not hold a starting replica for minutes per request
# (MLflow's defaults): the race's HTTP budget, unless MLflow's variables say otherwise
for _variable, _value in TrackingConfig().http_environment().items():
    os.environ.setdefault(_variable, _value)
# GET routes beside BentoML's POST APIs: a FastAPI app puts them in the OpenAPI document; the
# docs themselves are BentoML's (/ and /docs.json)
ROUTES = FastAPI(title="forecaster", docs_url=None, redoc_url=None, openapi_url=None)


class _OneLineRefusal(logging.Filter):
    """BentoML logs each body the request schema refuses at ERROR with pydantic's traceback;
    a 400 is the client's mistake, and the answer names the field: one WARNING line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, pydantic.ValidationError):
            first = error.errors()[0]
            where = ".".join(map(str, first["loc"])) or "body"
            # BentoML's message is "Exception on %s [%s]" % (path, method)
            path, method = record.args if len(record.args or ()) == 2 else ("?", "?")
            record.msg = "%s %s: 400, %d invalid field(s), the first %s: %s"
            record.args = (method, path, error.error_count(), where, first["msg"])
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


logging.getLogger("bentoml._internal.server.http_app").addFilter(_OneLineRefusal())


class _CountsRefusals:
    """A request schema that counts what it refuses (malformed JSON included) by reason."""

    @classmethod
    def model_validate_json(cls, json_data: Any, **kwargs: Any) -> Any:
        try:
            return super().model_validate_json(json_data, **kwargs)
        except pydantic.ValidationError as error:
            for reason in {e["type"] for e in error.errors()}:
                metrics.VALIDATION_FAILURES.labels(reason=reason).inc()
            raise


class ForecastInput(_CountsRefusals, ForecastRequest):
    model_config = ConfigDict(title="ForecastRequest")


class ActualsInput(_CountsRefusals, ActualsRequest):
    model_config = ConfigDict(title="ActualsRequest")


@bentoml.asgi_app(ROUTES, path="/")
@bentoml.service(
    name="forecaster",
    workers=CONFIG.workers,
    traffic={"timeout": CONFIG.timeout_seconds},
    logging={"access": {"enabled": CONFIG.access_log}},
    tracing={} if CONFIG.trace_requests else {"excluded_urls": ["/forecast", "/explain"]},
)
class Forecaster:
    def __init__(self) -> None:
        torch.set_num_threads(CONFIG.threads)
        mlflow.set_tracking_uri(CONFIG.tracking_uri)
        mlflow.set_registry_uri(CONFIG.registry_uri or CONFIG.tracking_uri)
        if CONFIG.bento_model:  # an exported Bento: its own model, whatever the registry says
            self.watcher = PinnedModel(partial(load_bento_model, CONFIG.bento_model,
                                               CONFIG.max_batch_size, CONFIG.refit_threads),
                                       on_outcome=_report_load)
        else:
            if signing.signing_key() is None:
                logger.warning("%s", signing.UNSIGNED_NOTE)
            cache = ModelCache(CONFIG.model_cache_dir, CONFIG.model_name, CONFIG.model_alias)
            warm = {"warmup_batch": CONFIG.max_batch_size, "refit_threads": CONFIG.refit_threads}
            self.watcher = ModelWatcher(
                MlflowClient(), CONFIG.model_name, CONFIG.model_alias, CONFIG.poll_seconds,
                on_outcome=_report_load, loader=partial(load_version, cache=cache, **warm),
                fallback=partial(load_cached, cache, CONFIG.model_alias, **warm),
                on_refused=lambda reason: metrics.MODEL_REFUSALS.labels(reason=reason).inc(),
                on_divergence=metrics.REGISTRY_DIVERGENCE.set)
        self.watcher.start()  # the registry's model loads in the background: see /readyz
        # concurrent requests share forward passes (serving.batching explains the set-up)
        self._batched = batched(_forward, CONFIG.max_batch_size, CONFIG.max_latency_ms,
                                _overloaded) if CONFIG.batching else None
        self._explain_batched = batched(explain_forward, CONFIG.max_batch_size,
                                        CONFIG.max_latency_ms, _overloaded) \
            if CONFIG.batching else None
        # without batching, one forward pass at a time per worker, as BentoML runs a
        # non-batchable API (its `threads` setting, default 1); batching has one batch in flight
        self._unbatched = anyio.CapacityLimiter(1)
        self._refits = FairPool(CONFIG.refit_threads)
        if api_token() is None:
            logger.warning("%s", NO_TOKEN_NOTE)
        metrics.ACCURACY_ALERT_FACTOR.set(CONFIG.accuracy_alert_factor)
        metrics.ACCURACY_ALERT_MIN_POINTS.set(CONFIG.accuracy_alert_min_points)
        self.store = StoreAccess(CONFIG.store) if CONFIG.store else None
        self.log: ForecastLog | None = None
        if self.store is not None:
            self.store.try_open()
            self.log = ForecastLog(
                self.store, CONFIG.forecast_log_queue_rows, CONFIG.forecast_log_batch_rows,
                CONFIG.forecast_log_flush_seconds, max_share=CONFIG.forecast_log_max_share,
                on_drop=lambda reason, rows:
                metrics.FORECAST_LOG_DROPPED.labels(reason=reason).inc(rows))
            self.log.start()
        self._backtests: dict[tuple[str, str], BacktestFigures] = {}  # of versions not served

    def __is_ready__(self) -> bool:
        return self.watcher.current is not None

    @bentoml.on_shutdown
    def stop_watching(self) -> None:
        self.watcher.stop()
        if self.log is not None:
            self.log.stop()
        if self.store is not None:
            self.store.close()

    @bentoml.api(route="/forecast", input_spec=ForecastInput, output_spec=ForecastResponse)
    async def forecast(self, series: list[Series], horizon: int,
                       quantiles: list[float] | None = None) -> Response:
        """Forecast each series ``horizon`` steps ahead with the model's quantiles."""
        model = self.watcher.current  # this request keeps this model, even across a swap
        if model is None:
            return _no_model(self)
        request = ForecastRequest.model_construct(series=series, horizon=horizon,
                                                  quantiles=quantiles)

        async def answer() -> bytes:
            prepared = prepare(request, model, CONFIG.max_series_per_request)
            forecasts = await self._forecasts(prepared)
            body = render(prepared, forecasts)
            if self.log is not None:  # the rows are made and written by the log's thread
                self.log.submit(Served(request, prepared, forecasts))
            return body

        return await _respond(model, len(series), answer)

    @bentoml.api(route="/explain", input_spec=ForecastInput, output_spec=ExplainResponse)
    async def explain(self, series: list[Series], horizon: int,
                      quantiles: list[float] | None = None) -> Response:
        """Why each forecast looks the way it does: per series, the attention of each of the
        ``horizon`` forecast steps (rows) over the input time steps (columns; each row sums to
        1), the most-attended steps and, for a model that weighs them, its covariates'
        importance. For a network with attention (GET /model: ``explains``); any other model
        gets a 400 naming the families that explain."""
        model = self.watcher.current
        if model is None:
            return _no_model(self)
        request = ForecastRequest.model_construct(series=series, horizon=horizon,
                                                  quantiles=quantiles)

        async def answer() -> bytes:
            prepared = prepare_explanation(request, model, CONFIG.max_series_per_request)
            items = prepared.items()
            explanations = await (self._explain_batched(items) if self._explain_batched
                                  else self._one_pass_at_a_time(explain_forward, items))
            return render_explanations(request, prepared, explanations)

        return await _respond(model, len(series), answer)

    @bentoml.api(route="/actuals", input_spec=ActualsInput, output_spec=ActualsResponse)
    async def actuals(self, series: list[ActualSeries]) -> Response:
        """Store observed values by (series id, time): posting the same ones again changes
        nothing, a new value replaces the old. Each value at the time of a forecast this
        service logged adds to the live accuracy (GET /accuracy, and the counters on /metrics).
        A 200 means the values are committed; 503 with Retry-After while the store is down
        (nothing is written); 401 without the API token when one is set."""
        if self.store is None:
            return _store_off()
        try:
            points = observations(series)
        except RequestError as error:
            metrics.VALIDATION_FAILURES.labels(reason=error.reason).inc()
            return JSONResponse(error.body(), status_code=400)
        try:
            outcome = await anyio.to_thread.run_sync(
                lambda: self.store.get().upsert_actuals(points))
        except StoreUnavailable as error:
            return _store_unavailable(error, "no actuals were written")
        metrics.observe_actuals(outcome)
        return JSONResponse({"accepted": outcome.accepted, "matched": outcome.matched})

    @ROUTES.get("/accuracy", response_model=AccuracyResponse, summary="Live accuracy",
                responses={503: {"model": ErrorResponse,
                                 "description": "the store is off or unavailable"}})
    async def accuracy(self, model_version: str | None = None, model_name: str | None = None
                       ) -> Response:
        """The live accuracy of each model version (or only of ``model_version`` and
        ``model_name``) over the forecasts logged and the actuals posted since: MAE, MASE (each
        error over the scale of its series' history), sMAPE (M4) and the coverage of each
        central interval served, overall and by horizon bucket, beside the version's backtest
        MASE, sMAPE and MAE from the registry."""
        if self.store is None:
            return _store_off()
        try:
            versions = await anyio.to_thread.run_sync(
                lambda: self.store.get().accuracy(model_version, model_name))
        except StoreUnavailable as error:
            return _store_unavailable(error, "the accuracy cannot be computed")
        backtests: dict[tuple[str, str], BacktestFigures] = {}
        for version in versions:  # outside the event loop: the registry may be slow
            key = (version.model_name, version.model_version)
            if key not in backtests:
                backtests[key] = await anyio.to_thread.run_sync(self._backtest, *key)
        report = accuracy_report(versions, backtests)
        return Response(report.model_dump_json(), media_type="application/json")

    def _backtest(self, name: str, version: str) -> BacktestFigures:
        """A version's backtest figures: the served model's own, else the registry's (kept)."""
        served = self.watcher.current
        if served is not None and (served.info.name, str(served.version)) == (name, version):
            return backtest_figures(served.info.metrics)
        if CONFIG.bento_model:  # an exported Bento has no registry to ask
            return BacktestFigures()
        if (name, version) not in self._backtests:
            figures = registry_backtest(MlflowClient(), name, version)
            if figures == BacktestFigures():  # not recorded, or no answer: asked again
                return figures
            self._backtests[name, version] = figures
        return self._backtests[name, version]

    @ROUTES.get("/model", response_model=ModelInfo, summary="The served model",
                responses={503: {"model": ErrorResponse, "description": "no model loaded yet"}})
    async def model_info(self) -> Response:
        """The served version, its horizon, quantile levels, shortest usable history, training
        time, backtest metrics, whether it explains (POST /explain) and, for a model refitted
        on each series, its cost per series."""
        model = self.watcher.current
        if model is None:
            return _no_model(self)
        return Response(model.info.model_dump_json(), media_type="application/json")

    async def _forecasts(self, prepared: PreparedRequest) -> Forecasts:
        items = prepared.items()
        cost = prepared.model.info.refit_cost
        if cost is not None:  # a local model: one fit per series, shared fairly
            costs = [cost.seconds(len(history)) for _, history in items]
            admit(sum(costs), self._refits.finish_estimate(sum(costs)), CONFIG.timeout_seconds,
                  len(items))
            return await self._refits.run([partial(_forward_one, item) for item in items],
                                          costs)
        if self._batched is not None:
            return await self._batched(items)
        return await self._one_pass_at_a_time(_forward, items)

    async def _one_pass_at_a_time(self, passes: Callable[[list[list[Item]]], list],
                                  items: list[Item]) -> Forecasts | Explanations:
        """Without batching: ``passes`` over ``items``, at most max_batch_size per pass."""
        results = []
        for start in range(0, len(items), CONFIG.max_batch_size):
            results += (await anyio.to_thread.run_sync(
                passes, [items[start:start + CONFIG.max_batch_size]],
                limiter=self._unbatched))[0]
        return results


Forecaster.add_asgi_middleware(BodySizeLimit, max_bytes=CONFIG.max_body_bytes,
                               on_reject=lambda: metrics.VALIDATION_FAILURES.labels(
                                   reason="body_too_large").inc())
Forecaster.add_asgi_middleware(ExplainNotReady, path="/readyz",
                               reason=lambda: _why_no_model(bentoml.get_current_service()))
# what writes needs the token, and with FORECASTER_PROTECT_READS=true what reads forecasts
Forecaster.add_asgi_middleware(
    BearerToken, token=api_token(),
    paths={"/actuals", *(("/forecast", "/explain", "/accuracy") if reads_protected() else ())})


async def _respond(model: ServedModel, n_series: int, answer: Callable[[], Awaitable[bytes]]
                   ) -> Response:
    """The JSON ``answer`` computes, or the error it raises as a 400, 503 or 500."""
    try:
        body = await answer()
    except RequestError as error:
        metrics.VALIDATION_FAILURES.labels(reason=error.reason).inc()
        return JSONResponse(error.body(), status_code=400)
    except ServiceBusy as error:
        metrics.REQUESTS_REFUSED.labels(reason=error.reason).inc()
        logger.warning("503 for a request of %d series: %s", n_series, error)
        return JSONResponse(error.body(), status_code=503, headers=error.headers())
    except ModelOutputError as error:
        metrics.NONFINITE_FORECASTS.labels(model_version=str(model.version)).inc()
        error_id = new_error_id()
        logger.error("error %s: 500: %s", error_id, error)
        return JSONResponse({**error.body(), "error_id": error_id}, status_code=500)
    except Exception:  # what BentoML would answer with a bare 500: this one has an id
        error_id = new_error_id()
        logger.exception("error %s: 500 for a request of %d series", error_id, n_series)
        return JSONResponse({"error": "internal error: the service could not answer this "
                                      f"request (error id {error_id})", "detail": [],
                             "error_id": error_id}, status_code=500)
    # the body is already JSON: BentoML's own serialisation would derive a JSON schema per
    # response, which costs more than the forecast
    return Response(body, media_type="application/json")


def _forward(jobs: list[list[Item]]) -> list[Forecasts]:
    return forward(jobs, observe=lambda model, n, seconds: metrics.observe_forward(
        model.version, n, seconds))


def _forward_one(item: Item) -> np.ndarray | Exception:
    return _forward([[item]])[0][0]


def _report_load(outcome: str, model: ServedModel | None) -> None:
    # the libraries and the model are millions of long-lived objects: a full collection over
    # them stalls every request for a few hundred ms, so they leave the collector's view
    gc.freeze()
    metrics.MODEL_LOADS.labels(outcome=outcome).inc()
    if model is not None:
        metrics.SERVED_VERSION.labels(model_name=model.info.name,
                                      alias=model.info.alias).set(model.version)
        metrics.SERVED_FROM_CACHE.set(int(model.info.source == "cache"))
        metrics.show_backtest_mase(model.info.name, model.version, model.info.metrics.get("mase"))
        metrics.start_live_series(model.info.name, model.version, model.info.quantiles)


def _overloaded() -> None:
    raise ServiceBusy("overloaded", "the service is overloaded: the request waited longer than "
                      f"max_latency_ms={CONFIG.max_latency_ms} for a forward pass",
                      retry_after=math.ceil(CONFIG.max_latency_ms / 1000))


def _why_no_model(service: Forecaster | None) -> str | None:
    """Why no model is served (None while one is)."""
    if service is None:
        return "the service is starting"
    if service.watcher.current is not None:
        return None
    return service.watcher.last_error or \
        f"{CONFIG.model_name}@{CONFIG.model_alias} is loading"


def _store_off() -> Response:
    return JSONResponse({"error": STORE_OFF_MESSAGE, "detail": []}, status_code=503)


def _store_unavailable(error: StoreUnavailable, consequence: str) -> Response:
    """A 503 saying the store is down and what follows (its URL is in the log only)."""
    logger.warning("503: %s: %s", consequence, error)
    return JSONResponse({"error": f"the forecast store is unavailable: {consequence}; try "
                                  "again later", "detail": []}, status_code=503,
                        headers={"Retry-After": str(STORE_RETRY_AFTER_S)})


def _no_model(service: Forecaster | None) -> Response:
    error_id = service.watcher.error_id if service is not None else None
    return JSONResponse({"error": f"no model is served: {_why_no_model(service)}",
                         "detail": [], "error_id": error_id}, status_code=503)

