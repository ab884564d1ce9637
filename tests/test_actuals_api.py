"""POST /actuals and GET /accuracy without a server: the body's checks (a 400 naming the field),
the observations at their times, the live counters of the matches (against a real SQLite
store: re-posting adds nothing), the backtest figures from the registry, the backtest MASE
gauge across a swap, and the bearer-token middleware (401 with WWW-Authenticate, BentoML's
own routes untouched)."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from mlflow import MlflowClient
from prometheus_client import REGISTRY
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from pipelines.api_token import authorization_problem
from pipelines.forecast_store import (
    HORIZON_BUCKETS,
    ForecastStore,
    LoggedForecast,
    VersionAccuracy,
    horizon_bucket,
)
from serving import metrics
from serving.http_limits import BearerToken
from serving.inference import RequestError
from serving.live_accuracy import (
    accuracy_report,
    backtest_figures,
    observations,
    registry_backtest,
)
from serving.schemas import ActualsRequest, BacktestFigures
from tests.conftest import _free_port

T0 = datetime(2024, 3, 1)


def request_of(body: dict) -> ActualsRequest:
    return ActualsRequest.model_validate_json(json.dumps(body))


# ---------------------------------------------------------------- the body
@pytest.mark.parametrize("series, loc, kind", [
    ({"id": "a", "values": [1.0], "freq": "h"}, ("series", 0, "start"), "missing"),
    ({"id": "a", "values": [1.0], "start": "2024-01-01"}, ("series", 0, "freq"), "missing"),
    ({"id": "a", "values": [1.0], "start": "2024-01-01", "freq": "fortnight"},
     ("series", 0, "freq"), "value_error"),
    ({"id": "a", "values": [], "start": "2024-01-01", "freq": "h"}, ("series", 0, "values"),
     "too_short"),
    ({"id": "a", "values": [1.0, "2"], "start": "2024-01-01", "freq": "h"},
     ("series", 0, "values", 1), "float_type"),
    ({"id": "", "values": [1.0], "start": "2024-01-01", "freq": "h"}, ("series", 0, "id"),
     "string_too_short"),
    ({"id": "a", "values": [1.0], "start": "2024-01-01", "freq": "h", "horizon": 2},
     ("series", 0, "horizon"), "extra_forbidden"),
    # PostgreSQL's text holds no NUL: refused here, as in /forecast's ids
    ({"id": "a\x00b", "values": [1.0], "start": "2024-01-01", "freq": "h"},
     ("series", 0, "id"), "string_pattern_mismatch"),
])
def test_a_bad_series_is_refused_naming_the_field(series: dict, loc: tuple, kind: str) -> None:
    with pytest.raises(ValidationError) as caught:
        request_of({"series": [series]})
    assert (loc, kind) in [(e["loc"], e["type"]) for e in caught.value.errors()]


def test_values_that_are_not_finite_and_repeated_ids_are_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        ActualsRequest.model_validate_json(b'{"series": [{"id": "a", "values": [1, NaN], '
                                           b'"start": "2024-01-01", "freq": "h"}]}')
    assert caught.value.errors()[0]["loc"] == ("series", 0, "values", 1)
    one = {"id": "a", "values": [1.0], "start": "2024-01-01", "freq": "h"}
    with pytest.raises(ValidationError, match=r"repeated: \['a'\]"):
        request_of({"series": [one, one]})
    with pytest.raises(ValidationError):
        request_of({"series": []})


def test_observations_are_the_values_at_their_times() -> None:
    request = request_of({"series": [
        {"id": "a", "values": [1.0, 2.0, 3.0], "start": "2024-03-01T00:00:00", "freq": "h"},
        {"id": "b", "values": [5.0, 6.0], "start": "2024-03-01", "freq": "D"}]})
    points = observations(request.series)
    assert [(p.series_id, p.timestamp, p.value) for p in points] == [
        ("a", T0, 1.0), ("a", T0 + timedelta(hours=1), 2.0), ("a", T0 + timedelta(hours=2), 3.0),
        ("b", T0, 5.0), ("b", T0 + timedelta(days=1), 6.0)]
    for start, freq in (("9999-12-31T00:00:00", "D"),  # past 9999
                        ("0001-01-01T00:00:00+05:00", "h")):  # before year 1 in UTC
        late = request_of({"series": [request.series[0].model_dump(mode="json"),
                                      {"id": "c", "values": [1.0, 2.0], "start": start,
                                       "freq": freq}]})
        with pytest.raises(RequestError) as caught:
            observations(late.series)
        assert caught.value.loc == ("series", 1, "start")
        assert caught.value.body()["error"].startswith("series.1.start: ")


# ---------------------------------------------------------------- the live counters
def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_each_new_match_adds_to_the_counters_once(tmp_path: Path) -> None:
    store = ForecastStore.open(f"sqlite:///{tmp_path / 'store.db'}")
    quantiles = {"0.1": 9.0, "0.5": 10.0, "0.9": 11.0}
    # steps 1..8 of one forecast of series s (mean 10, scale 2), and one of series t without
    # a scale; steps 1 and 2..6 and 7..24 fall into three buckets
    store.write_forecasts(
        [LoggedForecast("m", "7", "s", T0, step, T0 + timedelta(hours=step), 10.0, quantiles,
                        2.0) for step in range(1, 9)]
        + [LoggedForecast("m", "7", "t", T0, 1, T0 + timedelta(hours=1), 10.0, quantiles,
                          None)])
    labels = {"model_name": "m", "model_version": "7"}
    names = ["forecaster_live_abs_error_total", "forecaster_live_scaled_error_total",
             "forecaster_live_smape_total", "forecaster_live_points_total",
             "forecaster_live_scaled_points_total"]
    before = {(name, bucket): sample(name, **labels, horizon=bucket)
              for name in names for bucket in ("1", "2-6", "7-24")}
    hits_before = sample("forecaster_live_interval_hits_total", **labels, horizon="2-6",
                         level="0.8")
    received = sample("forecaster_actuals_received_total")
    matched = sample("forecaster_actuals_matched_total")
    # actuals at hours 0..8 of s (hour 0 is the origin: no forecast) and hour 1 of t
    actual = {step: 10.0 + (step % 3) for step in range(9)}  # errors 0, 1, 2, 0, 1, 2, ...
    request = request_of({"series": [
        {"id": "s", "values": list(actual.values()), "start": T0.isoformat(), "freq": "h"},
        {"id": "t", "values": [14.0], "start": (T0 + timedelta(hours=1)).isoformat(),
         "freq": "h"}]})
    outcome = store.upsert_actuals(observations(request.series))
    assert (outcome.accepted, outcome.matched) == (10, 9)
    metrics.observe_actuals(outcome)

    def added(name: str, bucket: str) -> float:
        return sample(name, **labels, horizon=bucket) - before[name, bucket]

    errors = {step: abs(actual[step] - 10.0) for step in range(1, 9)}
    for bucket, steps in (("2-6", range(2, 7)), ("7-24", range(7, 9))):
        assert horizon_bucket(steps[0]) == bucket
        assert added("forecaster_live_points_total", bucket) == len(steps)
        assert added("forecaster_live_scaled_points_total", bucket) == len(steps)
        assert added("forecaster_live_abs_error_total", bucket) == \
            pytest.approx(sum(errors[s] for s in steps))
        assert added("forecaster_live_scaled_error_total", bucket) == \
            pytest.approx(sum(errors[s] / 2 for s in steps))
        assert added("forecaster_live_smape_total", bucket) == pytest.approx(
            sum(200 * errors[s] / (actual[s] + 10.0) for s in steps))
    # step 1: s (error 1, scaled 0.5) and t (error 4, no scale)
    assert added("forecaster_live_points_total", "1") == 2
    assert added("forecaster_live_scaled_points_total", "1") == 1
    assert added("forecaster_live_abs_error_total", "1") == pytest.approx(5.0)
    assert added("forecaster_live_scaled_error_total", "1") == pytest.approx(0.5)
    # inside [9, 11]: the errors of 0 and 1 (steps 3, 4, 6 of 2..6, not 2 and 5)
    assert sample("forecaster_live_interval_hits_total", **labels, horizon="2-6",
                  level="0.8") - hits_before == 3
    assert sample("forecaster_actuals_received_total") - received == 10
    assert sample("forecaster_actuals_matched_total") - matched == 9

    # the same actuals again: stored already, nothing new to count
    after = {(name, bucket): sample(name, **labels, horizon=bucket)
             for name in names for bucket in ("1", "2-6", "7-24")}
    again = store.upsert_actuals(observations(request.series))
    assert (again.accepted, again.matched, again.new_matches) == (10, 9, [])
    metrics.observe_actuals(again)
    assert after == {(name, bucket): sample(name, **labels, horizon=bucket)
                     for name in names for bucket in ("1", "2-6", "7-24")}
    store.close()


def test_the_served_versions_live_series_start_at_zero() -> None:
    # Prometheus's increase() ignores a series' first sample: born at 0, none is lost
    metrics.start_live_series("zero-model", 4, [0.05, 0.1, 0.5, 0.9, 0.95])
    for bucket in HORIZON_BUCKETS:
        labels = {"model_name": "zero-model", "model_version": "4", "horizon": bucket}
        for name in ("abs_error", "scaled_error", "smape", "points", "scaled_points"):
            assert REGISTRY.get_sample_value(f"forecaster_live_{name}_total", labels) == 0.0
        for level in ("0.8", "0.9"):
            for name in ("interval_hits", "interval_points"):
                assert REGISTRY.get_sample_value(f"forecaster_live_{name}_total",
                                                 {**labels, "level": level}) == 0.0
        # the median bounds no interval
        assert REGISTRY.get_sample_value("forecaster_live_interval_points_total",
                                         {**labels, "level": "0"}) is None


def test_the_backtest_gauge_follows_the_served_version() -> None:
    metrics.show_backtest_mase("gauge-test", 1, 0.8)
    assert sample("forecaster_backtest_mase", model_name="gauge-test",
                  model_version="1") == 0.8
    metrics.show_backtest_mase("gauge-test", 2, 0.9)
    # multiprocess mode cannot remove the old child: NaN, which no comparison passes
    assert math.isnan(sample("forecaster_backtest_mase", model_name="gauge-test",
                             model_version="1"))
    assert sample("forecaster_backtest_mase", model_name="gauge-test", model_version="2") == 0.9
    metrics.show_backtest_mase("gauge-test", 3, None)  # not recorded: nothing to show
    assert math.isnan(sample("forecaster_backtest_mase", model_name="gauge-test",
                             model_version="2"))
    assert REGISTRY.get_sample_value("forecaster_backtest_mase",
                                     {"model_name": "gauge-test", "model_version": "3"}) is None


# ---------------------------------------------------------------- the report
def test_the_report_carries_the_registrys_backtest_figures(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    client.create_registered_model("m")
    client.create_model_version("m", source=str(tmp_path), tags={
        "mase": "0.81", "smape": "11.5", "mae": "3.25", "coverage": "0.79"})
    client.create_model_version("m", source=str(tmp_path), tags={"mase": "nan"})
    assert registry_backtest(client, "m", "1") == BacktestFigures(mase=0.81, smape=11.5,
                                                                  mae=3.25)
    assert registry_backtest(client, "m", "2") == BacktestFigures()  # nothing usable
    assert registry_backtest(client, "m", "9") == BacktestFigures()  # no such version
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    dead = f"http://127.0.0.1:{_free_port()}"
    assert registry_backtest(MlflowClient(dead, dead), "m", "1") == BacktestFigures()

    live = VersionAccuracy(model_name="m", model_version="1", points=4, mae=1.5, mase=0.9,
                           smape=10.0, coverage={"0.8": 0.75}, by_horizon=[])
    report = accuracy_report([live], {("m", "1"): registry_backtest(client, "m", "1")})
    [version] = json.loads(report.model_dump_json())["versions"]
    assert version["backtest"] == {"mase": 0.81, "smape": 11.5, "mae": 3.25}
    assert (version["points"], version["mase"], version["coverage"]) == (4, 0.9, {"0.8": 0.75})
    assert backtest_figures({"mase": 1.1}) == BacktestFigures(mase=1.1)
    other = live.model_copy(update={"model_version": "5"})
    assert accuracy_report([other], {}).versions[0].backtest == BacktestFigures()


# ---------------------------------------------------------------- the token
def guarded(token: str | None, paths: set[str]) -> TestClient:
    async def ok(_: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    routes = [Route(path, ok, methods=["GET", "POST"])
              for path in ("/actuals", "/forecast", "/metrics", "/readyz")]
    return TestClient(BearerToken(Starlette(routes=routes), token=token, paths=paths))


def test_a_route_that_needs_the_token_answers_401_without_it() -> None:
    client = guarded("s3cret", {"/actuals"})
    for headers, reason in (({}, authorization_problem(None, "s3cret")),
                            ({"Authorization": "Basic s3cret"}, "the Authorization header "
                                                                "must be 'Bearer <token>'"),
                            ({"Authorization": "Bearer wrong"}, "invalid token")):
        answer = client.post("/actuals", json={}, headers=headers)
        assert answer.status_code == 401
        assert answer.headers["www-authenticate"] == "Bearer"
        assert answer.json() == {"error": reason, "detail": []}
    assert client.post("/actuals", headers={"Authorization": "Bearer s3cret"}).json() == \
        {"ok": True}
    assert client.post("/actuals/", headers={"Authorization": "Bearer wrong"}).status_code \
        == 401
    for path in ("/forecast", "/metrics", "/readyz"):  # not guarded: as they were
        assert client.post(path).status_code == 200


def test_reads_are_guarded_when_asked_and_nothing_without_a_token() -> None:
    client = guarded("s3cret", {"/actuals", "/forecast"})
    assert client.post("/forecast").status_code == 401
    assert client.post("/forecast", headers={"Authorization": "bearer s3cret"}).status_code \
        == 200
    assert client.get("/metrics").status_code == 200
    open_client = guarded(None, {"/actuals", "/forecast"})
    assert open_client.post("/actuals").status_code == 200
