"""The model registry side of a race: versions, their tags, and the champion/challenger aliases.

Aliases are the only thing serving reads (``models:/NAME@champion``), so they move last: a race
registers and tags every version first, vouches for each (:mod:`pipelines.signing`, then
``race_complete``), and only then sets at most one alias. A job that dies before that leaves new
versions without aliases or ``race_complete`` and the champion where it was; the next race tags
those versions ``orphan`` (:func:`tag_orphans`).

Each version records the configuration it was trained from (:data:`TAG_CONFIG`), so that a
later race can refit the champion on its own folds instead of loading its weights, which have
seen every fold's test window.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models.model import ModelInfo
from mlflow.protos.databricks_pb2 import (
    ALREADY_EXISTS,
    RESOURCE_ALREADY_EXISTS,
    RESOURCE_DOES_NOT_EXIST,
    ErrorCode,
)

from pipelines.backtest import METRICS  # each is a tag on every version

logger = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"

# model version tags
TAG_CANDIDATE = "candidate"
TAG_MODEL_CLASS = "model_class"
TAG_RACE = "race_run_id"
TAG_VALID = "valid"
TAG_PROBLEMS = "problems"
# set last of all on each version of a race, once everything the race records is written and
# it vouched for the version (pipelines.signing): the loaders refuse a version without it
TAG_COMPLETE = "race_complete"
# on a version whose race ended before it was complete: the run id of the race that found it
TAG_ORPHAN = "orphan"
TAG_RANK = "race_rank"
TAG_DECISION = "decision"  # promoted | challenger | not-promoted (on the race's winner)
TAG_REASON = "decision_reason"
TAG_SCORE = "candidate_score"
TAG_CHAMPION_SCORE = "champion_score"
TAG_CHAMPION_VERSION = "champion_version"  # the champion it was compared with
# JSON {"model": class name, "params": {...}}, every constructor parameter: what a later race
# refits to score this version as champion. A tag rather than a run artifact: it is read with
# the version (one registry call, no artifact store), and shown beside its metrics in the UI.
TAG_CONFIG = "candidate_config"
# the run params a version's config is recovered from when it has no TAG_CONFIG (registered
# before the tag existed): the class, and each constructor parameter as "model.<name>"
PARAM_MODEL_CLASS, PARAM_PREFIX = "model.class", "model."


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    floor_blocked: bool = False  # the winner did not beat the baseline


@dataclass(frozen=True)
class Floor:
    """The baseline a winner must beat: its score on the race's folds, or why it has none."""

    name: str
    score: float | None
    error: str | None = None


@dataclass(frozen=True)
class RecordedConfig:
    """What a version was trained from, and where that was read. Params read from the run
    are its logged strings (``from_run_params``), still to be read back."""

    model: str
    params: dict[str, Any]
    source: str
    from_run_params: bool = False


def _missing(error: MlflowException) -> bool:
    return error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def register_version(model: ModelInfo, name: str, tags: Mapping[str, Any]) -> ModelVersion:
    """A new version of ``name`` (created if need be) for a logged model, tags included.

    The client calls rather than ``mlflow.register_model``, which prints to stderr over our
    progress bars; the version is the same (source, run and logged-model id).
    """
    client = MlflowClient()
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code not in (ErrorCode.Name(RESOURCE_ALREADY_EXISTS),
                                    ErrorCode.Name(ALREADY_EXISTS)):
            raise
    return client.create_model_version(name, source=model.model_uri, run_id=model.run_id,
                                       tags={k: str(v) for k, v in tags.items()},
                                       model_id=model.model_id)


def tag_version(name: str, version: int | str, tags: Mapping[str, Any]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))


def aliases(name: str) -> dict[str, int]:
    """alias -> version of a registered model; empty when the model does not exist yet."""
    try:
        model = MlflowClient().get_registered_model(name)
    except MlflowException as error:
        if _missing(error):
            return {}
        raise
    return {alias: int(version) for alias, version in model.aliases.items()}


def champion_version(name: str) -> int | None:
    return aliases(name).get(CHAMPION)


def recorded_config(name: str, version: int) -> RecordedConfig:
    """The configuration ``version`` was trained from: its :data:`TAG_CONFIG`, else (a version
    registered before that tag) the class and parameters its run logged, as strings for
    :func:`pipelines.candidates.params_from_logged` to read back. Raises ValueError when it
    records neither; registry errors propagate."""
    client = MlflowClient()
    model_version = client.get_model_version(name, str(version))
    recorded = model_version.tags.get(TAG_CONFIG)
    if recorded is not None:
        try:
            config = json.loads(recorded)
        except json.JSONDecodeError as error:
            raise ValueError(f"its tag {TAG_CONFIG} is not JSON: {error}") from None
        if not (isinstance(config, dict) and isinstance(config.get("model"), str)
                and isinstance(config.get("params"), dict)):
            raise ValueError(f"its tag {TAG_CONFIG} lacks a model name or a params mapping")
        return RecordedConfig(config["model"], config["params"], f"its tag {TAG_CONFIG}")
    if not model_version.run_id:
        raise ValueError(f"it has no tag {TAG_CONFIG} and no run")
    params = client.get_run(model_version.run_id).data.params
    if PARAM_MODEL_CLASS not in params:
        raise ValueError(f"it has no tag {TAG_CONFIG}, and its run logged no "
                         f"{PARAM_MODEL_CLASS} param")
    logged = {key.removeprefix(PARAM_PREFIX): value for key, value in params.items()
              if key.startswith(PARAM_PREFIX) and key != PARAM_MODEL_CLASS}
    return RecordedConfig(params[PARAM_MODEL_CLASS], logged, "its run's logged params",
                          from_run_params=True)


def tag_orphans(name: str, run_id: str) -> list[int]:
    """Tag ``orphan`` (with ``run_id``, the race that found them) the versions of ``name``
    left without ``race_complete`` by races that ended: a race that died after registering, or
    a version registered by hand. Those of a race still running are left alone: it may yet
    complete them. Tagged rather than deleted: nothing serves them anyway, and their runs and
    files stay for whoever investigates. Aliases are never touched. Returns their numbers."""
    client = MlflowClient()
    orphans, running = [], {}
    for version in client.search_model_versions(f"name='{name}'"):
        tags = version.tags
        if TAG_COMPLETE in tags or TAG_ORPHAN in tags:
            continue
        race = tags.get(TAG_RACE)
        if race:
            if race not in running:
                try:
                    running[race] = client.get_run(race).info.status == "RUNNING"
                except MlflowException as error:
                    if not _missing(error):
                        raise
                    running[race] = False
            if running[race]:
                continue
        client.set_model_version_tag(name, version.version, TAG_ORPHAN, run_id)
        orphans.append(int(version.version))
    if orphans:
        logger.warning("%s: version(s) %s were registered by races that ended before vouching "
                       "for them; tagged %s=%s, they are never served", name,
                       ", ".join(map(str, sorted(orphans))), TAG_ORPHAN, run_id)
    return sorted(orphans)


def decide(metric: str, score: float | None, champion: int | None,
           champion_score: float | None, margin: float, champion_error: str | None = None,
           *, winner: str | None = None, floor: Floor | None = None,
           champion_scored: str | None = None) -> Decision:
    """Whether the race's winner (``winner``, scoring ``score``; None when no candidate was
    valid) replaces the champion. Lower scores are better. Unless it is the baseline itself,
    the winner must beat ``floor`` (no promotion when the floor has no score); then it must
    beat the champion by ``margin``, a fraction of the champion's score. ``champion_scored``
    says how the champion was scored, for the reason."""
    if score is None or not math.isfinite(score):
        return Decision(False, "no candidate produced valid forecasts")
    if floor is not None and winner != floor.name:
        if floor.score is None or not math.isfinite(floor.score):
            return Decision(False, f"blocked by the baseline floor: the baseline {floor.name} "
                                   f"could not be scored on the folds "
                                   f"({floor.error or 'no valid forecasts'}), and nothing is "
                                   f"promoted without it", floor_blocked=True)
        if not score < floor.score:
            return Decision(False, f"blocked by the baseline floor: {metric} {score:.4f} does "
                                   f"not beat the baseline {floor.name}'s {floor.score:.4f} on "
                                   f"the same folds", floor_blocked=True)
    if champion is None:
        return Decision(True, "no champion yet")
    scored = f" ({champion_scored})" if champion_scored else ""
    if champion_score is None or not math.isfinite(champion_score):
        why = champion_error or "its forecasts failed validation"
        return Decision(True, f"champion v{champion} could not be scored on the current "
                              f"folds: {why}")
    threshold = champion_score * (1 - margin)
    gain = (champion_score - score) / champion_score if champion_score else 0.0
    if score < threshold:
        return Decision(True, f"{metric} {score:.4f} beats champion v{champion}'s "
                              f"{champion_score:.4f} by {gain:.1%} (margin {margin:.1%})"
                              f"{scored}")
    return Decision(False, f"{metric} {score:.4f} does not beat champion v{champion}'s "
                           f"{champion_score:.4f} by the margin of {margin:.1%}{scored}")


def set_alias(name: str, alias: str, version: int) -> None:
    MlflowClient().set_registered_model_alias(name, alias, str(version))


def list_versions(name: str | None = None) -> pd.DataFrame:
    """Every version of ``name`` (or of every registered model): candidate, metrics, decision,
    and the aliases it holds, newest first."""
    client = MlflowClient()
    if name is None:
        names = [m.name for m in client.search_registered_models()]
    else:
        try:
            client.get_registered_model(name)
        except MlflowException as error:
            if _missing(error):
                raise ValueError(f"no registered model named {name!r}") from None
            raise
        names = [name]
    rows = []
    for model_name in names:
        held = {}
        for alias, version in aliases(model_name).items():
            held.setdefault(version, []).append(alias)
        for version in client.search_model_versions(f"name='{model_name}'"):
            tags = version.tags
            number = int(version.version)
            rows.append({
                "model": model_name,
                "version": number,
                "aliases": ",".join(sorted(held.get(number, []))),
                "candidate": tags.get(TAG_CANDIDATE, ""),
                "class": tags.get(TAG_MODEL_CLASS, ""),
                **{metric: tag_number(tags.get(metric)) for metric in METRICS},
                "valid": tags.get(TAG_VALID, ""),
                "decision": tags.get(TAG_DECISION, ""),
                "complete": tags.get(TAG_COMPLETE, "false"),
                "created": datetime.fromtimestamp(version.creation_timestamp / 1000,
                                                  tz=timezone.utc).strftime("%Y-%m-%d %H:%M"),
            })
    columns = ["model", "version", "aliases", "candidate", "class", *METRICS, "valid",
               "decision", "complete", "created"]
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values(["model", "version"], ascending=[True, False], ignore_index=True)


def tag_number(value: str | None) -> float:
    """A numeric tag's value; NaN when it is missing or not a number."""
    try:
        return float(value) if value is not None else math.nan
    except ValueError:
        return math.nan
