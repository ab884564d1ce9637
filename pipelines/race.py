"""The race: backtest every candidate the same way, track it all in MLflow, register every
model, and move ``@champion`` only to a winner that beats the baseline and the current champion.

One parent MLflow run per race and a nested run per candidate. Order of work::

    prepare    add the baseline (``selection.baseline``; by default the seasonal naive
               forecast) to the candidates if absent, load the data (repaired as data.fill
               says), plan the folds: every config and data error surfaces here, before training
    orphans    tag ``orphan`` the versions that earlier races registered but never completed
    candidates per candidate: backtest on the folds, refit on all data (with the covariates,
               for candidates that take them), log the pyfunc model, download it back, hash its
               files and check that, loaded, it reproduces the estimator, register it as a new
               version with its metrics, its resolved config (``registry.TAG_CONFIG``) and its
               files' digest (``signing.TAG_FILES``)
    ensemble   with two valid candidates or more, and two folds or more: their fold forecasts
               weighted by greedy selection (``pipelines.ensemble``; each fold's forecast weighted
               on the other folds, so that its scores are out of sample), and the weighted
               ensemble of their refitted estimators logged, checked and registered as one more
               candidate (off with ``selection.ensemble: false``)
    champion   read the @champion's config from the registry (its tag, or its run's params) and
               score it like a candidate: refitted on each fold's training window, forecasting
               the fold's test window; a candidate of this race with the same config lends it
               its fold scores instead (an ensemble's members are refitted, or lent a
               candidate's fold forecasts, and weighted as recorded). Its registered model is
               never loaded
    decide     the best valid candidate must beat the baseline's score (unless it is the
               baseline), then the champion's by the promotion margin
    record     the decision on the winner's version, the race's tags and its leaderboard
    vouch      each version: its signature (``pipelines.signing``), then ``race_complete=true``,
               the tag that claims everything above is written
    alias      last of all: @champion on a promoted winner, @challenger on one that did not beat
               the champion; a winner below the baseline floor gets no alias

The model work is done by units of work, each a fit (``fit_fold``: a candidate or the
champion on one fold; ``_refit_task``: a candidate on all the data), run by the configured
engine (``execution``; :mod:`pipelines.execution`): one after another in this process, or as
Ray tasks submitted at once for every candidate without a search (a searched candidate's once
its search, :mod:`pipelines.search`, has chosen its parameters). Their records (forecasts,
learning curves, fitted estimators, warnings) come back to this process, which logs them in
the candidates' order: MLflow, the registry and the aliases see the same race either way.

An error from a candidate's own model code (a fit that raises, in the search, the backtest or
the refit; a Ray task whose worker keeps dying) fails that candidate only: its nested run is
marked FAILED with the error, it cannot win, and the race goes on without it (fold scores of
a completed backtest still count for the floor). The same holds for the ensemble's weighting
and model.
An error from MLflow or the registry, or a Ray cluster that goes away
(:class:`pipelines.execution.ClusterLost`), fails the race; aliases are then untouched, and
running again starts over cleanly. A tracking server that stops answering
fails it within ``tracking.http_budget_seconds``
(:class:`pipelines.tracking.TrackingUnavailable`, one line); an interrupt (Ctrl-C, or SIGTERM as
``forecaster train`` handles it) marks the open runs KILLED.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from mlflow.exceptions import MlflowException
from mlflow.models.model import ModelInfo
from pydantic import ValidationError
from sktime.forecasting.base import BaseForecaster, ForecastingHorizon
from tqdm.auto import tqdm

from forecaster.data import SERIES, TARGET, TIME
from forecaster.estimators import explains
from forecaster.trainer import EpochCallback, EpochRecord
from pipelines import registry, signing
from pipelines.backtest import (
    METRICS,
    BacktestPlan,
    BacktestResult,
    Fold,
    ForecastFn,
    plan_backtest,
    required_length,
    run_backtest,
)
from pipelines.candidates import (
    build_estimator,
    is_neural,
    loggable_params,
    loggable_sizes,
    min_train_length,
    params_from_logged,
    resolved_config,
    takes_covariates,
)
from pipelines.config import CandidateConfig, RaceConfig
from pipelines.ensemble import (
    ENSEMBLE_MODEL,
    ENSEMBLE_NAME,
    Selection,
    combine,
    ensemble_model,
    not_raced,
    recorded_members,
    select,
    shared_levels,
)
from pipelines.ensemble import recorded_config as ensemble_config
from pipelines.execution import ClusterLost, Engine, FitRecord, Task, recording, start_engine
from pipelines.explain import explain_series, series_inputs
from pipelines.forecasts import forecast_frame, forecast_problems, future_index, horizon_of
from pipelines.pyfunc_model import (
    forecast_history,
    future_layout,
    log_forecaster,
    model_levels,
)
from pipelines.schema_errors import describe
from pipelines.search import check_search, tune_candidate
from pipelines.sources import RaceData, load_race_data, source_description
from pipelines.tracking import (
    attention_figure,
    configure_tracking,
    end_run,
    ended_on_error,
    epoch_logger,
    explanation_figure,
    flatten,
    forecast_figure,
    http_requests,
    log_warnings,
    provenance_tags,
    system_metrics_interval,
    unavailable,
    unreachable,
)
from pipelines.warning_capture import recorded_warnings, without_sktime_notice

logger = logging.getLogger(__name__)

INPUT_EXAMPLE_SERIES, INPUT_EXAMPLE_ROWS = 2, 500


@dataclass(frozen=True)
class PreparedRace:
    """A config checked against its data: the data and the folds every candidate shares, and
    the candidates that race (the config's, plus the baseline when the race added it)."""

    config: RaceConfig
    data: RaceData
    plan: BacktestPlan
    fh: ForecastingHorizon
    candidates: list[CandidateConfig]
    baseline: str  # the candidate whose score is the floor
    baseline_added: bool  # the race added it: no candidate of the config was the baseline


@dataclass
class CandidateOutcome:
    name: str
    model: str
    run_id: str
    config: dict[str, Any]  # the resolved config (candidates.resolved_config)
    status: str = "ok"  # ok | failed
    scores: dict[str, float] = field(default_factory=lambda: dict.fromkeys(METRICS, math.nan))
    problems: list[str] = field(default_factory=list)
    error: str | None = None
    backtest: BacktestResult | None = None  # once the backtest completed
    train_seconds: float = math.nan
    backtest_seconds: float = math.nan
    version: int | None = None
    files: str = ""  # the digest of the registered model's files (signing.TAG_FILES)
    estimator: BaseForecaster | None = None  # refitted on all the data
    forecast: pd.DataFrame | None = None  # the estimator's forecast past the data
    example: pd.DataFrame | None = None  # the logged model's input example ...
    example_forecast: pd.DataFrame | None = None  # ... and its forecast
    forecast_input: pd.DataFrame | None = None  # what ``forecast`` is forecast from
    levels: list[float] = field(default_factory=list)  # the quantile levels it forecasts
    note: str = ""  # for the leaderboard (an ensemble's weights)
    covariates: tuple[str, ...] = ()  # the data's covariates the candidate takes
    ignores_covariates: bool = False  # the data have covariates and the candidate takes none

    @property
    def valid(self) -> bool:
        return self.status == "ok" and not self.problems and all(
            math.isfinite(v) for v in self.scores.values())


@dataclass
class RaceResult:
    """What a race did. ``champion_version`` and ``champion_score`` describe the champion after
    the race (the winner if promoted), scored on this race's folds."""

    leaderboard: pd.DataFrame  # one row per candidate, best first
    winner: str | None  # the best valid candidate
    winner_version: int | None
    winner_score: float | None
    promoted: bool
    reason: str
    champion_version: int | None
    champion_score: float | None
    previous_champion_version: int | None
    previous_champion_score: float | None
    challenger_version: int | None
    metric: str
    model_name: str
    run_id: str
    experiment_id: str
    baseline: str  # the candidate that set the floor
    baseline_added: bool  # the race added it to the config's candidates
    champion_scored: str | None = None  # how the previous champion was scored
    champion_error: str | None = None  # why the previous champion could not be scored
    versions: dict[str, int] = field(default_factory=dict)  # candidate -> registered version
    # versions of earlier races that died before vouching for them, tagged orphan by this one
    orphans: list[int] = field(default_factory=list)
    # the refitted estimators, in memory (what each registered version was made from)
    estimators: dict[str, BaseForecaster] = field(default_factory=dict, repr=False)
    ensemble_note: str | None = None  # why the race has no ensemble, when it has none


class _Progress:
    """A progress bar: one step per fold, then a candidate's refit and logging; neural models
    advance within a step epoch by epoch."""

    def __init__(self, name: str, steps: int, epochs: int | None, enabled: bool):
        self.bar = tqdm(total=steps, desc=f"{name:<14}", unit="step", leave=True,
                        disable=not enabled, bar_format="{desc} {bar} {n:.1f}/{total} "
                        "[{elapsed}<{remaining}]{postfix}")
        self.epochs, self.done = epochs, 0

    def epoch(self, record: EpochRecord) -> None:
        if self.epochs:
            self.bar.update(1 / self.epochs)
            self.bar.set_postfix_str(f"train {record.train_loss:.3f} val {record.val_loss:.3f}")

    def step(self, note: str | None = None) -> None:
        self.done += 1
        self.bar.update(self.done - self.bar.n)  # snaps early-stopped epochs to the step
        if note:
            self.bar.set_postfix_str(note)

    def close(self) -> None:
        self.bar.close()


def prepare_race(config: RaceConfig) -> PreparedRace:
    """Add the baseline if absent, load the data and plan the folds; raises ConfigError
    (naming the key) or ValueError."""
    candidates, baseline, added = _with_baseline(config)
    needs = {c.name: min_train_length(c, config) for c in candidates}
    hungriest = max(needs, key=lambda name: needs[name])
    need, why = required_length(config, needs[hungriest], f"candidate {hungriest!r}")
    data = load_race_data(config.data, config.frequency, min_length=need, need=why)
    plan = plan_backtest(config, data, needs[hungriest], f"candidate {hungriest!r}")
    prepared = PreparedRace(config, data, plan,
                            horizon_of(config.horizon, data.datetime_index, config.frequency),
                            candidates, baseline, added)
    for i, candidate in enumerate(config.candidates):
        if candidate.search is not None:
            check_search(prepared, f"candidates.{i}", needs[candidate.name])
    return prepared


def _with_baseline(config: RaceConfig) -> tuple[list[CandidateConfig], str, bool]:
    """The candidates that race, the baseline's name, and whether it was added: the named
    ``selection.baseline``, else a candidate that is the seasonal naive forecast (same
    resolved config), else the seasonal naive forecast appended to the candidates."""
    candidates = list(config.candidates)
    if config.selection.baseline is not None:
        return candidates, config.selection.baseline, False
    default = config.seasonal_naive
    wanted = resolved_config(default, config)
    for candidate in candidates:
        if resolved_config(candidate, config) == wanted:
            assert candidate.name is not None
            return candidates, candidate.name, False
    names = {c.name for c in candidates}
    name = default.name
    while name in names:  # a different candidate already has the name
        name = f"{name}-baseline"
    return [*candidates, default.model_copy(update={"name": name})], name, True


def run_race(config: RaceConfig, *, progress: bool = True) -> RaceResult:
    """Run one race now and return what happened (see the module doc for the steps).

    Every request to a tracking server gives up within ``tracking.http_budget_seconds``; one
    that did not answer ends the race with a TrackingUnavailable saying so in one line. A
    KeyboardInterrupt (Ctrl-C, or a SIGTERM the caller turned into one) marks the open runs
    KILLED and propagates; other errors mark them FAILED. Either way the aliases are untouched.
    """
    try:
        with http_requests(config.tracking):
            return _run_race(config, progress)
    except Exception as error:
        if unreachable(error, config.tracking.tracking_uri):
            raise unavailable(error, config.tracking) from None
        raise


def _run_race(config: RaceConfig, progress: bool) -> RaceResult:
    # the engine first: a Ray cluster that does not answer fails the race before MLflow is
    # touched, as a bad config does
    with without_sktime_notice(), \
            system_metrics_interval(config.tracking.system_metrics_sampling_interval), \
            start_engine(config.execution, progress) as engine:
        prepared = prepare_race(config)  # before MLflow is touched: a bad config changes nothing
        experiment_id = configure_tracking(config)
        tracking = config.tracking
        tags = {"race": config.name, "registered_model": config.registry.model_name,
                "data_source": source_description(config.data),
                **provenance_tags(prepared.data.fingerprint)}
        if prepared.baseline_added:
            logger.info("race %s: the baseline %s (the seasonal naive forecast) was added to "
                        "the candidates; selection.baseline names another", config.name,
                        prepared.baseline)
        with mlflow.start_run(experiment_id=experiment_id, run_name=config.name, tags=tags,
                              log_system_metrics=tracking.enable_system_metrics_logging
                              ) as parent, ended_on_error():
            _log_race_settings(prepared)
            orphans = registry.tag_orphans(config.registry.model_name, parent.info.run_id)
            work = _Work(engine, engine.share(prepared))  # the data go out once
            engine.plan(len(prepared.candidates) * (len(prepared.plan.folds) + 1))
            # every candidate's fits start now (on Ray, side by side); a searched candidate's
            # once its search has chosen its parameters
            tasks = {c.name: work.submit(prepared, c) for c in prepared.candidates
                     if c.search is None}
            outcomes = [_race_candidate(prepared, candidate, work, tasks.get(candidate.name),
                                        tags, experiment_id, parent.info.run_id, progress)
                        for candidate in prepared.candidates]
            ensemble, why = _race_ensemble(prepared, outcomes, tags, experiment_id,
                                           parent.info.run_id, progress)
            if ensemble is not None:
                outcomes.append(ensemble)
            result = _decide_and_alias(prepared, outcomes, parent.info.run_id, experiment_id,
                                       work, progress, orphans, why)
    logger.info("race %s: winner %s (v%s), %s: %s", config.name, result.winner,
                result.winner_version, "promoted" if result.promoted else "not promoted",
                result.reason)
    return result


def _log_race_settings(prepared: PreparedRace) -> None:
    config, data, plan = prepared.config, prepared.data, prepared.plan
    mlflow.log_params({
        **_race_params(prepared),
        "candidates": ",".join(c.name or c.model for c in prepared.candidates),
        "selection.metric": config.selection.metric,
        "selection.baseline": prepared.baseline,
        "selection.baseline_added": str(prepared.baseline_added),
        "selection.promotion_margin": str(config.selection.promotion_margin),
        "data.series": str(len(data.lengths)),
        "data.observations": str(len(data.long)),
    })
    mlflow.log_text(yaml.safe_dump(config.model_dump(mode="json", by_alias=True),
                                   sort_keys=False), "race_config.yaml")
    mlflow.log_params({"execution.engine": config.execution.engine,
                       "execution.address": str(config.execution.address)})
    mlflow.log_text("\n".join(f"fold {f.number}: train {len(f.y_train)} rows, test "
                              f"{len(f.y_test)} rows" for f in plan.folds), "folds.txt")
    # what data.fill filled or dropped before the race: counts as metrics, ids in the text
    mlflow.log_params({"data.fill.missing": data.report.missing,
                       "data.fill.short": data.report.short})
    mlflow.log_metrics(data.report.counts())
    mlflow.log_text(data.report.text(), "data_report.txt")


def _race_params(prepared: PreparedRace) -> dict[str, str]:
    config, plan = prepared.config, prepared.plan
    return {"horizon": str(config.horizon), "frequency": config.frequency,
            "season_length": str(config.season_length),
            **flatten({"backtest": {"splitter": config.backtest.splitter,
                                    "folds": len(plan.folds), "window": plan.window,
                                    "step": plan.step}})}


# ---------------------------------------------------------------------------- the work
@dataclass(frozen=True)
class _Tasks:
    """One candidate's units of work as submitted: a fit per fold (by number), its refit."""

    folds: dict[int, Task]
    refit: Task | None


@dataclass(frozen=True)
class _Work:
    """The race's engine, and the handle every unit of work receives the prepared race by."""

    engine: Engine
    shared: Any

    def submit(self, prepared: PreparedRace, candidate: CandidateConfig, refit: bool = True
               ) -> _Tasks:
        """Submit ``candidate``'s fit on every fold and, with ``refit``, on all the data,
        each holding the candidate's resources."""
        resources = prepared.config.resources(candidate)
        folds = {fold.number: self.engine.submit(
            _fold_task, self.shared, candidate, fold.number, resources=resources,
            name=f"{candidate.name}/fold_{fold.number}") for fold in prepared.plan.folds}
        final = self.engine.submit(_refit_task, self.shared, candidate, resources=resources,
                                   name=f"{candidate.name}/refit") if refit else None
        return _Tasks(folds, final)


def _takes_X(prepared: PreparedRace, estimator: BaseForecaster) -> bool:
    """Whether ``estimator`` gets the covariates: the data have some and it takes them
    (sktime's tag); the others ignore them."""
    return prepared.data.X is not None and takes_covariates(estimator)


def fit_fold(prepared: PreparedRace, candidate: CandidateConfig, fold: Fold,
             on_epoch: EpochCallback | None = None) -> FitRecord:
    """A fresh ``candidate`` fitted on the fold's training window, and its forecast of the
    fold's test window: how every candidate, the champion and each search trial is
    backtested. ``on_epoch`` gets the learning curve as it trains. A candidate that takes
    covariates (sktime's tag) gets the fold's X: its training window's and, for the
    forecast, its test window's."""
    config = prepared.config
    record = FitRecord()
    with recording(on_epoch, record) as epoch:
        estimator = build_estimator(candidate, config, on_epoch=epoch)
        takes_X = _takes_X(prepared, estimator)
        estimator.fit(fold.y_train, X=fold.X_train if takes_X else None, fh=prepared.fh)
        record.forecast = forecast_frame(
            estimator, model_levels(estimator, config.forecast_levels),
            X=fold.X_test if takes_X else None)
    return record


def _fold_task(prepared: PreparedRace, candidate: CandidateConfig, number: int,
               on_epoch: EpochCallback | None = None) -> FitRecord:
    """A unit of work: ``candidate`` on fold ``number`` (the folds travel with the race's
    data, which go to a cluster once)."""
    return fit_fold(prepared, candidate, prepared.plan.folds[number - 1], on_epoch)


def _refit_task(prepared: PreparedRace, candidate: CandidateConfig,
                on_epoch: EpochCallback | None = None) -> FitRecord:
    """A unit of work: ``candidate`` refitted on all the data (with the covariates, if it
    takes them)."""
    config, data = prepared.config, prepared.data
    record = FitRecord()
    with recording(on_epoch, record) as epoch:
        final = build_estimator(candidate, config, on_epoch=epoch)
        takes_X = _takes_X(prepared, final)
        final.fit(data.panel, X=data.X if takes_X else None, fh=prepared.fh)
    record.estimator = final
    return record


def _fold_forecast(engine: Engine, tasks: _Tasks,
                   on_epoch: Callable[[Fold], EpochCallback | None],
                   records: list[FitRecord]) -> ForecastFn:
    """A fold's forecast, from the unit of work that fitted it (``fit_fold``); ``on_epoch``
    gives each fold's learning curve callback; each fold's record goes to ``records``."""

    def forecast(fold: Fold) -> pd.DataFrame:
        record = engine.result(tasks.folds[fold.number], on_epoch(fold))
        records.append(record)
        assert record.forecast is not None
        return record.forecast

    return forecast


# ---------------------------------------------------------------------------- one candidate
def _race_candidate(prepared: PreparedRace, candidate: CandidateConfig, work: _Work,
                    tasks: _Tasks | None, tags: dict[str, str], experiment_id: str,
                    parent_id: str, progress: bool) -> CandidateOutcome:
    """Search its parameters (if it carries a search), backtest, refit, log, check and
    register one candidate in its own nested run. ``tasks``: its submitted work (None for a
    searched candidate, submitted once its parameters are known)."""
    config = prepared.config
    assert candidate.name is not None
    run = mlflow.start_run(experiment_id=experiment_id, run_name=candidate.name, nested=True,
                           log_system_metrics=config.tracking.enable_system_metrics_logging,
                           tags={**tags, "candidate": candidate.name, "model": candidate.model})
    outcome = CandidateOutcome(candidate.name, candidate.model, run.info.run_id,
                               resolved_config(candidate, config))
    bar: _Progress | None = None
    status = "FAILED"
    try:
        if candidate.search is not None:
            try:
                searched = tune_candidate(prepared, candidate, work.shared, fit_fold,
                                          progress)
            except ClusterLost:
                raise
            except Exception as error:  # no trial finished: the candidate fails, not the race
                return _failed(outcome, "search", error)
            candidate = searched.log(experiment_id)  # the trials as nested runs, the best
            outcome.config = resolved_config(candidate, config)
            tasks = work.submit(prepared, candidate)
        assert tasks is not None
        probe = build_estimator(candidate, config)  # for its parameters; never fitted
        bar = _Progress(candidate.name, len(prepared.plan.folds) + 2,  # folds, refit, logging
                        probe.get_params().get("max_epochs") if is_neural(probe) else None,
                        progress)
        mlflow.log_params({**_race_params(prepared),
                           **{f"model.{k}": v for k, v in loggable_params(probe).items()},
                           "model.class": candidate.model})
        try:
            warned: list[Any] = []  # what the units of work raised, wherever they ran
            with recorded_warnings() as caught:
                _backtest_and_refit(prepared, candidate, outcome, work.engine, tasks, bar,
                                    warned)
            count = log_warnings([*warned, *caught], "warnings.txt")
            mlflow.log_metric("warnings", count)
        except ClusterLost:  # not the candidate's fault: the race stops
            raise
        except Exception as error:  # the candidate's model failed: the race goes on
            if not _model_fault(error, config):
                raise  # logging its curve failed: MLflow's error fails the race
            return _failed(outcome, "backtest" if outcome.backtest is None
                           else "refit on all data", error)
        _log_and_register(prepared, outcome, tags, parent_id)
        bar.step(f"{config.selection.metric} {outcome.scores[config.selection.metric]:.4f}"
                 + ("" if outcome.valid else " (invalid)"))
        status = "FINISHED"
        return outcome
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:  # a failed candidate returns with status FAILED; an MLflow error propagates
        if bar is not None:
            bar.close()
        end_run(status)


def _model_fault(error: Exception, config: RaceConfig) -> bool:
    """Whether ``error`` is the model's own, which fails its candidate only, rather than
    MLflow's or its tracking server's, which fail the race."""
    return not (isinstance(error, MlflowException)
                or unreachable(error, config.tracking.tracking_uri))


def _failed(outcome: CandidateOutcome, stage: str, error: Exception) -> CandidateOutcome:
    """Mark the candidate failed at ``stage`` (called while handling ``error``)."""
    outcome.status = "failed"
    outcome.error = f"{stage} failed: {type(error).__name__}: {error}"
    mlflow.log_text(traceback.format_exc(), "error.txt")
    mlflow.set_tag("error", outcome.error[:500])
    logger.warning("candidate %s failed: %s", outcome.name, outcome.error)
    return outcome


def _backtest_and_refit(prepared: PreparedRace, candidate: CandidateConfig,
                        outcome: CandidateOutcome, engine: Engine, tasks: _Tasks,
                        bar: _Progress, warned: list[Any]) -> None:
    """The candidate's model work, fetched from its units of work: the folds, the forecast
    plot, the refit on all data."""
    config, run_id = prepared.config, outcome.run_id
    takes_X = _covariates(prepared, outcome, build_estimator(candidate, config))
    folds: list[FitRecord] = []
    forecast = _fold_forecast(engine, tasks, lambda fold: epoch_logger(
        run_id, f"fold_{fold.number}/", then=bar.epoch), folds)
    backtest = run_backtest(forecast, prepared.plan.folds, config,
                            on_fold=_fold_logger(config, bar))
    # the folds' own fitting time, wherever they ran: waiting on a cluster is not its cost
    backtest.seconds = sum(record.seconds for record in folds)
    warned.extend(w for record in folds for w in record.warnings)
    _record_backtest(prepared, outcome, backtest)

    assert tasks.refit is not None
    refit = engine.result(tasks.refit, epoch_logger(run_id, then=bar.epoch))
    warned.extend(refit.warnings)
    final = refit.estimator
    assert final is not None
    outcome.train_seconds = refit.seconds
    mlflow.log_metric("train_seconds", outcome.train_seconds)
    # what "auto" became on all the data (each fold resolved it on its own training window)
    mlflow.log_params(loggable_sizes(final))
    _forecast_past_the_data(prepared, outcome, final,
                            model_levels(final, config.forecast_levels))
    if explains(final):  # the families that can explain their forecasts
        _log_attention(prepared, candidate, final, outcome.example, takes_X)
    bar.step("refit")


def _covariates(prepared: PreparedRace, outcome: CandidateOutcome,
                estimator: BaseForecaster) -> bool:
    """Whether ``estimator`` takes the data's covariates (sktime's tag; the others ignore
    them), noted on ``outcome`` and logged."""
    data = prepared.data
    takes_X = _takes_X(prepared, estimator)
    outcome.covariates = (*data.known_future, *data.static) if takes_X else ()
    outcome.ignores_covariates = data.X is not None and not takes_X
    mlflow.log_param("covariates", ",".join(outcome.covariates) if takes_X else "none")
    return takes_X


def _fold_logger(config: RaceConfig, bar: _Progress, prefix: str = ""
                 ) -> Callable[[Fold, dict[str, float]], None]:
    """Log each fold's scores as ``<prefix>fold_<n>/<metric>`` and show the selection metric."""

    def scored(fold: Fold, scores: dict[str, float]) -> None:
        mlflow.log_metrics({f"{prefix}fold_{fold.number}/{m}": v for m, v in scores.items()})
        bar.step(f"fold {fold.number} {config.selection.metric} "
                 f"{scores[config.selection.metric]:.4f}")

    return scored


def _record_backtest(prepared: PreparedRace, outcome: CandidateOutcome,
                     backtest: BacktestResult) -> None:
    """A completed backtest on ``outcome`` and in its run: scores, time, forecast plot."""
    outcome.backtest = backtest
    outcome.scores, outcome.problems = backtest.scores, list(backtest.problems)
    outcome.backtest_seconds = backtest.seconds
    mlflow.log_metrics({**backtest.scores, "backtest_seconds": backtest.seconds})
    _log_forecast_plot(prepared, backtest)


def _forecast_past_the_data(prepared: PreparedRace, outcome: CandidateOutcome,
                            final: BaseForecaster, levels: list[float]) -> None:
    """What ``final``, fitted on all the data, forecasts past them and from the input example,
    at ``levels``: the logged model is checked against the first, and its signature built
    from the second."""
    config, data = prepared.config, prepared.data
    takes_X = bool(outcome.covariates)
    outcome.estimator, outcome.levels = final, levels
    columns = [SERIES, TIME, TARGET, *outcome.covariates]
    if takes_X:
        # the known-future covariates past the data are not in the data: the final model is
        # checked on the data's last horizon, whose covariates stand for the future
        outcome.forecast_input = future_layout(data.long[columns], config.horizon)
        outcome.forecast = forecast_history(final, outcome.forecast_input, config.horizon,
                                            levels, config.frequency, data.known_future,
                                            data.static)
        expected = data.panel.groupby(level=0, sort=False).tail(config.horizon).index
    else:
        outcome.forecast_input = data.long[columns]
        outcome.forecast = forecast_frame(final, levels)
        expected = future_index(data.long, config.horizon, config.frequency)
    outcome.problems += [f"final model: {p}" for p in forecast_problems(outcome.forecast,
                                                                        expected)]
    outcome.example = _input_example(prepared, outcome.forecast_input)
    outcome.example_forecast = forecast_history(
        final, outcome.example, config.horizon, levels, config.frequency,
        *((data.known_future, data.static) if takes_X else ((), ())))


def _log_attention(prepared: PreparedRace, candidate: CandidateConfig,
                   final: BaseForecaster, example: pd.DataFrame, takes_X: bool) -> None:
    """The first series of the input example: every attention module of the network
    (attention.png), and its forecast above the attention over the input time steps
    (explanation.png, what ``forecaster explain`` draws)."""
    config, data = prepared.config, prepared.data
    covariates = (data.known_future, data.static) if takes_X else ((), ())
    first = example[SERIES].iloc[0]
    rows = example[example[SERIES] == first]
    mlflow.log_figure(attention_figure(final.attention_maps(*series_inputs(rows, *covariates)),
                                       f"{candidate.name}: attention, series {first}"),
                      "attention.png")
    explained = explain_series(final, example, first, config.horizon, config.frequency,
                               *covariates)
    mlflow.log_figure(explanation_figure(
        explained.history, explained.forecast, explained.explanation.attention,
        config.selection.interval_coverage, explained.explanation.covariate_importance,
        f"{candidate.name}: forecast and attention over the input, series {first}"),
        "explanation.png")


def _log_forecast_plot(prepared: PreparedRace, backtest: BacktestResult) -> None:
    config, fold = prepared.config, prepared.plan.folds[-1]
    if backtest.last_forecast is None or config.plot_series == 0:
        return
    series = list(backtest.last_forecast[SERIES].drop_duplicates()[: config.plot_series])
    figure = forecast_figure(fold.y_train, backtest.last_forecast,
                             config.selection.interval_coverage, actual=fold.y_test,
                             series=series, title=f"last fold (fold {fold.number})")
    mlflow.log_figure(figure, "forecasts.png")


def _log_and_register(prepared: PreparedRace, outcome: CandidateOutcome, tags: dict[str, str],
                      parent_id: str, extra: dict[str, str] | None = None) -> None:
    """Log the refitted model, check it, and register it with its metrics (and ``extra``) as
    tags."""
    config, data = prepared.config, prepared.data
    assert outcome.estimator is not None and outcome.forecast is not None
    assert outcome.example is not None and outcome.example_forecast is not None
    assert outcome.forecast_input is not None
    takes_X = bool(outcome.covariates)
    info = log_forecaster(outcome.estimator, horizon=config.horizon,
                          levels=outcome.levels, frequency=config.frequency,
                          input_example=outcome.example,
                          example_output=outcome.example_forecast,
                          known_future=data.known_future if takes_X else (),
                          static=data.static if takes_X else ())
    problems, outcome.files = _reproduction_problems(info, outcome.forecast_input,
                                                     outcome.forecast, config.horizon)
    outcome.problems += problems
    if outcome.problems:
        mlflow.log_text("\n".join(outcome.problems), "problems.txt")
    version = registry.register_version(info, config.registry.model_name, {
        registry.TAG_CANDIDATE: outcome.name,
        registry.TAG_MODEL_CLASS: outcome.model,
        registry.TAG_CONFIG: json.dumps(outcome.config, sort_keys=True),
        registry.TAG_RACE: parent_id,
        registry.TAG_VALID: str(outcome.valid).lower(),
        registry.TAG_PROBLEMS: "; ".join(outcome.problems)[:5000],
        signing.TAG_FILES: outcome.files,
        **{m: f"{outcome.scores[m]:.6g}" for m in METRICS},
        "selection_metric": config.selection.metric,
        "horizon": config.horizon,
        "frequency": config.frequency,
        "train_seconds": f"{outcome.train_seconds:.3f}",
        **{k: v for k, v in tags.items() if k not in ("race", "registered_model")},
        **(extra or {}),
    })
    outcome.version = int(version.version)
    mlflow.set_tags({"registered_version": version.version, "valid": str(outcome.valid)})


def _input_example(prepared: PreparedRace, forecast_input: pd.DataFrame) -> pd.DataFrame:
    """The last rows of the first series of the forecast input (with covariates, their future
    rows included): enough history for any candidate, small to store."""
    keep = forecast_input[SERIES].drop_duplicates().iloc[:INPUT_EXAMPLE_SERIES]
    future = int(forecast_input[TARGET].isna().any()) * prepared.config.horizon
    rows = min(prepared.plan.window, INPUT_EXAMPLE_ROWS) + future
    example = forecast_input[forecast_input[SERIES].isin(keep)].groupby(
        SERIES, sort=False).tail(rows)
    return example.reset_index(drop=True)


def _reproduction_problems(info: ModelInfo, history: pd.DataFrame, expected: pd.DataFrame,
                           horizon: int) -> tuple[list[str], str]:
    """The logged model, downloaded back and loaded, must forecast exactly what the estimator
    forecasts; returns the problems and the digest of the files it was loaded from (what the
    race vouches for, signing.TAG_FILES). The download is deleted once loaded."""
    artifacts = mlflow.get_logged_model(info.model_id).artifact_location
    with tempfile.TemporaryDirectory(prefix="forecaster-logged-") as directory:
        files = signing.download(artifacts, Path(directory))
        digest = signing.files_digest(files)
        try:
            got = mlflow.pyfunc.load_model(str(files)).predict(history,
                                                               params={"horizon": horizon})
        except Exception as error:  # noqa: BLE001 - any failure means the model cannot be served
            return [f"the logged model failed to forecast: {type(error).__name__}: {error}"], \
                digest
    try:
        pd.testing.assert_frame_equal(got.reset_index(drop=True),
                                      expected.reset_index(drop=True), check_exact=True,
                                      check_dtype=False, check_index_type=False)
    except AssertionError as error:
        return [f"the logged model's forecasts differ from the estimator's: {error}"], digest
    return [], digest


# ---------------------------------------------------------------------------- the ensemble
def _race_ensemble(prepared: PreparedRace, outcomes: list[CandidateOutcome],
                   tags: dict[str, str], experiment_id: str, parent_id: str, progress: bool
                   ) -> tuple[CandidateOutcome | None, str | None]:
    """The weighted ensemble of the valid candidates (:mod:`pipelines.ensemble`), raced as one
    more candidate in its own nested run: weights chosen on their fold forecasts, its fold
    scores cross-fitted, its model made of their refitted estimators, then logged, checked and
    registered as theirs are. Returns it, or None and why the race has none (None: it is
    off). An error of its own fails it alone: its run is FAILED, the race goes on."""
    config, folds = prepared.config, prepared.plan.folds
    metric = config.selection.metric
    # best first: a tie in the greedy selection goes to the better candidate
    pool = sorted((o for o in outcomes
                   if o.valid and o.version is not None and o.backtest is not None),
                  key=lambda o: o.scores[metric])
    why = not_raced(config, len(pool), len(folds))
    if why is not None or not config.selection.ensemble.enabled:
        if why is not None:
            logger.info("race %s: no ensemble: %s", config.name, why)
        return None, why
    names = {o.name for o in outcomes}
    name = ENSEMBLE_NAME
    while name in names:  # a candidate of the config already has the name
        name = f"{name}-weighted"
    run = mlflow.start_run(experiment_id=experiment_id, run_name=name, nested=True,
                           log_system_metrics=config.tracking.enable_system_metrics_logging,
                           tags={**tags, "candidate": name, "model": ENSEMBLE_MODEL})
    outcome = CandidateOutcome(name, ENSEMBLE_MODEL, run.info.run_id, {})
    bar = _Progress(name, len(folds) + 2, None, progress)  # folds, the model, logging
    status = "FAILED"
    try:
        try:
            with recorded_warnings() as caught:
                started = time.perf_counter()
                forecasts = [o.backtest.forecasts for o in pool]
                selection = select([o.name for o in pool], forecasts, folds, config)
                size = config.selection.ensemble.size
                mlflow.log_params({**_race_params(prepared), "ensemble.size": size,
                                   "ensemble.candidates": ",".join(selection.names),
                                   **{f"weight.{n}": f"{w:.6g}"
                                      for n, w in selection.members.items()}})
                mlflow.log_dict(selection.record(metric, size), "ensemble_weights.json")
                if len(selection.members) > 1:
                    _backtest_ensemble(prepared, outcome, selection, forecasts, bar, started)
                    _build_ensemble(prepared, outcome, selection, pool)
                    bar.step("model")
            mlflow.log_metric("warnings", log_warnings(caught, "warnings.txt"))
        except Exception as error:  # the ensemble failed: the race goes on
            if not _model_fault(error, config):
                raise
            return _failed(outcome, "weighting" if outcome.backtest is None
                           else "building its model", error), None
        if len(selection.members) == 1:
            why = (f"the greedy selection gave all the weight to {next(iter(selection.members))}"
                   f": the ensemble would be that candidate")
            mlflow.set_tag("skipped", why)
            status = "FINISHED"
            return None, why
        _log_and_register(prepared, outcome, tags, parent_id, {
            "ensemble_members": ",".join(f"{n}={w:.6g}" for n, w in selection.members.items())})
        bar.step(f"{metric} {outcome.scores[metric]:.4f}"
                 + ("" if outcome.valid else " (invalid)"))
        status = "FINISHED"
        return outcome, None
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        bar.close()
        end_run(status)


def _backtest_ensemble(prepared: PreparedRace, outcome: CandidateOutcome, selection: Selection,
                       forecasts: list[list[pd.DataFrame]], bar: _Progress, started: float
                       ) -> None:
    """Score the ensemble's forecast of each fold, the candidates' forecasts of the fold
    weighted on the other folds, as a candidate's."""
    config = prepared.config
    forecast = _weighted_by_fold(forecasts, selection.fold_weights, config)
    backtest = run_backtest(forecast, prepared.plan.folds, config,
                            on_fold=_fold_logger(config, bar))
    backtest.seconds = time.perf_counter() - started  # the weighting with it
    _record_backtest(prepared, outcome, backtest)


def _build_ensemble(prepared: PreparedRace, outcome: CandidateOutcome, selection: Selection,
                    pool: list[CandidateOutcome]) -> None:
    """The ensemble of the candidates' refitted estimators with the weights chosen on every
    fold, fitted on all the data (its networks are not trained again), and its forecasts."""
    config, data = prepared.config, prepared.data
    weights = selection.members
    estimators = {o.name: o.estimator for o in pool
                  if o.name in weights and o.estimator is not None}
    started = time.perf_counter()
    model = ensemble_model(estimators, weights)
    takes_X = _covariates(prepared, outcome, model)
    model.fit(data.panel, X=data.X if takes_X else None, fh=prepared.fh)
    outcome.train_seconds = time.perf_counter() - started
    mlflow.log_metric("train_seconds", outcome.train_seconds)
    outcome.config = ensemble_config({o.name: o.config for o in pool}, weights)
    outcome.note = (f"weights {', '.join(f'{n} {w:.3g}' for n, w in weights.items())}; each "
                    f"fold's forecast weighted on the other folds")
    levels = shared_levels([model_levels(e, config.forecast_levels) for e in estimators.values()],
                           config.forecast_levels)
    _forecast_past_the_data(prepared, outcome, model, levels)


# ---------------------------------------------------------------------------- the decision
@dataclass(frozen=True)
class ChampionScore:
    """The champion on this race's folds: its backtest, or why it has no score, and how it was
    scored (for the decision's reason and the leaderboard)."""

    backtest: BacktestResult | None
    error: str | None
    how: str | None


def _score_champion(prepared: PreparedRace, outcomes: list[CandidateOutcome], version: int,
                    run_id: str, work: _Work, progress: bool) -> ChampionScore:
    """The champion's configuration, backtested as the candidates are: refitted on each fold's
    training window and scored on its test window (its registered weights have seen them all,
    and are never loaded). A candidate of this race with the same resolved config lends its
    fold scores instead: training it again on CPU gives the same ones. An ensemble's members
    are each refitted on the folds, or lent the fold forecasts of a candidate with their
    config, and its weights chosen afresh as the race's own ensemble's are, each fold's on the
    other folds: its recorded weights were chosen on its own race's folds, which may be these,
    and would score it in sample (with one fold, nothing is left to choose on: they are kept,
    and ``how`` says so).

    Registry errors propagate (they must not promote anyone); a config that cannot be read or
    rebuilt, or a fit that raises, leaves the champion without a score, with the reason.
    """
    config = prepared.config
    try:
        recorded = registry.recorded_config(config.registry.model_name, version)
        members = _champion_members(recorded, version)
        resolved = [resolved_config(member, config) for member, _, _ in members]
    except ValidationError as error:
        return ChampionScore(None, f"its recorded config is not a valid candidate: "
                                   f"{'; '.join(describe(error))}", None)
    except ValueError as error:
        return ChampionScore(None, f"its config could not be recovered: {error}", None)
    twins = [next((o for o in outcomes if o.config == r), None) for r in resolved]
    ensemble = recorded.model == ENSEMBLE_MODEL
    if not ensemble and twins[0] is not None:
        twin = twins[0]
        how = f"same config as candidate {twin.name}: its fold scores are reused"
        if twin.backtest is None:
            return ChampionScore(None, f"candidate {twin.name}, its config, failed: "
                                       f"{twin.error}", how)
        backtest = twin.backtest
    else:
        folds = prepared.plan.folds
        bar = _Progress(f"champion v{version}", len(folds),
                        resolved[0]["params"].get("max_epochs")
                        if not ensemble and is_neural(recorded.model) else None, progress)

        def curve(prefix: str) -> Callable[[Fold], EpochCallback]:
            return lambda fold: epoch_logger(run_id, f"{prefix}fold_{fold.number}/",
                                             then=bar.epoch)

        # every member's fits start now; they warn as they did in their own race: their
        # warnings are not kept
        forecasts = [
            _lent(twin.backtest) if ensemble and twin is not None and twin.backtest is not None
            else _fold_forecast(work.engine, work.submit(prepared, member, refit=False),
                                curve(f"champion/{label}/" if ensemble else "champion/"), [])
            for (member, label, _), twin in zip(members, twins, strict=True)]
        refitted = "its members refitted on each fold (or lent a candidate's fold forecasts)"
        if not ensemble:
            how = f"refitted on each fold from {recorded.source}"
        elif len(folds) > 1:
            how = f"{refitted}, each fold's weighted on the other folds as the race's ensemble"
        else:
            how = (f"{refitted}, weighted as {recorded.source} records (one fold: nothing else "
                   "to choose weights on)")
        try:
            with recorded_warnings():
                forecast = _champion_ensemble(forecasts, members, prepared) if ensemble \
                    else forecasts[0]
                backtest = run_backtest(forecast, folds, config,
                                        on_fold=_fold_logger(config, bar, "champion/"))
        except ClusterLost:
            raise
        except Exception as error:  # noqa: BLE001 - recorded as the reason of the decision
            return ChampionScore(None, f"{type(error).__name__}: {error}", how)
        finally:
            bar.close()
    if not backtest.valid:
        return ChampionScore(backtest, "; ".join(backtest.problems) or "non-finite scores", how)
    return ChampionScore(backtest, None, how)


def _champion_members(recorded: registry.RecordedConfig, version: int
                      ) -> list[tuple[CandidateConfig, str, float]]:
    """The champion as candidates to refit, each with its name and weight: itself (weight 1),
    or an ensemble's members. Raises ValidationError or ValueError when it cannot be read."""
    if recorded.model == ENSEMBLE_MODEL:
        return [(CandidateConfig(name=f"champion v{version}/{member.name}", model=member.model,
                                 params=member.params), member.name, member.weight)
                for member in recorded_members(recorded.params)]
    params = recorded.params
    if recorded.from_run_params:
        params = params_from_logged(recorded.model, params)
    return [(CandidateConfig(name=f"champion v{version}", model=recorded.model, params=params),
             "", 1.0)]


def _champion_ensemble(forecasts: list[ForecastFn],
                       members: list[tuple[CandidateConfig, str, float]],
                       prepared: PreparedRace) -> ForecastFn:
    """An ensemble champion's fold forecasts: its members' forecasts of every fold, weighted
    as the race's ensemble is (:func:`pipelines.ensemble.select`), each fold on the other
    folds, with those weights logged to the race's run as ``champion_ensemble_weights.json``;
    with one fold, weighted as recorded."""
    config, folds = prepared.config, prepared.plan.folds
    frames = [[member(fold) for fold in folds] for member in forecasts]
    if len(folds) == 1:
        return _weighted_by_fold(frames, [[weight for _, _, weight in members]], config)
    selection = select([label for _, label, _ in members], frames, folds, config)
    mlflow.log_dict(selection.record(config.selection.metric, config.selection.ensemble.size),
                    "champion_ensemble_weights.json")
    return _weighted_by_fold(frames, selection.fold_weights, config)


def _weighted_by_fold(frames: Sequence[Sequence[pd.DataFrame]],
                      fold_weights: Sequence[Sequence[float]], config: RaceConfig
                      ) -> ForecastFn:
    """The ensemble's forecast of fold k: the members' forecasts of it (``frames[i][k - 1]``)
    weighted with ``fold_weights[k - 1]``."""
    return lambda fold: combine([member[fold.number - 1] for member in frames],
                                fold_weights[fold.number - 1], config.forecast_levels)


def _lent(backtest: BacktestResult) -> ForecastFn:
    """A candidate's own forecast of each fold, from its completed backtest."""
    return lambda fold: backtest.forecasts[fold.number - 1]


def _floor(prepared: PreparedRace, outcomes: list[CandidateOutcome]) -> registry.Floor:
    """The baseline's score on the folds: its backtest's, even when its refit then failed."""
    metric = prepared.config.selection.metric
    baseline = next(o for o in outcomes if o.name == prepared.baseline)
    backtest = baseline.backtest
    if backtest is None:
        return registry.Floor(baseline.name, None, baseline.error)
    if not backtest.valid:
        return registry.Floor(baseline.name, None, "; ".join(backtest.problems))
    return registry.Floor(baseline.name, backtest.scores[metric])


def _decide_and_alias(prepared: PreparedRace, outcomes: list[CandidateOutcome], run_id: str,
                      experiment_id: str, work: _Work, progress: bool,
                      orphans: list[int], ensemble_note: str | None) -> RaceResult:
    config = prepared.config
    name, metric = config.registry.model_name, config.selection.metric
    leaderboard = _leaderboard(outcomes, metric, prepared.baseline)
    valid = [o for o in outcomes if o.valid and o.version is not None]
    # on a tie the baseline wins: the simpler model
    winner = min(valid, key=lambda o: (o.scores[metric], o.name != prepared.baseline)
                 ) if valid else None

    champion = registry.champion_version(name)
    champion_score, scored = None, ChampionScore(None, None, None)
    if champion is not None:
        scored = _score_champion(prepared, outcomes, champion, run_id, work, progress)
        if scored.backtest is not None and scored.error is None:
            champion_score = scored.backtest.scores[metric]
            mlflow.log_metrics({f"champion/{m}": v for m, v in scored.backtest.scores.items()})
        mlflow.set_tags({"champion_version": str(champion), "champion_scored": scored.how or "",
                         "champion_error": (scored.error or "")[:500]})

    floor = _floor(prepared, outcomes)
    decision = registry.decide(metric, winner.scores[metric] if winner else None, champion,
                               champion_score, config.selection.promotion_margin,
                               scored.error, winner=winner.name if winner else None,
                               floor=floor, champion_scored=scored.how)
    label = ("promoted" if decision.promoted else
             "not-promoted" if decision.floor_blocked else "challenger")
    if winner is not None:
        assert winner.version is not None
        registry.tag_version(name, winner.version, {
            registry.TAG_DECISION: label,
            registry.TAG_REASON: decision.reason,
            registry.TAG_SCORE: f"{winner.scores[metric]:.6g}",
            registry.TAG_CHAMPION_SCORE: "" if champion_score is None else f"{champion_score:.6g}",
            registry.TAG_CHAMPION_VERSION: "" if champion is None else str(champion),
        })
        mlflow.log_metrics({f"winner/{m}": v for m, v in winner.scores.items()})
    if floor.score is not None:
        mlflow.log_metric(f"baseline/{metric}", floor.score)
    mlflow.set_tags({"winner": winner.name if winner else "", "promoted": str(decision.promoted),
                     "decision_reason": decision.reason})
    promoted = decision.promoted and winner is not None
    # a winner below the floor is no challenger to the champion
    challenger = winner.version if winner is not None and not decision.promoted \
        and not decision.floor_blocked else None
    result = RaceResult(
        leaderboard=leaderboard,
        winner=winner.name if winner else None,
        winner_version=winner.version if winner else None,
        winner_score=winner.scores[metric] if winner else None,
        promoted=promoted,
        reason=decision.reason,
        champion_version=winner.version if promoted and winner else champion,
        champion_score=winner.scores[metric] if promoted and winner else champion_score,
        previous_champion_version=champion,
        previous_champion_score=champion_score,
        challenger_version=challenger,
        metric=metric,
        model_name=name,
        run_id=run_id,
        experiment_id=experiment_id,
        baseline=prepared.baseline,
        baseline_added=prepared.baseline_added,
        champion_scored=scored.how,
        champion_error=scored.error,
        versions={o.name: o.version for o in outcomes if o.version is not None},
        orphans=orphans,
        estimators={o.name: o.estimator for o in outcomes if o.estimator is not None},
        ensemble_note=ensemble_note,
    )
    # the table, each note in full, the champion's score (or why it has none), the decision
    mlflow.log_text(format_leaderboard(result), "leaderboard.md")

    # everything the race records is written: now it vouches for each version (its signature,
    # then race_complete, the tag that claims all of this), so a race that dies before this
    # leaves no version claiming to be complete
    key = signing.signing_key()
    by_name = {o.name: o for o in outcomes}
    for rank, candidate in enumerate(leaderboard.index, start=1):
        outcome = by_name[candidate]
        if outcome.version is not None:
            registry.tag_version(name, outcome.version, {
                registry.TAG_RANK: rank,
                **signing.vouch(name, outcome.version, {
                    signing.TAG_FILES: outcome.files,
                    registry.TAG_VALID: str(outcome.valid).lower()}, key)})

    # the very last step: one alias moves, after every version is fully registered and tagged
    if promoted:
        registry.set_alias(name, registry.CHAMPION, result.winner_version)
    elif challenger is not None:
        registry.set_alias(name, registry.CHALLENGER, challenger)
    return result


def _leaderboard(outcomes: list[CandidateOutcome], metric: str, baseline: str) -> pd.DataFrame:
    """Candidates best first: valid ones by the metric, then invalid, then failed. A failed
    candidate keeps the scores of a backtest that completed; ``note`` holds its whole error."""
    rows = [{
        "candidate": o.name, "model": o.model, **o.scores,
        "valid": o.valid, "status": o.status, "baseline": o.name == baseline,
        "version": o.version, "train_seconds": o.train_seconds,
        "backtest_seconds": o.backtest_seconds,
        "note": o.error or "; ".join(
            [*o.problems, *(["ignores covariates"] if o.ignores_covariates else []),
             *([o.note] if o.note else [])]),
    } for o in outcomes]
    table = pd.DataFrame(rows)
    table["_order"] = [0 if o.valid else 1 if o.status == "ok" else 2 for o in outcomes]
    table = table.sort_values(["_order", metric], na_position="last", kind="stable")
    table = table.drop(columns="_order").set_index("candidate")
    table["version"] = table["version"].astype("Int64")  # missing for failed candidates
    return table


def format_leaderboard(result: RaceResult) -> str:
    """The leaderboard as a table, the winner marked, each note in full below it, the baseline,
    and the decision with its reason."""
    table = result.leaderboard.copy()
    table.insert(0, "", ["★" if name == result.winner else "" for name in table.index])
    table["version"] = [f"v{v}" if not pd.isna(v) else "-" for v in table["version"]]
    notes = table.pop("note")
    lines = [table.to_markdown(floatfmt=".4f"), ""]
    lines += [f"{name}: {note}" for name, note in notes.items() if note]
    added = (" (the seasonal naive forecast, added to the candidates: set selection.baseline "
             "to choose another)" if result.baseline_added else "")
    lines.append(f"baseline: {result.baseline}{added}; a winner must beat it to be promoted")
    if result.ensemble_note:
        lines.append(f"ensemble: not raced: {result.ensemble_note}")
    if result.previous_champion_version is not None:
        score = ("could not be scored" if result.previous_champion_score is None
                 else f"{result.metric} {result.previous_champion_score:.4f}")
        if result.previous_champion_score is None and result.champion_error:
            score += f": {result.champion_error}"
        how = f"; {result.champion_scored}" if result.champion_scored else ""
        lines.append(f"champion before the race: v{result.previous_champion_version} "
                     f"(on the same folds: {score}{how})")
    if result.orphans:
        lines.append(f"orphans: {', '.join(f'v{v}' for v in result.orphans)} (registered by "
                     f"races that died before vouching for them) are tagged "
                     f"{registry.TAG_ORPHAN}; they are never served")
    if result.winner is None:
        lines.append(f"no winner: {result.reason}")
    elif result.promoted:
        lines.append(f"winner: {result.winner} (v{result.winner_version}, {result.metric} "
                     f"{result.winner_score:.4f}) -> promoted to @champion: {result.reason}")
    elif result.challenger_version is not None:
        lines.append(f"winner: {result.winner} (v{result.winner_version}, {result.metric} "
                     f"{result.winner_score:.4f}) -> not promoted, now @challenger: "
                     f"{result.reason}")
    else:
        lines.append(f"winner: {result.winner} (v{result.winner_version}, {result.metric} "
                     f"{result.winner_score:.4f}) -> not promoted, no alias: {result.reason}")
    return "\n".join(lines)
