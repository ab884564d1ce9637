"""A seasonal naive champion served for real (a real race, a real ``forecaster serve``, real
HTTP): it states its own minimum history, refits each series on the worker's threads, answers
more series than a batch on an idle server, refuses a request it could not answer within the
timeout before any work starts, and keeps answering small requests while a large one runs."""

from __future__ import annotations

import math
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from forecaster.data import SERIES, panel_to_long
from pipelines.forecasts import POINT, quantile_column
from tests.pipeline_support import SNAIVE, clean_mlflow_environment
from tests.serving_support import call, call_with_headers, race, running_service, series_of
from tests.test_serving_e2e import metric

pytestmark = pytest.mark.slow
MODEL = "test-forecaster"
TIMEOUT = 20  # seconds: the service's traffic timeout
MAX_BATCH = 16
SEASON = 24  # the race's season length for hourly data


@dataclass
class Served:
    url: str
    log: Path
    panel: pd.DataFrame
    tracking_uri: str
    version: int


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[Served]:
    store = tmp_path_factory.mktemp("serving-baseline")
    config, result, panel = race(store, data_dir, [SNAIVE])
    log = store / "serve.log"
    with running_service(config, log, timeout_seconds=str(TIMEOUT),
                         max_batch_size=str(MAX_BATCH), refit_threads="2",
                         max_series_per_request="100000",
                         max_body_bytes=str(64 * 1024 * 1024)) as url:
        yield Served(url, log, panel, config.tracking_uri, result.champion_version)


def many(served: Served, count: int) -> list[dict]:
    """``count`` series of 200 values: the race's series, repeated under new ids."""
    series = series_of(served.panel)
    return [{"id": f"s{i}", "values": series[i % len(series)]["values"]} for i in range(count)]


def seconds_per_series(served: Served, length: int) -> float:
    """The service's own estimate, as GET /model publishes it."""
    cost = call(f"{served.url}/model")[1]["refit_cost"]
    return cost["fixed"] + cost["per_value"] * length


def test_the_model_states_its_minimum_history(served: Served) -> None:
    status, info = call(f"{served.url}/model")
    assert status == 200 and info["model_class"] == "NaiveForecaster"
    assert info["min_history"] == SEASON + 1  # the last season and one residual
    history = series_of(served.panel)[0]["values"]
    status, body = call(f"{served.url}/forecast", {"series": [
        {"id": "ok", "values": history[-SEASON - 1:]},
        {"id": "short", "values": history[-SEASON:]}], "horizon": 24})
    assert status == 400 and body["detail"][0]["loc"] == ["series", 1, "values"]
    assert f"has {SEASON} values; the model needs at least {SEASON + 1}" in body["error"]
    status, body = call(f"{served.url}/forecast",
                        {"series": [{"id": "ok", "values": history[-SEASON - 1:]}],
                         "horizon": 24})
    assert status == 200 and len(body["forecasts"][0]["mean"]) == 24


def test_forecasts_equal_the_registered_models(served: Served) -> None:
    status, body = call(f"{served.url}/forecast", {"series": series_of(served.panel),
                                                   "horizon": 24, "quantiles": [0.1, 0.9]})
    assert status == 200, body
    with clean_mlflow_environment():
        mlflow.set_tracking_uri(served.tracking_uri)
        model = mlflow.pyfunc.load_model(f"models:/{MODEL}/{served.version}")
        expected = model.predict(panel_to_long(served.panel), params={"horizon": 24})
    for forecast in body["forecasts"]:
        rows = expected[expected[SERIES] == forecast["id"]]
        np.testing.assert_allclose(forecast["mean"], rows[POINT], rtol=1e-9)
        np.testing.assert_allclose(forecast["quantiles"]["0.9"], rows[quantile_column(0.9)],
                                   rtol=1e-9)


def test_more_series_than_a_batch_are_answered_on_an_idle_server(served: Served) -> None:
    series = many(served, 3 * MAX_BATCH)
    status, body = call(f"{served.url}/forecast", {"series": series, "horizon": 24},
                        timeout=TIMEOUT + 10)
    assert status == 200, body
    assert [f["id"] for f in body["forecasts"]] == [s["id"] for s in series]


def test_a_request_too_costly_is_refused_before_any_work(served: Served) -> None:
    count = math.ceil(2 * TIMEOUT / seconds_per_series(served, 200))
    before = urllib.request.urlopen(f"{served.url}/metrics").read().decode()
    start = time.monotonic()
    status, text, headers = call_with_headers(
        f"{served.url}/forecast", {"series": many(served, count), "horizon": 24})
    assert status == 503, text
    assert time.monotonic() - start < 5  # refused up front, not after the work
    assert "retry-after" not in headers  # trying again would not help
    assert f"over the service's timeout of {TIMEOUT} s" in text and "send at most" in text
    after = urllib.request.urlopen(f"{served.url}/metrics").read().decode()
    assert metric(after, "forecaster_series_forecast_total") == \
        metric(before, "forecaster_series_forecast_total")  # no series was forecast
    assert metric(after, "forecaster_requests_refused_total", reason="too_costly") == \
        metric(before, "forecaster_requests_refused_total", reason="too_costly") + 1


def test_small_requests_are_answered_while_a_large_one_runs(served: Served) -> None:
    each = seconds_per_series(served, 200)
    large = many(served, int(0.4 * TIMEOUT / each))
    outcome: dict[str, tuple] = {}

    def post_large() -> None:
        outcome["large"] = call(f"{served.url}/forecast", {"series": large, "horizon": 24},
                                timeout=2 * TIMEOUT)

    thread = threading.Thread(target=post_large)
    thread.start()
    time.sleep(0.5)
    # another large one would wait for its share of the first: past the timeout, refused
    status, text, headers = call_with_headers(
        f"{served.url}/forecast", {"series": many(served, int(0.8 * TIMEOUT / each)),
                                   "horizon": 24})
    assert status == 503, text
    assert "the service is busy" in text and int(headers["retry-after"]) >= 1
    small = {"series": series_of(served.panel)[:1], "horizon": 24}
    latencies = []
    while thread.is_alive():
        start = time.monotonic()
        status, body = call(f"{served.url}/forecast", small)
        latencies.append(time.monotonic() - start)
        assert status == 200, body
    thread.join()
    status, body = outcome["large"]
    assert status == 200, body
    assert len(body["forecasts"]) == len(large)
    assert len(latencies) >= 5, latencies  # answered while the large one ran
    assert max(latencies) < 3.0, latencies  # a turn after the series in progress


def test_refusals_are_one_warning_line_each(served: Served) -> None:
    log = served.log.read_text(errors="replace")
    refusals = [line for line in log.splitlines() if "503 for a request of" in line]
    assert len(refusals) == 2 and all("[WARNING]" in line for line in refusals)
    assert "Traceback" not in log
