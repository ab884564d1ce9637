"""The forecast log and the actuals store: what the service forecast, what was then observed,
and the live accuracy that follows from the two.

A SQL database through SQLAlchemy, its schema kept by the Alembic migrations in
``store_migrations/`` (run to head by :meth:`ForecastStore.open`, under a lock, so several
workers may open one store at once). ``FORECASTER_STORE_URL`` selects it: by default SQLite in
the working directory, PostgreSQL in deployments (a bare ``postgresql://`` URL uses psycopg2,
the driver the project installs); ``none`` turns the log off.

- ``forecasts``: one row per served step (model, version, series, origin, step, timestamp,
  mean, quantiles, and the scale of the history: its in-sample seasonal-naive MAE, for MASE).
- ``actuals``: one value per (series, timestamp), upserted: posting the same actuals again
  changes nothing, a changed value replaces the old one.

The error terms and horizon buckets live here only (:func:`point_errors`,
:func:`horizon_bucket`, :func:`interval_levels`, :func:`interval_hit`): the service's
Prometheus counters and :meth:`ForecastStore.accuracy` both use them, so the two agree.
Timestamps are stored naive: an aware one is converted to UTC first.

A new migration: ``alembic.command.revision(migration_config(), "what it does")`` writes its
file under ``store_migrations/versions/``.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
from alembic import command
from alembic.config import Config
from pydantic import BaseModel
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    or_,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, Row, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, InterfaceError, NoSuchModuleError
from sqlalchemy.exc import OperationalError as SQLOperationalError

from forecaster.data import SERIES, TARGET, TIME

STORE_URL_VARIABLE = "FORECASTER_STORE_URL"
DEFAULT_STORE_URL = "sqlite:///forecaster-store.db"
STORE_OFF = "none"  # FORECASTER_STORE_URL=none: no forecast log

MIGRATIONS = Path(__file__).with_name("store_migrations")
# not Alembic's default alembic_version: the store may share a database with MLflow's tables,
# which keep their own migration state under that name
VERSION_TABLE = "forecaster_store_version"
# PostgreSQL: the advisory lock held while migrating, so that workers opening the store
# together migrate one after another (the later ones find it at head); any fixed 64-bit key
MIGRATION_LOCK_KEY = 0x666F72655F6D6967
CONNECT_TIMEOUT_S = 5  # an unreachable PostgreSQL host fails fast rather than hanging a worker
# SQLite: how long a connection waits for another's write lock before "database is locked".
# The driver's 5 s was too short for workers opening a new store together on a loaded machine:
# one migrates while the others wait, and migrating loads the migration scripts
SQLITE_BUSY_TIMEOUT_S = 30
SERIES_PER_QUERY = 300  # series per lookup of forecasts: 900 parameters, under SQLite's 999

# the horizon buckets of the live accuracy: the last step of each (None: no end)
_BUCKET_ENDS: tuple[tuple[int | None, str], ...] = ((1, "1"), (6, "2-6"), (24, "7-24"),
                                                    (None, "25+"))
HORIZON_BUCKETS = tuple(label for _, label in _BUCKET_ENDS)

metadata = MetaData()
# the schema as the latest migration leaves it (the migrations own it: change both together)
forecasts = Table(
    "forecasts", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("model_name", String, nullable=False),
    Column("model_version", String, nullable=False),
    Column("series_id", String, nullable=False),
    Column("origin", DateTime, nullable=False),
    Column("step", Integer, nullable=False),
    Column("timestamp", DateTime, nullable=False),
    Column("mean", Float, nullable=False),
    Column("quantiles", JSON, nullable=False),
    Column("scale", Float, nullable=True),
    Column("created_at", DateTime, nullable=False),
    Index("ix_forecasts_series_id_timestamp", "series_id", "timestamp"),
)
actuals = Table(
    "actuals", metadata,
    Column("series_id", String, primary_key=True),
    Column("timestamp", DateTime, primary_key=True),
    Column("value", Float, nullable=False),
    Column("received_at", DateTime, nullable=False),
)


class StoreUnavailable(Exception):
    """The store's database cannot be reached or refused the work (the message names the
    store without its password); nothing of the failed call was written."""


def store_url_from_environment() -> str | None:
    """``FORECASTER_STORE_URL``, else the default SQLite file; None when it is ``none``."""
    url = os.environ.get(STORE_URL_VARIABLE, "").strip() or DEFAULT_STORE_URL
    return None if url.lower() == STORE_OFF else url


# --- the error terms: one home for the counters and /accuracy ---------------------------------


class PointErrors(NamedTuple):
    abs_error: float
    scaled_error: float | None  # None without a usable scale (missing, zero or not finite)
    smape: float  # in percent, as M4: 0..200


def point_errors(actual: float, mean: float, scale: float | None) -> PointErrors:
    """The error terms of one forecast point: |a - f|, |a - f| / scale (MASE's term) and M4's
    sMAPE 200 |a - f| / (|a| + |f|), 0 when both are 0."""
    abs_error = abs(actual - mean)
    usable = scale is not None and math.isfinite(scale) and scale > 0
    denominator = abs(actual) + abs(mean)
    return PointErrors(abs_error, abs_error / scale if usable else None,
                       200.0 * abs_error / denominator if denominator > 0 else 0.0)


def horizon_bucket(step: int) -> str:
    """The bucket of a forecast step (1-based): one of :data:`HORIZON_BUCKETS`."""
    if step < 1:
        raise ValueError(f"step: a forecast step counts from 1, not {step}")
    return next(label for end, label in _BUCKET_ENDS if end is None or step <= end)


def interval_levels(quantiles: dict[str, float]) -> dict[str, tuple[str, str]]:
    """The central intervals a forecast's quantiles bound: level ``1 - 2q`` -> the keys of
    quantiles ``q`` and ``1 - q`` (``"0.1"`` and ``"0.9"`` -> ``"0.8"``)."""
    by_value = {round(float(key), 10): key for key in quantiles}
    return {f"{round(1 - 2 * q, 10):g}": (key, by_value[round(1 - q, 10)])
            for q, key in sorted(by_value.items())
            if q < 0.5 and round(1 - q, 10) in by_value}


def interval_hit(actual: float, quantiles: dict[str, float]) -> dict[str, bool]:
    """For each central interval of the quantiles: whether ``actual`` lies in it (bounds
    included)."""
    return {level: quantiles[low] <= actual <= quantiles[high]
            for level, (low, high) in interval_levels(quantiles).items()}


# --- what goes in and comes out ----------------------------------------------------------------


class LoggedForecast(NamedTuple):
    """One served forecast step (a named tuple: the log builds one a step, and a frozen
    dataclass costs five times as much to build)."""

    model_name: str
    model_version: str
    series_id: str
    origin: datetime  # the last timestamp of the history sent
    step: int  # 1..horizon
    timestamp: datetime
    mean: float
    quantiles: dict[str, float]  # {"0.1": value, ...}
    scale: float | None  # the history's in-sample seasonal-naive MAE; None if not computable


@dataclass(frozen=True)
class Observation:
    """One actual value."""

    series_id: str
    timestamp: datetime
    value: float


@dataclass(frozen=True)
class Match:
    """A logged forecast step and the actual that met it."""

    model_name: str
    model_version: str
    step: int
    actual: float
    mean: float
    scale: float | None
    quantiles: dict[str, float]


@dataclass(frozen=True)
class ActualsOutcome:
    """What :meth:`ForecastStore.upsert_actuals` did. ``accepted``: the distinct (series,
    timestamp) points posted; ``matched``: how many of them meet at least one logged forecast;
    ``new_matches``: the (forecast, actual) pairs of the points that were not already stored
    with that value, for the counters (re-posting the same actuals adds none)."""

    accepted: int
    matched: int
    new_matches: list[Match] = field(default_factory=list)


class HorizonAccuracy(BaseModel):
    steps: str  # a HORIZON_BUCKETS value
    points: int
    mae: float
    mase: float | None  # None when no point of the bucket had a scale
    smape: float


class VersionAccuracy(BaseModel):
    """Live accuracy of one model version over its matched points."""

    model_name: str
    model_version: str
    points: int
    mae: float
    mase: float | None
    smape: float
    coverage: dict[str, float]  # interval level ("0.8") -> share of points inside
    by_horizon: list[HorizonAccuracy]
    backtest: dict[str, float] | None = None  # the service fills it from the registry


@dataclass
class _Sums:
    """Running sums of the error terms of a group of matched points."""

    points: int = 0
    abs_error: float = 0.0
    smape: float = 0.0
    scaled_error: float = 0.0
    scaled_points: int = 0
    hits: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    interval_points: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, errors: PointErrors, hits: dict[str, bool]) -> None:
        self.points += 1
        self.abs_error += errors.abs_error
        self.smape += errors.smape
        if errors.scaled_error is not None:
            self.scaled_error += errors.scaled_error
            self.scaled_points += 1
        for level, hit in hits.items():
            self.hits[level] += hit
            self.interval_points[level] += 1

    def figures(self) -> dict[str, Any]:
        return {"points": self.points, "mae": self.abs_error / self.points,
                "smape": self.smape / self.points,
                "mase": self.scaled_error / self.scaled_points if self.scaled_points else None}


# --- the store ---------------------------------------------------------------------------------


def migration_config() -> Config:
    """Alembic's config for the store's migrations (no alembic.ini: the location is set here)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def shown_url(url: str | URL) -> str:
    """A store URL as messages and tags show it: without its password."""
    if isinstance(url, str):
        try:
            url = make_url(url)
        except ArgumentError:
            return url.rsplit("@", 1)[-1]  # not a URL: whatever might be credentials goes
    return url.render_as_string(hide_password=True)


def _engine_url(url: str) -> URL:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(f"store URL {shown_url(url)!r} is not a database URL (e.g. "
                         "sqlite:///forecaster-store.db or postgresql://user@host/forecaster)"
                         ) from None
    if parsed.drivername == "postgresql":  # SQLAlchemy 2.1 would pick psycopg 3
        parsed = parsed.set(drivername="postgresql+psycopg2")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(f"store URL {shown_url(parsed)!r}: the store runs on sqlite or "
                         f"postgresql, not {parsed.get_backend_name()}")
    return parsed


def _naive_utc(moment: datetime) -> datetime:
    if isinstance(moment, pd.Timestamp):
        moment = moment.to_pydatetime()
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _sqlite_transactions(engine: Engine) -> None:
    """SQLAlchemy, not the sqlite3 driver, begins SQLite's transactions (SQLAlchemy's recipe):
    the driver would run DDL outside them, so two processes migrating a new file together
    could both create the tables. WAL lets readers and the writer work at once."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA journal_mode=WAL")

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        # IMMEDIATE takes the write lock up front (migrations read, then write)
        mode = connection.get_execution_options().get("sqlite_begin", "")
        connection.exec_driver_sql(f"BEGIN {mode}".strip())


# COPY's text format: the forecasts' columns in the order _copy_text writes them
_COPY_COLUMNS = ("model_name", "model_version", "series_id", "origin", "scale", "step",
                 "timestamp", "mean", "quantiles", "created_at")
_COPY_FORECASTS = f"COPY forecasts ({', '.join(_COPY_COLUMNS)}) FROM STDIN"
_COPY_NULL = "\\N"
# what the text format escapes in a value: its delimiter, the line ends and the backslash
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_text(rows: Sequence[LoggedForecast], created_at: datetime) -> str:
    """The rows as the input of :data:`_COPY_FORECASTS`: a line each, tab-separated, escaped;
    times naive UTC, floats by repr (exact), quantiles as JSON. A forecast's rows share a
    template (its model, series, origin and scale and its quantiles' keys, escaped once), and
    a batch's rows their times: a row costs one %-format, most of it its floats' digits."""
    templates: dict[tuple[Any, ...], str] = {}
    times: dict[datetime, str] = {}
    lines = []
    for row in rows:
        share = (row.model_name, row.model_version, row.series_id, row.origin, row.scale,
                 *row.quantiles)
        template = templates.get(share)
        if template is None:
            template = templates[share] = _copy_template(row, created_at)
        moment = times.get(row.timestamp)
        if moment is None:
            moment = times[row.timestamp] = str(_naive_utc(row.timestamp))
        # float(): a numpy float would print its repr ("np.float64(...)")
        lines.append(template % (row.step, moment, float(row.mean),
                                 *map(float, row.quantiles.values())))
    return "".join(lines)


def _copy_template(row: LoggedForecast, created_at: datetime) -> str:
    """The %-format of a forecast's rows in :func:`_copy_text`: its shared values in place,
    the step, time, mean and quantile values to fill."""
    head = [str(value).translate(_COPY_ESCAPES).replace("%", "%%")
            for value in (row.model_name, row.model_version, row.series_id)]
    quantiles = ", ".join(json.dumps(str(key)).translate(_COPY_ESCAPES).replace("%", "%%")
                          + ": %r" for key in row.quantiles)
    scale = _COPY_NULL if row.scale is None else repr(float(row.scale))
    return "\t".join((*head, str(_naive_utc(row.origin)), scale, "%d", "%s", "%r",
                      f"{{{quantiles}}}", f"{created_at}\n"))


class ForecastStore:
    """The forecast log and actuals store on one database (see the module doc)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
        self._insert = dialect.insert

    @classmethod
    def open(cls, url: str) -> ForecastStore:
        """Connect to the store at ``url`` and migrate it to the latest schema. Raises
        ValueError for a URL that names no usable database, StoreUnavailable when the
        database does not answer."""
        parsed = _engine_url(url)
        connect_args = {"connect_timeout": CONNECT_TIMEOUT_S} \
            if parsed.get_backend_name() == "postgresql" else {"timeout": SQLITE_BUSY_TIMEOUT_S}
        try:
            # pre-ping: a connection the database dropped (a restart) is replaced on checkout
            engine = create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
        except (NoSuchModuleError, ImportError) as error:
            raise ValueError(f"store URL {shown_url(parsed)!r}: {error}") from None
        if engine.dialect.name == "sqlite":
            _sqlite_transactions(engine)
        store = cls(engine)
        try:
            store._migrate()
        except BaseException:
            engine.dispose()
            raise
        return store

    def _migrate(self) -> None:
        config = migration_config()
        with self._reachable(), \
                self.engine.execution_options(sqlite_begin="IMMEDIATE").begin() as connection:
            if connection.dialect.name == "postgresql":
                # released at commit; the migrations run in this same transaction
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                   {"key": MIGRATION_LOCK_KEY})
            config.attributes["connection"] = connection
            config.attributes["version_table"] = VERSION_TABLE
            command.upgrade(config, "head")

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> ForecastStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @contextmanager
    def _reachable(self) -> Iterator[None]:
        """Database outages as StoreUnavailable, with the store's URL minus its password."""
        driver = self.engine.dialect.loaded_dbapi  # its errors: those of the COPY's cursor
        try:
            yield
        except (SQLOperationalError, InterfaceError, driver.OperationalError,
                driver.InterfaceError) as error:
            raise StoreUnavailable(self._describe(error)) from None
        except DBAPIError as error:
            if error.connection_invalidated:
                raise StoreUnavailable(self._describe(error)) from None
            raise

    def _describe(self, error: Exception) -> str:
        url = self.engine.url
        cause = getattr(error, "orig", None) or error  # SQLAlchemy's wrapper: the driver's
        reason = (str(cause).strip() or type(cause).__name__).splitlines()[0]
        if url.password:
            reason = reason.replace(str(url.password), "***")
        return f"forecast store {shown_url(url)!r} unavailable: {reason}"

    def write_forecasts(self, rows: Sequence[LoggedForecast]) -> None:
        """Log served forecast steps, all in one transaction: on PostgreSQL by ``COPY``
        (several times cheaper a row than a batched INSERT: the log's capacity, see
        serving.forecast_log), elsewhere by a batched INSERT."""
        if not rows:
            return
        now = _now()
        with self._reachable(), self.engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                # the driver's cursor on the transaction's connection: committed with it
                with connection.connection.cursor() as cursor:
                    cursor.copy_expert(_COPY_FORECASTS, io.StringIO(_copy_text(rows, now)))
                return
            connection.execute(forecasts.insert(), [
                {"model_name": r.model_name, "model_version": str(r.model_version),
                 "series_id": str(r.series_id), "origin": _naive_utc(r.origin),
                 "step": int(r.step), "timestamp": _naive_utc(r.timestamp),
                 "mean": float(r.mean),
                 "quantiles": {str(k): float(v) for k, v in r.quantiles.items()},
                 "scale": None if r.scale is None else float(r.scale), "created_at": now}
                for r in rows])

    def upsert_actuals(self, points: Sequence[Observation]) -> ActualsOutcome:
        """Store actuals by (series, timestamp) in one transaction (a later point of the same
        key in ``points`` wins) and match them with the logged forecasts. Raises ValueError
        for a value that is not finite, StoreUnavailable when the database is down."""
        latest: dict[tuple[str, datetime], float] = {}
        for point in points:
            if not math.isfinite(point.value):
                raise ValueError(f"value: {point.value} at {point.timestamp} of series "
                                 f"{point.series_id!r} is not a finite number")
            latest[(str(point.series_id), _naive_utc(point.timestamp))] = float(point.value)
        if not latest:
            return ActualsOutcome(0, 0, [])
        now = _now()
        statement = self._insert(actuals)
        statement = statement.on_conflict_do_update(
            index_elements=[actuals.c.series_id, actuals.c.timestamp],
            set_={"value": statement.excluded.value, "received_at": statement.excluded.received_at},
            # an unchanged value is no update, so RETURNING leaves it out: the returned keys
            # are the points new to the store, even with another writer posting the same ones
            where=actuals.c.value.is_distinct_from(statement.excluded.value),
        ).returning(actuals.c.series_id, actuals.c.timestamp)
        keys = list(latest)
        with self._reachable(), self.engine.begin() as connection:
            changed = {(row.series_id, row.timestamp) for row in connection.execute(
                statement, [{"series_id": s, "timestamp": t, "value": latest[(s, t)],
                             "received_at": now} for s, t in keys])}
            met = [row for row in self._forecasts_between(connection, keys)
                   if (row.series_id, row.timestamp) in latest]
        matched = {(row.series_id, row.timestamp) for row in met}
        new_matches = [Match(row.model_name, row.model_version, row.step,
                             latest[(row.series_id, row.timestamp)], row.mean, row.scale,
                             row.quantiles)
                       for row in met if (row.series_id, row.timestamp) in changed]
        return ActualsOutcome(len(keys), len(matched), new_matches)

    @staticmethod
    def _forecasts_between(connection: Connection, keys: list[tuple[str, datetime]]
                           ) -> list[Row[Any]]:
        """The logged forecasts of each key's series from its first to its last key's
        timestamp: one range per series uses the (series_id, timestamp) index, in one query
        for a batch of consecutive points (a sparse batch reads more, left to the caller to
        filter)."""
        spans: dict[str, tuple[datetime, datetime]] = {}
        for key, moment in keys:
            first, last = spans.get(key, (moment, moment))
            spans[key] = (min(first, moment), max(last, moment))
        columns = [forecasts.c.series_id, forecasts.c.timestamp, forecasts.c.model_name,
                   forecasts.c.model_version, forecasts.c.step, forecasts.c.mean,
                   forecasts.c.scale, forecasts.c.quantiles]
        ranges = list(spans.items())
        return [row for start in range(0, len(ranges), SERIES_PER_QUERY)
                for row in connection.execute(select(*columns).where(or_(*(
                    (forecasts.c.series_id == key) & forecasts.c.timestamp.between(first, last)
                    for key, (first, last) in ranges[start:start + SERIES_PER_QUERY]))))]

    def accuracy(self, model_version: str | None = None, model_name: str | None = None
                 ) -> list[VersionAccuracy]:
        """The live accuracy of each (model name, version) with matched points, over all its
        logged forecasts that met an actual: MAE, MASE (over the points with a scale), M4's
        sMAPE, interval coverage per level, and the same by horizon bucket."""
        query = select(forecasts.c.model_name, forecasts.c.model_version, forecasts.c.step,
                       forecasts.c.mean, forecasts.c.scale, forecasts.c.quantiles,
                       actuals.c.value).join(actuals, (actuals.c.series_id
                                                       == forecasts.c.series_id)
                                             & (actuals.c.timestamp == forecasts.c.timestamp))
        if model_version is not None:
            query = query.where(forecasts.c.model_version == str(model_version))
        if model_name is not None:
            query = query.where(forecasts.c.model_name == model_name)
        totals: dict[tuple[str, str], _Sums] = defaultdict(_Sums)
        buckets: dict[tuple[str, str], dict[str, _Sums]] = defaultdict(
            lambda: defaultdict(_Sums))
        with self._reachable(), self.engine.connect() as connection:
            for row in connection.execute(query):
                errors = point_errors(row.value, row.mean, row.scale)
                key = (row.model_name, row.model_version)
                totals[key].add(errors, interval_hit(row.value, row.quantiles))
                buckets[key][horizon_bucket(row.step)].add(errors, {})
        return [VersionAccuracy(
            model_name=name, model_version=version, **sums.figures(),
            coverage={level: sums.hits[level] / n for level, n in sorted(
                sums.interval_points.items(), key=lambda item: float(item[0]))},
            by_horizon=[HorizonAccuracy(steps=label, **buckets[(name, version)][label].figures())
                        for label in HORIZON_BUCKETS if label in buckets[(name, version)]])
            for (name, version), sums in sorted(totals.items(), key=_version_order)]

    def read_panel(self, series: list[str] | None = None) -> pd.DataFrame:
        """The actuals as the race's long frame (columns SERIES, TIME, TARGET), sorted by
        series and time; only ``series`` when given."""
        query = select(actuals.c.series_id, actuals.c.timestamp, actuals.c.value) \
            .order_by(actuals.c.series_id, actuals.c.timestamp)
        if series is not None:
            query = query.where(actuals.c.series_id.in_([str(s) for s in series]))
        with self._reachable(), self.engine.connect() as connection:
            rows = connection.execute(query).all()
        frame = pd.DataFrame(rows, columns=[SERIES, TIME, TARGET])
        return frame.astype({SERIES: str, TIME: "datetime64[ns]", TARGET: "float64"})


def _version_order(item: tuple[tuple[str, str], Any]) -> tuple[str, int, str]:
    """Model name, then versions in number order ("10" after "9")."""
    name, version = item[0]
    return name, int(version) if version.isdigit() else -1, version
