"""The service's request path as plain functions, without a server: schemas, checks against
the model, the batched forward pass, a refitted baseline, rendering (never a non-finite number),
admission, the fair pool, hot swap, batching, the middlewares and the log filter."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
from functools import partial
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError
from sktime.forecasting.naive import NaiveForecaster
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from forecaster.data import SERIES, TARGET, panel_to_long
from pipelines import registry as race_registry
from pipelines.forecasts import POINT, quantile_column
from pipelines.signing import Untrusted
from serving.batching import batched
from serving.config import load_serving_config
from serving.fair_pool import FairPool
from serving.http_limits import BodySizeLimit, ExplainNotReady
from serving.inference import (
    ModelOutputError,
    RequestError,
    ServiceBusy,
    admit,
    forward,
    prepare,
    render,
)
from serving.model import ServedModel, load_cached, load_version, resolve_alias
from serving.model_cache import ModelCache
from serving.model_watcher import ModelWatcher
from serving.schemas import ForecastRequest
from tests.conftest import PERIOD, _free_port, sine_series
from tests.pipeline_support import clean_mlflow_environment
from tests.serving_support import HORIZON, MODEL_NAME, Registry, make_registry, register

BASELINE = "serving-test-baseline"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, sine_panel: pd.DataFrame) -> Registry:
    with clean_mlflow_environment():
        yield make_registry(tmp_path_factory.mktemp("serving"), sine_panel)


@pytest.fixture(scope="module")
def champion(store: Registry) -> ServedModel:
    version = resolve_alias(store.client, MODEL_NAME, "champion")
    return load_version(store.client, version, "champion", warmup_batch=8)


@pytest.fixture(scope="module")
def baseline(store: Registry, sine_panel: pd.DataFrame) -> ServedModel:
    """Seasonal naive (sp = the panel's period) registered as a race registers it, and served
    as the service serves it: refitted on each history, on two threads."""
    estimator = NaiveForecaster(strategy="last", sp=PERIOD).fit(
        sine_panel, fh=list(range(1, HORIZON + 1)))
    number = register(estimator, sine_panel, name=BASELINE, levels=[0.1, 0.5, 0.9])
    return load_version(store.client, store.client.get_model_version(BASELINE, str(number)),
                        "champion", refit_threads=2)


def histories(panel: pd.DataFrame) -> dict[str, list[float]]:
    return {str(key): group[TARGET].tolist()
            for key, group in panel.reset_index().groupby(SERIES)}


def request_for(panel: pd.DataFrame, **fields) -> ForecastRequest:
    series = [{"id": key, "values": values} for key, values in histories(panel).items()]
    return ForecastRequest.model_validate({"series": series, "horizon": HORIZON, **fields})


def answer(request: ForecastRequest, model: ServedModel) -> dict:
    prepared = prepare(request, model, max_series=100)
    return json.loads(render(prepared, forward([prepared.items()])[0]))


# ---------------------------------------------------------------- the numbers
def test_forecasts_equal_the_estimators_own_predict(store: Registry, champion: ServedModel,
                                                    sine_panel: pd.DataFrame) -> None:
    body = answer(request_for(sine_panel), champion)
    estimator = store.estimators[champion.version]
    fh = list(range(1, HORIZON + 1))
    point = estimator.predict(fh)
    bands = estimator.predict_quantiles(fh, alpha=[0.1, 0.9])
    assert body["model"] == {"name": MODEL_NAME, "version": 1, "alias": "champion"}
    assert [f["id"] for f in body["forecasts"]] == ["a", "b", "c"]
    for forecast in body["forecasts"]:
        expected = point.xs(forecast["id"], level=0).to_numpy().ravel()
        np.testing.assert_allclose(forecast["mean"], expected, rtol=1e-5, atol=1e-5)
        for level in (0.1, 0.9):
            column = bands.xs(forecast["id"], level=0).iloc[:, [0.1, 0.9].index(level)]
            np.testing.assert_allclose(forecast["quantiles"][f"{level:g}"], column.to_numpy(),
                                       rtol=1e-5, atol=1e-5)
        assert len(forecast["mean"]) == HORIZON and "timestamps" not in forecast


def test_unseen_series_are_forecast_from_their_history(champion: ServedModel) -> None:
    rng = np.random.default_rng(7)
    values = (5 + np.sin(np.arange(40) / 2) + 0.1 * rng.standard_normal(40)).tolist()
    request = ForecastRequest.model_validate(
        {"series": [{"id": "new", "values": values}], "horizon": 3, "quantiles": [0.5, 0.9]})
    forecast = answer(request, champion)["forecasts"][0]
    assert len(forecast["mean"]) == 3 and set(forecast["quantiles"]) == {"0.5", "0.9"}
    assert forecast["mean"] == forecast["quantiles"]["0.5"]
    assert all(m <= q for m, q in zip(forecast["mean"], forecast["quantiles"]["0.9"],
                                      strict=True))
    assert all(3 < v < 7 for v in forecast["mean"])  # near the history's level


def test_timestamps_follow_start_and_freq(champion: ServedModel) -> None:
    # as JSON, as over HTTP: the schema is strict, and only JSON spells a time as a string
    request = ForecastRequest.model_validate_json(json.dumps({"series": [
        {"id": "x", "values": [1.0] * 30, "start": "2024-03-01T00:00:00", "freq": "h"},
        {"id": "y", "values": [2.0] * 30}], "horizon": 2}))
    first, second = answer(request, champion)["forecasts"]
    assert first["timestamps"] == ["2024-03-02T06:00:00", "2024-03-02T07:00:00"]
    assert "timestamps" not in second


def test_one_forward_pass_per_model_in_a_batch(store: Registry, champion: ServedModel,
                                               sine_panel: pd.DataFrame) -> None:
    other = load_version(store.client, store.client.get_model_version(MODEL_NAME, "2"),
                         "champion", warmup_batch=1)
    calls = []
    jobs = [prepare(request_for(sine_panel), model, 100).items()
            for model in (champion, other, champion)]
    results = forward(jobs, observe=lambda model, n, _: calls.append((model.version, n)))
    assert sorted(calls) == [(1, 6), (2, 3)]
    np.testing.assert_array_equal(results[0][0], results[2][0])
    assert not np.allclose(results[0][0], results[1][0])  # version 2 answered job 2


def test_a_baseline_is_refitted_on_each_history(baseline: ServedModel,
                                                sine_panel: pd.DataFrame) -> None:
    body = answer(request_for(sine_panel, quantiles=[0.1, 0.9]), baseline)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{BASELINE}/{baseline.version}")
    expected = pyfunc.predict(panel_to_long(sine_panel), params={"horizon": HORIZON})
    assert [f["id"] for f in body["forecasts"]] == ["a", "b", "c"]
    for forecast in body["forecasts"]:
        rows = expected[expected[SERIES] == forecast["id"]]
        np.testing.assert_allclose(forecast["mean"], rows[POINT], rtol=1e-9)
        for level in (0.1, 0.9):
            np.testing.assert_allclose(forecast["quantiles"][f"{level:g}"],
                                       rows[quantile_column(level)], rtol=1e-9)


def test_the_minimum_history_comes_from_the_model(store: Registry, champion: ServedModel,
                                                  baseline: ServedModel) -> None:
    assert champion.info.min_history == store.estimators[champion.version].min_history_
    assert baseline.info.min_history == PERIOD + 1  # the last season and one residual
    shortest = {"id": "a", "values": sine_series(PERIOD + 1).tolist()}
    forecast = answer(ForecastRequest.model_validate({"series": [shortest], "horizon": 3}),
                      baseline)["forecasts"][0]
    assert len(forecast["mean"]) == 3
    too_short = {"series": [shortest, {"id": "b", "values": [1.0] * PERIOD}], "horizon": 3}
    with pytest.raises(RequestError) as caught:
        prepare(ForecastRequest.model_validate(too_short), baseline, max_series=100)
    assert (caught.value.loc, caught.value.reason) == (("series", 1, "values"),
                                                       "history_too_short")
    assert f"has {PERIOD} values; the model needs at least {PERIOD + 1}" in caught.value.message


def test_a_refitted_models_cost_is_measured_at_load(champion: ServedModel,
                                                    baseline: ServedModel) -> None:
    cost = baseline.info.refit_cost
    assert cost is not None and cost.fixed >= 0 and cost.per_value >= 0
    assert 0 < cost.seconds(100) < 5  # a naive refit: milliseconds, not seconds
    assert champion.info.refit_cost is None  # a network: one forward pass for all series


# ---------------------------------------------------------------- never a non-finite number
def test_values_that_overflow_the_models_dtype_are_refused(champion: ServedModel,
                                                           baseline: ServedModel) -> None:
    huge = [1e19, 0.0] * 20
    # the network computes in float32, where the scale of these values overflows
    assert not np.isfinite(champion.predict([np.asarray(huge, np.float32)])[0]).all()
    body = {"series": [{"id": "fine", "values": [1e15] * 40}, {"id": "huge", "values": huge}],
            "horizon": 2}
    with pytest.raises(RequestError) as caught:
        prepare(ForecastRequest.model_validate(body), champion, max_series=100)
    assert (caught.value.loc, caught.value.reason) == (("series", 1, "values"),
                                                       "value_too_large")
    assert "'huge'" in caught.value.message and "float32" in caught.value.message
    # the baseline computes in float64, where they are fine
    forecast = answer(ForecastRequest.model_validate(body), baseline)["forecasts"][1]
    assert np.isfinite(forecast["mean"]).all() and max(forecast["mean"]) == pytest.approx(1e19)


def test_a_non_finite_forecast_is_withheld(champion: ServedModel,
                                           sine_panel: pd.DataFrame) -> None:
    prepared = prepare(request_for(sine_panel), champion, max_series=100)
    forecasts = forward([prepared.items()])[0]
    render(prepared, forecasts)  # finite: rendered
    forecasts[1] = forecasts[1].copy()
    forecasts[1][2, -1] = np.inf  # the highest level of a step
    with pytest.raises(ModelOutputError) as caught:
        render(prepared, forecasts)
    assert "series 'b' (series.1)" in str(caught.value)
    assert caught.value.body()["detail"][0]["loc"] == ["series", 1]


# ---------------------------------------------------------------- admission (refitted models)
def test_a_request_too_costly_alone_is_refused_without_retry() -> None:
    with pytest.raises(ServiceBusy) as caught:
        admit(cost=12.0, finish=12.0, timeout=10.0, series=100)
    error = caught.value
    assert (error.reason, error.retry_after, error.headers()) == ("too_costly", None, {})
    assert "about 12 s" in error.message and "at most 83 such series" in error.message


def test_a_request_delayed_past_the_timeout_is_refused_with_retry_after() -> None:
    admit(cost=6.0, finish=9.5, timeout=10.0, series=60)  # in time: admitted
    with pytest.raises(ServiceBusy) as caught:
        admit(cost=6.0, finish=13.2, timeout=10.0, series=60)
    assert (caught.value.reason, caught.value.headers()) == ("busy", {"Retry-After": "4"})
    assert "about 13 s" in caught.value.message


# ---------------------------------------------------------------- the fair pool
def test_the_pool_takes_one_series_of_each_request_in_turn() -> None:
    order: list[str] = []

    def task(name: str) -> str:
        order.append(name)
        time.sleep(0.02)
        return name.upper()

    async def scenario() -> tuple[list, list]:
        pool = FairPool(threads=1)
        big = asyncio.ensure_future(pool.run([lambda i=i: task(f"big{i}") for i in range(10)],
                                             [1.0] * 10))
        await asyncio.sleep(0.03)  # the big request is running
        small = await pool.run([lambda: task("small")], [1.0])
        return await big, small

    big, small = asyncio.run(scenario())
    assert big == [f"BIG{i}" for i in range(10)] and small == ["SMALL"]
    assert order.index("small") <= 3  # after the series in progress, not after all ten


def test_a_cancelled_request_leaves_the_pool_and_its_series_never_run() -> None:
    ran: list[int] = []

    def task(i: int) -> int:
        ran.append(i)
        time.sleep(0.02)
        return i

    async def scenario() -> float:
        pool = FairPool(threads=1)
        request = asyncio.ensure_future(pool.run([lambda i=i: task(i) for i in range(50)],
                                                 [0.5] * 50))
        await asyncio.sleep(0.05)
        assert pool.finish_estimate(1.0) == pytest.approx(2.0)  # 1 + min(cost left, 1)
        request.cancel()  # as BentoML's timeout does
        with pytest.raises(asyncio.CancelledError):
            await request
        await asyncio.sleep(0.2)
        return pool.finish_estimate(1.0)

    assert asyncio.run(scenario()) == 1.0  # nothing left in progress
    assert len(ran) <= 5


def test_a_failing_task_fails_its_request_and_drops_the_rest() -> None:
    ran: list[int] = []

    def task(i: int) -> int:
        ran.append(i)
        if i == 1:
            raise RuntimeError("boom")
        return i

    async def scenario() -> None:
        await FairPool(threads=1).run([lambda i=i: task(i) for i in range(5)], [1.0] * 5)

    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(scenario())
    assert ran == [0, 1]


def test_the_estimate_shares_the_threads_with_the_requests_in_progress() -> None:
    release = threading.Event()

    async def scenario() -> list[float]:
        pool = FairPool(threads=1)
        work = asyncio.ensure_future(pool.run([release.wait, release.wait], [1.5, 1.5]))
        await asyncio.sleep(0.02)
        estimates = [pool.finish_estimate(1.0), pool.finish_estimate(5.0)]
        release.set()
        await work
        return estimates

    # 3 s in progress: a 1 s request waits for 1 s of it, a 5 s request for all 3 s
    assert asyncio.run(scenario()) == [2.0, 8.0]


# ---------------------------------------------------------------- bad input, by field
@pytest.mark.parametrize("body, loc, kind", [
    ({"series": [{"id": "a", "values": [1.0, float("nan")]}], "horizon": 2},
     ("series", 0, "values", 1), "finite_number"),
    ({"series": [{"id": "a", "values": [1.0, float("inf")]}], "horizon": 2},
     ("series", 0, "values", 1), "finite_number"),
    ({"series": [{"id": "a", "values": [1.0, "x"]}], "horizon": 2},
     ("series", 0, "values", 1), "float_type"),
    ({"series": [{"id": "a", "values": []}], "horizon": 2}, ("series", 0, "values"),
     "too_short"),
    ({"series": [], "horizon": 2}, ("series",), "too_short"),
    ({"series": [{"id": "a", "values": [1.0]}], "horizon": 0}, ("horizon",), "greater_than_equal"),
    ({"series": [{"id": "a", "values": [1.0]}], "horizon": -3}, ("horizon",), "greater_than_equal"),
    ({"series": [{"id": "a", "values": [1.0]}, {"id": "a", "values": [2.0]}], "horizon": 1},
     ("series",), "value_error"),
    ({"series": [{"id": "a", "values": [1.0], "start": "2024-01-01"}], "horizon": 1},
     ("series", 0), "value_error"),
    ({"series": [{"id": "a", "values": [1.0]}], "horizon": 1, "quantiles": [0.0]},
     ("quantiles", 0), "value_error"),
    ({"series": [{"id": "a", "values": [1.0], "start": "2024-01-01", "freq": "fortnight"}],
      "horizon": 1}, ("series", 0, "freq"), "value_error"),
    ({"series": [{"id": "a", "values": [1.0]}], "horizon": 1, "quantiles": [1.5]},
     ("quantiles", 0), "less_than_equal"),
    # strict types: no string or boolean is taken for a number
    ({"series": [{"id": "a", "values": [1.0]}], "horizon": "7"}, ("horizon",), "int_type"),
    ({"series": [{"id": "a", "values": [1.0]}], "horizon": True}, ("horizon",), "int_type"),
    ({"series": [{"id": "a", "values": [1.0]}], "horizon": 7.0}, ("horizon",), "int_type"),
    ({"series": [{"id": "a", "values": [1.0, True]}], "horizon": 1},
     ("series", 0, "values", 1), "float_type"),
    ({"series": [{"id": "a", "values": ["1.5"]}], "horizon": 1},
     ("series", 0, "values", 0), "float_type"),
    ({"series": [{"id": "a", "values": [1.0]}], "horizon": 1, "quantiles": ["0.5"]},
     ("quantiles", 0), "float_type"),
    ({"series": [{"id": 7, "values": [1.0]}], "horizon": 1}, ("series", 0, "id"), "string_type"),
    ({"series": [{"id": "a", "values": [1.0], "start": 1700000000, "freq": "h"}],
      "horizon": 1}, ("series", 0, "start", "datetime"), "datetime_type"),
])
def test_schema_errors_name_the_field(body: dict, loc: tuple, kind: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ForecastRequest.model_validate_json(json.dumps(body))  # NaN/Infinity literals too
    errors = caught.value.errors()
    assert (loc, kind) in [(e["loc"], e["type"]) for e in errors], errors


def test_malformed_json_is_a_validation_error() -> None:
    with pytest.raises(ValidationError) as caught:
        ForecastRequest.model_validate_json(b'{"series": [')
    assert caught.value.errors()[0]["type"] == "json_invalid"


@pytest.mark.parametrize("fields, loc, reason", [
    ({"horizon": HORIZON + 1}, ("horizon",), "horizon_too_large"),
    ({"quantiles": [0.5, 0.33]}, ("quantiles", 1), "unknown_quantile"),
    ({"series": [{"id": "a", "values": [1.0, 2.0]}]}, ("series", 0, "values"),
     "history_too_short"),
])
def test_model_checks_name_the_field(champion: ServedModel, fields: dict, loc: tuple,
                                     reason: str) -> None:
    body = {"series": [{"id": "a", "values": [1.0] * 30}], "horizon": HORIZON, **fields}
    with pytest.raises(RequestError) as caught:
        prepare(ForecastRequest.model_validate(body), champion, max_series=100)
    assert (caught.value.loc, caught.value.reason) == (loc, reason)
    assert caught.value.body()["detail"][0]["loc"] == list(loc)
    assert ".".join(map(str, loc)) in caught.value.body()["error"]


def test_too_many_series_per_request(champion: ServedModel) -> None:
    body = {"series": [{"id": str(i), "values": [1.0] * 30} for i in range(3)], "horizon": 1}
    with pytest.raises(RequestError, match="at most 2 per request"):
        prepare(ForecastRequest.model_validate(body), champion, max_series=2)


# ---------------------------------------------------------------- hot swap
def test_the_watcher_loads_swaps_and_survives_a_broken_version(
        store: Registry, sine_panel: pd.DataFrame, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "serving")
    outcomes, refusals, diverged = [], [], []
    watcher = ModelWatcher(store.client, MODEL_NAME, "champion", poll_seconds=60,
                           on_outcome=lambda outcome, model: outcomes.append(outcome),
                           on_refused=refusals.append, on_divergence=diverged.append)
    assert watcher.poll() == "loaded" and watcher.current.version == 1
    assert watcher.poll() == "unchanged"
    race_registry.set_alias(MODEL_NAME, "champion", 2)
    old = watcher.current
    assert watcher.poll() == "swapped" and watcher.current.version == 2
    assert old.predict([np.ones(30, np.float32)])[0].shape == (HORIZON, 8)  # still usable
    assert diverged == [False, False, False]

    # the files of v2, registered again without the tags of a race: refused, never downloaded
    source = store.client.get_model_version(MODEL_NAME, "2").source
    unvouched = store.client.create_model_version(MODEL_NAME, source=source)
    race_registry.set_alias(MODEL_NAME, "champion", int(unvouched.version))
    assert watcher.poll() == "refused" and watcher.current.version == 2
    assert refusals == ["incomplete"] and diverged[-1] is True
    assert watcher.last_error == f"{MODEL_NAME} v{unvouched.version} was refused: no race " \
        f"vouched for it as it is (error id {watcher.error_id})"
    assert f"error {watcher.error_id}: {MODEL_NAME} v{unvouched.version} refused before " \
           "loading" in caplog.text

    # the tags of a race on files that are gone: the load fails
    tags = store.client.get_model_version(MODEL_NAME, "2").tags
    broken = store.client.create_model_version(MODEL_NAME, source="/nonexistent/model",
                                               tags=tags)
    race_registry.set_alias(MODEL_NAME, "champion", int(broken.version))
    assert watcher.poll() == "failed" and watcher.current.version == 2
    assert watcher.poll() == "unchanged"  # not retried until the alias moves
    assert diverged[-2:] == [True, True]
    # what a client may read names no path; the log line with the same id has the details
    assert watcher.last_error == f"loading {MODEL_NAME} v{broken.version} failed (error id " \
        f"{watcher.error_id})"
    logged = [r for r in caplog.records if f"error {watcher.error_id}" in r.getMessage()]
    assert len(logged) == 1 and "/nonexistent" in logged[0].exc_text

    race_registry.set_alias(MODEL_NAME, "champion", 1)
    assert watcher.poll() == "swapped" and watcher.current.version == 1
    assert outcomes == ["loaded", "swapped", "failed", "swapped"] and diverged[-1] is False
    assert f"{MODEL_NAME} v1 swapped from the registry (was v2 from the registry)" in caplog.text


def test_the_last_good_model_serves_while_the_registry_cannot(
        store: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    cache = ModelCache(tmp_path, MODEL_NAME, "champion")
    loader = partial(load_version, warmup_batch=8, cache=cache)
    first = ModelWatcher(store.client, MODEL_NAME, "champion", 60, loader=loader)
    assert first.poll() == "loaded"
    version = first.current.version
    # kept, the download moved into the cache: nothing left in the staging folder
    files, meta = cache.last()
    assert meta["version"] == version and (files / "MLmodel").is_file()
    assert not any((tmp_path / ".staging").iterdir())

    # a replica starting while the registry does not answer (one quick try)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    dead = f"http://127.0.0.1:{_free_port()}"
    loads, diverged = [], []
    watcher = ModelWatcher(mlflow.MlflowClient(dead, dead), MODEL_NAME, "champion", 60,
                           loader=loader, on_outcome=lambda o, m: loads.append(o),
                           on_divergence=diverged.append,
                           fallback=partial(load_cached, cache, "champion", warmup_batch=8))
    assert watcher.poll() == "unreachable"
    assert watcher.current.version == version and watcher.current.info.source == "cache"
    assert loads == ["loaded"] and diverged == []  # the registry's alias is unknown
    assert dead not in (watcher.last_error or "")
    # the registry answers again, naming the same version: loaded from it, the source follows
    watcher.client = store.client
    assert watcher.poll() == "swapped" and watcher.current.info.source == "registry"
    assert diverged == [False]

    # a kept copy whose files changed is refused like a registry version
    (files / "MLmodel").write_text((files / "MLmodel").read_text() + "\n")
    with pytest.raises(Untrusted, match="do not match the digest"):
        load_cached(cache, "champion", warmup_batch=8)


def test_a_missing_model_or_alias_is_reported_not_raised(store: Registry) -> None:
    watcher = ModelWatcher(store.client, MODEL_NAME, "no-such-alias", poll_seconds=60)
    assert watcher.poll() == "missing" and watcher.current is None
    assert watcher.last_error == f"{MODEL_NAME}@no-such-alias does not exist: registered " \
        f"model {MODEL_NAME!r} has no alias 'no-such-alias' (its aliases: ['champion'])"
    watcher = ModelWatcher(store.client, "no-such-model", "champion", poll_seconds=60)
    assert watcher.poll() == "missing"
    assert watcher.last_error.endswith("no registered model named 'no-such-model'")


def test_readyz_says_why_no_model_is_served() -> None:
    async def ready(_: Request) -> JSONResponse:
        return JSONResponse({}, status_code=200)

    why: list[str | None] = ["no registered model named 'x'"]
    app = ExplainNotReady(Starlette(routes=[Route("/readyz", ready), Route("/other", ready)]),
                          path="/readyz", reason=lambda: why[0])
    client = TestClient(app)
    answer_ = client.get("/readyz")
    assert answer_.status_code == 503
    assert answer_.json()["error"] == "not ready: no registered model named 'x'"
    assert client.get("/other").status_code == 200  # other paths pass through
    why[0] = None
    assert client.get("/readyz").status_code == 200


# ---------------------------------------------------------------- batching
def test_concurrent_requests_share_batches_and_single_ones_are_not_held() -> None:
    batches = []

    def double(jobs):
        batches.append(sum(len(job) for job in jobs))
        time.sleep(0.02)  # a forward pass: requests queue meanwhile
        return [[2 * x for x in job] for job in jobs]

    async def scenario() -> tuple[list, float]:
        call = batched(double, max_batch_size=64, max_latency_ms=5000, on_overload=lambda: None)
        results = await asyncio.gather(*(call([i, i + 100]) for i in range(40)))
        for _ in range(3):  # after the burst, alone
            start = time.perf_counter()
            assert await call([1]) == [2]
            alone = time.perf_counter() - start
        return results, alone

    results, alone = asyncio.run(scenario())
    assert results == [[2 * i, 2 * (i + 100)] for i in range(40)]
    assert max(batches) > 2 and len(batches) < 40  # merged, and within max_batch_size
    assert max(batches) <= 64
    assert alone < 0.02 + 0.015  # one forward pass and a tick, no learned hold-back


def test_a_request_larger_than_a_batch_is_split_and_reassembled() -> None:
    sizes = []

    def double(jobs):
        sizes.append(sum(len(job) for job in jobs))
        return [[2 * x for x in job] for job in jobs]

    async def one_big_request() -> list:
        call = batched(double, max_batch_size=4, max_latency_ms=5000, on_overload=lambda: None)
        return await call(list(range(10)))

    assert asyncio.run(one_big_request()) == [2 * x for x in range(10)]
    assert sizes == [4, 4, 2]


def test_a_caller_cancelled_in_the_queue_is_never_computed() -> None:
    computed: list[int] = []

    def slow(jobs):
        computed.extend(x for job in jobs for x in job)
        time.sleep(0.2)
        return [list(job) for job in jobs]

    async def scenario() -> list:
        call = batched(slow, max_batch_size=8, max_latency_ms=5000, on_overload=lambda: None)
        first = asyncio.ensure_future(call([1]))
        await asyncio.sleep(0.05)  # its forward pass is running
        gone = asyncio.ensure_future(call([2]))  # queued behind it
        await asyncio.sleep(0.05)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):  # a cancellation, not a shed
            await gone
        return [await first, await call([3])]

    assert asyncio.run(scenario()) == [[1], [3]]
    assert computed == [1, 3]


def test_requests_are_shed_only_once_they_have_waited_max_latency() -> None:
    def shed() -> None:
        raise ServiceBusy("overloaded", "shed", retry_after=1)

    def passes(durations):
        def forward_pass(jobs):
            time.sleep(next(durations))
            return [[2 * x for x in job] for job in jobs]
        return forward_pass

    async def eight_clients() -> list:
        # one slow pass among fast ones: no request waits 800 ms, so none is shed
        call = batched(passes(iter([0.01] * 14 + [0.5] + [0.01] * 500)), max_batch_size=64,
                       max_latency_ms=800, on_overload=shed)
        answers = []
        for round_ in range(20):
            answers += await asyncio.gather(*(call([round_]) for _ in range(8)))
        return answers

    async def one_waits_too_long() -> list:
        call = batched(passes(itertools.chain([0.01] * 12, itertools.repeat(0.6))),
                       max_batch_size=64, max_latency_ms=200, on_overload=shed)
        for _ in range(12):  # BentoML's warm-up passes, which shed nothing alone in the queue
            await call([0])
        running = asyncio.ensure_future(call([1]))
        await asyncio.sleep(0.05)
        with pytest.raises(ServiceBusy):
            await call([2])  # queued behind a 600 ms pass
        return await running

    assert asyncio.run(eight_clients()) == [[2 * r] for r in range(20) for _ in range(8)]
    assert asyncio.run(one_waits_too_long()) == [2]


# ---------------------------------------------------------------- limits and config
def test_bodies_over_the_limit_get_413() -> None:
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"size": len(await request.body())})

    rejected = []
    app = BodySizeLimit(Starlette(routes=[Route("/", echo, methods=["POST"])]), max_bytes=100,
                        on_reject=lambda: rejected.append(1))
    client = TestClient(app)
    assert client.post("/", content=b"x" * 100).json() == {"size": 100}
    too_big = client.post("/", content=b"x" * 101)
    assert too_big.status_code == 413 and too_big.json()["detail"][0]["loc"] == ["body"]
    chunked = client.post("/", content=iter([b"x" * 60, b"x" * 60]))  # no content-length
    assert chunked.status_code == 413
    assert client.post("/", content=iter([b"x" * 30, b"x" * 30])).json() == {"size": 60}
    assert len(rejected) == 2


def test_a_refused_body_is_one_warning_line_without_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    import serving.service  # noqa: F401 - installs the filter on BentoML's logger

    bentoml_logger = logging.getLogger("bentoml._internal.server.http_app")
    try:
        ForecastRequest.model_validate_json('{"series": [], "horizon": "7"}')
    except ValidationError:
        with caplog.at_level(logging.WARNING, logger=bentoml_logger.name):
            bentoml_logger.error("Exception on %s [%s]", "/forecast", "POST", exc_info=True)
    [record] = caplog.records
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert record.getMessage() == "POST /forecast: 400, 2 invalid field(s), the first series: " \
        "List should have at least 1 item after validation, not 0"


def test_the_environment_overrides_the_config_file(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "serving.yaml"
    path.write_text("model_name: from-file\nmax_batch_size: 32\npoll_seconds: 5\n")
    monkeypatch.setenv("FORECASTER_MAX_BATCH_SIZE", "128")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    config = load_serving_config(path)
    assert (config.model_name, config.max_batch_size, config.poll_seconds) == \
        ("from-file", 128, 5.0)
    assert config.tracking_uri == "http://mlflow:5000"
    monkeypatch.delenv("FORECASTER_MAX_BATCH_SIZE")
    path.write_text("max_batch_size: 1\nmodel_nmae: typo\n")
    with pytest.raises(ValueError) as caught:
        load_serving_config(path)
    assert "max_batch_size" in str(caught.value) and "model_nmae: unknown key" in \
        str(caught.value)
