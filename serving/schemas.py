"""The HTTP API's request and response bodies (pydantic): what the OpenAPI schema publishes.
POST /explain takes the body of POST /forecast; POST /actuals the observed values, which
GET /accuracy compares with the forecasts served.

Checks that need no model live here (strict types: "7" is not a horizon nor ``true`` a value;
finite numbers, non-empty series, unique ids, a positive horizon); checks against the served
model (its horizon, quantile levels, minimum history, covariates and the range of its dtype)
are in :mod:`serving.inference`. Every model forbids keys it does not define.
"""

from __future__ import annotations

from collections import Counter
from datetime import date, datetime
from typing import Annotated, Literal

import pandas as pd
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    model_validator,
)

from pipelines.forecast_store import VersionAccuracy

# JSON has no NaN or infinity, but Python's parsers accept the literals; refuse them here
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


def _strictly_inside(level: float) -> float:
    if level in (0.0, 1.0):
        raise ValueError("a quantile level lies strictly between 0 and 1")
    return level


def _pandas_frequency(freq: str) -> str:
    try:
        pd.tseries.frequencies.to_offset(freq)
    except ValueError:
        raise ValueError(f"{freq!r} is not a pandas frequency (e.g. 'h', 'D', "
                         "'15min')") from None
    return freq


Frequency = Annotated[str, AfterValidator(_pandas_frequency),
                      Field(description="pandas frequency, e.g. 'h' or '15min'")]
# no NUL: PostgreSQL's text cannot hold one, and the forecast store keeps the ids
SeriesId = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^\x00]*$",
                                description="the series' name, echoed back")]


def _unique_ids(series: list[BaseModel]) -> list[BaseModel]:
    counts = Counter(s.id for s in series)
    repeated = sorted(name for name, count in counts.items() if count > 1)
    if repeated:
        raise ValueError(f"series ids must be unique; repeated: {repeated}")
    return series


# BentoML publishes OpenAPI 3.0, whose exclusive bounds are flags, not numbers: the bounds
# here are inclusive in the schema and the endpoints are refused by the validator
QuantileLevel = Annotated[float, Field(ge=0, le=1), AfterValidator(_strictly_inside)]


class Series(BaseModel):
    """One series' history, oldest value first."""

    # strict: JSON's types as they are, no string or boolean taken for a number
    model_config = ConfigDict(extra="forbid", strict=True)

    id: SeriesId
    values: list[FiniteFloat] = Field(min_length=1, description="the history, oldest first")
    start: datetime | date | None = Field(
        default=None, description="time of the first value: an ISO 8601 date or date-time")
    freq: Frequency | None = None
    covariates: dict[str, list[FiniteFloat]] | None = Field(
        default=None, description="known-future covariates by name (GET /model lists those "
        "the model takes): len(values) + horizon values each, the history's then the steps "
        "ahead")
    static: dict[str, FiniteFloat] | None = Field(
        default=None, description="static covariates by name: one value per series")

    @model_validator(mode="after")
    def _start_with_freq(self) -> Series:
        if (self.start is None) != (self.freq is None):
            raise ValueError("give both `start` and `freq` for timestamps, or neither")
        return self


class ForecastRequest(BaseModel):
    """Histories to forecast, how far ahead, and which quantile levels."""

    model_config = ConfigDict(extra="forbid", strict=True)

    series: Annotated[list[Series], AfterValidator(_unique_ids)] = Field(
        min_length=1, description="one or more series")
    horizon: int = Field(ge=1, description="steps ahead, at most the model's horizon")
    quantiles: list[QuantileLevel] | None = Field(
        default=None, description="levels among the model's (GET /model); default: all")


class ActualSeries(BaseModel):
    """One series' observed values, oldest first, at the times ``start`` and ``freq`` give."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: SeriesId
    values: list[FiniteFloat] = Field(min_length=1, description="the observations, oldest "
                                      "first")
    start: datetime | date = Field(
        description="time of the first value: an ISO 8601 date or date-time")
    freq: Frequency


class ActualsRequest(BaseModel):
    """Observed values of series that were (or will be) forecast: stored by (series id,
    time), so that posting the same values again changes nothing."""

    model_config = ConfigDict(extra="forbid", strict=True)

    series: Annotated[list[ActualSeries], AfterValidator(_unique_ids)] = Field(
        min_length=1, description="one or more series")


class ActualsResponse(BaseModel):
    accepted: int = Field(description="observations stored (new or updated), all committed")
    matched: int = Field(description="of those, the ones at the time of a logged forecast of "
                         "their series")


class BacktestFigures(BaseModel):
    """The version's backtest scores, recorded on it when the race registered it (None: not
    recorded, or the registry did not answer)."""

    mase: float | None = None
    smape: float | None = None
    mae: float | None = None


class VersionReport(VersionAccuracy):
    backtest: BacktestFigures


class AccuracyResponse(BaseModel):
    versions: list[VersionReport] = Field(
        description="per model name and version: live accuracy from the logged forecasts and "
        "the actuals posted, beside its backtest's")


class ModelRef(BaseModel):
    name: str
    version: int
    alias: str


class SeriesForecast(BaseModel):
    id: str
    mean: list[float] = Field(description="point forecast (the median for quantile models)")
    quantiles: dict[str, list[float]] = Field(description="level -> values")
    timestamps: list[datetime] | None = None


class ForecastResponse(BaseModel):
    model: ModelRef
    forecasts: list[SeriesForecast]


class InputWeight(BaseModel):
    """One input time step and the attention it gets, averaged over the forecast steps."""

    position: int = Field(description="its column in `attention` (0: the oldest shown)")
    lag: int = Field(description="steps before the forecast origin (1: the last value)")
    timestamp: datetime | None = None
    weight: float


class SeriesExplanation(BaseModel):
    id: str
    attention: list[list[float]] = Field(
        description="horizon x input steps: row h is forecast step h + 1, column j an input "
        "time step (the last len(columns) values of the history, oldest first); each row sums "
        "to 1")
    input_timestamps: list[datetime] | None = Field(
        default=None, description="the time of each column, when `start` and `freq` are given")
    top_inputs: list[InputWeight] = Field(
        description="the (at most 5) most-attended input steps, by their mean weight over the "
        "forecast steps, largest first")
    covariate_importance: dict[str, float] | None = Field(
        default=None, description="each covariate's mean variable-selection weight, for a "
        "model that weighs its inputs (the hybrid) trained with covariates")


class ExplainResponse(BaseModel):
    model: ModelRef
    explanations: list[SeriesExplanation]


class RefitCost(BaseModel):
    """The time a model refitted on each series takes per series of ``length`` values: ``fixed
    + per_value * length`` seconds of a worker's refit threads, measured at load with every
    thread busy."""

    fixed: float
    per_value: float

    def seconds(self, length: int) -> float:
        return self.fixed + self.per_value * length


ModelSource = Literal["registry", "cache", "bento"]


class ModelInfo(BaseModel):
    """The served model: registry coordinates, what it can forecast, how it scored."""

    name: str
    version: int
    alias: str
    model_class: str
    candidate: str
    horizon: int
    quantiles: list[float]
    min_history: int
    covariates: list[str] = Field(
        default_factory=list, description="known-future covariates each series must carry")
    static: list[str] = Field(
        default_factory=list, description="static covariates each series must carry")
    frequency: str
    season_length: int = Field(
        description="the seasonal period of the MASE scale: the race's (its backtest's MASE), "
        "and of the live MASE (GET /accuracy)")
    trained_at: datetime | None
    run_id: str | None
    metrics: dict[str, float] = Field(description="backtest metrics recorded at registration")
    loaded_at: datetime
    explains: bool = Field(
        default=False, description="whether POST /explain answers for this model (a network "
        "with attention)")
    source: ModelSource = Field(
        default="registry", description="where the served files came from: the registry, "
        "the replica's cache of its last good model (the registry was unreachable at start, or "
        "its version failed to load), or the model store of an exported Bento")
    refit_cost: RefitCost | None = Field(
        default=None, description="for a model refitted on each series (an sktime baseline): "
        "its cost per series; a request it would not answer within the service's timeout is "
        "refused. None for a network, which answers many series in one forward pass")


class ErrorDetail(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorResponse(BaseModel):
    error: str
    detail: list[ErrorDetail] = Field(default_factory=list)
    error_id: str | None = Field(
        default=None, description="for a 5xx: names the service's log line with the details")
