"""Hyperparameter search of a network on Ray Tune, before it races.

A candidate's ``search`` (:class:`pipelines.config.SearchConfig`) names ranges of its
constructor parameters. Optuna (Ray Tune's ``OptunaSearch``) draws ``trials`` configurations;
each trial fits the candidate the way the race fits a fold (``fit`` is the race's
:func:`pipelines.race.fit_fold`) on the search's own fold: the first backtest fold's training
window, its last ``horizon`` observations held out, so that no trial sees a window the
backtest then tests on. The trainer's per-epoch validation loss goes to Tune as it trains:
Optuna learns from it and ASHA stops poor trials early on it. A trial that runs to the end
is scored on the held-out window with the race's metrics, and the best by ``search.metric``
gives the candidate its parameters.

The trials run as Ray Tune trials, holding the candidate's resources, on the race's Ray
cluster; the race's data reach them through the object store handle the race already holds.
Back on the driver, :meth:`SearchResult.log` records each trial as a nested MLflow run under
the candidate's run, and the chosen parameters on the candidate's run itself.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd
from mlflow.entities import Metric

from pipelines.backtest import METRICS, Fold, score_forecast
from pipelines.candidates import build_estimator
from pipelines.config import CandidateConfig, ConfigError, SearchDimension
from pipelines.forecasts import forecast_problems

if TYPE_CHECKING:
    from forecaster.trainer import EpochCallback
    from pipelines.execution import FitRecord
    from pipelines.race import PreparedRace

    FitFn = Callable[[PreparedRace, CandidateConfig, Fold, EpochCallback | None], FitRecord]

SEED = 0  # Optuna's sampler: the same race proposes the same trials
EPOCH_METRICS = ("train_loss", "val_loss")


def search_fold(prepared: PreparedRace) -> Fold:
    """The first fold's training window, the last ``horizon`` observations of each series
    held out: what every trial trains on and is scored on."""
    first, horizon = prepared.plan.folds[0], prepared.config.horizon
    y, X = first.y_train, first.X_train
    held_out = (y.groupby(level=0, sort=False).cumcount(ascending=False) < horizon).to_numpy()
    return Fold(0, y[~held_out], y[held_out],
                None if X is None else X[~held_out], None if X is None else X[held_out])


def check_search(prepared: PreparedRace, key: str, need: int) -> None:
    """Raise ConfigError (naming ``key``.search) when the search's fold is too short for a
    candidate that trains on at least ``need`` observations."""
    shortest = int(search_fold(prepared).y_train.groupby(level=0).size().min())
    if shortest < need:
        raise ConfigError(
            f"{key}.search: trials train on the first fold's training window less its last "
            f"{prepared.config.horizon} observations ({shortest} on the shortest series), "
            f"and the candidate needs at least {need}: lengthen backtest.window or shorten "
            "input_len")


def _domain(dimension: SearchDimension) -> Any:
    from ray import tune

    if dimension.loguniform is not None:
        return tune.loguniform(*dimension.loguniform)
    if dimension.uniform is not None:
        return tune.uniform(*dimension.uniform)
    if dimension.integer is not None:
        low, high = dimension.integer
        return tune.randint(low, high + 1)  # Tune's upper bound is exclusive, ours is not
    return tune.choice(dimension.choice)


def _trial(params: dict[str, Any], *, prepared: PreparedRace, candidate: CandidateConfig,
           fit: FitFn) -> None:
    """One trial (a Tune function trainable): the candidate with ``params`` fitted on the
    search's fold, each epoch's losses reported as it trains, its scores at the end."""
    from ray import tune

    trial = candidate.model_copy(update={"params": {**candidate.params, **params},
                                         "search": None})
    fold = search_fold(prepared)

    def report(record: Any) -> None:
        tune.report({"epoch": record.epoch + 1, "train_loss": record.train_loss,
                     "val_loss": record.val_loss})

    record = fit(prepared, trial, fold, report)
    assert record.forecast is not None
    scores = (dict.fromkeys(METRICS, math.nan)
              if forecast_problems(record.forecast, fold.y_test.index)
              else score_forecast(fold, record.forecast, prepared.config))
    tune.report({"epoch": len(record.curve), "val_loss": min(r.val_loss for r in record.curve),
                 "fit_seconds": record.seconds, **scores})


@dataclass
class Trial:
    number: int  # 1-based, in the order Tune created the trials
    params: dict[str, Any]
    curve: pd.DataFrame  # per epoch: epoch, train_loss, val_loss
    scores: dict[str, float]  # on the held-out window; empty unless the trial ran to its end
    status: str  # completed | stopped early | error
    error: str | None = None


@dataclass
class SearchResult:
    candidate: CandidateConfig  # as configured
    metric: str
    trials: list[Trial]
    best: Trial
    seconds: float
    space: dict[str, Any] = field(default_factory=dict)

    @property
    def tuned(self) -> CandidateConfig:
        """The candidate with the best trial's parameters, its search done."""
        return self.candidate.model_copy(update={
            "params": {**self.candidate.params, **self.best.params}, "search": None})

    def log(self, experiment_id: str) -> CandidateConfig:
        """Each trial as a nested run under the active (candidate's) run, the search and its
        best parameters on that run; returns :attr:`tuned`."""
        client = mlflow.MlflowClient()
        name = self.candidate.name
        for trial in self.trials:
            with mlflow.start_run(experiment_id=experiment_id, nested=True,
                                  run_name=f"{name}/trial_{trial.number}",
                                  log_system_metrics=False,
                                  tags={"candidate": str(name), "search_trial": trial.number,
                                        "search_status": trial.status,
                                        "search_best": str(trial is self.best).lower()}
                                  ) as run:
                mlflow.log_params({key: str(value) for key, value in trial.params.items()})
                now = int(time.time() * 1000)
                client.log_batch(run.info.run_id, metrics=[
                    Metric(loss, float(row[loss]), now, int(row["epoch"]) - 1)
                    for _, row in trial.curve.iterrows() for loss in EPOCH_METRICS])
                mlflow.log_metrics({k: v for k, v in trial.scores.items() if math.isfinite(v)})
                if trial.error:
                    mlflow.set_tag("error", trial.error[:500])
        mlflow.log_params({"search.trials": len(self.trials), "search.metric": self.metric,
                           "search.scheduler": self.candidate.search.scheduler
                           if self.candidate.search else "",
                           **{f"search.best.{key}": str(value)
                              for key, value in self.best.params.items()}})
        mlflow.log_metrics({f"search/best_{self.metric}": self.best.scores[self.metric],
                            "search/seconds": self.seconds,
                            "search/stopped_early": sum(t.status == "stopped early"
                                                        for t in self.trials)})
        mlflow.log_text(json.dumps(self.space, indent=2, default=str), "search_space.json")
        return self.tuned


def _max_epochs(prepared: PreparedRace, candidate: CandidateConfig) -> int:
    """The most epochs a trial can run: ASHA's horizon."""
    assert candidate.search is not None
    dimension = candidate.search.space.get("max_epochs")
    if dimension is None:
        return int(build_estimator(candidate, prepared.config).get_params()["max_epochs"])
    bounds = dimension.integer or dimension.choice or dimension.uniform or dimension.loguniform
    assert bounds is not None
    return int(max(bounds))


def tune_candidate(prepared: PreparedRace, candidate: CandidateConfig, shared: Any,
                   fit: FitFn, progress: bool = False) -> SearchResult:
    """Run ``candidate``'s search on the connected Ray cluster; ``shared`` is the race's
    object store handle on ``prepared`` (Tune resolves it in each trial). Raises
    RuntimeError when no trial ran to its end with a finite score."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    search = candidate.search
    assert search is not None
    metric = search.metric or prepared.config.selection.metric
    resources = prepared.config.resources(candidate)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, prepared=shared, candidate=candidate, fit=fit),
        {"cpu": resources.num_cpus, "gpu": resources.num_gpus})
    # Tune counts reports: one per epoch, then the trial's scores, which ASHA must not cut
    scheduler = (ASHAScheduler(time_attr="training_iteration",
                               max_t=_max_epochs(prepared, candidate) + 1, grace_period=1)
                 if search.scheduler == "asha" else FIFOScheduler())
    storage = tempfile.mkdtemp(prefix="forecaster-tune-")  # Tune's own files, not kept
    started = time.perf_counter()
    try:
        # Optuna and ASHA follow the trainer's validation loss, reported every epoch
        tuner = tune.Tuner(trainable, param_space={
            key: _domain(dimension) for key, dimension in search.space.items()},
            tune_config=tune.TuneConfig(metric="val_loss", mode="min",
                                        search_alg=OptunaSearch(seed=SEED),
                                        scheduler=scheduler, num_samples=search.trials),
            run_config=tune.RunConfig(name=f"{prepared.config.name}-{candidate.name}",
                                      storage_path=storage, verbose=1 if progress else 0))
        grid = tuner.fit()
        trials = [_trial_of(number, result, metric)
                  for number, result in enumerate(grid, start=1)]
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    done = [t for t in trials if t.status == "completed" and math.isfinite(t.scores[metric])]
    if not done:
        failed = next((t for t in trials if t.error), None)
        raise RuntimeError(f"no trial of {len(trials)} ran to its end with a finite {metric}"
                           + (f"; trial {failed.number}: {failed.error}" if failed else ""))
    best = min(done, key=lambda t: (t.scores[metric], t.number))
    space = {key: dimension.model_dump(by_alias=True, exclude_none=True)
             for key, dimension in search.space.items()}
    return SearchResult(candidate, metric, trials, best, time.perf_counter() - started, space)


def _trial_of(number: int, result: Any, metric: str) -> Trial:
    frame = result.metrics_dataframe
    if frame is None or "train_loss" not in frame:
        curve = pd.DataFrame(columns=["epoch", *EPOCH_METRICS])
    else:
        curve = frame.loc[frame["train_loss"].notna(), ["epoch", *EPOCH_METRICS]]
    last = result.metrics or {}
    params = {key: value for key, value in (result.config or {}).items()}
    if result.error is not None:
        return Trial(number, params, curve, {}, "error",
                     f"{type(result.error).__name__}: {result.error}")
    if metric in last:
        return Trial(number, params, curve, {m: float(last[m]) for m in METRICS}, "completed")
    return Trial(number, params, curve, {}, "stopped early")
