"""The service's request path as plain functions, without a server: schemas, checks against
the model, the batched forward pass, rendering, hot swap, batching and the body limit."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from forecaster.data import SERIES, TARGET
from pipelines import registry as race_registry
from serving.batching import batched
from serving.config import load_serving_config
from serving.http_limits import BodySizeLimit
from serving.inference import RequestError, forward, prepare, render
from serving.model import ServedModel, load_version, resolve_alias
from serving.model_watcher import ModelWatcher
from serving.schemas import ForecastRequest
from tests.pipeline_support import clean_mlflow_environment
from tests.serving_support import HORIZON, MODEL_NAME, Registry, make_registry


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, sine_panel: pd.DataFrame) -> Registry:
    with clean_mlflow_environment():
        yield make_registry(tmp_path_factory.mktemp("serving"), sine_panel)


@pytest.fixture(scope="module")
def champion(store: Registry) -> ServedModel:
    version = resolve_alias(store.client, MODEL_NAME, "champion")
    return load_version(store.client, version, "champion", warmup_batch=8)


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
    request = ForecastRequest.model_validate({"series": [
        {"id": "x", "values": [1.0] * 30, "start": "2024-03-01T00:00:00", "freq": "h"},
        {"id": "y", "values": [2.0] * 30}], "horizon": 2})
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


# ---------------------------------------------------------------- bad input, by field
@pytest.mark.parametrize("body, loc, kind", [
    ({"series": [{"id": "a", "values": [1.0, float("nan")]}], "horizon": 2},
     ("series", 0, "values", 1), "finite_number"),
    ({"series": [{"id": "a", "values": [1.0, float("inf")]}], "horizon": 2},
     ("series", 0, "values", 1), "finite_number"),
    ({"series": [{"id": "a", "values": [1.0, "x"]}], "horizon": 2},
     ("series", 0, "values", 1), "float_parsing"),
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
        store: Registry, sine_panel: pd.DataFrame) -> None:
    outcomes = []
    watcher = ModelWatcher(store.client, MODEL_NAME, "champion", poll_seconds=60,
                           on_outcome=lambda outcome, model: outcomes.append(outcome))
    assert watcher.poll() == "loaded" and watcher.current.version == 1
    assert watcher.poll() == "unchanged"
    race_registry.set_alias(MODEL_NAME, "champion", 2)
    old = watcher.current
    assert watcher.poll() == "swapped" and watcher.current.version == 2
    assert old.predict([np.ones(30, np.float32)])[0].shape == (HORIZON, 8)  # still usable
    broken = store.client.create_model_version(MODEL_NAME, source=str(Path("/nonexistent")))
    race_registry.set_alias(MODEL_NAME, "champion", int(broken.version))
    assert watcher.poll() == "failed" and watcher.current.version == 2
    assert watcher.poll() == "unchanged"  # not retried until the alias moves
    assert f"v{broken.version}" in watcher.last_error
    race_registry.set_alias(MODEL_NAME, "champion", 1)
    assert watcher.poll() == "swapped" and watcher.current.version == 1
    assert outcomes == ["loaded", "swapped", "failed", "swapped"]


def test_a_missing_alias_is_reported_not_raised(store: Registry) -> None:
    watcher = ModelWatcher(store.client, MODEL_NAME, "no-such-alias", poll_seconds=60)
    assert watcher.poll() == "missing" and watcher.current is None
    assert "does not exist" in watcher.last_error


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
