"""The race configuration: a typed YAML file, validated before anything trains.

A race reads one data set, backtests every candidate on the same folds, and registers the
winner. Everything it needs is in :class:`RaceConfig`; :func:`load_config` reads it from YAML.
Every mistake is reported with the key it concerns (``candidates.1.model: unknown model
'Prophet' ...``): schema errors (unknown keys, wrong types, unknown models or parameters) when
the file is read, and data-dependent ones (a missing column, a horizon the series are too short
for, and every problem of the values at once, unless ``data.fill`` repairs it) by
:func:`pipelines.race.prepare_race`, before the first model trains.

Tracking settings come from the ``tracking`` section with environment overrides: the usual
MLflow variables (``MLFLOW_TRACKING_URI``, ``MLFLOW_REGISTRY_URI``, ``MLFLOW_EXPERIMENT_NAME``,
``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING``, ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``,
``MLFLOW_HTTP_REQUEST_TIMEOUT``, ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``) and ``MLFLOW_ARTIFACT_LOCATION`` win over the file, so
one config serves a laptop (the embedded SQLite store) and a server alike.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from forecaster.ensemble import GREEDY_STEPS
from forecaster.estimators import DEFAULT_QUANTILES
from forecaster.seasonality import season_length_of
from pipelines.candidates import (
    MODELS,
    check_params,
    default_candidate_name,
    interval_problem,
    is_neural,
)
from pipelines.schema_errors import describe

SEASONAL_NAIVE = "snaive"  # the name of the default baseline when the race adds it
HTTP_BACKOFF_JITTER_S = 1.0  # MLflow's MLFLOW_HTTP_REQUEST_BACKOFF_JITTER, left at its default


class ConfigError(ValueError):
    """A config that cannot run; the message names each offending key."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("invalid race config:\n  " + "\n  ".join(self.problems))


class StrictModel(BaseModel):
    # a misspelt key is an error, never silently ignored
    model_config = ConfigDict(extra="forbid")


class ColumnMapping(StrictModel):
    """Which columns of a CSV or Parquet file hold the series id, the time and the target, and
    which are covariates (under their own names): ``known_future`` ones, known ahead (a
    promotion calendar: forecasts need their future values), and ``static`` ones, constant
    per series. That they exist, are numeric and (static) constant is checked against the
    file. Candidates that take covariates (sktime's ``capability:exogenous`` tag) get them;
    the others ignore them."""

    series_id: str = "series_id"
    timestamp: str = "timestamp"
    target: str = "target"
    known_future: list[str] = Field(default_factory=list)
    static: list[str] = Field(default_factory=list)

    @field_validator("known_future", "static")
    @classmethod
    def _covariate_names(cls, names: list[str], info: ValidationInfo) -> list[str]:
        keys = {key: info.data.get(key) for key in ("series_id", "timestamp", "target")}
        earlier = info.data.get("known_future") or [] if info.field_name == "static" else []
        for name in names:
            if name in keys.values():
                key = next(k for k, v in keys.items() if v == name)
                raise ValueError(f"{name!r} is the {key} column, not a covariate")
            if name in keys:  # the race renames the key columns to these names
                raise ValueError(f"{name!r} is reserved for the {name} column; rename the "
                                 "covariate")
            if names.count(name) > 1 or name in earlier:
                raise ValueError(f"{name!r} is named twice")
        return names

    @property
    def covariates(self) -> list[str]:
        return [*self.known_future, *self.static]


class FillConfig(StrictModel):
    """What the race does with gaps and short series instead of failing (``error``).

    ``missing``: missing timestamps and NaN values are filled by linear interpolation
    (``interpolate``; a series' first or last values take its nearest observation) or with
    ``zero``. ``short``: series too short for every candidate's training window plus the
    backtest folds are left out (``drop``). Whatever is filled or dropped is logged in the race.
    """

    # besides error, the methods of forecaster.data.fill_gaps
    missing: Literal["error", "interpolate", "zero"] = "error"
    short: Literal["error", "drop"] = "error"


class DataConfig(StrictModel):
    """A file (``path`` plus ``columns``), a bundled loader (``loader`` plus ``data_dir``), or
    the actuals the service received (``loader: store``, with the store's ``url``; by default
    the environment's store, as FORECASTER_STORE_URL names it).

    A file is ``long`` (a row per series and time: the ``columns`` mapping names its columns)
    or ``wide`` (a column per series, named by its id; the time in the ``columns.timestamp``
    column, else the first one). ``max_series`` keeps the first series (in file order) and
    ``last_n`` the last observations of each: slices for quick runs. ``fill`` decides about
    gaps and short series. Relative paths are relative to the config file.
    """

    loader: Literal["m4_hourly", "etth1", "store"] | None = None
    data_dir: Path | None = None
    url: str | None = None  # loader store: the database URL of the forecast store
    variables: list[str] | None = None  # etth1: the columns to forecast, each its own series
    path: Path | None = None
    format: Literal["long", "wide"] = "long"
    columns: ColumnMapping = Field(default_factory=ColumnMapping)
    max_series: PositiveInt | None = None
    last_n: PositiveInt | None = None
    fill: FillConfig = Field(default_factory=FillConfig)

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.loader is None) == (self.path is None):
            raise ValueError("give either `path` (a CSV or Parquet file) or `loader` "
                             "(m4_hourly, etth1 or store), not both")
        if self.loader == "store":
            if self.data_dir is not None:
                raise ValueError("`data_dir` applies to the m4_hourly and etth1 loaders; the "
                                 "store loader reads `url`")
        elif self.loader is not None and self.data_dir is None:
            raise ValueError(f"`data_dir` is required with loader {self.loader!r}")
        if self.url is not None and self.loader != "store":
            raise ValueError("`url` applies to loader store only")
        if self.path is not None and self.path.suffix.lower() not in (".csv", ".parquet",
                                                                      ".pq"):
            raise ValueError(f"path {str(self.path)!r}: expected a .csv or .parquet file")
        if self.loader is not None and self.columns != ColumnMapping():
            raise ValueError("`columns` applies to `path` sources only")
        if self.variables is not None and self.loader != "etth1":
            raise ValueError("`variables` applies to the etth1 loader only")
        if self.loader is not None and self.format != "long":
            raise ValueError("`format` applies to `path` sources only")
        # a wide file names its series by its columns: only the time column can be mapped
        long_only = sorted(self.columns.model_fields_set - {"timestamp"})
        if self.format == "wide" and long_only:
            raise ValueError(f"`columns` {long_only} apply to the long format only; a wide "
                             "file has one column per series")
        return self


class ResourcesConfig(StrictModel):
    """What one task of the race holds on a Ray cluster (Ray's own resource names; fractions
    of a GPU share it between tasks)."""

    num_cpus: PositiveFloat = 1.0
    num_gpus: float = Field(default=0.0, ge=0)


# a Ray cluster's address: its GCS (HOST:PORT) or its Ray Client server (ray://HOST:PORT)
RAY_ADDRESS = re.compile(r"^(ray://)?[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")


class ExecutionConfig(StrictModel):
    """Where the model work runs. ``local``: one fit after another in this process (no Ray).
    ``ray``: every (candidate, fold) fit and every refit is a Ray task holding ``resources``
    (a candidate may set its own), retried ``max_retries`` times when its worker dies.
    ``address``: the cluster (``auto``, ``HOST:PORT`` or ``ray://HOST:10001``); none: the
    cluster in ``RAY_ADDRESS``, else a Ray started in this process on this machine's cores."""

    engine: Literal["local", "ray"] = "local"
    address: str | None = None
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    max_retries: int = Field(default=3, ge=0)

    @field_validator("address")
    @classmethod
    def _ray_address(cls, address: str | None) -> str | None:
        if address is not None and address != "auto" and not RAY_ADDRESS.match(address):
            raise ValueError(f"{address!r} is not a Ray address: give auto, HOST:PORT or "
                             "ray://HOST:PORT")
        return address

    @model_validator(mode="after")
    def _address_needs_ray(self) -> ExecutionConfig:
        if self.address is not None and self.engine != "ray":
            raise ValueError("`address` applies to engine ray only (set engine: ray)")
        return self


class SearchDimension(StrictModel):
    """One parameter's range, exactly one of: ``loguniform: [low, high]`` (low > 0),
    ``uniform: [low, high]``, ``int: [low, high]`` (both included) or ``choice: [a, b, ...]``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    integer: tuple[int, int] | None = Field(default=None, alias="int")
    choice: list[Any] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_range(self) -> SearchDimension:
        given = [name for name in ("loguniform", "uniform", "integer", "choice")
                 if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of loguniform, uniform, int or choice")
        bounds = self.loguniform or self.uniform or self.integer
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"the low bound {bounds[0]} must be below the high bound "
                             f"{bounds[1]}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform bounds must be positive, not {self.loguniform[0]}")
        return self


class SearchConfig(StrictModel):
    """A hyperparameter search of a network on Ray Tune, before its backtest: ``trials``
    configurations drawn by Optuna from ``space`` (constructor parameters over the
    candidate's ``params``), poor ones stopped early by ASHA (``scheduler: asha``; ``fifo``
    runs each to the end) on the trainer's per-epoch validation loss. The trial with the
    best ``metric`` (default: selection.metric) on the held-out end of the first fold's
    training window gives the candidate its parameters."""

    space: dict[str, SearchDimension] = Field(min_length=1)
    trials: PositiveInt = 8
    metric: Literal["mase", "smape", "mae"] | None = None
    scheduler: Literal["asha", "fifo"] = "asha"


class CandidateConfig(StrictModel):
    """One model in the race: a class name from :data:`pipelines.candidates.MODELS` and its
    constructor parameters. ``name`` defaults to the model's short name and must be unique.
    ``resources`` replaces execution.resources for its tasks; ``search`` tunes a network's
    parameters first (engine ray)."""

    name: str | None = None
    model: str
    params: dict[str, Any] = Field(default_factory=dict)
    resources: ResourcesConfig | None = None
    search: SearchConfig | None = None

    @field_validator("model")
    @classmethod
    def _known_model(cls, model: str) -> str:
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; choose one of {sorted(MODELS)}")
        return model

    @field_validator("params")
    @classmethod
    def _known_params(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        model = info.data.get("model")
        if model is not None:  # an unknown model is reported on its own key
            check_params(model, params)
        return params

    @field_validator("search")
    @classmethod
    def _searchable(cls, search: SearchConfig | None, info: ValidationInfo
                    ) -> SearchConfig | None:
        model = info.data.get("model")
        if search is None or model is None:
            return search
        if not is_neural(model):
            raise ValueError(f"{model} has no training epochs to search over; search applies "
                             "to the networks")
        try:
            check_params(model, search.space)
        except ValueError as error:
            raise ValueError(f"space: {error}") from None
        return search

    @model_validator(mode="after")
    def _default_name(self) -> CandidateConfig:
        if self.name is None:
            self.name = default_candidate_name(self.model)
        return self


class BacktestConfig(StrictModel):
    """sktime's ExpandingWindowSplitter or SlidingWindowSplitter with ``folds`` folds.

    ``step`` (default: the horizon) separates fold cutoffs; ``window`` is the initial training
    window (expanding) or the training window (sliding), by default the largest that leaves
    room for all folds, so that the last fold forecasts the last ``horizon`` observations.
    """

    splitter: Literal["expanding", "sliding"] = "expanding"
    folds: PositiveInt = 3
    step: PositiveInt | None = None
    window: PositiveInt | None = None


class EnsembleConfig(StrictModel):
    """The ensemble of the race's candidates (:mod:`pipelines.ensemble`): their fold forecasts
    weighted by Caruana's greedy selection with replacement, ``size`` steps at most, on the
    selection metric; raced when two or more candidates are valid and the backtest has two
    or more folds. ``selection.ensemble: false`` is short for ``enabled: false``."""

    enabled: bool = True
    size: PositiveInt = GREEDY_STEPS


class SelectionConfig(StrictModel):
    """How the winner is chosen and when it replaces the champion.

    Lower is better for every metric. The winner is promoted when it beats the baseline (unless
    it is the baseline) and its score is below ``champion score * (1 - promotion_margin)``, all
    on the same folds. ``baseline`` names a candidate; by default it is the seasonal naive
    forecast (NaiveForecaster, strategy ``last``, ``sp`` = the season length), added to the
    candidates when none of them is that model. ``ensemble`` adds a weighted ensemble of the
    valid candidates to them (:class:`EnsembleConfig`).
    """

    metric: Literal["mase", "smape", "mae"] = "mase"
    promotion_margin: float = Field(default=0.0, ge=0.0, lt=1.0)
    interval_coverage: float = Field(default=0.9, gt=0.0, lt=1.0)
    baseline: str | None = None  # a candidate's name; default: the seasonal naive candidate
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig)

    @field_validator("ensemble", mode="before")
    @classmethod
    def _ensemble_switch(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return {"enabled": value}
        if not isinstance(value, dict | EnsembleConfig):
            raise ValueError(f"give true, false or a mapping of enabled and size, not {value!r}")
        return value


class RegistryConfig(StrictModel):
    model_name: str = Field(min_length=1)


class TrackingConfig(StrictModel):
    """Where runs and models go. The default needs no server: SQLite and a local folder, both
    in the working directory. Environment variables override these (see the module doc)."""

    tracking_uri: str = "sqlite:///mlflow.db"
    registry_uri: str | None = None  # default: the tracking URI
    experiment_name: str | None = None  # default: the race name
    # a folder or URI for the experiments the race creates; by default a folder "mlartifacts"
    # in the working directory, or the server's own artifact store for http(s) tracking URIs
    artifact_location: str | None = None
    enable_system_metrics_logging: bool = True
    system_metrics_sampling_interval: float = Field(default=5.0, gt=0)
    # MLflow's HTTP client, for a tracking server: each try of a request waits at most
    # http_timeout_seconds to connect and as long for each read, and a failed request is
    # tried again http_max_retries times, http_backoff_factor * 2**n seconds apart. MLflow's
    # own defaults (120 s, 7 retries, factor 2) hold a race on a dead server for minutes per
    # request; these give up within http_budget_seconds (under a minute)
    http_timeout_seconds: int = Field(default=5, ge=1)
    http_max_retries: int = Field(default=2, ge=0, le=10)  # MLflow refuses more than 10
    http_backoff_factor: int = Field(default=1, ge=0, le=120)  # ... and a factor over 120

    @property
    def http_budget_seconds(self) -> float:
        """The longest one request to a dead or hung server takes before the race gives up:
        every try's connect and read timeouts, plus the back-off between tries (urllib3 waits
        0 s before the first retry, then factor * 2**n, plus MLflow's jitter of up to 1 s)."""
        tries = self.http_max_retries + 1
        backoff = sum(self.http_backoff_factor * 2 ** (n - 1) + HTTP_BACKOFF_JITTER_S
                      for n in range(2, tries))
        return tries * 2 * self.http_timeout_seconds + backoff

    def http_environment(self) -> dict[str, str]:
        """MLflow's variables for the HTTP settings: its client reads them at each request."""
        # imported here: checking a config needs no MLflow
        from mlflow.environment_variables import (
            MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
            MLFLOW_HTTP_REQUEST_MAX_RETRIES,
            MLFLOW_HTTP_REQUEST_TIMEOUT,
        )

        return {MLFLOW_HTTP_REQUEST_TIMEOUT.name: str(self.http_timeout_seconds),
                MLFLOW_HTTP_REQUEST_MAX_RETRIES.name: str(self.http_max_retries),
                MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.name: str(self.http_backoff_factor)}


class TrackingEnvironment(BaseSettings):
    """The environment's say on tracking: each variable set here replaces the config value."""

    model_config = SettingsConfigDict(env_prefix="MLFLOW_", extra="ignore")

    tracking_uri: str | None = None
    registry_uri: str | None = None
    experiment_name: str | None = None
    artifact_location: str | None = None
    enable_system_metrics_logging: bool | None = None
    system_metrics_sampling_interval: float | None = None
    # MLflow's own names for its HTTP client's settings
    http_timeout_seconds: int | None = Field(default=None,
                                             validation_alias="MLFLOW_HTTP_REQUEST_TIMEOUT")
    http_max_retries: int | None = Field(default=None,
                                         validation_alias="MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    http_backoff_factor: int | None = Field(
        default=None, validation_alias="MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")


class RaceConfig(StrictModel):
    """A whole race: data, forecasting task, candidates, backtest, selection, registry."""

    name: str = Field(min_length=1)
    data: DataConfig
    frequency: str = "h"
    horizon: PositiveInt
    season_length: PositiveInt | None = None  # default: from the frequency (h -> 24)
    quantiles: list[float] = Field(default_factory=lambda: list(DEFAULT_QUANTILES))
    candidates: list[CandidateConfig] = Field(min_length=1)
    backtest: BacktestConfig = Field(default_factory=BacktestConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    registry: RegistryConfig
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    plot_series: int = Field(default=4, ge=0)  # series drawn in each forecast plot

    @field_validator("frequency")
    @classmethod
    def _pandas_frequency(cls, frequency: str) -> str:
        try:
            pd.tseries.frequencies.to_offset(frequency)
        except ValueError as error:
            raise ValueError(f"{frequency!r} is not a pandas frequency: {error}") from None
        return frequency

    @field_validator("quantiles")
    @classmethod
    def _levels(cls, quantiles: list[float]) -> list[float]:
        if not quantiles or any(not 0 < q < 1 for q in quantiles):
            raise ValueError("quantile levels must lie strictly between 0 and 1")
        return sorted({*quantiles, 0.5})

    @model_validator(mode="after")
    def _consistent(self) -> RaceConfig:
        if self.season_length is None:
            self.season_length = season_length_of(self.frequency)
        names = [c.name for c in self.candidates]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"candidates: names must be unique; repeated: {duplicates} "
                             "(set `name` on each)")
        for i, candidate in enumerate(self.candidates):
            if problem := interval_problem(candidate, self):
                raise ValueError(f"candidates.{i}.params.quantiles: {problem}")
        for i, candidate in enumerate(self.candidates):
            if candidate.search is not None and self.execution.engine != "ray":
                raise ValueError(f"candidates.{i}.search: runs on Ray Tune: set "
                                 "execution.engine: ray (or `forecaster train --ray`)")
        baseline = self.selection.baseline
        if baseline is not None and baseline not in names:
            raise ValueError(f"selection.baseline: {baseline!r} is not a candidate; name one of "
                             f"{names}, or leave it out for the seasonal naive forecast")
        return self

    @property
    def seasonal_naive(self) -> CandidateConfig:
        """The default baseline: the last season repeated (sktime's seasonal naive)."""
        return CandidateConfig(name=SEASONAL_NAIVE, model="NaiveForecaster",
                               params={"strategy": "last", "sp": self.season_length})

    @model_validator(mode="after")
    def _environment_overrides(self) -> RaceConfig:
        overrides = TrackingEnvironment().model_dump(exclude_none=True)
        if overrides:
            try:
                self.tracking = TrackingConfig.model_validate(
                    {**self.tracking.model_dump(), **overrides})
            except ValidationError as error:
                variables = ", ".join(f"MLFLOW_{'.'.join(map(str, e['loc'])).upper()}: "
                                      f"{e['msg']}" for e in error.errors())
                raise ValueError(f"tracking (from the environment): {variables}") from None
        return self

    # names the scheduler reads (pipelines/schedule.py)
    @property
    def tracking_uri(self) -> str:
        return self.tracking.tracking_uri

    @property
    def registered_model(self) -> str:
        return self.registry.model_name

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment_name or self.name

    def resources(self, candidate: CandidateConfig) -> ResourcesConfig:
        """What each Ray task of ``candidate`` holds: its own resources, else the race's."""
        return candidate.resources or self.execution.resources

    @property
    def interval_levels(self) -> tuple[float, float]:
        """The quantile levels bounding the scored prediction interval."""
        coverage = self.selection.interval_coverage
        return round((1 - coverage) / 2, 10), round((1 + coverage) / 2, 10)

    @property
    def forecast_levels(self) -> list[float]:
        """Every quantile level a forecast carries: the configured ones and the interval's."""
        return sorted({*self.quantiles, *self.interval_levels})


def parse_config(raw: dict[str, Any], base_dir: Path | None = None) -> RaceConfig:
    """Validate a config mapping; relative data paths are taken from ``base_dir``."""
    if not isinstance(raw, dict):
        raise ConfigError("the config must be a mapping of keys to values")
    data = raw.get("data")
    if base_dir is not None and isinstance(data, dict):
        data = dict(data)
        for key in ("path", "data_dir"):
            if isinstance(data.get(key), str) and not Path(data[key]).is_absolute():
                data[key] = str((base_dir / data[key]).resolve())
        raw = {**raw, "data": data}
    try:
        return RaceConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(describe(error)) from None


def on_ray(config: RaceConfig, address: str | None = None) -> RaceConfig:
    """``config`` with ``execution.engine: ray`` at ``address`` (None: the cluster in
    ``RAY_ADDRESS``, else a Ray started in the process): what ``forecaster train --ray``
    runs. Checked again as a whole, as a file would be."""
    raw = config.model_dump()
    raw["execution"] = {**raw["execution"], "engine": "ray", "address": address}
    try:
        return RaceConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(describe(error)) from None


def load_config(path: str | Path, *, ray: str | None = None) -> RaceConfig:
    """Read and validate a race config from YAML (relative data paths: from the file's folder).
    ``ray``: run on Ray at this address instead of the file's ``execution`` (``""``: the
    cluster in ``RAY_ADDRESS``, else a Ray started in the process), as ``--ray`` does."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} not found") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    config = parse_config(raw or {}, base_dir=path.resolve().parent)
    return config if ray is None else on_ray(config, ray or None)
