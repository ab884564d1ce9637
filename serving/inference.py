"""The request path as plain functions, tested without a server.

    prepare   a parsed request checked against the served model -> PreparedRequest
    admit     a refitted model's request, its cost and the load -> refused before any work?
    forward   the series of many requests in one model call     -> forecasts per request
    render    a request's forecasts                             -> response JSON

A ``RequestError`` names the field and the problem; the HTTP layer turns it into a 400. A
``ServiceBusy`` says why the service cannot answer now (a 503, with Retry-After when waiting
helps); a ``ModelOutputError`` withholds a forecast with NaN or infinite values (a 500): no
non-finite number reaches a response.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pydantic_core

from serving.model import Forecasts, ServedModel, model_input
from serving.schemas import ForecastRequest, Series

# one series of a request, as the batching dispatcher queues it
Item = tuple[ServedModel, np.ndarray]


class ServiceBusy(Exception):
    """The service cannot answer this request in time; ``retry_after``: seconds after which
    trying again may succeed, None when it would not (the request alone is too costly)."""

    def __init__(self, reason: str, message: str, retry_after: int | None):
        super().__init__(message)
        self.reason, self.message, self.retry_after = reason, message, retry_after

    def body(self) -> dict:
        return {"error": self.message, "detail": []}

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


class ModelOutputError(RuntimeError):
    """The model forecast NaN or infinite values for a series: its fault, not the request's."""

    def __init__(self, model: ServedModel, index: int, series_id: str):
        self.loc = ("series", index)
        super().__init__(f"model {model.info.name} v{model.version} forecast non-finite values "
                         f"for series {series_id!r} (series.{index}); the forecast is withheld")

    def body(self) -> dict:
        return {"error": str(self), "detail": [{"loc": list(self.loc), "msg": str(self),
                                               "type": "model_output_not_finite"}]}


class RequestError(ValueError):
    """A request the served model cannot answer; ``loc`` is the offending field's path."""

    def __init__(self, loc: tuple[str | int, ...], reason: str, message: str):
        super().__init__(message)
        self.loc, self.reason, self.message = loc, reason, message

    def body(self) -> dict:
        # an empty loc: the request as a whole (a model that cannot explain)
        where = f"{'.'.join(map(str, self.loc))}: " if self.loc else ""
        return {"error": f"{where}{self.message}",
                "detail": [{"loc": list(self.loc), "msg": self.message, "type": self.reason}]}


@dataclass(frozen=True)
class PreparedRequest:
    model: ServedModel
    ids: list[str]
    histories: list[np.ndarray]
    horizon: int
    levels: list[float]  # requested levels, as the model spells them
    columns: list[int]  # their positions in the model's output (after the point forecast)
    timestamps: list[list[str] | None]  # each series' step times as answered
    # each series' origin (the last value's time) and step times, for the forecast log
    times: list[pd.DatetimeIndex | None]

    def items(self) -> list[Item]:
        return [(self.model, history) for history in self.histories]


def prepare(request: ForecastRequest, model: ServedModel, max_series: int) -> PreparedRequest:
    """Check a parsed request against the model; raise RequestError naming the field."""
    info = model.info
    if len(request.series) > max_series:
        raise RequestError(("series",), "too_many_series",
                           f"{len(request.series)} series; at most {max_series} per request")
    if request.horizon > info.horizon:
        raise RequestError(("horizon",), "horizon_too_large",
                           f"horizon {request.horizon} exceeds the {info.horizon} steps model "
                           f"{info.name} v{info.version} was trained for")
    levels, columns = _levels(request.quantiles, info.quantiles)
    histories = []
    for i, series in enumerate(request.series):
        if len(series.values) < info.min_history:
            raise RequestError(("series", i, "values"), "history_too_short",
                               f"series {series.id!r} has {len(series.values)} values; the "
                               f"model needs at least {info.min_history}")
        values = _representable(series.values, i, series.id, model.dtype)
        histories.append(_model_input(i, series, values, model, request.horizon))
    # from the forecast's origin (the last value's time), which the forecast log keeps: a
    # series whose times the store cannot hold is refused here, not in the log's thread
    times = [step_index(s.start, s.freq, len(s.values) - 1, request.horizon + 1, ("series", i))
             if s.start is not None else None for i, s in enumerate(request.series)]
    return PreparedRequest(model, [s.id for s in request.series], histories, request.horizon,
                           levels, columns,
                           [None if index is None else [t.isoformat() for t in index[1:]]
                            for index in times], times)


def admit(cost: float, finish: float, timeout: float, series: int) -> None:
    """Refuse (ServiceBusy) a request of ``series`` series for a refitted model before any work
    starts: when its estimated work, ``cost`` seconds, exceeds ``timeout`` by itself, or when it
    would be answered ``finish`` seconds from now (after its share of the work in progress),
    past ``timeout``."""
    if cost > timeout:
        each = cost / series
        raise ServiceBusy("too_costly", f"this request needs about {cost:.0f} s of model time "
                          f"({series} series, each refitted on its history: about "
                          f"{each * 1000:.0f} ms each), over the service's timeout of "
                          f"{timeout:g} s; send at most {int(timeout / each)} such series per "
                          "request", retry_after=None)
    if finish > timeout:
        raise ServiceBusy("busy", f"the service is busy: with the work in progress this request "
                          f"would be answered in about {finish:.0f} s, past its timeout of "
                          f"{timeout:g} s", retry_after=math.ceil(finish - timeout))


def forward(jobs: Sequence[Sequence[Item]],
            observe: Callable[[ServedModel, int, float], None] | None = None,
            call: Callable[[ServedModel, list[np.ndarray]], list] | None = None) -> list[list]:
    """Forecasts for the queued series of many requests: one model call per distinct model
    (during a swap, requests checked against the old model finish on it). ``observe`` receives
    (model, series, seconds) of each call; ``call`` replaces ``model.predict`` (explanations
    are batched the same way)."""
    flat = [item for job in jobs for item in job]
    results: list = [None] * len(flat)
    by_model: dict[int, list[int]] = {}
    for position, (model, _) in enumerate(flat):
        by_model.setdefault(id(model), []).append(position)
    for positions in by_model.values():
        model = flat[positions[0]][0]
        start = time.perf_counter()
        inputs = [flat[p][1] for p in positions]
        forecasts = model.predict(inputs) if call is None else call(model, inputs)
        if observe is not None:
            observe(model, len(positions), time.perf_counter() - start)
        for position, forecast in zip(positions, forecasts, strict=True):
            results[position] = forecast
    out, offset = [], 0
    for job in jobs:
        out.append(results[offset:offset + len(job)])
        offset += len(job)
    return out


def render(prepared: PreparedRequest, forecasts: Forecasts) -> bytes:
    """The response JSON; a series the model could not forecast raises RequestError."""
    info = prepared.model.info
    entries = []
    for i, (series_id, forecast) in enumerate(zip(prepared.ids, forecasts, strict=True)):
        if isinstance(forecast, Exception):
            raise RequestError(("series", i, "values"), "model_failed",
                               f"series {series_id!r} could not be forecast: {forecast}")
        if not np.isfinite(forecast[:prepared.horizon]).all():
            raise ModelOutputError(prepared.model, i, series_id)
        mean, quantiles = served_forecast(prepared, forecast)
        entry = {"id": series_id, "mean": mean, "quantiles": quantiles}
        if prepared.timestamps[i] is not None:
            entry["timestamps"] = prepared.timestamps[i]
        entries.append(entry)
    body = {"model": {"name": info.name, "version": info.version, "alias": info.alias},
            "forecasts": entries}
    return pydantic_core.to_json(body)


def served_forecast(prepared: PreparedRequest, forecast: np.ndarray
                    ) -> tuple[list[float], dict[str, list[float]]]:
    """A series' forecast as /forecast answers it: the mean, and each requested level's
    values by its key ("0.1")."""
    values = forecast[:prepared.horizon].T  # (1 + levels, horizon)
    return values[0].tolist(), {f"{level:g}": values[1 + c].tolist()
                                for level, c in zip(prepared.levels, prepared.columns,
                                                    strict=True)}


def _model_input(i: int, series: Series, values: np.ndarray, model: ServedModel,
                 horizon: int) -> np.ndarray:
    """One series (its ``values`` in the model's dtype) as the model takes it, its covariates
    checked against the model's."""
    info = model.info
    known, static = series.covariates or {}, series.static or {}
    for field, given, names in (("covariates", known, info.covariates),
                                ("static", static, info.static)):
        unknown = [name for name in given if name not in names]
        if unknown:
            raise RequestError(("series", i, field, unknown[0]), "unknown_covariate",
                               f"series {series.id!r}: the model takes no {field} "
                               f"{unknown[0]!r}; it takes {names or 'none'}")
    expected = len(series.values) + horizon
    for name in info.covariates:
        if name not in known:
            raise RequestError(("series", i, "covariates", name), "missing_covariate",
                               f"series {series.id!r} lacks the known-future covariate "
                               f"{name!r}: {expected} values, len(values) + horizon")
        if len(known[name]) != expected:
            raise RequestError(("series", i, "covariates", name), "covariate_length",
                               f"series {series.id!r}: {len(known[name])} values; expected "
                               f"len(values) + horizon = {len(series.values)} + {horizon} = "
                               f"{expected}")
    for name in info.static:
        if name not in static:
            raise RequestError(("series", i, "static", name), "missing_covariate",
                               f"series {series.id!r} lacks the static covariate {name!r}")
    return model_input(values, horizon, [known[n] for n in info.covariates],
                       [static[n] for n in info.static], dtype=values.dtype)


def _representable(values: list[float], index: int, series_id: str, dtype: np.dtype
                   ) -> np.ndarray:
    """The history in the model's dtype; RequestError when its sum of squares overflows that
    dtype: every model scales or fits by second moments, which would be infinite."""
    with np.errstate(over="ignore"):
        history = np.asarray(values, dtype=dtype)
        if np.isfinite(np.square(history).sum()):
            return history
    raise RequestError(("series", index, "values"), "value_too_large",
                       f"series {series_id!r} has values too large for the model, which "
                       f"computes in {dtype}: the sum of their squares overflows it (largest "
                       f"magnitude {max(map(abs, values)):.3g})")


def _levels(requested: list[float] | None, available: list[float]
            ) -> tuple[list[float], list[int]]:
    if requested is None:
        return list(available), list(range(len(available)))
    levels, columns = [], []
    for i, level in enumerate(requested):
        matches = [j for j, a in enumerate(available) if math.isclose(a, level, abs_tol=1e-9)]
        if not matches:
            raise RequestError(("quantiles", i), "unknown_quantile",
                               f"level {level:g} is not among the model's levels "
                               f"{[float(f'{a:g}') for a in available]}")
        levels.append(available[matches[0]])
        columns.append(matches[0])
    return levels, columns


def step_times(start: object, freq: str | None, first: int, count: int,
               loc: tuple[str | int, ...] = ()) -> list[str]:
    """The times of ``count`` steps from step ``first`` (0: ``start``) of a series, ISO 8601;
    RequestError naming ``loc`` (the series) when they are past what a time can hold."""
    return [t.isoformat() for t in step_index(start, freq, first, count, loc)]


@functools.lru_cache(maxsize=64)
def _offset(freq: str | None) -> pd.DateOffset:
    """pandas' offset of a frequency, cached: parsing it costs more than the whole range."""
    return pd.tseries.frequencies.to_offset(freq)


def step_index(start: object, freq: str | None, first: int, count: int,
               loc: tuple[str | int, ...] = ()) -> pd.DatetimeIndex:
    """:func:`step_times` as a DatetimeIndex."""
    try:
        offset = _offset(freq)
        index = pd.date_range(pd.Timestamp(start) + first * offset, periods=count, freq=offset)
        # the first and last times as Python holds them (years 1 to 9999), in UTC as the
        # forecast store keeps them (a slice: ten times cheaper than index[[0, -1]])
        edges = index[::max(count - 1, 1)]
        (edges if edges.tz is None else edges.tz_convert(None)).to_pydatetime()
    except (ValueError, OverflowError):
        raise RequestError((*loc, "start"), "timestamps_out_of_range",
                           f"the times from start {start} every {freq} leave the years 1 to "
                           "9999 (in UTC)") from None
    return index
