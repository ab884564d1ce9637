"""Candidate configs -> sktime estimators: our neural forecasters and three baselines.

The race treats every candidate as an sktime forecaster; this module knows which classes may be
raced, which constructor parameters they take, the defaults the pipeline adds, how long a
training window each needs, and what a candidate is once every default is filled in (its
resolved config: what the registry records so that a champion can be refitted, and what makes
two candidates the same model).
"""

from __future__ import annotations

import ast
import inspect
import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from sktime.forecasting.base import BaseForecaster
from sktime.forecasting.ets import AutoETS
from sktime.forecasting.naive import NaiveForecaster
from sktime.forecasting.theta import ThetaForecaster

from forecaster.ensemble import WeightedEnsembleForecaster
from forecaster.estimators import ESTIMATORS, NeuralForecaster
from forecaster.trainer import EpochCallback
from pipelines.warning_capture import without_sktime_notice

if TYPE_CHECKING:
    from pipelines.config import CandidateConfig, RaceConfig

NEURAL_MODELS: dict[str, type[NeuralForecaster]] = {cls.__name__: cls for cls in ESTIMATORS}
BASELINE_MODELS: dict[str, type[BaseForecaster]] = {
    "NaiveForecaster": NaiveForecaster,
    "ThetaForecaster": ThetaForecaster,
    "AutoETS": AutoETS,
}
MODELS: dict[str, type[BaseForecaster]] = {**NEURAL_MODELS, **BASELINE_MODELS}

# set by the pipeline itself, never from a config
RESERVED_PARAMS = {"on_epoch"}
# set from the data section of the config: the key that sets each
DATA_PARAMS = {"static_covariates": "data.columns.static"}


def default_candidate_name(model: str) -> str:
    """``LSTMForecaster`` -> ``lstm``, ``AutoETS`` -> ``autoets``."""
    return model.removesuffix("Forecaster").lower()


def constructor_params(model: str) -> list[str]:
    signature = inspect.signature(MODELS[model].__init__)
    return [name for name in signature.parameters if name != "self"]


def check_params(model: str, params: Mapping[str, Any]) -> None:
    """Raise ValueError naming parameters ``model``'s constructor does not take."""
    from_data = sorted(set(params) & set(DATA_PARAMS))
    if from_data:
        raise ValueError(f"{from_data} are set from the data section, not here: "
                         f"{', '.join(DATA_PARAMS[p] for p in from_data)}")
    valid = set(constructor_params(model)) - RESERVED_PARAMS
    unknown = sorted(set(params) - valid)
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for {model}; valid: {sorted(valid)}")


def takes_covariates(estimator: BaseForecaster) -> bool:
    """Whether the estimator uses exogenous data X, by sktime's own tag."""
    return bool(estimator.get_tag("capability:exogenous", False, raise_error=False))


def is_neural(estimator: BaseForecaster | str) -> bool:
    if isinstance(estimator, str):
        return estimator in NEURAL_MODELS
    return isinstance(estimator, NeuralForecaster)


def estimator_params(candidate: CandidateConfig, config: RaceConfig) -> dict[str, Any]:
    """The constructor arguments: the config's, plus the defaults the pipeline chooses."""
    params = dict(candidate.params)
    if config.data.columns.static and "static_covariates" in constructor_params(candidate.model):
        # which columns of X are static, for the estimators that tell the two kinds apart
        params["static_covariates"] = tuple(config.data.columns.static)
    if is_neural(candidate.model):
        # our own progress bar reports epochs; the networks forecast every level the race
        # scores, so that intervals are read off exactly rather than interpolated
        params.setdefault("verbose", False)
        params.setdefault("quantiles", tuple(config.forecast_levels))
        # the race's season, as the baselines' sp: the networks' "auto" sizes count in it,
        # and integer timestamps carry no frequency to read it from
        params.setdefault("season_length", config.season_length)
    else:
        params.setdefault("sp", config.season_length)
        if candidate.model == "AutoETS" and params.get("auto"):
            # sktime 1.2 passes a keyword statsmodels 0.15 rejects when it simulates the
            # intervals of multiplicative models; additive models have exact intervals
            params.setdefault("additive_only", True)
    return params


def build_estimator(candidate: CandidateConfig, config: RaceConfig,
                    on_epoch: EpochCallback | None = None) -> BaseForecaster:
    """A fresh, unfitted estimator for ``candidate``; ``on_epoch`` receives the learning curve
    of neural models (baselines have none)."""
    params = estimator_params(candidate, config)
    if is_neural(candidate.model):
        params["on_epoch"] = on_epoch
    return MODELS[candidate.model](**params)


def min_train_length(candidate: CandidateConfig, config: RaceConfig) -> int:
    """The fewest observations per series ``candidate`` can be trained on (a lower bound)."""
    with without_sktime_notice():
        estimator = build_estimator(candidate, config)
    if is_neural(estimator):
        return estimator.min_train_length(config.horizon)
    return min_history(estimator)  # a baseline trains on the history it forecasts from


def min_history(estimator: BaseForecaster) -> int:
    """The fewest observations of a series ``estimator`` forecasts from: a fitted network's own
    ``min_history_``; for a baseline, which refits on each history, what its fit and its
    prediction intervals need (each rule found by experiment: tests/test_min_history.py); for
    an ensemble, what its hungriest member needs."""
    if is_neural(estimator):
        return int(estimator.min_history_)
    if isinstance(estimator, WeightedEnsembleForecaster):
        return max(min_history(member) for _, member in estimator.forecasters)
    return BASELINE_MIN_HISTORY[type(estimator).__name__](estimator.get_params(deep=False))


def _naive_min_history(params: dict[str, Any]) -> int:
    sp, window = params["sp"] or 1, params["window_length"] or 1
    # the last season and one residual for the intervals; the mean of a season; a drift
    # through a season, which sktime's intervals leave undefined at exactly sp + 1 values
    extra = {"last": 1, "mean": 0, "drift": 2}[params["strategy"]]
    return max(sp + extra, window)


def _theta_min_history(params: dict[str, Any]) -> int:
    # two full seasons to deseasonalise; two values for the smoothing's residual variance
    return max(2 * params["sp"], 2) if params["deseasonalize"] else 2


def _ets_min_history(params: dict[str, Any]) -> int:
    sp, auto = params["sp"] or 1, params["auto"]
    heuristic = params["initialization_method"] == "heuristic"
    need = 2 if params["trend"] is not None or auto else 1  # a trend starts from a difference
    if heuristic:
        need = max(need, 10)  # statsmodels' heuristic start reads ten values
    if sp > 1 and (params["seasonal"] is not None or auto):
        need = max(need, 2 * sp)  # two full seasons start the seasonal states
        if heuristic:  # ten values besides the half seasons lost at either end
            need = max(need, 10 + 2 * (sp // 2))
    return need


BASELINE_MIN_HISTORY: dict[str, Callable[[dict[str, Any]], int]] = {
    "NaiveForecaster": _naive_min_history,
    "ThetaForecaster": _theta_min_history,
    "AutoETS": _ets_min_history,
}


def interval_problem(candidate: CandidateConfig, config: RaceConfig) -> str | None:
    """Why ``candidate`` cannot forecast the scored interval, if it cannot."""
    quantiles = candidate.params.get("quantiles")
    if not is_neural(candidate.model) or quantiles is None:
        return None
    low, high = config.interval_levels
    if min(quantiles) > low or max(quantiles) < high:
        return (f"quantiles {list(quantiles)} must reach {low} and {high} to forecast the "
                f"{config.selection.interval_coverage:.0%} interval that is scored")
    return None


def loggable_params(estimator: BaseForecaster) -> dict[str, str]:
    """Constructor parameters as MLflow params (strings, the callback left out)."""
    return {name: str(value) for name, value in estimator.get_params(deep=False).items()
            if name not in RESERVED_PARAMS}


def loggable_sizes(estimator: BaseForecaster) -> dict[str, str]:
    """The sizes a fitted network trained with, each "auto" parameter resolved from the data
    (its ``resolved_params_``), as MLflow params named ``resolved.<parameter>``; none for a
    baseline."""
    if not is_neural(estimator):
        return {}
    return {f"resolved.{name}": str(value) for name, value in estimator.resolved_params_.items()}


def resolved_config(candidate: CandidateConfig, config: RaceConfig) -> dict[str, Any]:
    """``{"model": class name, "params": every constructor parameter}`` as JSON values: the
    config's params, the pipeline's defaults and the class's own. Candidates with equal
    resolved configs train the same model (on the same data: the parameters the data section
    sets, DATA_PARAMS, are left out)."""
    with without_sktime_notice():
        estimator = build_estimator(candidate, config)
    params = {name: value for name, value in estimator.get_params(deep=False).items()
              if name not in RESERVED_PARAMS and name not in DATA_PARAMS}
    return json.loads(json.dumps({"model": candidate.model, "params": params}))


def params_from_logged(model: str, logged: Mapping[str, str]) -> dict[str, Any]:
    """Constructor parameters read back from their MLflow strings (:func:`loggable_params`).

    Raises ValueError unless ``logged`` names exactly the parameters ``model`` takes now and
    each string reads back (a Python literal, else the string itself) to a value whose string
    is that string again: anything less could refit a different model than was logged.
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}")
    # the data section sets DATA_PARAMS again for the refit: they are not the candidate's
    logged = {name: text for name, text in logged.items() if name not in DATA_PARAMS}
    expected = set(constructor_params(model)) - RESERVED_PARAMS - set(DATA_PARAMS)
    missing, unknown = sorted(expected - set(logged)), sorted(set(logged) - expected)
    if missing or unknown:
        raise ValueError(f"the logged params do not match {model}'s parameters "
                         f"(missing: {missing}, unknown: {unknown})")
    params = {name: _literal(text) for name, text in logged.items()}
    ambiguous = sorted(name for name, value in params.items() if str(value) != logged[name])
    if ambiguous:
        raise ValueError(f"the logged params {ambiguous} of {model} do not read back as logged")
    return params


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):  # not a literal: a string parameter such as "last"
        return text
