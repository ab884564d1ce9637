"""The service's settings: typed, with defaults that serve the demo race's champion.

Values come, highest priority first, from the environment (``FORECASTER_<FIELD>``, plus the
MLflow variables ``MLFLOW_TRACKING_URI`` and ``MLFLOW_REGISTRY_URI``), then from the YAML file
named by ``FORECASTER_SERVING_CONFIG`` (``forecaster serve --config``), then the defaults here;
``forecaster serve --model-name/--alias`` set their variables. BentoML reads the batching,
worker and timeout settings when it imports the service, so they are fixed for the life of a
server; everything else is read when the service starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices, Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from pipelines.schema_errors import describe

ENV_PREFIX = "FORECASTER_"  # FORECASTER_<FIELD> sets a field
CONFIG_FILE_VARIABLE = f"{ENV_PREFIX}SERVING_CONFIG"
CACHE_FOLDER = "model-cache"  # the default cache_dir's name
# written into a Bento's sources by `forecaster export-bento`: the model that Bento serves
PINNED_MODEL_FILE = Path(__file__).resolve().parents[1] / "pinned_model.txt"


class ServingConfig(BaseSettings):
    """Where the model comes from, how requests are batched, and the service's limits."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid",
                                      populate_by_name=True)

    tracking_uri: str = Field(default="sqlite:///mlflow.db", validation_alias=AliasChoices(
        "tracking_uri", "MLFLOW_TRACKING_URI"))
    registry_uri: str | None = Field(default=None, validation_alias=AliasChoices(
        "registry_uri", "MLFLOW_REGISTRY_URI"))
    model_name: str = Field(default="m4-hourly-quick", min_length=1)
    model_alias: str = Field(default="champion", min_length=1)
    # a BentoML model-store tag to serve instead of following the alias (set by export-bento)
    bento_model: str | None = None
    poll_seconds: float = Field(default=30.0, gt=0, description="how often the alias is read")
    # adaptive batching: a forward pass takes at most max_batch_size series; a request waits
    # at most max_latency_ms in the queue before BentoML's dispatcher sheds it with a 503
    batching: bool = True
    max_batch_size: int = Field(default=256, ge=2)
    max_latency_ms: int = Field(default=1000, gt=0)
    workers: int = Field(default=1, ge=1)
    threads: int = Field(default=1, ge=1, description="torch threads per forward pass")
    # a model refitted on each series (an sktime baseline) forecasts series in parallel on
    # this many threads per worker, one series of each request in turn
    refit_threads: int = Field(default=2, ge=1)
    # BentoML answers 504 past this; a request of a refitted model estimated to take longer
    # (from its series and their lengths) is refused with a 503 before any work starts
    timeout_seconds: float = Field(default=60.0, gt=0)
    max_series_per_request: int = Field(default=1000, ge=1)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    # the last model served and verified, served at start when the registry is unreachable
    # or its version fails to load (serving.model_cache); default: model-cache/ under
    # $BENTOML_HOME, else the working directory. Give each replica a volume of its own
    cache_dir: Path | None = None
    access_log: bool = False  # one log line per request costs more CPU than a forward pass
    # an OpenTelemetry span per /forecast request (exported per BentoML's tracing settings)
    # costs about 15% of the request's CPU (py-spy), so it is opt-in
    trace_requests: bool = False
    # the forecast log and the actuals (pipelines.forecast_store; FORECASTER_STORE_URL, which
    # "none" turns off): each worker queues at most forecast_log_queue_rows rows (forecast
    # steps) and writes them in batches of forecast_log_batch_rows, at least every
    # forecast_log_flush_seconds, busy at most forecast_log_max_share of the time: past what
    # that share writes, the queue fills and drops rows (serving.forecast_log). 5%: measured
    # within the 10% budget with a margin; 10% doubles the rows kept and costs about
    # the whole budget (docs/benchmarks.md, "Live accuracy: the service")
    store_url: str | None = Field(default=None, min_length=1)  # None: the store's default
    forecast_log_queue_rows: int = Field(default=200_000, ge=1)
    forecast_log_batch_rows: int = Field(default=5_000, ge=1)
    forecast_log_flush_seconds: float = Field(default=1.0, gt=0)
    forecast_log_max_share: float = Field(default=0.05, gt=0, le=1)
    # the drift alert's thresholds, exported as gauges for its rule (ForecastAccuracyDegraded):
    # the live MASE over this factor times the backtest's, with at least this many points
    accuracy_alert_factor: float = Field(default=1.3, gt=0)
    accuracy_alert_min_points: int = Field(default=50, ge=1)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        # the environment beats the file, which arrives as init values
        return env_settings, init_settings

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_name}@{self.model_alias}"

    @property
    def store(self) -> str | None:
        """The store's URL (store_url, else the store's default), None when the log is off."""
        # imported here: the store module imports forecaster (torch), which importing the
        # settings must not (the CLI reads them)
        from pipelines.forecast_store import DEFAULT_STORE_URL, STORE_OFF

        url = self.store_url or DEFAULT_STORE_URL
        return None if url.strip().lower() == STORE_OFF else url

    @property
    def model_cache_dir(self) -> Path:
        """``cache_dir``, or its default."""
        if self.cache_dir is not None:
            return self.cache_dir
        return Path(os.environ.get("BENTOML_HOME", ".")).resolve() / CACHE_FOLDER


def load_serving_config(path: str | Path | None = None) -> ServingConfig:
    """The settings from ``path`` (default: ``$FORECASTER_SERVING_CONFIG``, else none) and the
    environment; a ValueError names each bad key."""
    path = path or os.environ.get(CONFIG_FILE_VARIABLE)
    values: dict[str, Any] = {}
    if path:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ValueError(f"serving config {str(path)!r} not found") from None
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML: {error}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: the serving config must be a mapping of keys to values")
    if PINNED_MODEL_FILE.is_file():  # running from an exported Bento
        values.setdefault("bento_model", PINNED_MODEL_FILE.read_text().strip())
    try:
        return ServingConfig(**values)
    except ValidationError as error:
        raise ValueError("invalid serving config:\n  " + "\n  ".join(describe(error))) from None
