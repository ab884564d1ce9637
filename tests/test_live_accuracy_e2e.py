"""Live accuracy for real: ``forecaster serve`` (bentoml serve, two workers) logging into
PostgreSQL. Forecasts for a set of series with timestamps, then their actuals posted: GET
/accuracy and the counters on /metrics equal the MAE, MASE, sMAPE and coverage computed here
from the served forecasts and the actuals; posting them again changes nothing; the token guards
/actuals (and, with FORECASTER_PROTECT_READS, the reads); every row of an acknowledged post is
in the database after its worker is killed with SIGKILL. A private PostgreSQL stopped under a
running service: /forecast keeps answering, /actuals answers 503, the dropped-row counter
rises; restarted, both recover without restarting the service. With the store off, /forecast
is as before and /actuals and /accuracy say the store is off."""

from __future__ import annotations

import os
import signal
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.first_forecast import wait_for_ok
from tests.conftest import postgres_database, sine_series
from tests.live_accuracy_support import expected_accuracy, hourly_actuals, rows, wait_for
from tests.pipeline_support import clean_mlflow_environment
from tests.postgres_support import private_postgres
from tests.serving_support import (
    HORIZON,
    MODEL_NAME,
    Registry,
    call,
    call_with_headers,
    make_registry,
    serving,
)

pytestmark = pytest.mark.slow
TOKEN = "live-accuracy-e2e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
START = datetime(2024, 5, 1)
FLUSH = "0.2"  # seconds between the log's writes


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, sine_panel: pd.DataFrame
             ) -> Iterator[Registry]:
    with clean_mlflow_environment():
        yield make_registry(tmp_path_factory.mktemp("live-accuracy"), sine_panel, seeds=(0,))


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with postgres_database("forecaster_live") as url:
        yield url


@pytest.fixture(scope="module")
def service(registry: Registry, database: str, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[str]:
    log = tmp_path_factory.mktemp("live-service") / "serve.log"
    with serving(registry.uri, log, ["--model-name", MODEL_NAME], workers="2",
                 store_url=database, forecast_log_flush_seconds=FLUSH,
                 environment={"FORECASTER_API_TOKEN": TOKEN,
                              "FORECASTER_PROTECT_READS": "true"}) as url:
        yield url


def histories(count: int, prefix: str = "s") -> list[dict]:
    return [{"id": f"{prefix}{i}", "values": sine_series(60 + 6 * i, phase=i, level=3 + i,
                                                         seed=i).tolist(),
             "start": START.isoformat(), "freq": "h"} for i in range(count)]


def scraped(url: str, name: str, **labels: str) -> float:
    text_ = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text_)
               for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


def assert_figures(got: dict, expected: dict) -> None:
    assert got["points"] == expected["points"]
    for name in ("mae", "mase", "smape"):
        assert got[name] == pytest.approx(expected[name], rel=1e-9), name


def test_accuracy_equals_the_figures_computed_from_the_served_forecasts(
        service: str, database: str) -> None:
    sent = histories(4)
    body = {"series": [*sent, {"id": "no-times", "values": sine_series(60).tolist()}],
            "horizon": HORIZON}
    status, _, headers = call_with_headers(f"{service}/forecast", body)
    assert (status, headers["www-authenticate"]) == (401, "Bearer")  # reads are protected
    status, answer = call(f"{service}/forecast", body, headers=AUTH)
    assert status == 200, answer
    served = [f for f in answer["forecasts"] if "timestamps" in f]
    wait_for(lambda: rows(database, "forecasts") == 4 * HORIZON, what="the log's rows")

    # the truth: the history's sine continued, from two steps before each forecast's origin
    actuals: dict[str, dict] = {}
    posted = []
    for i, series in enumerate(sent):
        first = len(series["values"]) - 2
        values = sine_series(first + 2 + HORIZON, phase=i, level=3 + i, seed=100 + i)[first:]
        actuals[series["id"]], post = hourly_actuals(series["id"],
                                                     START + timedelta(hours=first), values)
        posted.append(post)
    status, _, headers = call_with_headers(f"{service}/actuals", {"series": posted})
    assert (status, headers["www-authenticate"]) == (401, "Bearer")
    status, ack = call(f"{service}/actuals", {"series": posted}, headers=AUTH)
    assert (status, ack) == (200, {"accepted": 4 * (2 + HORIZON), "matched": 4 * HORIZON})

    expected = expected_accuracy(served, sent, actuals)
    assert call(f"{service}/accuracy")[0] == 401
    status, report = call(f"{service}/accuracy?model_name={MODEL_NAME}&model_version=1",
                          headers=AUTH)
    assert status == 200, report
    [version] = report["versions"]
    assert (version["model_name"], version["model_version"]) == (MODEL_NAME, "1")
    assert_figures(version, expected)
    assert version["coverage"] == pytest.approx(expected["coverage"], rel=1e-12)
    for got, want in zip(version["by_horizon"], expected["by_horizon"], strict=True):
        assert got["steps"] == want["steps"]
        assert_figures(got, want)
    # the registry's tags of version 1 (tests.serving_support.register): no MAE recorded
    assert version["backtest"] == {"mase": 0.75, "smape": 12.5, "mae": None}
    assert call(f"{service}/accuracy?model_version=2", headers=AUTH)[1] == {"versions": []}

    # the same through the counters, summed over both workers
    live = {name: scraped(service, f"forecaster_live_{name}_total", model_name=MODEL_NAME,
                          model_version="1")
            for name in ("abs_error", "scaled_error", "smape", "points", "scaled_points")}
    assert live["points"] == live["scaled_points"] == expected["points"]
    assert live["abs_error"] / live["points"] == pytest.approx(expected["mae"], rel=1e-9)
    assert live["scaled_error"] / live["scaled_points"] == pytest.approx(expected["mase"],
                                                                         rel=1e-9)
    assert live["smape"] / live["points"] == pytest.approx(expected["smape"], rel=1e-9)
    for level, share in expected["coverage"].items():
        hits, points = (scraped(service, f"forecaster_live_interval_{kind}_total", level=level)
                        for kind in ("hits", "points"))
        assert (points, hits / points) == (expected["points"], pytest.approx(share))
    assert scraped(service, "forecaster_backtest_mase", model_name=MODEL_NAME,
                   model_version="1") == 0.75
    assert scraped(service, "forecaster_accuracy_alert_factor") == 1.3
    assert scraped(service, "forecaster_accuracy_alert_min_points") == 50

    # posting the same actuals again: the same answer, nothing new counted or computed
    received = scraped(service, "forecaster_actuals_received_total")
    assert call(f"{service}/actuals", {"series": posted}, headers=AUTH) == (200, ack)
    assert call(f"{service}/accuracy?model_name={MODEL_NAME}", headers=AUTH)[1] == report
    assert scraped(service, "forecaster_live_points_total") == expected["points"]
    assert scraped(service, "forecaster_actuals_received_total") == received + ack["accepted"]
    assert rows(database, "actuals") == ack["accepted"]


def test_the_token_leaves_probes_and_metrics_open(service: str) -> None:
    for path in ("/readyz", "/livez", "/metrics", "/model"):
        assert call(f"{service}{path}")[0] == 200, path
    status, body = call(f"{service}/actuals", {"series": histories(1)},
                        headers={"Authorization": "Bearer wrong"})
    assert (status, body) == (401, {"error": "invalid token", "detail": []})


def service_workers(url: str) -> list[psutil.Process]:
    """The BentoML worker processes of the service at ``url`` (its BentoML home names its
    port: tests.serving_support.serving)."""
    home = f"bentoml-home-{url.rsplit(':', 1)[1]}"
    workers = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if "_bentoml_impl.worker.service" in " ".join(process.info["cmdline"] or ()) \
                    and process.environ().get("BENTOML_HOME", "").endswith(home):
                workers.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return workers


def test_acknowledged_actuals_survive_a_killed_worker(service: str, database: str) -> None:
    posted = [{"id": f"kill-{i}", "values": np.arange(200, dtype=float).tolist(),
               "start": "2024-06-01T00:00:00", "freq": "h"} for i in range(40)]
    workers = service_workers(service)
    assert len(workers) == 2
    status, ack = call(f"{service}/actuals", {"series": posted}, headers=AUTH)
    for worker in workers:  # whichever answered: at once, no shutdown
        os.kill(worker.pid, signal.SIGKILL)
    assert (status, ack) == (200, {"accepted": 8000, "matched": 0})
    assert rows(database, "actuals", "series_id LIKE 'kill-%'") == 8000
    assert rows(database, "actuals", "series_id = 'kill-7' AND value = 199 AND "
                                     "timestamp = '2024-06-09 07:00:00'") == 1
    # BentoML starts the workers again
    wait_for_ok(f"{service}/readyz", timeout=180)


def test_a_database_outage_drops_log_rows_never_requests(registry: Registry,
                                                         tmp_path: Path) -> None:
    with private_postgres() as postgres, \
            serving(registry.uri, tmp_path / "serve.log", ["--model-name", MODEL_NAME],
                    store_url=postgres.url, forecast_log_flush_seconds=FLUSH) as url:
        body = {"series": histories(2), "horizon": HORIZON}
        assert call(f"{url}/forecast", body)[0] == 200
        wait_for(lambda: rows(postgres.url, "forecasts") == 2 * HORIZON, what="the log")
        dropped = "forecaster_forecast_log_dropped_total"

        postgres.stop()
        for _ in range(5):
            assert call(f"{url}/forecast", body)[0] == 200
        status, answer, headers = call_with_headers(f"{url}/actuals",
                                                    {"series": histories(1)})
        assert status == 503 and headers["retry-after"] == "5"
        assert "unavailable" in answer and "127.0.0.1" not in answer  # no URL in the body
        assert call(f"{url}/accuracy")[0] == 503
        wait_for(lambda: scraped(url, dropped, reason="store_unavailable") == 5 * 2 * HORIZON,
                 what="the dropped rows counted")

        postgres.start()  # the same service, no restart
        wait_for(lambda: call(f"{url}/actuals", {"series": histories(1)})[0] == 200,
                 timeout=60, what="/actuals answering again")
        assert call(f"{url}/forecast", body)[0] == 200
        wait_for(lambda: rows(postgres.url, "forecasts") == 2 * 2 * HORIZON,
                 what="the log writing again")
        assert scraped(url, dropped, reason="store_unavailable") == 5 * 2 * HORIZON
        assert call(f"{url}/accuracy")[0] == 200


def test_with_the_store_off_forecasts_are_as_before(registry: Registry, tmp_path: Path) -> None:
    with serving(registry.uri, tmp_path / "serve.log", ["--model-name", MODEL_NAME],
                 store_url="none") as url:
        status, answer = call(f"{url}/forecast", {"series": histories(1), "horizon": 2})
        assert status == 200 and len(answer["forecasts"][0]["timestamps"]) == 2
        for path, body in (("/actuals", {"series": histories(1)}), ("/accuracy", None)):
            status, answer = call(f"{url}{path}", body)
            assert status == 503 and "store is off" in answer["error"], path
        # no token configured: the service said so once at start
        assert "FORECASTER_API_TOKEN is not set" in (tmp_path / "serve.log").read_text()
    assert not (tmp_path / "forecaster-store.db").exists()
