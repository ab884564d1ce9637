"""The forecast log without a server: the scale of a history (sktime's MASE denominator, with
the race's season length), the rows of an answer (the numbers /forecast returned, at its
timestamps), and the queue: written in batches by its thread into a real SQLite store, rows
dropped and counted when the queue is full or the store is down, never blocking a request."""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from sktime.performance_metrics.forecasting import MeanAbsoluteScaledError
from sqlalchemy import func, select

from forecaster.seasonality import season_length_of
from pipelines.config import RaceConfig
from pipelines.forecast_store import forecasts
from serving.forecast_log import (
    QUEUE_FULL,
    STORE_UNAVAILABLE,
    ForecastLog,
    Served,
    logged_rows,
    seasonal_scale,
)
from serving.inference import RequestError, forward, prepare, render
from serving.model import ServedModel, load_version, resolve_alias
from serving.schemas import ForecastRequest
from serving.store_access import StoreAccess
from tests.conftest import PERIOD, _free_port, sine_series
from tests.pipeline_support import clean_mlflow_environment
from tests.serving_support import HORIZON, MODEL_NAME, Registry, make_registry

START = "2024-03-01T00:00:00"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, sine_panel: pd.DataFrame
             ) -> Registry:
    with clean_mlflow_environment():
        yield make_registry(tmp_path_factory.mktemp("forecast-log"), sine_panel, seeds=(0,))


@pytest.fixture(scope="module")
def champion(registry: Registry) -> ServedModel:
    version = resolve_alias(registry.client, MODEL_NAME, "champion")
    return load_version(registry.client, version, "champion", warmup_batch=8)


def answered(model: ServedModel, body: dict) -> tuple[Served, dict]:
    """A request answered as /forecast answers it: what the log receives, and the JSON."""
    request = ForecastRequest.model_validate_json(json.dumps(body))
    prepared = prepare(request, model, max_series=100)
    results = forward([prepared.items()])[0]
    return Served(request, prepared, results), json.loads(render(prepared, results))


def body_of(series: int = 3, timestamps: bool = True, start: str = START) -> dict:
    return {"series": [{"id": f"s{i}", "values": sine_series(40 + 4 * i, seed=i).tolist(),
                        **({"start": start, "freq": "h"} if timestamps else {})}
                       for i in range(series)], "horizon": HORIZON}


# ---------------------------------------------------------------- the scale
def test_the_scale_is_sktimes_mase_denominator() -> None:
    rng = np.random.default_rng(3)
    history = 10 + np.sin(np.arange(100) / 3) + rng.standard_normal(100)
    actual, forecast = rng.standard_normal(6) + 10, np.full(6, 10.0)
    for season in (1, 12, 24):
        mase = MeanAbsoluteScaledError(sp=season)(pd.Series(actual), pd.Series(forecast),
                                                  y_train=pd.Series(history))
        scale = seasonal_scale(history.tolist(), season)
        assert np.mean(np.abs(actual - forecast)) / scale == pytest.approx(mase, rel=1e-12)


def test_no_scale_without_a_full_season_or_any_error() -> None:
    assert seasonal_scale([1.0] * 24, 24) is None  # no value a season before another
    assert seasonal_scale([1.0, 2.0] * 20, 2) is None  # a perfect seasonal naive: scale 0
    assert seasonal_scale([1e308, -1e308] * 20, 1) is None  # the differences overflow
    assert seasonal_scale([1.0, 2.0, 4.0], 1) == 1.5


def test_the_season_is_the_races_rule_or_what_the_race_recorded(
        registry: Registry, champion: ServedModel) -> None:
    # the race's default: from the frequency, one rule for the backtest and the log
    assert season_length_of("h") == 24 and season_length_of("15min") == 1
    assert RaceConfig.model_validate({
        "name": "x", "data": {"loader": "m4_hourly", "data_dir": "x"}, "frequency": "D",
        "horizon": 2, "candidates": [{"model": "NaiveForecaster"}],
        "registry": {"model_name": "x"}}).season_length == season_length_of("D") == 7
    assert champion.info.season_length == 24  # logged without a race: the frequency's ("h")
    # a race logs its season length on the version's run: that one wins
    version = registry.client.get_model_version(MODEL_NAME, str(champion.version))
    with clean_mlflow_environment():
        mlflow.set_tracking_uri(registry.uri)
        registry.client.log_param(version.run_id, "season_length", str(PERIOD))
        assert load_version(registry.client, version, "champion", warmup_batch=1) \
            .info.season_length == PERIOD


# ---------------------------------------------------------------- the rows
def test_the_rows_are_what_forecast_answered(champion: ServedModel) -> None:
    body = body_of()
    body["series"][1] = {"id": "untimed", "values": sine_series(40).tolist()}
    body["series"][2]["start"] = "2024-03-01T00:00:00+02:00"  # stored in UTC
    body["quantiles"] = [0.1, 0.5, 0.9]
    served, answer = answered(champion, body)
    rows = logged_rows(served)
    assert served.rows == len(rows) == 2 * HORIZON  # the series without timestamps: none
    by_series = {f["id"]: f for f in answer["forecasts"]}
    for series in (body["series"][0], body["series"][2]):
        mine = [r for r in rows if r.series_id == series["id"]]
        forecast = by_series[series["id"]]
        assert [r.step for r in mine] == list(range(1, HORIZON + 1))
        assert [r.mean for r in mine] == forecast["mean"]  # the very numbers answered
        for level in ("0.1", "0.5", "0.9"):
            assert [r.quantiles[level] for r in mine] == forecast["quantiles"][level]
        assert [r.timestamp for r in mine] == \
            [datetime.fromisoformat(t) for t in forecast["timestamps"]]
        start = datetime.fromisoformat(series["start"])
        assert {r.origin for r in mine} == {start + timedelta(hours=len(series["values"]) - 1)}
        assert {r.scale for r in mine} == {seasonal_scale(series["values"], 24)}
        assert {(r.model_name, r.model_version) for r in mine} == {(MODEL_NAME, "1")}


def test_times_past_what_a_time_holds_are_a_400_naming_the_series(
        champion: ServedModel) -> None:
    for start, freq in (("9999-12-31T00:00:00", "D"),  # the steps ahead: past 9999
                        # the origin (the last value's), which the log keeps: year 0 in UTC
                        ("0001-01-01T00:00:00+05:00", "min")):
        body = body_of(series=2)
        body["series"][1] |= {"start": start, "freq": freq}
        with pytest.raises(RequestError) as caught:
            prepare(ForecastRequest.model_validate_json(json.dumps(body)), champion, 100)
        assert caught.value.loc == ("series", 1, "start")
        assert caught.value.reason == "timestamps_out_of_range"


# ---------------------------------------------------------------- the queue
def written(store: StoreAccess) -> int:
    with store.get().engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(forecasts)).scalar_one()


def test_the_thread_writes_batches_and_the_rest_at_stop(champion: ServedModel,
                                                        tmp_path: Path) -> None:
    store = StoreAccess(f"sqlite:///{tmp_path / 'store.db'}")
    dropped: Counter = Counter()
    served, _ = answered(champion, body_of(series=2))  # 12 rows
    log = ForecastLog(store, max_rows=1000, batch_rows=24, flush_seconds=30,
                      on_drop=lambda reason, rows: dropped.update({reason: rows}))
    log.start()
    log.submit(answered(champion, body_of(timestamps=False))[0])  # nothing to log
    assert log.queued_rows == 0
    for _ in range(2):
        log.submit(served)  # 24 rows: a full batch wakes the thread
    deadline = time.monotonic() + 20
    while written(store) < 24 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert written(store) == 24  # long before the 30 s flush interval
    log.submit(served)
    log.stop()
    assert written(store) == 36 and log.queued_rows == 0 and not dropped
    store.close()


def test_a_full_queue_drops_the_answer_and_counts_its_rows(champion: ServedModel,
                                                           tmp_path: Path) -> None:
    store = StoreAccess(f"sqlite:///{tmp_path / 'store.db'}")
    dropped: Counter = Counter()
    log = ForecastLog(store, max_rows=30, batch_rows=1000, flush_seconds=30,
                      on_drop=lambda reason, rows: dropped.update({reason: rows}))
    served, _ = answered(champion, body_of(series=2))  # 12 rows
    started = time.perf_counter()
    for _ in range(4):
        log.submit(served)  # the third and fourth do not fit
    assert (time.perf_counter() - started) < 0.01  # never waits
    assert dropped == {QUEUE_FULL: 24} and log.queued_rows == 24
    log.flush()
    assert written(store) == 24 and log.queued_rows == 0
    store.close()


def test_a_store_down_drops_the_queue_and_counts_it(champion: ServedModel) -> None:
    # a PostgreSQL port nobody listens on: refused at once, as a stopped server is
    store = StoreAccess(f"postgresql://postgres@127.0.0.1:{_free_port()}/nothing")
    store.try_open()  # reported, not raised: the service starts all the same
    dropped: Counter = Counter()
    log = ForecastLog(store, max_rows=1000, batch_rows=12, flush_seconds=30,
                      on_drop=lambda reason, rows: dropped.update({reason: rows}))
    served, _ = answered(champion, body_of(series=2))
    for _ in range(3):
        log.submit(served)
    log.flush()  # the first batch fails: it and the two queued behind it are dropped
    assert dropped == {STORE_UNAVAILABLE: 36} and log.queued_rows == 0


def test_the_thread_writes_at_most_its_share_of_the_time(champion: ServedModel,
                                                         tmp_path: Path) -> None:
    served, _ = answered(champion, body_of(series=2))  # 12 rows: one batch each

    runs = iter(range(100))

    def flush_time(share: float) -> float:
        store = StoreAccess(f"sqlite:///{tmp_path / f'store-{next(runs)}.db'}")
        store.get()  # opened (and migrated) before the clock starts
        log = ForecastLog(store, max_rows=1000, batch_rows=12, flush_seconds=30,
                          on_drop=lambda reason, rows: None, max_share=share)
        for _ in range(4):
            log.submit(served)
        started = time.perf_counter()
        log.flush()
        seconds = time.perf_counter() - started
        assert written(store) == 48
        store.close()
        return seconds

    alone = min(flush_time(1.0) for _ in range(3))  # no rest: the writes' own time
    # busy a quarter of the time: it rests three times as long as each batch took
    assert flush_time(0.25) >= 2.5 * alone
