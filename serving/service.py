"""The BentoML service: a thin HTTP layer over :mod:`serving.inference`.

    POST /forecast   forecasts for one or more series (adaptively batched)
    GET  /model      the served model: registry version, horizon, levels, backtest metrics
    GET  /readyz     200 once a model is loaded and warmed up; /livez, /metrics: BentoML's

Run it with ``forecaster serve`` (or ``bentoml serve serving.service:Forecaster``); settings
come from :mod:`serving.config`.
"""

from __future__ import annotations

import gc
import logging
from functools import partial
from typing import Any

import anyio
import bentoml
import mlflow
import pydantic
import torch
from bentoml.exceptions import ServiceUnavailable
from mlflow import MlflowClient
from pydantic import ConfigDict
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving import metrics
from serving.batching import batched
from serving.config import load_serving_config
from serving.http_limits import BodySizeLimit
from serving.inference import Item, RequestError, forward, prepare, render
from serving.model import Forecasts, ServedModel, load_bento_model, load_version
from serving.model_watcher import ModelWatcher, PinnedModel
from serving.schemas import ForecastRequest, ForecastResponse, Series

logger = logging.getLogger(__name__)
CONFIG = load_serving_config()


class ForecastInput(ForecastRequest):
    """The request schema, counting what it refuses (malformed JSON included) by reason."""

    model_config = ConfigDict(title="ForecastRequest")

    @classmethod
    def model_validate_json(cls, json_data: Any, **kwargs: Any) -> ForecastInput:
        try:
            return super().model_validate_json(json_data, **kwargs)
        except pydantic.ValidationError as error:
            for reason in {e["type"] for e in error.errors()}:
                metrics.VALIDATION_FAILURES.labels(reason=reason).inc()
            raise


async def model_info(_: Request) -> Response:
    service = bentoml.get_current_service()
    model = service.watcher.current if service is not None else None
    if model is None:
        return _no_model(service)
    return Response(model.info.model_dump_json(), media_type="application/json")


@bentoml.asgi_app(Starlette(routes=[Route("/", model_info, methods=["GET"])]), path="/model")
@bentoml.service(
    name="forecaster",
    workers=CONFIG.workers,
    traffic={"timeout": 60},
    logging={"access": {"enabled": CONFIG.access_log}},
    tracing={} if CONFIG.trace_requests else {"excluded_urls": ["/forecast"]},
)
class Forecaster:
    def __init__(self) -> None:
        torch.set_num_threads(CONFIG.threads)
        mlflow.set_tracking_uri(CONFIG.tracking_uri)
        mlflow.set_registry_uri(CONFIG.registry_uri or CONFIG.tracking_uri)
        if CONFIG.bento_model:  # an exported Bento: its own model, whatever the registry says
            self.watcher = PinnedModel(partial(load_bento_model, CONFIG.bento_model,
                                               CONFIG.max_batch_size), on_outcome=_report_load)
        else:
            self.watcher = ModelWatcher(MlflowClient(), CONFIG.model_name, CONFIG.model_alias,
                                        CONFIG.poll_seconds, on_outcome=_report_load,
                                        loader=partial(load_version,
                                                       warmup_batch=CONFIG.max_batch_size))
        self.watcher.start()  # the registry's model loads in the background: see /readyz
        # concurrent requests share forward passes (serving.batching explains the set-up)
        self._batched = batched(_forward, CONFIG.max_batch_size, CONFIG.max_latency_ms,
                                _overloaded) if CONFIG.batching else None
        # without batching, one forward pass at a time per worker, as BentoML runs a
        # non-batchable API (its `threads` setting, default 1); batching has one batch in flight
        self._unbatched = anyio.CapacityLimiter(1)

    def __is_ready__(self) -> bool:
        return self.watcher.current is not None

    @bentoml.on_shutdown
    def stop_watching(self) -> None:
        self.watcher.stop()

    @bentoml.api(route="/forecast", input_spec=ForecastInput, output_spec=ForecastResponse)
    async def forecast(self, series: list[Series], horizon: int,
                       quantiles: list[float] | None = None) -> Response:
        """Forecast each series ``horizon`` steps ahead with the model's quantiles."""
        model = self.watcher.current  # this request keeps this model, even across a swap
        if model is None:
            return _no_model(self)
        request = ForecastRequest.model_construct(series=series, horizon=horizon,
                                                  quantiles=quantiles)
        try:
            prepared = prepare(request, model, CONFIG.max_series_per_request)
            items = prepared.items()
            if self._batched is not None:
                forecasts = await self._batched(items)
            else:
                forecasts = (await anyio.to_thread.run_sync(_forward, [items],
                                                             limiter=self._unbatched))[0]
            body = render(prepared, forecasts)
        except RequestError as error:
            metrics.VALIDATION_FAILURES.labels(reason=error.reason).inc()
            return JSONResponse(error.body(), status_code=400)
        # the body is already JSON: BentoML's own serialisation would derive a JSON schema
        # per response, which costs more than the forecast
        return Response(body, media_type="application/json")


Forecaster.add_asgi_middleware(BodySizeLimit, max_bytes=CONFIG.max_body_bytes,
                               on_reject=lambda: metrics.VALIDATION_FAILURES.labels(
                                   reason="body_too_large").inc())


def _forward(jobs: list[list[Item]]) -> list[Forecasts]:
    return forward(jobs, observe=lambda model, n, seconds: metrics.observe_forward(
        model.version, n, seconds))


def _report_load(outcome: str, model: ServedModel | None) -> None:
    # the libraries and the model are millions of long-lived objects: a full collection over
    # them stalls every request for a few hundred ms, so they leave the collector's view
    gc.freeze()
    metrics.MODEL_LOADS.labels(outcome=outcome).inc()
    if model is not None:
        metrics.SERVED_VERSION.labels(model_name=model.info.name,
                                      alias=model.info.alias).set(model.version)


def _overloaded() -> None:
    raise ServiceUnavailable("the service is overloaded: the request waited longer than "
                             f"max_latency_ms={CONFIG.max_latency_ms} for a forward pass")


def _no_model(service: Forecaster | None) -> Response:
    why = service.watcher.last_error if service is not None else None
    return JSONResponse({"error": f"no model is loaded yet ({why or 'loading'}); "
                                  "see GET /readyz", "detail": []}, status_code=503)

