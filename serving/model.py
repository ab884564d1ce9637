"""The served model: a registry version checked, loaded, checked and warmed up, behind one
numeric call.

A version is loaded only once :mod:`pipelines.signing` vouches for it: its tags first, then its
files, downloaded into a folder of their own (in the cache directory, :mod:`serving.model_cache`)
and loaded from there; the folder is then kept as the last good model, or deleted.

``ServedModel.predict`` maps one array per series to forecasts (series, horizon, 1 + levels):
the point forecast, then the model's quantiles in ascending order. The array is the raw
history (time,), or for a model with covariates the :func:`model_input` layout. A neural
champion answers all series in one forward pass (``NeuralForecaster.forecast_histories``); an
sktime baseline is a local model and is refitted on each history, as the pyfunc model does.
The model states what the service needs to know: the shortest history it takes (recorded when
the race logged it), the covariates it takes, the dtype it computes in, and for a refitted
model the cost of a series by its length, measured at warm-up. A network with attention also
explains: ``ServedModel.explain`` maps the same arrays to ``Explanation``s in one forward pass
(None for a model that cannot).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from forecaster import NeuralForecaster
from forecaster.data import SERIES, TARGET, TIME
from forecaster.estimators import Explanation, explains
from forecaster.seasonality import season_length_of
from pipelines import signing
from pipelines.backtest import METRICS
from pipelines.candidates import min_history as min_history_of
from pipelines.forecasts import POINT, quantile_column
from pipelines.pyfunc_model import NEURAL, ForecasterModel, forecast_history
from pipelines.registry import TAG_CANDIDATE, TAG_MODEL_CLASS, tag_number
from serving.model_cache import ModelCache
from serving.schemas import ModelInfo, ModelSource, RefitCost

logger = logging.getLogger(__name__)

# warm-up batch sizes: the first forward at a new size allocates, later ones reuse
WARMUP_BATCHES = (1, 8, 64)

Forecasts = list[np.ndarray | Exception]  # per series: (horizon, 1 + levels), or its error
Explanations = list[Explanation | Exception]  # per series, or its error


@dataclass(frozen=True)
class ServedModel:
    info: ModelInfo
    predict: Callable[[list[np.ndarray]], Forecasts]
    # what the model computes in: a history whose second moment overflows it is refused
    dtype: np.dtype
    # the attention behind the forecasts of the same inputs; None: the model has none
    explain: Callable[[list[np.ndarray]], Explanations] | None = None

    @property
    def version(self) -> int:
        return self.info.version


def model_input(values: Sequence[float], steps: int, known: Sequence[Sequence[float]] = (),
                static: Sequence[float] = (), dtype: np.dtype | type = np.float32) -> np.ndarray:
    """One series as ``ServedModel.predict`` takes it. Without covariates: the history (time,).
    With them: a table (rows, 1 + known + static) of the target, then each known-future
    covariate, then each static one repeated, in the order of the model's ``covariates`` and
    ``static``; with known-future covariates (len(values) + steps values each) the table
    holds the ``steps`` ahead as rows whose target is NaN. ``dtype``: the model's."""
    history = np.asarray(values, dtype=dtype)
    if not known and not static:
        return history
    steps = steps if known else 0
    rows = len(history) + steps
    return np.column_stack([np.concatenate([history, np.full(steps, np.nan, dtype)]),
                            *(np.asarray(k, dtype) for k in known),
                            *(np.full(rows, v, dtype) for v in static)])


def _split_input(array: np.ndarray, n_known: int
                 ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """A :func:`model_input` array -> the history, its known-future covariates, its statics."""
    if array.ndim == 1:
        return array, None, None
    history = array[~np.isnan(array[:, 0]), 0]
    return history, array[:, 1:1 + n_known], array[0, 1 + n_known:]


def resolve_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version ``name@alias`` points at, or None while the model or alias does not exist."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        # a missing model is RESOURCE_DOES_NOT_EXIST, a missing alias INVALID_PARAMETER_VALUE
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


@dataclass(frozen=True)
class VersionMeta:
    """What the service reports about a registered version (see ``ModelInfo``), and what a
    kept copy is checked against (its tags)."""

    name: str
    version: int
    tags: dict[str, str]
    run_id: str | None
    trained_at: datetime | None
    # the race's season length (its run's param), when the race recorded one: the backtest's
    # MASE scaled by it, and so does the live MASE (serving.forecast_log)
    season_length: int | None = None

    @classmethod
    def of(cls, client: MlflowClient, version: ModelVersion) -> VersionMeta:
        return cls(version.name, int(version.version), dict(version.tags), version.run_id,
                   *_run_facts(client, version))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "tags": self.tags,
                "run_id": self.run_id,
                "trained_at": self.trained_at.isoformat() if self.trained_at else None,
                "season_length": self.season_length}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VersionMeta:
        trained_at = data.get("trained_at")
        return cls(data["name"], int(data["version"]), dict(data["tags"]), data.get("run_id"),
                   datetime.fromisoformat(trained_at) if trained_at else None,
                   data.get("season_length"))


def why_missing(client: MlflowClient, name: str, alias: str) -> str:
    """Why ``name@alias`` resolves to nothing: no such registered model, or no such alias."""
    try:
        model = client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return f"no registered model named {name!r}"
        raise
    return f"registered model {name!r} has no alias {alias!r} (its aliases: " \
           f"{sorted(model.aliases) or 'none'})"


def load_version(client: MlflowClient, version: ModelVersion, alias: str,
                 warmup_batch: int = max(WARMUP_BATCHES), refit_threads: int = 1,
                 cache: ModelCache | None = None) -> ServedModel:
    """Load a registered version, check that it forecasts, warm it up.

    Nothing of it is imported before it is checked (:mod:`pipelines.signing`): its tags before
    anything is downloaded, then its files, downloaded into a folder of their own, from which
    it is loaded; signing.Untrusted refuses it. The download is then kept as the ``cache``'s
    last good model, or deleted.
    """
    name, number, tags = version.name, int(version.version), dict(version.tags)
    signing.check_claims(name, number, tags)
    staging = cache.staging() if cache is not None else \
        tempfile.TemporaryDirectory(prefix="forecaster-model-")
    with staging as folder:
        files = signing.download(client.get_model_version_download_uri(name, str(number)),
                                 Path(folder), client.tracking_uri)
        signing.verify(files, name, number, tags, signing.signing_key())
        meta = VersionMeta.of(client, version)
        model = served_model(load_pyfunc(files), meta, alias, warmup_batch, refit_threads)
        if cache is not None:
            cache.keep(files, meta.to_json())
    return model


def load_cached(cache: ModelCache, alias: str, warmup_batch: int = max(WARMUP_BATCHES),
                refit_threads: int = 1) -> ServedModel:
    """The cache's last good model, checked again against the tags it was kept with; a
    LookupError when none was kept, signing.Untrusted when its files changed since."""
    kept = cache.last()
    if kept is None:
        raise LookupError(f"no model was kept in {cache.slot}")
    files, data = kept
    meta = VersionMeta.from_json(data)
    signing.verify(files, meta.name, meta.version, meta.tags, signing.signing_key())
    return served_model(load_pyfunc(files), meta, alias, warmup_batch, refit_threads,
                        source="cache")


def load_pyfunc(files: Path) -> mlflow.pyfunc.PyFuncModel:
    """The pyfunc model in a checked folder, left as it was: Python writes no bytecode beside
    the model's code, a file the race never hashed (and a later check of the kept copy would
    refuse)."""
    before, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        return mlflow.pyfunc.load_model(str(files))
    finally:
        sys.dont_write_bytecode = before


def served_model(pyfunc: mlflow.pyfunc.PyFuncModel, meta: VersionMeta, alias: str,
                 warmup_batch: int = max(WARMUP_BATCHES), refit_threads: int = 1,
                 source: ModelSource = "registry") -> ServedModel:
    """A loaded pyfunc model, checked and warmed up (a refitted model's cost per series timed
    on ``refit_threads`` threads); ValueError when this API cannot serve it (a forecast of
    the wrong shape). ``source``: where its files came from, for ``/model``."""
    wrapper = pyfunc.unwrap_python_model()
    # a model from code runs pipelines/pyfunc_model.py as its own module: compare by name
    if type(wrapper).__name__ != ForecasterModel.__name__:
        raise ValueError(f"{meta.name} v{meta.version} is not a forecaster pyfunc model")
    if wrapper.kind == NEURAL:
        estimator: NeuralForecaster = wrapper.estimator
        levels = list(estimator.levels_)
        predict, batches = _neural_predict(estimator), (*WARMUP_BATCHES, warmup_batch)
        explain = _neural_explain(estimator) if explains(estimator) else None
        dtype = torch.empty(0, dtype=next(estimator.network_.parameters()).dtype).numpy().dtype
    else:
        # one check suffices: a local model refits per series, nothing to warm up
        levels = sorted(wrapper.levels)
        predict, batches = _baseline_predict(wrapper), (1,)
        explain = None
        dtype = np.dtype(np.float64)  # statsmodels and pandas compute in float64
    # recorded when the race logged the model; versions logged before it was recorded state
    # it through their estimator
    min_history = getattr(wrapper, "min_history", None) or min_history_of(wrapper.estimator)
    tags = meta.tags
    model = ServedModel(
        info=ModelInfo(
            name=meta.name, version=meta.version, alias=alias,
            model_class=tags.get(TAG_MODEL_CLASS, type(wrapper.estimator).__name__),
            candidate=tags.get(TAG_CANDIDATE, ""), horizon=wrapper.horizon, quantiles=levels,
            min_history=min_history, covariates=wrapper.known_future, static=wrapper.static,
            frequency=wrapper.frequency, explains=explain is not None,
            season_length=meta.season_length or season_length_of(wrapper.frequency),
            trained_at=meta.trained_at, run_id=meta.run_id,
            metrics=backtest_metrics(tags),
            loaded_at=datetime.now(timezone.utc), source=source),
        predict=predict, dtype=dtype, explain=explain)
    check_and_warm_up(model, sorted({min(b, warmup_batch) for b in batches}))
    if wrapper.kind != NEURAL:
        model = dataclasses.replace(model, info=model.info.model_copy(
            update={"refit_cost": measure_refit_cost(model, refit_threads)}))
    return model


def backtest_metrics(tags: dict[str, str]) -> dict[str, float]:
    """The backtest metrics a race recorded on a version, from its tags (those it has)."""
    return {m: value for m in METRICS if math.isfinite(value := tag_number(tags.get(m)))}


def load_bento_model(tag: str, warmup_batch: int = max(WARMUP_BATCHES), refit_threads: int = 1
                     ) -> ServedModel:
    """A model that ``forecaster export-bento`` put in the BentoML model store."""
    import bentoml

    stored = bentoml.models.get(tag)
    meta = stored.info.metadata
    trained_at = datetime.fromisoformat(meta["trained_at"]) if meta.get("trained_at") else None
    return served_model(bentoml.mlflow.load_model(stored),
                        VersionMeta(meta["name"], int(meta["version"]), meta["tags"],
                                    meta.get("run_id"), trained_at, meta.get("season_length")),
                        meta["alias"], warmup_batch, refit_threads, source="bento")


def check_and_warm_up(model: ServedModel, batch_sizes: list[int]) -> None:
    """Forecast a synthetic history at these batch sizes; an error or a wrong shape raises."""
    info = model.info
    length = _check_length(info)
    # a covariate calendar of ones every seventh step and statics of 1, for models taking them
    known = [(np.arange(length + info.horizon) % 7 == 0).astype(np.float32)] * len(
        info.covariates)
    history = model_input(_synthetic_history(length), info.horizon, known,
                          [1.0] * len(info.static), dtype=model.dtype)
    expected = (info.horizon, 1 + len(info.quantiles))
    for size in batch_sizes:
        forecasts = model.predict([history] * size)
        for forecast in forecasts:
            if isinstance(forecast, Exception):
                raise ValueError(f"the model failed on a synthetic history: {forecast}")
            if forecast.shape != expected or not np.isfinite(forecast).all():
                raise ValueError(f"the model's forecast has shape {forecast.shape} or non-finite "
                                 f"values; expected finite values of shape {expected}")
        if len(forecasts) != size:
            raise ValueError(f"{len(forecasts)} forecasts for {size} histories")


def measure_refit_cost(model: ServedModel, threads: int) -> RefitCost:
    """The cost of a series for a model refitted on each one: wall time per series at two
    history lengths, with ``threads`` threads forecasting at once (the GIL and the shared cores
    count), and the line through them."""
    lengths = (_check_length(model.info), 4 * _check_length(model.info))
    per_series = []
    with ThreadPoolExecutor(threads) as pool:
        for length in lengths:
            histories = [_synthetic_history(length).astype(model.dtype)] * (2 * threads)
            start = time.perf_counter()
            list(pool.map(lambda history: model.predict([history]), histories))
            per_series.append((time.perf_counter() - start) / len(histories))
    per_value = max(0.0, (per_series[1] - per_series[0]) / (lengths[1] - lengths[0]))
    return RefitCost(fixed=max(per_series[0] - per_value * lengths[0], 0.0),
                     per_value=per_value)


def _check_length(info: ModelInfo) -> int:
    return max(info.min_history, 2 * info.horizon, 48)


def _synthetic_history(length: int) -> np.ndarray:
    """A daily-seasonal history with a slight trend, which every model forecasts."""
    steps = np.arange(length, dtype=np.float32)
    return 10 + np.sin(2 * np.pi * steps / 24) + 0.01 * steps


def _neural_predict(estimator: NeuralForecaster) -> Callable[[list[np.ndarray]], Forecasts]:
    median = estimator.levels_.index(0.5)
    n_known = len(estimator.covariates_)

    def predict(inputs: list[np.ndarray]) -> Forecasts:
        histories, known, static = zip(*(_split_input(a, n_known) for a in inputs), strict=True)
        quantiles = estimator.forecast_histories(  # (N, H, levels), one forward pass
            histories, covariates=known if estimator.covariates_ else None,
            static=np.stack(static) if estimator.static_covariates_ else None)
        return list(np.concatenate([quantiles[..., median:median + 1], quantiles], axis=-1))

    return predict


def _neural_explain(estimator: NeuralForecaster) -> Callable[[list[np.ndarray]], Explanations]:
    n_known = len(estimator.covariates_)

    def explain(inputs: list[np.ndarray]) -> Explanations:
        histories, known, static = zip(*(_split_input(a, n_known) for a in inputs), strict=True)
        try:  # one forward pass
            return list(estimator.explain_histories(
                histories, covariates=known if estimator.covariates_ else None,
                static=np.stack(static) if estimator.static_covariates_ else None))
        except ValueError as error:
            if len(inputs) == 1:
                return [error]
        # a series the model cannot explain (see explain_histories) fails alone
        return [result for array in inputs for result in explain([array])]

    return explain


def _baseline_predict(wrapper: ForecasterModel) -> Callable[[list[np.ndarray]], Forecasts]:
    levels = sorted(wrapper.levels)
    columns = [POINT, *map(quantile_column, levels)]
    covariates = [*wrapper.known_future, *wrapper.static]

    def predict(inputs: list[np.ndarray]) -> Forecasts:
        results: Forecasts = []
        for array in inputs:  # local models: one fit per series, each may fail alone
            table = array.reshape(len(array), -1)
            frame = pd.DataFrame({SERIES: "series", TIME: np.arange(len(table)),
                                  TARGET: table[:, 0],
                                  **{name: table[:, 1 + i] for i, name in enumerate(covariates)}})
            # with known-future covariates, the rows ahead are those the request carried
            steps = int(np.isnan(table[:, 0]).sum()) if wrapper.known_future else wrapper.horizon
            try:
                forecast = forecast_history(wrapper.estimator, frame, steps, levels,
                                            wrapper.frequency, wrapper.known_future,
                                            wrapper.static)
                results.append(forecast[columns].to_numpy(np.float64))
            except Exception as error:  # noqa: BLE001 - reported for this series only
                results.append(error)
        return results

    return predict


def _run_facts(client: MlflowClient, version: ModelVersion) -> tuple[datetime | None,
                                                                     int | None]:
    """When the version's run finished (its registration time if the run is gone), and the
    season length the race logged on it (None: not recorded)."""
    millis, season = version.creation_timestamp, None
    if version.run_id:
        try:
            run = client.get_run(version.run_id)
        except MlflowException:
            logger.warning("run %s of %s v%s is gone", version.run_id, version.name,
                           version.version)
        else:
            millis = run.info.end_time or millis
            recorded = run.data.params.get("season_length")
            season = int(recorded) if recorded and recorded.isdigit() else None
    return (datetime.fromtimestamp(millis / 1000, tz=timezone.utc) if millis else None,
            season)
