"""The ensemble in a race of two baselines on the M4 slice, tracked in SQLite under tmp_path:
it races as a candidate (cross-fitted fold scores, weights logged), wins, is registered with
its members and served through the registry like any champion; a later race scores it as
champion on its own folds, refitting its members or reusing the candidates' forecasts alike;
and an ensemble that fails leaves the race to the candidates."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from pipelines import race as race_module
from pipelines import registry
from pipelines.backtest import score_forecast
from pipelines.ensemble import combine
from pipelines.forecasts import forecast_frame
from pipelines.race import fit_fold, format_leaderboard, prepare_race, run_race
from pipelines.sources import load_race_data
from tests.pipeline_support import (
    MODEL,
    NAIVE,
    SNAIVE,
    THETA,
    Race,
    clean_mlflow_environment,
    race_config,
)

pytestmark = pytest.mark.slow
ENSEMBLE = {"ensemble": {"size": 10}}


@pytest.fixture(scope="module")
def ensemble_race(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[Race]:
    """Two baselines and their ensemble, into an empty store."""
    store = tmp_path_factory.mktemp("ensemble")
    with clean_mlflow_environment():
        config = race_config(store, data_dir, [SNAIVE, THETA], selection=ENSEMBLE)
        yield Race(config, run_race(config, progress=False), store)


def test_the_ensemble_races_as_a_candidate(ensemble_race: Race) -> None:
    result, config = ensemble_race.result, ensemble_race.config
    board = result.leaderboard
    row = board.loc["ensemble"]
    assert row["model"] == "WeightedEnsembleForecaster" and row["valid"] and row["status"] == "ok"
    # on this slice the mix beats both its members, each fold weighted on the other
    assert row["mase"] < min(board.loc["snaive", "mase"], board.loc["theta", "mase"])
    assert result.winner == "ensemble" and result.promoted

    runs = {run.info.run_name: run for run in MlflowClient().search_runs(
        [result.experiment_id]) if run.data.tags.get("mlflow.parentRunId") == result.run_id}
    run = runs["ensemble"]
    assert run.info.status == "FINISHED"
    weights = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="ensemble_weights.json",
        dst_path=str(ensemble_race.store / "weights"))).read_text())
    assert weights["metric"] == "mase" and weights["size"] == 10
    assert set(weights["weights"]) <= {"snaive", "theta"} and len(weights["weights"]) == 2
    assert run.data.params[f"weight.{next(iter(weights['weights']))}"]
    assert [f["chosen_on_folds"] for f in weights["folds"]] == [[2], [1]]

    # honest fold scores: the members' forecasts of fold k weighted with the weights chosen
    # on the other fold, scored as any candidate's
    prepared = prepare_race(config)
    for fold, chosen in zip(prepared.plan.folds, weights["folds"], strict=True):
        frames = [fit_fold(prepared, candidate, fold).forecast
                  for candidate in prepared.candidates]
        fold_weights = [chosen["weights"].get(c.name, 0.0) for c in prepared.candidates]
        scores = score_forecast(fold, combine(frames, fold_weights, config.forecast_levels),
                                config)
        assert run.data.metrics[f"fold_{fold.number}/mase"] == pytest.approx(scores["mase"])
    assert "ensemble: weights " in format_leaderboard(result)


def test_the_ensemble_is_registered_and_served_as_champion(ensemble_race: Race) -> None:
    result, config = ensemble_race.result, ensemble_race.config
    version = result.versions["ensemble"]
    assert registry.aliases(MODEL) == {"champion": version}
    tags = MlflowClient().get_model_version(MODEL, str(version)).tags
    assert tags["candidate"] == "ensemble" and tags["race_complete"] == "true"
    assert tags["model_class"] == "WeightedEnsembleForecaster" and tags["valid"] == "true"
    recorded = json.loads(tags[registry.TAG_CONFIG])
    members = {m["name"]: m["model"] for m in recorded["params"]["members"]}
    assert members == {"snaive": "NaiveForecaster", "theta": "ThetaForecaster"}
    assert tags["ensemble_members"] == ",".join(
        f"{name}={weight:.6g}" for name, weight in zip(
            members, recorded["params"]["weights"], strict=True))

    history = load_race_data(config.data).long
    served = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").predict(history)
    expected = forecast_frame(result.estimators["ensemble"], config.forecast_levels)
    pd.testing.assert_frame_equal(served, expected, check_exact=True, check_dtype=False)
    assert len(served) == 8 * config.horizon


def test_an_ensemble_champion_is_scored_on_the_race_s_folds(ensemble_race: Race,
                                                            data_dir: Path) -> None:
    champion = ensemble_race.result.champion_version
    with clean_mlflow_environment():
        # no twin: its members are refitted on each fold; one candidate: no ensemble
        alone = run_race(race_config(ensemble_race.store, data_dir, [NAIVE],
                                     selection={"baseline": "naive", **ENSEMBLE}),
                         progress=False)
        # its members' twins lend their fold forecasts, and race their own ensemble
        twins = run_race(race_config(ensemble_race.store, data_dir, [SNAIVE, THETA],
                                     selection=ENSEMBLE), progress=False)
        weights = json.loads(Path(mlflow.artifacts.download_artifacts(
            run_id=alone.run_id, artifact_path="champion_ensemble_weights.json",
            dst_path=str(ensemble_race.store / "champion_weights"))).read_text())
    assert alone.previous_champion_version == champion
    assert alone.champion_scored.startswith("its members refitted on each fold")
    assert "each fold's weighted on the other folds" in alone.champion_scored
    # its weights were chosen on these very folds: re-chosen, each fold's on the other fold
    assert [f["chosen_on_folds"] for f in weights["folds"]] == [[2], [1]]
    assert alone.champion_error is None and not alone.promoted
    assert alone.ensemble_note == "1 valid candidate(s): an ensemble needs two"
    assert "ensemble: not raced: 1 valid candidate(s)" in format_leaderboard(alone)
    assert "ensemble" not in alone.versions
    # refitted or lent, the same forecasts: the same score
    assert twins.previous_champion_version == champion
    assert twins.previous_champion_score == pytest.approx(alone.previous_champion_score,
                                                          rel=1e-12)
    # on the same footing as the race's own ensemble of the same members: the same score,
    # so it is not replaced by its equal
    assert twins.previous_champion_score == pytest.approx(
        twins.leaderboard.loc["ensemble", "mase"], rel=1e-9)
    assert not twins.promoted
    assert registry.champion_version(MODEL) == champion


def test_a_failing_ensemble_leaves_the_race_to_the_candidates(
        tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no ensemble today")

    monkeypatch.setattr(race_module, "ensemble_model", broken)
    with clean_mlflow_environment():
        result = run_race(race_config(tmp_path, data_dir, [SNAIVE, THETA], selection=ENSEMBLE),
                          progress=False)
        runs = {run.info.run_name: run for run in MlflowClient().search_runs(
            [result.experiment_id])}
        aliases = registry.aliases(MODEL)
    row = result.leaderboard.loc["ensemble"]
    assert row["status"] == "failed" and not row["valid"]
    assert row["note"] == "building its model failed: RuntimeError: no ensemble today"
    assert runs["ensemble"].info.status == "FAILED"
    assert set(result.versions) == {"snaive", "theta"}
    assert result.winner in {"snaive", "theta"} and result.promoted
    assert aliases == {"champion": result.winner_version}
