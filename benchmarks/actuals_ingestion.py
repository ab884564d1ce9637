"""How fast the forecast store takes actuals: ``ForecastStore.upsert_actuals`` in points per
second, into PostgreSQL, against SQLite (the default store) measured in the same run.

    python -m benchmarks.actuals_ingestion [--postgres postgresql://postgres@127.0.0.1:5432]
                                           [--series 24] [--points 100] [--batches 10]
                                           [--runs 5]

Each batch is what one ``POST /actuals`` carries: ``--series`` series of ``--points``
consecutive hours. A run upserts ``--batches`` of them, one transaction each; the table gives
the median over ``--runs`` runs of three cases: points new to the store that meet no logged
forecast, new points that each meet one logged forecast (the matches are read back, as the
service needs them for its counters), and the same batches posted again (nothing changes).
PostgreSQL runs in a database created for the benchmark and dropped after it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg2
from sqlalchemy.engine import make_url

from pipelines.forecast_store import ForecastStore, LoggedForecast, Observation

START = datetime(2024, 1, 1)


@contextmanager
def postgres_database(server: str) -> Iterator[str]:
    """A new database on ``server`` (a URL without the database), dropped afterwards."""
    url = make_url(server)
    admin = psycopg2.connect(dbname="postgres", host=url.host, port=url.port or 5432,
                             user=url.username, password=url.password)
    admin.autocommit = True
    name = f"forecaster_bench_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def batches(run: int, args: argparse.Namespace) -> list[list[Observation]]:
    """The run's batches: each its own hours (runs and batches never overlap)."""
    rng = np.random.default_rng(run)
    out = []
    for batch in range(args.batches):
        first = START + timedelta(hours=(run * args.batches + batch) * args.points)
        out.append([Observation(f"s{series}", first + timedelta(hours=hour),
                                float(rng.normal(10, 1)))
                    for series in range(args.series) for hour in range(args.points)])
    return out


def forecasts_for(points: list[Observation]) -> list[LoggedForecast]:
    return [LoggedForecast("bench", "1", p.series_id, START, 1, p.timestamp, p.value + 0.5,
                           {"0.1": p.value - 1, "0.5": p.value + 0.5, "0.9": p.value + 2}, 1.0)
            for p in points]


def rates(url: str, args: argparse.Namespace) -> dict[str, float]:
    """Median points/s of each case over the runs, on the store at ``url``."""
    timings: dict[str, list[float]] = {"new": [], "new, matched": [], "re-posted": []}
    with ForecastStore.open(url) as store:
        for run in range(args.runs):
            plain = batches(2 * run, args)
            matched = batches(2 * run + 1, args)
            for batch in matched:  # logged beforehand, outside the timing
                store.write_forecasts(forecasts_for(batch))
            for case, posted in (("new", plain), ("new, matched", matched),
                                 ("re-posted", matched)):
                started = time.perf_counter()
                for batch in posted:
                    outcome = store.upsert_actuals(batch)
                seconds = time.perf_counter() - started
                assert outcome.matched == (0 if case == "new" else len(batch))
                assert len(outcome.new_matches) == (len(batch) if case == "new, matched" else 0)
                timings[case].append(args.batches * len(posted[0]) / seconds)
    return {case: statistics.median(values) for case, values in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432",
                        help="the PostgreSQL server (a database is created there and dropped)")
    parser.add_argument("--series", type=int, default=24)
    parser.add_argument("--points", type=int, default=100, help="hours per series and batch")
    parser.add_argument("--batches", type=int, default=10, help="batches per run")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    with postgres_database(args.postgres) as url:
        postgres = rates(url, args)
    with tempfile.TemporaryDirectory() as folder:
        sqlite = rates(f"sqlite:///{Path(folder) / 'store.db'}", args)
    table = pd.DataFrame({"PostgreSQL points/s": postgres, "SQLite points/s": sqlite})
    table["PostgreSQL / SQLite"] = table["PostgreSQL points/s"] / table["SQLite points/s"]
    table.index.name = (f"upsert_actuals, batches of {args.series}x{args.points} points "
                        f"(median of {args.runs} runs of {args.batches} batches)")
    print(table.to_markdown(floatfmt=("", ",.0f", ",.0f", ".2f")))


if __name__ == "__main__":
    main()
