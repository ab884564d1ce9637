"""One series' forecast and the attention behind it, from a trained estimator or a logged
model, for a person to look at: what ``forecaster explain`` draws and the race logs
(``explanation.png``, with ``tracking.explanation_figure``).

The input is a long frame in the layout the logged model takes (``pipelines.pyfunc_model``):
``series_id``, ``timestamp``, ``target`` and the model's covariates, with ``horizon`` future
rows (empty target) per series for a model with known-future covariates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from sktime.forecasting.base import BaseForecaster

from forecaster.data import SERIES, TARGET, TIME
from forecaster.estimators import Explanation, explaining_families, explains
from pipelines.config import load_config
from pipelines.pyfunc_model import forecast_history


@dataclass(frozen=True)
class ExplainedSeries:
    series_id: str
    history: pd.Series  # the observed target, indexed by time
    forecast: pd.DataFrame  # its forecast frame (pipelines.forecasts)
    explanation: Explanation


def series_inputs(rows: pd.DataFrame, known_future: Sequence[str] = (),
                  static: Sequence[str] = ()
                  ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One series of a long frame as ``attention_maps`` and ``explain_histories`` take it: the
    history, and the raw covariates of a model trained with them."""
    history = rows[TARGET].dropna().to_numpy(np.float32)
    known = rows[list(known_future)].to_numpy(np.float32) if known_future else None
    statics = rows[list(static)].iloc[0].to_numpy(np.float32) if static else None
    return history, known, statics


def explain_series(estimator: BaseForecaster, frame: pd.DataFrame, series_id: object,
                   horizon: int, frequency: str, known_future: Sequence[str] = (),
                   static: Sequence[str] = ()) -> ExplainedSeries:
    """The forecast of ``series_id`` in ``frame`` and its explanation; a ValueError when the
    estimator has no attention (naming the families that have) or the series is missing."""
    if not explains(estimator):
        raise ValueError(f"{type(estimator).__name__} has no attention to explain its forecasts "
                         f"with; the families that explain are {', '.join(explaining_families())}")
    rows = frame[frame[SERIES].astype(str) == str(series_id)]
    if rows.empty:
        ids = list(frame[SERIES].astype(str).drop_duplicates()[:5])
        raise ValueError(f"no series {str(series_id)!r} in the input (its first ids: {ids})")
    history, known, statics = series_inputs(rows, known_future, static)
    explanation, = estimator.explain_histories(
        [history], [series_id], covariates=None if known is None else [known],
        static=None if statics is None else [statics])
    forecast = forecast_history(estimator, rows, horizon, list(estimator.levels_), frequency,
                                known_future, static)
    observed = rows[rows[TARGET].notna()]
    return ExplainedSeries(str(series_id),
                           pd.Series(observed[TARGET].to_numpy(np.float64),
                                     index=pd.Index(observed[TIME])),
                           forecast, explanation)


def model_uri(target: str, alias: str = "champion") -> str:
    """A model URI as it is, or for a race config (a YAML file), ``models:/NAME@alias`` of its
    registered model, with MLflow pointed at the config's tracking and registry stores."""
    if Path(target).suffix.lower() not in (".yaml", ".yml"):
        return target
    config = load_config(target)
    mlflow.set_tracking_uri(config.tracking_uri)
    mlflow.set_registry_uri(config.tracking.registry_uri or config.tracking_uri)
    return f"models:/{config.registered_model}@{alias}"


def read_series(path: Path) -> pd.DataFrame:
    """A long frame from a CSV or Parquet file, its timestamps parsed when they are text."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"series file {str(path)!r} not found")
    frame = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path)
    missing = [c for c in (SERIES, TIME, TARGET) if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing}; the file holds the model's input "
                         f"layout: {SERIES}, {TIME}, {TARGET} and its covariates")
    times = frame[TIME]
    if not (pd.api.types.is_numeric_dtype(times) or pd.api.types.is_datetime64_any_dtype(times)):
        try:
            frame[TIME] = pd.to_datetime(frame[TIME])
        except (ValueError, TypeError) as error:
            raise ValueError(f"{path}: column {TIME!r} holds neither numbers nor dates: "
                             f"{error}") from None
    return frame
