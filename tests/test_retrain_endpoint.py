"""POST /retrain on the scheduler's metrics port: a race now, at most one at a time, the others
coalesced; the bearer token when FORECASTER_API_TOKEN is set; an Alertmanager webhook's body.

In process, the real APScheduler and HTTP server with a training job that waits on a gate (so
that "a race is running" lasts exactly as long as the test wants); then, marked slow, a real
``forecaster schedule`` process whose /retrain runs a real seasonal-naive race into MLflow.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient

from pipelines.api_token import NO_TOKEN_NOTE, TOKEN_VARIABLE
from pipelines.schedule import (
    JOB_ID,
    TrainingMetrics,
    TrainingScheduler,
    cron_trigger,
    start_metrics_server,
)
from pipelines.scheduler_http import COALESCED_REASON, MAX_BODY_BYTES
from tests.conftest import _free_port
from tests.pipeline_support import SNAIVE, clean_mlflow_environment, race_config
from tests.serving_support import clean_environment
from tests.test_schedule import scrape

REPO = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token"
FAR_CRON = "0 3 1 1 *"  # 03:00 on January 1st: never during a test
WAIT_S = 20

# what Alertmanager's webhook receiver POSTs (version 4 of its payload), for the drift alert
ALERTMANAGER_NOTIFICATION = {
    "version": "4", "groupKey": '{}:{alertname="ForecastAccuracyDegraded"}', "truncatedAlerts": 0,
    "status": "firing", "receiver": "retrain", "groupLabels": {
        "alertname": "ForecastAccuracyDegraded"},
    "commonLabels": {"alertname": "ForecastAccuracyDegraded", "severity": "warning",
                     "model_name": "m4-hourly", "model_version": "3"},
    "commonAnnotations": {"summary": "Live MASE of m4-hourly version 3 is well above its "
                                     "backtest"},
    "externalURL": "http://alertmanager:9093",
    "alerts": [{"status": "firing", "labels": {"alertname": "ForecastAccuracyDegraded",
                                               "model_name": "m4-hourly", "model_version": "3"},
                "annotations": {}, "startsAt": "2025-01-01T00:00:00Z",
                "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "http://prometheus:9090/graph",
                "fingerprint": "0123456789abcdef"}],
}


class Response(SimpleNamespace):
    status: int
    body: dict[str, Any]
    headers: Any


def request(port: int, method: str = "POST", path: str = "/retrain", token: str | None = None,
            body: dict[str, Any] | None = None) -> Response:
    """One HTTP request; the answer, 4xx and 5xx included."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as answer:
            return Response(status=answer.status, body=json.load(answer), headers=answer.headers)
    except urllib.error.HTTPError as error:
        with error:
            return Response(status=error.code, body=json.load(error), headers=error.headers)


class GatedJob:
    """A training job that runs until the test opens its gate."""

    def __init__(self) -> None:
        self.calls = 0
        self.entered = threading.Event()
        self.gate = threading.Event()

    def __call__(self) -> SimpleNamespace:
        self.calls += 1
        self.entered.set()
        assert self.gate.wait(WAIT_S), "the test never let the job finish"
        self.entered.clear()
        return SimpleNamespace(champion_version=self.calls, champion_score=1.0)


class Endpoint(SimpleNamespace):
    port: int
    token: str | None
    job: GatedJob
    scheduler: TrainingScheduler
    metrics: TrainingMetrics


@pytest.fixture(params=[None, TOKEN], ids=["no-token", "token"])
def endpoint(request: pytest.FixtureRequest) -> Iterator[Endpoint]:
    """A started scheduler on a far cron, its HTTP server, with the token the param names."""
    job = GatedJob()
    metrics = TrainingMetrics.create()
    scheduler = TrainingScheduler(job, cron_trigger(FAR_CRON), metrics)
    server = start_metrics_server(0, scheduler, addr="127.0.0.1", token=request.param)
    scheduler.start()
    try:
        yield Endpoint(port=server.server_port, job=job, scheduler=scheduler, metrics=metrics,
                       token=request.param)
    finally:
        job.gate.set()
        scheduler.shutdown(wait=True)
        server.shutdown()
        server.server_close()


def runs_succeeded(metrics: TrainingMetrics) -> float:
    return metrics.registry.get_sample_value("forecaster_training_runs_total",
                                             {"outcome": "success"}) or 0


def wait_until(condition: Any, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def retrain_counts(port: int) -> dict[str, float]:
    return {dict(labels)["outcome"]: value for (name, labels), value in scrape(port).items()
            if name == "forecaster_training_retrain_requests_total"}


def test_post_retrain_runs_a_race_and_coalesces_the_requests_meanwhile(
        endpoint: Endpoint) -> None:
    cron_next = endpoint.scheduler.scheduler.get_job(JOB_ID).next_run_time
    assert (cron_next.month, cron_next.day, cron_next.hour) == (1, 1, 3)

    first = request(endpoint.port, token=endpoint.token)
    assert (first.status, first.body) == (202, {"started": True})
    assert endpoint.job.entered.wait(WAIT_S), "POST /retrain started no run"
    # while it runs: folded into it, twice, and said so
    for _ in range(2):
        again = request(endpoint.port, token=endpoint.token, body=ALERTMANAGER_NOTIFICATION)
        assert (again.status, again.body) == (202, {"started": False, "coalesced": True,
                                                    "reason": COALESCED_REASON})
    assert again.headers["Content-Type"] == "application/json"
    assert endpoint.job.calls == 1

    endpoint.job.gate.set()
    wait_until(lambda: runs_succeeded(endpoint.metrics) == 1, "the run to end")
    assert endpoint.job.calls == 1, "a coalesced request ran a race of its own"
    # the run was the cron job's, brought forward: the cron goes on as before
    assert endpoint.scheduler.scheduler.get_job(JOB_ID).next_run_time == cron_next

    # the race is over: the next request starts another
    assert request(endpoint.port, token=endpoint.token).body == {"started": True}
    wait_until(lambda: runs_succeeded(endpoint.metrics) == 2, "the second run")
    assert endpoint.job.calls == 2
    assert retrain_counts(endpoint.port) == {"started": 2, "coalesced": 2, "unauthorized": 0}


def test_a_request_during_a_cron_run_is_coalesced() -> None:
    job = GatedJob()
    metrics = TrainingMetrics.create()
    scheduler = TrainingScheduler(job, cron_trigger(FAR_CRON), metrics, run_at_start="always")
    server = start_metrics_server(0, scheduler, addr="127.0.0.1")
    scheduler.start()  # the start run: the same job as the cron's
    try:
        assert job.entered.wait(WAIT_S)
        assert request(server.server_port).body["coalesced"] is True
        job.gate.set()
        wait_until(lambda: runs_succeeded(metrics) == 1, "the start run to end")
    finally:
        job.gate.set()
        scheduler.shutdown(wait=True)
        server.shutdown()
        server.server_close()
    assert job.calls == 1


@pytest.mark.parametrize("endpoint", [TOKEN], indirect=True)
def test_retrain_asks_for_the_bearer_token_when_one_is_set(endpoint: Endpoint) -> None:
    for headers_token, reason in ((None, "missing Authorization header"),
                                  ("wrong", "invalid token")):
        refused = request(endpoint.port, token=headers_token, body=ALERTMANAGER_NOTIFICATION)
        assert refused.status == 401
        assert refused.headers["WWW-Authenticate"] == "Bearer"
        assert refused.body["error"].startswith(reason) and refused.body["detail"] == []
    basic = urllib.request.Request(f"http://127.0.0.1:{endpoint.port}/retrain", data=b"{}",
                                   headers={"Authorization": f"Basic {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(basic, timeout=10)
    assert error.value.code == 401
    assert endpoint.job.calls == 0 and not endpoint.job.entered.is_set()

    # the Alertmanager webhook, with the token in its http_config
    accepted = request(endpoint.port, token=TOKEN, body=ALERTMANAGER_NOTIFICATION)
    assert (accepted.status, accepted.body) == (202, {"started": True})
    assert endpoint.job.entered.wait(WAIT_S)
    assert retrain_counts(endpoint.port) == {"started": 1, "coalesced": 0, "unauthorized": 3}


@pytest.mark.parametrize("endpoint", [None], indirect=True)
def test_metrics_and_refusals_on_the_same_port(endpoint: Endpoint) -> None:
    # /metrics as before (any other path too, as prometheus-client's server did)
    scraped = scrape(endpoint.port)
    assert scraped["forecaster_training_runs_total", (("outcome", "success"),)] == 0
    assert retrain_counts(endpoint.port) == {"started": 0, "coalesced": 0, "unauthorized": 0}

    wrong_method = request(endpoint.port, method="GET")
    assert wrong_method.status == 405 and wrong_method.headers["Allow"] == "POST"
    assert "POST" in wrong_method.body["error"]

    # a body over the limit is refused before it is read
    connection = http.client.HTTPConnection("127.0.0.1", endpoint.port, timeout=10)
    try:
        connection.putrequest("POST", "/retrain")
        connection.putheader("Content-Length", str(MAX_BODY_BYTES + 1))
        connection.endheaders()
        answer = connection.getresponse()
        assert answer.status == 413
        assert "bytes" in json.load(answer)["error"]
    finally:
        connection.close()
    assert endpoint.job.calls == 0


def test_a_request_while_the_scheduler_is_not_running_is_503() -> None:
    metrics = TrainingMetrics.create()
    scheduler = TrainingScheduler(GatedJob(), cron_trigger(FAR_CRON), metrics)
    server = start_metrics_server(0, scheduler, addr="127.0.0.1")
    try:
        refused = request(server.server_port)
    finally:
        server.shutdown()
        server.server_close()
    assert refused.status == 503 and refused.headers["Retry-After"]
    assert "not running" in refused.body["error"]


# --- a real `forecaster schedule` and a real race ---------------------------------------------

@pytest.mark.slow
def test_forecaster_schedule_retrains_on_post(tmp_path: Path, data_dir: Path) -> None:
    """The CLI's scheduler with the token from the environment: POST /retrain without it is
    refused; with it, the seasonal-naive race runs into MLflow and a second request while it
    runs is coalesced."""
    with clean_mlflow_environment():
        config = race_config(tmp_path / "store", data_dir, [SNAIVE])
    config_path = tmp_path / "race.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    port = _free_port()
    log = tmp_path / "scheduler.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "schedule", str(config_path), "--cron", FAR_CRON,
             "--metrics-port", str(port), "--metrics-addr", "127.0.0.1"],
            cwd=REPO, env=clean_environment(**{TOKEN_VARIABLE: TOKEN}), stdout=output,
            stderr=subprocess.STDOUT)
    try:
        def up() -> bool:
            assert process.poll() is None, log.read_text()
            try:
                scrape(port)
            except OSError:
                return False
            return True

        wait_until(up, "forecaster schedule to answer", timeout=60)
        assert request(port).status == 401
        requested = time.time()
        assert request(port, token=TOKEN, body=ALERTMANAGER_NOTIFICATION).body == {
            "started": True}
        assert request(port, token=TOKEN).body["coalesced"] is True

        def succeeded() -> bool:
            assert process.poll() is None, log.read_text()
            scraped = scrape(port)
            assert scraped["forecaster_training_runs_total", (("outcome", "failure"),)] == 0, (
                log.read_text())
            return scraped["forecaster_training_runs_total", (("outcome", "success"),)] == 1

        wait_until(succeeded, "the race to succeed", timeout=240)
        assert retrain_counts(port) == {"started": 1, "coalesced": 1, "unauthorized": 1}
    finally:
        process.terminate()
        process.wait(timeout=60)
    text = log.read_text()
    assert NO_TOKEN_NOTE not in text
    assert "a race starts now" in text and "coalesced" in text

    # the race's runs and its champion, in the config's store
    client = MlflowClient(config.tracking_uri, config.tracking_uri)
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments])
    assert runs and all(run.info.status == "FINISHED" for run in runs)
    assert min(run.info.start_time for run in runs) / 1000 >= requested - 1
    model = client.get_registered_model(config.registered_model)
    assert "champion" in model.aliases
