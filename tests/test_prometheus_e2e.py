"""The monitoring stack for real: a Prometheus with the project's own config and alert rules
(deploy/prometheus, targets rewritten to loopback ports, 1 s intervals) scrapes a real
``forecaster serve``, a real ``forecaster schedule`` that trains once at start, and a
Pushgateway the scheduler pushes to. After some traffic, Prometheus's query API must answer
the questions the dashboard and the alerts ask: request rate, latency quantiles, batch sizes,
the served version, the last successful training, every target up, every rule loaded. Then
forecasts with timestamps and their actuals: the live MAE, MASE, sMAPE and coverage from the
service's counters, per version and horizon bucket, equal the figures computed in the test,
and ForecastAccuracyDegraded stays inactive on the first round of actuals and goes pending on
a drifted second.

prometheus and prometheus-pushgateway come from Debian's packages, which .ci/run installs;
without them the test fails, never skips, with the command that installs them
(tests/monitoring_support.py).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from serving.first_forecast import wait_for_ok
from tests.conftest import _free_port
from tests.live_accuracy_support import expected_accuracy, hourly_actuals, rows
from tests.monitoring_support import require_binaries
from tests.pipeline_support import LSTM, SNAIVE, clean_mlflow_environment, race_config
from tests.serving_support import (
    call,
    clean_environment,
    race,
    running_service,
    series_of,
    started,
)

pytestmark = pytest.mark.slow

PROMETHEUS_DIR = Path(__file__).parents[1] / "deploy" / "prometheus"
# the job names of deploy/prometheus/prometheus.yml, and the one the scheduler pushes under
SERVICE_JOB, TRAINER_JOB, PUSHGATEWAY_JOB = "forecaster-service", "forecaster-trainer", \
    "pushgateway"
PUSHED_JOB = "forecaster_training"
INTERVAL = "1s"  # scrape and rule evaluation: the project's 10s would make this test slow
START_TIMEOUT_S = 60
QUERY_TIMEOUT_S = 60
TRAINING_TIMEOUT_S = 240  # the scheduler's race shares two CPUs with the service's


@dataclass
class Stack:
    prometheus: str  # URLs
    service: str
    champion: int  # the service registry's champion version
    panel: pd.DataFrame
    logs: dict[str, Path]
    store: str  # the service's forecast store (SQLite, the default kind)
    registry: MlflowClient  # the service's

    def tails(self) -> str:
        """The end of every process's log, for a failure message."""
        return "\n".join(f"--- {name} ({path}):\n{path.read_text(errors='replace')[-1500:]}"
                         for name, path in self.logs.items())


@dataclass
class Traffic:
    end: float  # Unix time of the last answer
    ok_requests: int
    ok_series: int  # series in the requests answered 200 (warm-up included)


def prometheus_config(tmp: Path, ports: dict[str, int]) -> Path:
    """The project's prometheus.yml and alerts.yml copied to ``tmp``, each compose target
    rewritten to its loopback port and every interval set to INTERVAL."""
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", tmp / "alerts.yml")  # rule_files is relative
    text = (PROMETHEUS_DIR / "prometheus.yml").read_text()
    for target, port in ports.items():
        # exactly once: a renamed target must fail here, not leave a job scraping nothing
        assert text.count(target) == 1, f"{target} not found once in prometheus.yml"
        text = text.replace(target, f"127.0.0.1:{port}")
    # scrape_timeout too: Prometheus refuses a timeout longer than the scrape interval
    text, count = re.subn(r"(?m)^(\s*(?:scrape_interval|evaluation_interval|scrape_timeout):)"
                          r"\s*\S+", rf"\g<1> {INTERVAL}", text)
    assert count == 3, "prometheus.yml: expected scrape_interval, evaluation_interval and " \
                       "scrape_timeout under global"
    path = tmp / "prometheus.yml"
    path.write_text(text)
    return path


def wait_for(url: str, process: Callable[[], int | None], log: Path) -> None:
    """Until ``url`` answers 200; a failure with the log if the process exits or time runs
    out."""
    try:
        wait_for_ok(url, START_TIMEOUT_S, alive=lambda: process() is None, interval=0.2)
    except TimeoutError as error:
        pytest.fail(f"{error}:\n{log.read_text(errors='replace')[-3000:]}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[Stack]:
    binaries = require_binaries({"prometheus": "prometheus",
                                 "prometheus-pushgateway": "prometheus-pushgateway"})
    tmp = tmp_path_factory.mktemp("prometheus-e2e")
    ports = {"trainer:9101": _free_port(), "pushgateway:9091": _free_port(),
             "localhost:9090": _free_port()}
    logs = {name: tmp / f"{name}.log" for name in ("pushgateway", "scheduler", "service",
                                                   "prometheus")}
    pushgateway = f"127.0.0.1:{ports['pushgateway:9091']}"
    prometheus = f"http://127.0.0.1:{ports['localhost:9090']}"
    with ExitStack() as processes:
        gateway = processes.enter_context(started(
            [binaries["prometheus-pushgateway"], f"--web.listen-address={pushgateway}",
             # Debian's default persists to /var/lib/prometheus
             f"--persistence.file={tmp / 'pushgateway.data'}"], logs["pushgateway"]))

        # the scheduler first: its race (seasonal naive, the cheapest candidate, in a store of
        # its own so that it never changes the service's champion) runs while the service's
        # trains here
        trainer_config = tmp / "trainer-race.yaml"
        with clean_mlflow_environment():  # the machine's MLFLOW_* must not land in the YAML
            trainer_race = race_config(tmp / "trainer", data_dir, [SNAIVE])
        trainer_config.write_text(yaml.safe_dump(trainer_race.model_dump(mode="json")))
        scheduler = processes.enter_context(started(
            [sys.executable, "-m", "cli.main", "schedule", str(trainer_config),
             "--cron", "0 3 * * *", "--run-at-start", "always",
             "--metrics-port", str(ports["trainer:9101"]), "--metrics-addr", "127.0.0.1",
             "--pushgateway", pushgateway], logs["scheduler"], clean_environment()))

        # the LSTM is its own baseline floor: the champion served is a network
        service_config, result, panel = race(tmp / "service", data_dir, [LSTM],
                                             selection={"baseline": LSTM["name"]})
        store = f"sqlite:///{tmp / 'forecaster-store.db'}"
        service = processes.enter_context(running_service(service_config, logs["service"],
                                                          store_url=store))
        ports["service:3000"] = urllib.parse.urlsplit(service).port

        # last, once every target's port is known; it starts in a second or two
        server = processes.enter_context(started(
            [binaries["prometheus"], f"--config.file={prometheus_config(tmp, ports)}",
             f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{ports['localhost:9090']}"],
            logs["prometheus"]))
        wait_for(f"http://{pushgateway}/-/ready", gateway.poll, logs["pushgateway"])
        wait_for(f"{prometheus}/-/ready", server.poll, logs["prometheus"])
        assert scheduler.poll() is None, logs["scheduler"].read_text(errors="replace")
        yield Stack(prometheus, service, result.champion_version, panel, logs, store,
                    MlflowClient(service_config.tracking_uri, service_config.tracking_uri))


# --- Prometheus's query API ---------------------------------------------------------------------

Sample = tuple[dict[str, str], float]  # labels, value


def query(stack: Stack, expr: str, at: float | None = None) -> list[Sample]:
    """An instant query, at Unix time ``at`` (default now)."""
    params = {"query": expr} | ({} if at is None else {"time": f"{at:.3f}"})
    url = f"{stack.prometheus}/api/v1/query?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return [(item["metric"], float(item["value"][1])) for item in body["data"]["result"]]


def eventually(stack: Stack, what: str, fetch: Callable[[], list], check: Callable[[list], bool],
               timeout: float = QUERY_TIMEOUT_S) -> list:
    """``fetch()`` again until it is non-empty and ``check`` holds: scrapes, rule evaluations
    and the training run all come in their own time. A failure with the last answer and the
    logs when that does not happen within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        answer = fetch()
        if answer and check(answer):
            return answer
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: {answer!r} after {timeout:.0f} s\n{stack.tails()}")
        time.sleep(0.5)


def poll(stack: Stack, expr: str, check: Callable[[list[Sample]], bool] = lambda _: True,
         at: float | None = None, timeout: float = QUERY_TIMEOUT_S) -> list[Sample]:
    return eventually(stack, expr, lambda: query(stack, expr, at), check, timeout)


def value(samples: list[Sample]) -> float:
    """The value of a one-sample answer (an aggregation's)."""
    assert len(samples) == 1, samples
    return samples[0][1]


def by_job(samples: list[Sample]) -> dict[str, float]:
    return {labels["job"]: number for labels, number in samples}


# --- traffic ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def traffic(stack: Stack) -> Traffic:
    """Three dozen forecasts, a third one after the other and the rest eight at a time (so
    that the adaptive batching has something to batch), and one bad request."""
    url = f"{stack.service}/forecast"
    series = series_of(stack.panel)
    bodies = [{"series": series[: 1 + i % 3], "horizon": 6} for i in range(36)]
    # one request first, scraped before the others: rate() only counts what a series gained
    # between two scrapes, and BentoML creates the latency histogram's series with the first
    # request (its request counter, by contrast, starts at 0 for every route)
    warm_up = bodies.pop()
    assert call(url, warm_up)[0] == 200
    poll(stack, f'bentoml_service_request_duration_seconds_count{{job="{SERVICE_JOB}", '
                'endpoint="/forecast"}', lambda samples: value(samples) >= 1)
    with ThreadPoolExecutor(8) as pool:
        statuses = [call(url, body)[0] for body in bodies[:12]]
        statuses += pool.map(lambda body: call(url, body)[0], bodies[12:])
    bad = call(url, b'{"series": [{"id": "a", "values": [1, NaN]}], "horizon": 2}')
    end = time.time()
    assert statuses == [200] * len(bodies), statuses
    assert bad[0] == 400, bad
    return Traffic(end, len(bodies) + 1, sum(len(body["series"]) for body in [warm_up, *bodies]))


def after(traffic: Traffic) -> float:
    """When to evaluate queries about the traffic: two scrapes after its end (so that every
    request is counted), at a fixed time (so that a [30s] window holds it all, however long
    the tests before took). Waits until then."""
    at = traffic.end + 2.5
    time.sleep(max(0.0, at + 0.5 - time.time()))
    return at


# --- the tests ----------------------------------------------------------------------------------


def test_every_target_is_up(stack: Stack) -> None:
    jobs = {SERVICE_JOB, TRAINER_JOB, PUSHGATEWAY_JOB, "prometheus"}
    up = poll(stack, "up", lambda samples: by_job(samples) == dict.fromkeys(jobs, 1.0))
    assert len(up) == len(jobs)  # one target each


def test_the_projects_alert_rules_are_loaded_and_evaluate(stack: Stack) -> None:
    expected = sorted(rule["alert"] for group in yaml.safe_load(
        (PROMETHEUS_DIR / "alerts.yml").read_text())["groups"] for rule in group["rules"]
        if "alert" in rule)

    def rules() -> list[dict]:
        with urllib.request.urlopen(f"{stack.prometheus}/api/v1/rules?type=alert",
                                    timeout=10) as response:
            return [rule for group in json.load(response)["data"]["groups"]
                    for rule in group["rules"]]

    # health "ok" once evaluated without error ("unknown" before the first evaluation)
    loaded = eventually(stack, "/api/v1/rules", rules,
                        lambda answer: all(rule["health"] == "ok" for rule in answer))
    assert sorted(rule["name"] for rule in loaded) == expected
    # nothing fires: the stack is healthy, and the `for` periods are longer than this test
    assert not [rule["name"] for rule in loaded if rule["state"] == "firing"]


def test_request_rate_and_latency(stack: Stack, traffic: Traffic) -> None:
    at = after(traffic)
    forecast = f'job="{SERVICE_JOB}", endpoint="/forecast"'
    rate = poll(stack, f"sum(rate(bentoml_service_request_total{{{forecast}}}[30s]))",
                lambda samples: value(samples) > 0, at)
    # every request of the traffic counted (extrapolation to the window's edges only adds);
    # the warm-up request is the series' first sample, not an increase
    ok = value(poll(stack, f'sum(increase(bentoml_service_request_total{{{forecast}, '
                           f'http_response_code="200"}}[1m]))', at=at))
    assert traffic.ok_requests - 1 <= ok <= 2 * traffic.ok_requests, (ok, rate)
    refused = poll(stack, f'bentoml_service_request_total{{{forecast}, '
                          f'http_response_code="400"}}', at=at)
    assert value(refused) == 1
    assert value(poll(stack, "sum(forecaster_validation_failures_total)", at=at)) == 1

    def quantile(level: float) -> float:
        return value(poll(stack, f"histogram_quantile({level}, sum by (le) (rate("
                                 f"bentoml_service_request_duration_seconds_bucket{{{forecast}}}"
                                 "[30s])))", at=at))

    p50, p99 = quantile(0.5), quantile(0.99)
    assert math.isfinite(p99) and 0 < p50 <= p99 <= 30, (p50, p99)  # 30 s: the client's timeout


def test_batch_sizes(stack: Stack, traffic: Traffic) -> None:
    at = after(traffic)
    passes = value(poll(stack, "sum(forecaster_inference_batch_size_count)", at=at))
    # batching merges requests into one forward pass, and never splits one this small
    assert 1 <= passes <= traffic.ok_requests
    mean = value(poll(stack, "sum(forecaster_inference_batch_size_sum) / "
                             "sum(forecaster_inference_batch_size_count)", at=at))
    assert mean >= 1
    # the histogram's sum is every series forecast, as the service's own counter says
    assert mean * passes == pytest.approx(traffic.ok_series)
    assert value(poll(stack, "sum(forecaster_series_forecast_total)", at=at)) == \
        traffic.ok_series


def test_served_model_version_is_the_champion(stack: Stack) -> None:
    (labels, version), = poll(stack, "forecaster_served_model_version")
    assert (labels["job"], labels["model_name"], labels["alias"]) == \
        (SERVICE_JOB, "test-forecaster", "champion")
    assert version == stack.champion
    assert value(poll(stack, 'forecaster_model_loads_total{outcome="loaded"}')) == 1


def test_last_successful_training_from_trainer_and_pushgateway(stack: Stack) -> None:
    # from the trainer's /metrics, and pushed: job="forecaster_training" kept by honor_labels
    jobs = {TRAINER_JOB, PUSHED_JOB}
    success = by_job(poll(stack, "forecaster_training_last_success_timestamp_seconds > 0",
                          lambda samples: set(by_job(samples)) == jobs, timeout=TRAINING_TIMEOUT_S))
    now = time.time()
    for job, stamp in success.items():
        assert now - 300 < stamp <= now + 1, (job, stamp, now)
    # what RetrainingStale computes: seconds since the freshest success of either source
    age = value(poll(stack, "time() - max without (instance, job) "
                            "(forecaster_training_last_success_timestamp_seconds > 0)"))
    assert 0 <= age < 300
    runs = poll(stack, 'forecaster_training_runs_total{outcome="success"}',
                lambda samples: set(by_job(samples)) == jobs)
    assert by_job(runs) == dict.fromkeys(jobs, 1.0)
    # the scheduler's race registered version 1 in its own store, and made it champion
    poll(stack, "forecaster_champion_version",
         lambda samples: by_job(samples) == dict.fromkeys(jobs, 1.0))


# --- live accuracy ------------------------------------------------------------------------------

LIVE_HORIZON = 24  # the race's: every step from bucket "1" to "7-24"
LIVE_START = datetime(2024, 5, 1)  # of the histories sent with timestamps
# the second round's actuals drift: shifted up by this many times the range of their history,
# so that their MASE is far above any backtest's
DRIFT = 100
FIRST_ROUND_SERIES = 1  # its LIVE_HORIZON points: fewer than the alert's minimum
SAMPLES_BEFORE_SECOND_ROUND = 5  # scrapes of the first round's counters (see live)
ACCURACY_ALERT = "ForecastAccuracyDegraded"


@dataclass
class Live:
    """The live accuracy of the served version, computed in the test: over every matched
    point; the first round's points; when Prometheus had scraped each round, and the alert
    as evaluated on the first round alone."""

    version: str
    expected: dict  # tests.live_accuracy_support.expected_accuracy
    first_points: int
    first_seen: float  # Unix times
    seen: float
    first_rule: dict  # ACCURACY_ALERT in /api/v1/rules


def accuracy_rule(stack: Stack, after: float) -> dict:
    """ACCURACY_ALERT in /api/v1/rules, once evaluated after Unix time ``after``."""
    def fetch() -> list[dict]:
        with urllib.request.urlopen(f"{stack.prometheus}/api/v1/rules?type=alert",
                                    timeout=10) as response:
            return [rule for group in json.load(response)["data"]["groups"]
                    for rule in group["rules"] if rule["name"] == ACCURACY_ALERT]

    [rule] = eventually(stack, f"{ACCURACY_ALERT} evaluated", fetch, lambda answer: (
        pd.Timestamp(answer[0]["lastEvaluation"]).timestamp() > after))
    return rule


@pytest.fixture(scope="module")
def live(stack: Stack) -> Live:
    """Forecasts with timestamps for every series of the panel, less the last LIVE_HORIZON
    values, which come back as their actuals (with two before each origin, which meet no
    forecast) in two rounds: the first, of FIRST_ROUND_SERIES series, too few points for the
    alert; the second, of the others, drifted. The service starts the served version's
    counters at 0 on load, so that increase() counts the first round too (a series born
    holding its first increment would not). Runs after the traffic's tests, whose counts
    these forecasts would change."""
    full = series_of(stack.panel)
    sent = [{"id": s["id"], "values": s["values"][:-LIVE_HORIZON],
             "start": LIVE_START.isoformat(), "freq": "h"} for s in full]
    status, answer = call(f"{stack.service}/forecast", {"series": sent, "horizon": LIVE_HORIZON})
    assert status == 200, answer
    served = answer["forecasts"]
    eventually(stack, "the forecast log's rows", lambda: [rows(stack.store, "forecasts")],
               lambda answer: answer == [len(sent) * LIVE_HORIZON])

    actuals: dict[str, dict] = {}
    rounds: tuple[list[dict], list[dict]] = ([], [])
    for i, (history, series) in enumerate(zip(sent, full, strict=True)):
        first = len(history["values"]) - 2
        truth = np.asarray(series["values"][first:])
        if i >= FIRST_ROUND_SERIES:
            truth += DRIFT * np.ptp(history["values"])
        actuals[series["id"]], post = hourly_actuals(
            series["id"], LIVE_START + timedelta(hours=first), truth)
        rounds[i >= FIRST_ROUND_SERIES].append(post)
    seen = []
    for number, part in enumerate(rounds):
        status, ack = call(f"{stack.service}/actuals", {"series": part})
        assert (status, ack) == (200, {"accepted": len(part) * (2 + LIVE_HORIZON),
                                       "matched": len(part) * LIVE_HORIZON}), ack
        done = sum(map(len, rounds[: number + 1])) * LIVE_HORIZON
        poll(stack, "sum(forecaster_live_points_total)",
             lambda samples, done=done: value(samples) == done)
        if number == 0:  # a few scrapes of the first round's values before the second
            poll(stack, "min(count_over_time(forecaster_live_points_total[1m]))",
                 lambda samples: value(samples) >= SAMPLES_BEFORE_SECOND_ROUND)
            first_rule = accuracy_rule(stack, time.time())
        seen.append(time.time())
    return Live(str(stack.champion), expected_accuracy(served, sent, actuals),
                len(rounds[0]) * LIVE_HORIZON, *seen, first_rule)


def by_labels(stack: Stack, expr: str, by: tuple[str, ...], at: float | None = None
              ) -> dict[tuple[str, ...], float]:
    """The answer to ``expr`` by the values of its labels ``by``."""
    return {tuple(labels[name] for name in by): number
            for labels, number in query(stack, expr, at)}


def assert_live_figures(stack: Stack, by: tuple[str, ...],
                        expected: dict[tuple[str, ...], dict]) -> None:
    """The points, MAE, MASE and sMAPE through Prometheus, grouped by the labels ``by``, as
    ``expected`` (their values -> the figures of expected_accuracy)."""
    group = f"sum by ({', '.join(by)})"
    counted = by_labels(stack, f"{group} (forecaster_live_points_total)", by)
    # the served version's series start at 0 (a bucket no forecast reached stays there)
    assert {key: n for key, n in counted.items() if n} == {
        key: figures["points"] for key, figures in expected.items()}, by
    for figure, numerator, denominator in (("mae", "abs_error", "points"),
                                           ("mase", "scaled_error", "scaled_points"),
                                           ("smape", "smape", "points")):
        got = by_labels(stack, f"{group} (forecaster_live_{numerator}_total) / "
                               f"{group} (forecaster_live_{denominator}_total)", by)
        want = {key: figures[figure] for key, figures in expected.items()}
        assert {key: got[key] for key in want} == pytest.approx(want, rel=1e-9), (figure, by)


def test_live_accuracy_through_prometheus_equals_the_figures_computed_here(
        stack: Stack, live: Live) -> None:
    expected, name, version = live.expected, "test-forecaster", live.version
    points = len(series_of(stack.panel)) * LIVE_HORIZON
    assert expected["points"] == points
    for counter in ("points", "scaled_points"):  # every series' history has a scale
        assert value(query(stack, f"sum(forecaster_live_{counter}_total)")) == points
    assert_live_figures(stack, (), {(): expected})
    assert_live_figures(stack, ("model_name", "model_version"), {(name, version): expected})
    assert_live_figures(stack, ("model_version", "horizon"),
                        {(version, bucket["steps"]): bucket for bucket in expected["by_horizon"]})
    assert [bucket["steps"] for bucket in expected["by_horizon"]] == ["1", "2-6", "7-24"]
    coverage = by_labels(stack, "sum by (model_version, level) "
                                "(forecaster_live_interval_hits_total) / sum by (model_version, "
                                "level) (forecaster_live_interval_points_total)",
                         ("model_version", "level"))
    assert coverage == pytest.approx({(version, level): share for level, share
                                      in expected["coverage"].items()}, rel=1e-12)
    # the served version's backtest MASE, as the race tagged it
    tags = stack.registry.get_model_version(name, version).tags
    assert query(stack, "forecaster_backtest_mase") == [
        ({"__name__": "forecaster_backtest_mase", "job": SERVICE_JOB,
          "instance": f"127.0.0.1:{urllib.parse.urlsplit(stack.service).port}",
          "model_name": name, "model_version": version}, float(tags["mase"]))]


def test_the_accuracy_alert_evaluates_as_the_numbers_imply(stack: Stack, live: Live) -> None:
    by = ("model_name", "model_version")
    group = f"sum by ({', '.join(by)})"
    key = ("test-forecaster", live.version)
    factor = value(query(stack, "forecaster_accuracy_alert_factor"))
    min_points = value(query(stack, "forecaster_accuracy_alert_min_points"))
    backtest = value(query(stack, f'forecaster_backtest_mase{{model_version="{live.version}"}}'))
    assert (factor, min_points) == (1.3, 50)  # the service's defaults

    def window(counter: str, at: float) -> dict[tuple[str, ...], float]:
        """The counter's increase over the alert's window, at ``at``."""
        return by_labels(stack, f"{group} (increase(forecaster_live_{counter}_total[24h]))",
                         by, at)

    # increase() extrapolates each counter's rise to the window's end, by up to half a scrape
    # interval over the SAMPLES_BEFORE_SECOND_ROUND or more it sampled (not before its first
    # sample, 0 since the model loaded): the window's figures are the posted ones within that
    tolerance = 1 / SAMPLES_BEFORE_SECOND_ROUND
    # the first round alone: counted (the series were there at 0), too few points to alert
    assert window("points", live.first_seen)[key] == pytest.approx(live.first_points,
                                                                   rel=tolerance)
    assert live.first_points < min_points
    assert (live.first_rule["health"], live.first_rule["state"]) == ("ok", "inactive")

    # with the second: the drifted points, enough of them, their MASE far above the backtest's
    everything = live.expected
    scaled, scaled_points = (window(counter, live.seen)[key]
                             for counter in ("scaled_error", "scaled_points"))
    mase = scaled / scaled_points
    assert mase == pytest.approx(everything["mase"], rel=2 * tolerance)
    assert everything["mase"] > 2 * factor * backtest, (everything["mase"], backtest)
    assert window("points", live.seen)[key] == pytest.approx(everything["points"],
                                                             rel=tolerance)
    assert everything["points"] >= min_points
    rule = accuracy_rule(stack, live.seen)
    assert (rule["health"], rule.get("lastError", "")) == ("ok", "")
    # `for: 30m`: pending for the rest of this test, never firing
    assert rule["state"] == "pending"
    assert [alert["labels"]["model_version"] for alert in rule["alerts"]] == [live.version]
    assert by_labels(stack, rule["query"], by, live.seen) == {key: pytest.approx(mase)}
