"""The model registry side of a race: versions, their tags, and the champion/challenger aliases.

Aliases are the only thing serving reads (``models:/NAME@champion``), so they move last: a race
registers and tags every version first, and only then sets at most one alias. A job that dies
before that leaves new versions without aliases and the champion where it was.
"""

from __future__ import annotations

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

CHAMPION, CHALLENGER = "champion", "challenger"

# model version tags
TAG_CANDIDATE = "candidate"
TAG_MODEL_CLASS = "model_class"
TAG_RACE = "race_run_id"
TAG_VALID = "valid"
TAG_PROBLEMS = "problems"
TAG_COMPLETE = "race_complete"  # set once every version of the race is registered and tagged
TAG_RANK = "race_rank"
TAG_DECISION = "decision"  # promoted | challenger | not-promoted (on the race's winner)
TAG_REASON = "decision_reason"
TAG_SCORE = "candidate_score"
TAG_CHAMPION_SCORE = "champion_score"
TAG_CHAMPION_VERSION = "champion_version"  # the champion it was compared with


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str


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


def decide(metric: str, score: float | None, champion: int | None,
           champion_score: float | None, margin: float, champion_error: str | None = None
           ) -> Decision:
    """Whether the race's winner (``score``; None when no candidate was valid) replaces the
    champion. Lower scores are better; the winner must beat the champion by ``margin``, a
    fraction of the champion's score."""
    if score is None or not math.isfinite(score):
        return Decision(False, "no candidate produced valid forecasts")
    if champion is None:
        return Decision(True, "no champion yet")
    if champion_score is None or not math.isfinite(champion_score):
        why = champion_error or "its forecasts failed validation"
        return Decision(True, f"champion v{champion} could not be scored on the current "
                              f"folds: {why}")
    threshold = champion_score * (1 - margin)
    gain = (champion_score - score) / champion_score if champion_score else 0.0
    if score < threshold:
        return Decision(True, f"{metric} {score:.4f} beats champion v{champion}'s "
                              f"{champion_score:.4f} by {gain:.1%} (margin {margin:.1%})")
    return Decision(False, f"{metric} {score:.4f} does not beat champion v{champion}'s "
                           f"{champion_score:.4f} by the margin of {margin:.1%}")


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
