"""The forecast log: each forecast served with timestamps (a series sent with ``start`` and
``freq``) is written to the store (pipelines.forecast_store), one row per step, for the live
accuracy that the actuals posted later give (POST /actuals, GET /accuracy).

Writing never slows or fails /forecast. A request hands the log what it already holds (the
parsed request, the prepared request and the model's forecasts) and goes on; a thread of the
worker turns them into rows and writes them in batches of ``batch_rows``, at least every
``flush_seconds``. That thread shares the worker's CPU (and the GIL) with the requests, and the
database often shares the machine: it writes at most ``max_share`` of the time, resting after
each batch in proportion to the time the batch took, so that the log costs the service at most
about that share of its throughput whatever the rate of forecasts. The queue holds at most
``max_rows`` rows: a request whose rows do not fit is not logged (``queue_full``: the log
cannot keep up); a batch the store cannot take (StoreUnavailable: the database is down) is
dropped with everything queued behind it (``store_unavailable``), and the next flush tries
again. Each dropped row is counted (forecaster_forecast_log_dropped_total).

Each row carries the scale of its series: the in-sample MAE of the seasonal naive forecast on
the history that was sent, with the model's season length, the denominator of the backtest's
MASE (sktime's MeanAbsoluteScaledError), so that the live MASE is the backtest's.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pipelines.forecast_store import LoggedForecast, StoreUnavailable
from serving.inference import PreparedRequest, served_forecast
from serving.model import Forecasts
from serving.schemas import ForecastRequest
from serving.store_access import StoreAccess

logger = logging.getLogger(__name__)

QUEUE_FULL = "queue_full"
STORE_UNAVAILABLE = "store_unavailable"
FAILED = "error"  # a batch that failed for another reason (a bug): logged with its traceback


def seasonal_scale(values: Sequence[float], season: int) -> float | None:
    """The in-sample MAE of the seasonal naive forecast of ``values`` (each value forecast by
    the one ``season`` steps before): MASE's denominator. None when the history is not longer
    than a season, or when that MAE is zero or not finite (no error can be scaled by it)."""
    history = np.asarray(values, dtype=np.float64)
    if len(history) <= season:
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        scale = float(np.mean(np.abs(history[season:] - history[:-season])))
    return scale if math.isfinite(scale) and scale > 0 else None


@dataclass(frozen=True)
class Served:
    """A /forecast answer as the log receives it: the parsed request, the request prepared
    against the model that answered, and its forecasts (all rendered)."""

    request: ForecastRequest
    prepared: PreparedRequest
    forecasts: Forecasts

    @property
    def rows(self) -> int:
        """Its rows in the log: a step of each series with timestamps."""
        return sum(t is not None for t in self.prepared.timestamps) * self.prepared.horizon


def logged_rows(served: Served) -> list[LoggedForecast]:
    """The rows of an answer: for each series with timestamps, one per step, with the mean and
    quantiles as /forecast returned them, at the times the request computed (its origin and
    steps, :attr:`PreparedRequest.times`)."""
    prepared = served.prepared
    info = prepared.model.info
    name, version = info.name, str(info.version)
    rows = []
    for series, times, forecast in zip(served.request.series, prepared.times, served.forecasts,
                                       strict=True):
        if times is None:
            continue
        origin, *steps = times.to_pydatetime()
        mean, quantiles = served_forecast(prepared, forecast)
        keys, scale = list(quantiles), seasonal_scale(series.values, info.season_length)
        # a step's values taken across the columns at once: the rows cost a quarter of
        # building each from keyword arguments and a quantile dict comprehension
        rows.extend(LoggedForecast(name, version, series.id, origin, step, moment, value,
                                   dict(zip(keys, levels, strict=True)), scale)
                    for step, (moment, value, *levels) in enumerate(
                        zip(steps, mean, *quantiles.values(), strict=True), start=1))
    return rows


class ForecastLog:
    """The worker's queue of answers to log, and the thread that writes them (module doc).
    ``on_drop(reason, rows)`` counts the rows dropped."""

    def __init__(self, store: StoreAccess, max_rows: int, batch_rows: int,
                 flush_seconds: float, on_drop: Callable[[str, int], None],
                 max_share: float = 1.0):
        self.store, self.max_rows, self.batch_rows = store, max_rows, batch_rows
        self.flush_seconds, self.on_drop, self.max_share = flush_seconds, on_drop, max_share
        self._queue: deque[Served] = deque()
        self._queued_rows = 0
        self._lock = threading.Lock()
        self._wake, self._stopping = threading.Event(), threading.Event()
        self._failing = False  # the last write failed: say so once, and once when it recovers
        self._thread = threading.Thread(target=self._run, name="forecast-log", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, served: Served) -> None:
        """Queue an answer (nothing when none of its series has timestamps); never blocks."""
        rows = served.rows
        if not rows:
            return
        with self._lock:
            fits = self._queued_rows + rows <= self.max_rows
            if fits:
                self._queue.append(served)
                self._queued_rows += rows
            full_batch = self._queued_rows >= self.batch_rows
        if not fits:
            self.on_drop(QUEUE_FULL, rows)
        elif full_batch:
            self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued (while the store takes it), then end the thread."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def flush(self) -> None:
        """Write everything queued now, a batch at a time (resting after each, see the
        module doc, unless the log is stopping)."""
        while batch := self._take():
            started = time.perf_counter()
            if self._write(batch):  # not after a failure: the next flush tries again
                busy = time.perf_counter() - started
                self._stopping.wait(busy * (1 - self.max_share) / self.max_share)

    def _write(self, batch: list[Served]) -> bool:
        """Write a batch; False when it was dropped."""
        rows = sum(served.rows for served in batch)
        try:
            self.store.get().write_forecasts([row for served in batch
                                              for row in logged_rows(served)])
        except StoreUnavailable as error:
            if not self._failing:
                logger.warning("the forecast log drops rows while the store is unavailable: %s",
                               error)
            self._failing = True
            self.on_drop(STORE_UNAVAILABLE, rows + self._drop_queue())
            return False
        except Exception:  # noqa: BLE001 - the log never takes the worker down
            logger.exception("the forecast log failed to write %d rows; they are dropped", rows)
            self.on_drop(FAILED, rows)
            return False
        if self._failing:
            logger.warning("the forecast log writes to the store again")
            self._failing = False
        return True

    def _take(self) -> list[Served]:
        """The oldest answers queued, up to batch_rows rows (at least one answer)."""
        batch, rows = [], 0
        with self._lock:
            while self._queue and (not batch or rows + self._queue[0].rows <= self.batch_rows):
                served = self._queue.popleft()
                batch.append(served)
                rows += served.rows
            self._queued_rows -= rows
        return batch

    def _drop_queue(self) -> int:
        with self._lock:
            rows, self._queued_rows = self._queued_rows, 0
            self._queue.clear()
        return rows

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            self.flush()
            if self._stopping.is_set():
                return
