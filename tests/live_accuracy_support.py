"""For the live accuracy tests (test_live_accuracy_e2e, test_prometheus_e2e): the forecast
store's row counts, actuals as POST /actuals takes them, and the MAE, MASE, sMAPE and coverage
of served forecasts against actuals, computed here independently of the service."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

import pandas as pd
from sklearn.metrics import mean_absolute_error
from sqlalchemy import create_engine, text

SEASON = 24  # the served models' frequency is "h"
# the central intervals of the served quantiles (forecaster's default levels): level -> bounds
LEVELS = {"0.5": ("0.25", "0.75"), "0.8": ("0.1", "0.9"), "0.9": ("0.05", "0.95")}
# the horizon buckets of the design (steps 1, 2-6, 7-24, 25+): label -> first and last step
BUCKETS = {"1": (1, 1), "2-6": (2, 6), "7-24": (7, 24), "25+": (25, float("inf"))}


def rows(url: str, table: str, where: str = "TRUE") -> int:
    """Rows of ``table`` in the store at ``url`` (PostgreSQL or SQLite)."""
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg2://", 1))
    try:
        with engine.connect() as connection:
            return connection.execute(text(f"SELECT count(*) FROM {table} WHERE {where}")
                                      ).scalar_one()
    finally:
        engine.dispose()


def wait_for(condition: Callable[[], bool], timeout: float = 30, what: str = "the condition"
             ) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not hold within {timeout} s")
        time.sleep(0.1)


def hourly_actuals(series_id: str, first: datetime, values: Sequence[float]
                   ) -> tuple[dict[datetime, float], dict]:
    """``values`` observed hourly from ``first``: by time (for :func:`expected_accuracy`), and
    as one series of a POST /actuals body."""
    times = [first + timedelta(hours=k) for k in range(len(values))]
    return (dict(zip(times, map(float, values), strict=True)),
            {"id": series_id, "values": list(map(float, values)),
             "start": first.isoformat(), "freq": "h"})


def expected_accuracy(served: list[dict], sent: list[dict], actuals: dict[str, dict]) -> dict:
    """MAE, MASE, sMAPE and coverage of the served forecasts against the actuals (series id ->
    time -> value; a series without actuals has no points), computed here: each matched
    point's error, MASE's over the in-sample seasonal naive MAE of its series' history
    (sklearn's MAE of the history against itself a season later); by_horizon: the buckets
    that have points."""
    scale = {s["id"]: mean_absolute_error(s["values"][SEASON:], s["values"][:-SEASON])
             for s in sent}
    points = []
    for forecast in served:
        for step, moment in enumerate(forecast["timestamps"]):
            actual = actuals.get(forecast["id"], {}).get(datetime.fromisoformat(moment))
            if actual is None:
                continue
            mean = forecast["mean"][step]
            points.append({"step": step + 1, "error": abs(actual - mean),
                           "scaled": abs(actual - mean) / scale[forecast["id"]],
                           "smape": 200 * abs(actual - mean) / (abs(actual) + abs(mean)),
                           **{level: forecast["quantiles"][low][step] <= actual
                              <= forecast["quantiles"][high][step]
                              for level, (low, high) in LEVELS.items()}})
    frame = pd.DataFrame(points)

    def figures(part: pd.DataFrame) -> dict:
        return {"points": len(part), "mae": part["error"].mean(),
                "mase": part["scaled"].mean(), "smape": part["smape"].mean()}

    masks = {bucket: frame["step"].between(low, high) for bucket, (low, high) in BUCKETS.items()}
    return {**figures(frame), "coverage": {level: frame[level].mean() for level in LEVELS},
            "by_horizon": [{"steps": bucket, **figures(frame[mask])}
                           for bucket, mask in masks.items() if mask.any()]}
