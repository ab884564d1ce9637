"""The forecast store (pipelines/forecast_store.py), each test on SQLite (the default) and on a
fresh database of the real PostgreSQL: its migrations, idempotent upserts of actuals, live
accuracy against the same figures computed here independently (sktime's MAE, M4's sMAPE with
numpy), its error terms and buckets, outages as StoreUnavailable, and a race that reads the
store as its data."""

from __future__ import annotations

import multiprocessing
import sqlite3
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
from alembic.script import ScriptDirectory
from sktime.performance_metrics.forecasting import mean_absolute_error
from sqlalchemy import func, inspect, select, text

from forecaster.data import SERIES, TARGET, TIME
from pipelines.config import ConfigError, RaceConfig, parse_config
from pipelines.forecast_store import (
    DEFAULT_STORE_URL,
    HORIZON_BUCKETS,
    STORE_URL_VARIABLE,
    VERSION_TABLE,
    ForecastStore,
    LoggedForecast,
    Match,
    Observation,
    StoreUnavailable,
    forecasts,
    horizon_bucket,
    interval_hit,
    interval_levels,
    migration_config,
    point_errors,
    store_url_from_environment,
)
from pipelines.race import prepare_race, run_race
from pipelines.sources import source_description
from tests.conftest import POSTGRES_DSN, _free_port, _postgres_admin, postgres_database
from tests.pipeline_support import SNAIVE, clean_mlflow_environment, race_config

ORIGIN = datetime(2024, 3, 1, 23)  # the last hour of the history each forecast was made from
QUANTILES = ("0.05", "0.1", "0.5", "0.9", "0.95")  # central intervals 0.9 and 0.8
WORKERS = 4  # processes opening one new store at once


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
    else:
        with postgres_database("forecaster_store") as url:
            yield url


@pytest.fixture
def store(store_url: str) -> Iterator[ForecastStore]:
    with ForecastStore.open(store_url) as opened:
        yield opened


def hour(step: int) -> datetime:
    return ORIGIN + timedelta(hours=step)


def forecast_rows(version: str, series: str, horizon: int, seed: int,
                  scale: float | None = 2.0) -> list[LoggedForecast]:
    """A forecast of ``horizon`` hours after ORIGIN with noisy means and widening quantiles."""
    rng = np.random.default_rng(seed)
    means = 10 + rng.normal(0, 1, horizon)
    return [LoggedForecast("m", version, series, ORIGIN, step, hour(step), float(mean),
                           {q: float(mean + (float(q) - 0.5) * 4 * (1 + step / 10))
                            for q in QUANTILES}, scale)
            for step, mean in enumerate(means, start=1)]


# --- migrations --------------------------------------------------------------------------------


def test_migrations_to_head_create_the_tables(store_url: str) -> None:
    head = ScriptDirectory.from_config(migration_config()).get_current_head()
    for _ in range(2):  # opening an existing store leaves it as it is
        with ForecastStore.open(store_url) as store:
            inspector = inspect(store.engine)
            assert {"forecasts", "actuals", VERSION_TABLE} <= set(inspector.get_table_names())
            assert "alembic_version" not in inspector.get_table_names()  # MLflow's name
            assert {c["name"] for c in inspector.get_columns("forecasts")} == {
                "id", "model_name", "model_version", "series_id", "origin", "step",
                "timestamp", "mean", "quantiles", "scale", "created_at"}
            assert inspector.get_pk_constraint("actuals")["constrained_columns"] == [
                "series_id", "timestamp"]
            assert [i["column_names"] for i in inspector.get_indexes("forecasts")] == [
                ["series_id", "timestamp"]]
            with store.engine.connect() as connection:
                versions = connection.execute(
                    text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
            assert versions == [head]


def open_when_all_are_ready(url: str, barrier: Any) -> None:
    barrier.wait()
    ForecastStore.open(url).close()


def test_a_worker_waits_out_a_sqlite_write_lock_held_longer_than_the_drivers_default(
        tmp_path: Path) -> None:
    """The sqlite3 driver gives up on a locked database after 5 s; a worker opening the store
    while another holds the write lock (migrating, on a loaded machine) must wait instead."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    ForecastStore.open(url).close()
    holding, release = multiprocessing.get_context("fork").Event(), 6.0  # seconds, past 5

    def hold_the_write_lock() -> None:
        connection = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
        connection.execute("BEGIN IMMEDIATE")
        holding.set()
        time.sleep(release)
        connection.execute("COMMIT")

    holder = multiprocessing.get_context("fork").Process(target=hold_the_write_lock)
    holder.start()
    assert holding.wait(30)
    started = time.monotonic()
    with ForecastStore.open(url) as store:  # migrating takes the write lock: it waits
        assert {"forecasts", "actuals"} <= set(inspect(store.engine).get_table_names())
    holder.join(30)
    assert holder.exitcode == 0
    assert time.monotonic() - started > 5.0  # it did wait past the driver's default


def test_workers_opening_a_new_store_together_migrate_it_once(store_url: str) -> None:
    # processes, as the service's workers are (forked: they start at once, already imported)
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(WORKERS)
    workers = [context.Process(target=open_when_all_are_ready, args=(store_url, barrier))
               for _ in range(WORKERS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [w.exitcode for w in workers] == [0] * WORKERS  # none failed on the migrations
    with ForecastStore.open(store_url) as store:
        assert {"forecasts", "actuals"} <= set(inspect(store.engine).get_table_names())


# --- actuals -----------------------------------------------------------------------------------


def test_upserting_the_same_actuals_again_changes_nothing(store: ForecastStore) -> None:
    store.write_forecasts(forecast_rows("1", "a", 3, seed=0)
                          + forecast_rows("2", "a", 2, seed=1))
    posted = [Observation("a", hour(step), 10.0 + step) for step in (1, 2, 3, 4)]

    first = store.upsert_actuals(posted)
    # hour 4 met no forecast; hours 1 and 2 met two each (versions 1 and 2), hour 3 one
    assert (first.accepted, first.matched) == (4, 3)
    assert sorted((m.model_version, m.step, m.actual) for m in first.new_matches) == [
        ("1", 1, 11.0), ("1", 2, 12.0), ("1", 3, 13.0), ("2", 1, 11.0), ("2", 2, 12.0)]
    stored = store.read_panel()

    again = store.upsert_actuals(posted)
    assert (again.accepted, again.matched, again.new_matches) == (4, 3, [])
    pd.testing.assert_frame_equal(store.read_panel(), stored)

    changed = store.upsert_actuals([Observation("a", hour(2), 20.0),
                                    Observation("a", hour(3), 13.0)])
    assert (changed.accepted, changed.matched) == (2, 2)
    assert sorted((m.model_version, m.step, m.actual) for m in changed.new_matches) == [
        ("1", 2, 20.0), ("2", 2, 20.0)]
    panel = store.read_panel()
    assert list(panel[TARGET]) == [11.0, 20.0, 13.0, 14.0]
    assert list(panel[TIME]) == [hour(s) for s in (1, 2, 3, 4)]


def test_only_the_posted_timestamps_meet_forecasts(store: ForecastStore) -> None:
    store.write_forecasts(forecast_rows("1", "a", 5, seed=0) + forecast_rows("1", "b", 5, seed=1))
    outcome = store.upsert_actuals([Observation("a", hour(1), 1.0), Observation("a", hour(4), 4.0),
                                    Observation("b", hour(3), 3.0)])
    assert (outcome.accepted, outcome.matched) == (3, 3)
    assert sorted((m.step, m.actual) for m in outcome.new_matches) == [
        (1, 1.0), (3, 3.0), (4, 4.0)]  # not hours 2 and 3 of a, between its posted ones


def test_a_match_carries_the_logged_forecast(store: ForecastStore) -> None:
    row = forecast_rows("7", "b", 1, seed=3, scale=None)[0]
    store.write_forecasts([row])
    outcome = store.upsert_actuals([Observation("b", hour(1), 9.5)])
    assert outcome.new_matches == [Match("m", "7", 1, 9.5, row.mean, None, row.quantiles)]


def test_actuals_in_one_batch_keep_the_last_value_of_a_key(store: ForecastStore) -> None:
    outcome = store.upsert_actuals([Observation("a", hour(1), 1.0),
                                    Observation("a", hour(1), 2.0)])
    assert (outcome.accepted, outcome.matched) == (1, 0)
    assert list(store.read_panel()[TARGET]) == [2.0]


def test_an_aware_timestamp_is_stored_in_utc(store: ForecastStore) -> None:
    plus_two = timezone(timedelta(hours=2))
    store.upsert_actuals([Observation("a", hour(3).replace(tzinfo=plus_two), 1.0)])
    assert list(store.read_panel()[TIME]) == [hour(1)]


# what the COPY text format escapes or the %-template could mistake, and unicode
AWKWARD = ("a,b", 'say "hi"', "tab\there", "back\\slash\\N", "new\nline\r", "100%s %d",
           "ünï €😀", "\\N", "")


def awkward_rows() -> list[LoggedForecast]:
    """Many rows (a few thousand) of awkward series ids, quantile keys, times and numbers."""
    rng = np.random.default_rng(7)
    plus_two = timezone(timedelta(hours=2))
    rows = []
    for i in range(300):
        series = f"{AWKWARD[i % len(AWKWARD)]}-{i}"
        origin = ORIGIN.replace(tzinfo=plus_two) if i % 3 == 0 else pd.Timestamp(ORIGIN)
        keys = ("0.1", "0.9") if i % 2 else ("0.05", 'q"\\%\t', "0.95")
        for step in range(1, 13):
            mean = [float(rng.normal()), 1e-300, -1e308, 0.1][step % 4]
            rows.append(LoggedForecast(
                AWKWARD[i % len(AWKWARD)] or "m", f"{i % 4}", series, origin, step,
                origin + timedelta(hours=step, microseconds=i), np.float64(mean),
                {key: float(rng.normal()) for key in keys}, None if i % 5 == 0 else 1 / 3))
    return rows


def test_written_forecasts_read_back_exactly(store: ForecastStore) -> None:
    # on PostgreSQL by COPY, on SQLite by INSERT: either reads back what was written
    rows = awkward_rows()
    store.write_forecasts(rows[:1000])
    store.write_forecasts(rows[1000:])
    with store.engine.connect() as connection:
        stored = connection.execute(select(
            forecasts.c.model_name, forecasts.c.model_version, forecasts.c.series_id,
            forecasts.c.origin, forecasts.c.step, forecasts.c.timestamp, forecasts.c.mean,
            forecasts.c.quantiles, forecasts.c.scale).order_by(forecasts.c.id)).all()

    def utc(moment: datetime) -> datetime:
        moment = pd.Timestamp(moment)
        return (moment.tz_convert(None) if moment.tzinfo else moment).to_pydatetime()

    assert [tuple(row) for row in stored] == [
        (r.model_name, r.model_version, r.series_id, utc(r.origin), r.step, utc(r.timestamp),
         float(r.mean), r.quantiles, r.scale) for r in rows]


def test_a_write_the_database_cancels_is_store_unavailable_and_writes_nothing() -> None:
    # a statement timeout cancels the COPY on the server: the driver's own error, mapped
    with postgres_database("forecaster_store") as url, ForecastStore.open(url) as store:
        with store.engine.connect() as connection:
            connection.execute(text(f"ALTER DATABASE {store.engine.url.database} "
                                    "SET statement_timeout = 1"))
            connection.commit()
        store.engine.dispose()  # new sessions take the setting
        with pytest.raises(StoreUnavailable, match="canceling statement"):
            store.write_forecasts(awkward_rows() * 20)
        with store.engine.connect() as connection:
            connection.execute(text("SET statement_timeout = 0"))
            assert connection.execute(select(func.count()).select_from(forecasts)) \
                .scalar_one() == 0


def test_a_value_that_is_not_finite_writes_nothing(store: ForecastStore) -> None:
    with pytest.raises(ValueError, match=r"value: nan at .* of series 'a' is not a finite"):
        store.upsert_actuals([Observation("a", hour(1), 1.0),
                              Observation("a", hour(2), float("nan"))])
    assert store.read_panel().empty


def test_read_panel_is_the_race_long_frame(store: ForecastStore) -> None:
    store.upsert_actuals([Observation(key, hour(step), float(step))
                          for key in ("b", "a", "c") for step in (2, 1)])
    panel = store.read_panel()
    assert list(panel.columns) == [SERIES, TIME, TARGET]
    assert list(zip(panel[SERIES], panel[TARGET], strict=True)) == [
        ("a", 1.0), ("a", 2.0), ("b", 1.0), ("b", 2.0), ("c", 1.0), ("c", 2.0)]
    assert pd.api.types.is_datetime64_any_dtype(panel[TIME])
    assert set(store.read_panel(["c", "a"])[SERIES]) == {"a", "c"}


# --- accuracy ----------------------------------------------------------------------------------


def expected_figures(actual: np.ndarray, mean: np.ndarray, scale: np.ndarray
                     ) -> dict[str, float | None]:
    """MAE by sktime, MASE as the mean of |a - f| / scale over the points with a scale, M4's
    sMAPE: computed here, not by the store's error terms."""
    scaled = ~np.isnan(scale)
    denominator = np.abs(actual) + np.abs(mean)
    smape = np.divide(200 * np.abs(actual - mean), denominator,
                      out=np.zeros_like(actual), where=denominator > 0)  # 0 / 0 counts as 0
    return {"points": len(actual),
            "mae": mean_absolute_error(pd.Series(actual), pd.Series(mean)),
            "mase": float(np.mean(np.abs(actual - mean)[scaled] / scale[scaled]))
            if scaled.any() else None,
            "smape": float(np.mean(smape))}


def test_accuracy_equals_the_figures_computed_independently(store: ForecastStore) -> None:
    horizon = 30  # every bucket: 1, 2-6, 7-24, 25+
    logged = (forecast_rows("1", "a", horizon, seed=0) + forecast_rows("1", "b", horizon, seed=1,
                                                                       scale=0.5)
              + forecast_rows("1", "c", horizon, seed=2, scale=None)  # no MASE term
              + forecast_rows("2", "a", 12, seed=3))
    store.write_forecasts(logged)
    rng = np.random.default_rng(9)
    observed = {(key, hour(step)): float(10 + rng.normal(0, 2))
                for key in ("a", "b", "c") for step in range(1, 28)}  # 28..30 not observed
    observed[("b", hour(5))] = 0.0
    logged.append(LoggedForecast("m", "1", "b", ORIGIN, 5, hour(5), 0.0,
                                 {"0.1": -1.0, "0.9": 1.0}, 0.5))  # sMAPE's 0/0
    store.write_forecasts(logged[-1:])
    store.upsert_actuals([Observation(k, t, v) for (k, t), v in observed.items()])

    frame = pd.DataFrame([{"version": f.model_version, "step": f.step, "mean": f.mean,
                           "scale": np.nan if f.scale is None else f.scale,
                           "actual": observed[(f.series_id, f.timestamp)],
                           "q": f.quantiles}
                          for f in logged if (f.series_id, f.timestamp) in observed])
    bounds = {"1": (1, 1), "2-6": (2, 6), "7-24": (7, 24), "25+": (25, 10**6)}
    result = {v.model_version: v for v in store.accuracy()}
    assert set(result) == {"1", "2"}
    for version, rows in frame.groupby("version"):
        got = result[version]
        want = expected_figures(rows.actual.to_numpy(), rows["mean"].to_numpy(),
                                rows.scale.to_numpy())
        assert got.points == want["points"]
        for name in ("mae", "mase", "smape"):
            assert getattr(got, name) == pytest.approx(want[name], rel=1e-12), name
        coverage = {}
        for level, (low, high) in {"0.8": ("0.1", "0.9"), "0.9": ("0.05", "0.95")}.items():
            has = rows[rows.q.map(lambda q, low=low: low in q)]
            inside = [q[low] <= a <= q[high] for q, a in zip(has.q, has.actual, strict=True)]
            coverage[level] = float(np.mean(inside))
        assert got.coverage == pytest.approx(coverage, rel=1e-12)
        assert 0 < coverage["0.8"] < 1  # the check means something
        buckets = []
        for label, (first, last) in bounds.items():
            part = rows[(rows.step >= first) & (rows.step <= last)]
            if len(part):
                buckets.append((label, expected_figures(
                    part.actual.to_numpy(), part["mean"].to_numpy(), part.scale.to_numpy())))
        assert [b.steps for b in got.by_horizon] == [label for label, _ in buckets]
        for bucket, (_, figures) in zip(got.by_horizon, buckets, strict=True):
            assert bucket.model_dump(exclude={"steps"}) == pytest.approx(figures, rel=1e-12)
    assert [b.steps for b in result["1"].by_horizon] == list(HORIZON_BUCKETS)
    assert [b.steps for b in result["2"].by_horizon] == ["1", "2-6", "7-24"]

    only = store.accuracy(model_version="2")
    assert [v.model_version for v in only] == ["2"] and only[0] == result["2"]
    assert store.accuracy(model_name="another") == []


# --- the error terms ---------------------------------------------------------------------------


def test_point_errors() -> None:
    assert point_errors(12.0, 10.0, 4.0) == (2.0, 0.5, pytest.approx(200 * 2 / 22))
    assert point_errors(-1.0, 1.0, None) == (2.0, None, 200.0)
    assert point_errors(0.0, 0.0, 1.0) == (0.0, 0.0, 0.0)  # M4: 0/0 counts as 0
    for unusable in (None, 0.0, float("nan"), float("inf")):
        assert point_errors(3.0, 1.0, unusable).scaled_error is None


def test_horizon_buckets() -> None:
    assert [horizon_bucket(s) for s in (1, 2, 6, 7, 24, 25, 720)] == [
        "1", "2-6", "2-6", "7-24", "7-24", "25+", "25+"]
    assert set(HORIZON_BUCKETS) == {horizon_bucket(s) for s in range(1, 30)}
    with pytest.raises(ValueError, match="step: a forecast step counts from 1"):
        horizon_bucket(0)


def test_interval_levels_pair_the_quantiles() -> None:
    quantiles = {"0.05": 1.0, "0.1": 2.0, "0.5": 3.0, "0.9": 4.0, "0.95": 5.0, "0.3": 2.5}
    assert interval_levels(quantiles) == {"0.9": ("0.05", "0.95"), "0.8": ("0.1", "0.9")}
    assert interval_levels({"0.5": 1.0, "0.2": 0.0}) == {}  # 0.2 has no 0.8
    assert interval_hit(4.0, quantiles) == {"0.9": True, "0.8": True}  # bounds included
    assert interval_hit(4.5, quantiles) == {"0.9": True, "0.8": False}
    assert interval_hit(0.0, quantiles) == {"0.9": False, "0.8": False}


# --- where the store is ------------------------------------------------------------------------


def test_the_store_url_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(STORE_URL_VARIABLE, raising=False)
    assert store_url_from_environment() == DEFAULT_STORE_URL == "sqlite:///forecaster-store.db"
    monkeypatch.setenv(STORE_URL_VARIABLE, "postgresql://db/forecaster")
    assert store_url_from_environment() == "postgresql://db/forecaster"
    monkeypatch.setenv(STORE_URL_VARIABLE, "none")
    assert store_url_from_environment() is None


def test_a_closed_port_is_store_unavailable_without_the_password() -> None:
    url = f"postgresql://forecaster:s3cret@127.0.0.1:{_free_port()}/store"
    with pytest.raises(StoreUnavailable) as raised:
        ForecastStore.open(url)
    message = str(raised.value)
    assert "s3cret" not in message and "forecaster:***@127.0.0.1" in message
    assert "unavailable" in message and "\n" not in message


@pytest.mark.parametrize(("url", "problem"), [
    ("mysql://db/forecaster", "runs on sqlite or postgresql, not mysql"),
    ("no url at all", "is not a database URL"),
])
def test_a_url_of_no_usable_database_is_a_value_error(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        ForecastStore.open(url)


def test_a_postgresql_restart_is_survived_by_the_open_store() -> None:
    with postgres_database("forecaster_store") as url, ForecastStore.open(url) as store:
        store.upsert_actuals([Observation("a", hour(1), 1.0)])
        # the server ends every session of the database, as a restart does to a pooled one
        admin = _postgres_admin()
        with admin.cursor() as cursor:
            cursor.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                           "WHERE datname = %s AND pid <> pg_backend_pid()",
                           (store.engine.url.database,))
            assert cursor.fetchone()[0] >= 1
        admin.close()
        assert store.upsert_actuals([Observation("a", hour(2), 2.0)]).accepted == 1
        assert list(store.read_panel()[TARGET]) == [1.0, 2.0]


# --- the race's data ---------------------------------------------------------------------------


def hourly_actuals(hours: int = 168) -> list[Observation]:
    rng = np.random.default_rng(0)
    start = datetime(2024, 1, 1)
    return [Observation(key, start + timedelta(hours=t),
                        float(10 + i + np.sin(2 * np.pi * t / 24 + i) + 0.1 * rng.normal()))
            for i, key in enumerate(("s1", "s2", "s3")) for t in range(hours)]


@pytest.fixture
def store_race(store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
               ) -> Iterator[tuple[RaceConfig, list[Observation]]]:
    """A race config whose data are three series of hourly actuals in the store, which it
    finds through the environment (data.url left out)."""
    points = hourly_actuals()
    with ForecastStore.open(store_url) as store:
        store.upsert_actuals(points)
    monkeypatch.setenv(STORE_URL_VARIABLE, store_url)
    with clean_mlflow_environment():
        # the data_dir of race_config's M4 source goes unused: the store replaces it
        yield race_config(tmp_path, tmp_path, [SNAIVE], data={"loader": "store"},
                          tracking={"enable_system_metrics_logging": False}), points


def test_a_race_reads_the_store_as_its_data(
        store_race: tuple[RaceConfig, list[Observation]], store_url: str) -> None:
    config, points = store_race
    assert source_description(config.data) == f"store:{store_url}"
    data = prepare_race(config).data
    assert list(data.lengths.items()) == [("s1", 168), ("s2", 168), ("s3", 168)]
    assert data.long[TARGET].tolist() == [p.value for p in points]
    assert data.long[TIME].tolist() == [p.timestamp for p in points]


@pytest.mark.slow
@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_a_race_on_the_store_completes(store_race: tuple[RaceConfig, list[Observation]],
                                       store_url: str) -> None:
    config, _ = store_race
    result = run_race(config, progress=False)
    assert result.winner == "snaive" and result.promoted
    assert mlflow.get_run(result.run_id).data.tags["data_source"] == f"store:{store_url}"


def test_an_unreachable_store_fails_the_race_before_training(tmp_path: Path) -> None:
    url = f"postgresql://race:s3cret@127.0.0.1:{_free_port()}/store"
    with clean_mlflow_environment():
        config = race_config(tmp_path, tmp_path, [SNAIVE], data={"loader": "store", "url": url})
        with pytest.raises(ConfigError) as raised:
            run_race(config, progress=False)
    assert len(raised.value.problems) == 1
    problem = raised.value.problems[0]
    assert problem.startswith("data.url: forecast store 'postgresql+psycopg2://race:***@")
    assert "s3cret" not in str(raised.value) and "\n" not in problem
    assert not (tmp_path / "mlflow.db").exists()  # nothing was tracked


@pytest.mark.parametrize(("url", "problem"), [
    ("mysql://db/x", "data.url: store URL 'mysql://db/x': the store runs on sqlite or "
                     "postgresql"),
    ("sqlite:///{tmp}/absent.db", "data.url: no store at sqlite:///{tmp}/absent.db"),
])
def test_a_bad_store_url_is_a_config_error(url: str, problem: str, tmp_path: Path) -> None:
    config = race_config(tmp_path, tmp_path, [SNAIVE],
                         data={"loader": "store", "url": url.format(tmp=tmp_path)})
    with pytest.raises(ConfigError, match=problem.format(tmp=tmp_path)):
        prepare_race(config)
    assert not (tmp_path / "absent.db").exists()  # reading created no empty store


def test_the_store_keys_of_the_data_section() -> None:
    base = {"name": "r", "horizon": 2, "registry": {"model_name": "m"},
            "candidates": [{"model": "NaiveForecaster"}]}
    with pytest.raises(ConfigError, match="data: `url` applies to loader store only"):
        parse_config({**base, "data": {"path": "x.csv", "url": "sqlite:///s.db"}})
    with pytest.raises(ConfigError, match="`data_dir` applies to the m4_hourly and etth1"):
        parse_config({**base, "data": {"loader": "store", "data_dir": "/data"}})
    config = parse_config({**base, "data": {"loader": "store"}})
    assert (config.data.loader, config.data.url) == ("store", None)


def test_psycopg2_is_the_driver_of_a_bare_postgresql_url() -> None:
    # the project installs psycopg2-binary; SQLAlchemy 2.1 alone would pick psycopg 3
    user, host, port = POSTGRES_DSN["user"], POSTGRES_DSN["host"], POSTGRES_DSN["port"]
    with postgres_database("forecaster_store") as url:
        database = url.rsplit("/", 1)[1]
        with ForecastStore.open(f"postgresql://{user}@{host}:{port}/{database}") as store:
            assert store.engine.dialect.driver == "psycopg2"
