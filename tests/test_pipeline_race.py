"""End-to-end races on a small slice of M4 Hourly with tiny models, tracked in SQLite under
tmp_path: what is logged, what is registered, where the aliases go, that the served model
reproduces the estimator exactly, and that a job dying halfway leaves the champion alone."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from cli.main import main
from pipelines import race as race_module
from pipelines import registry
from pipelines.config import RaceConfig
from pipelines.forecasts import forecast_frame
from pipelines.pyfunc_model import model_levels
from pipelines.race import RaceResult, format_leaderboard, prepare_race, run_race
from pipelines.sources import load_race_data
from tests.pipeline_support import (
    LSTM,
    NAIVE,
    SNAIVE,
    THETA,
    TRANSFORMER,
    clean_mlflow_environment,
    race_config,
)

pytestmark = pytest.mark.slow
MODEL = "test-forecaster"


@dataclass
class Race:
    config: RaceConfig
    result: RaceResult
    store: Path


@pytest.fixture(scope="module")
def first_race(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[Race]:
    """A first race into an empty store: two baselines and two tiny networks."""
    store = tmp_path_factory.mktemp("store")
    with clean_mlflow_environment():
        config = race_config(store, data_dir, [SNAIVE, THETA, LSTM, TRANSFORMER])
        yield Race(config, run_race(config, progress=False), store)


def _runs(race: Race) -> dict[str, mlflow.entities.Run]:
    runs = MlflowClient().search_runs([race.result.experiment_id])
    return {run.info.run_name: run for run in runs
            if run.data.tags.get("mlflow.parentRunId") == race.result.run_id
            or run.info.run_id == race.result.run_id}


def _artifacts(run_id: str) -> set[str]:
    return {item.path for item in MlflowClient().list_artifacts(run_id)}


def test_a_race_tracks_every_candidate(first_race: Race) -> None:
    result = first_race.result
    runs = _runs(first_race)
    assert set(runs) == {"test-race", "snaive", "theta", "lstm", "transformer"}
    parent = runs["test-race"]
    assert parent.info.status == "FINISHED"
    assert len(parent.data.tags["data_fingerprint"]) == 64
    assert parent.data.tags["git_commit"]
    assert any(key.startswith("system/") for key in parent.data.metrics)  # MLflow's monitor
    assert {"race_config.yaml", "leaderboard.md", "folds.txt"} <= _artifacts(result.run_id)

    client = MlflowClient()
    for name in ("snaive", "theta", "lstm", "transformer"):
        run = runs[name]
        assert run.info.status == "FINISHED", name
        assert run.data.tags["data_fingerprint"] == parent.data.tags["data_fingerprint"]
        assert run.data.params["model.class"] == run.data.tags["model"]
        metrics = run.data.metrics
        for metric in ("mase", "smape", "mae", "coverage"):
            assert metric in metrics and f"fold_1/{metric}" in metrics and f"fold_2/{metric}" in \
                metrics, (name, metric)
        assert metrics["train_seconds"] > 0
        assert "forecasts.png" in _artifacts(run.info.run_id)
    # learning curves of the networks: one point per epoch, for each fold and the refit
    lstm = runs["lstm"].info.run_id
    for prefix in ("fold_1/", "fold_2/", ""):
        for loss in ("train_loss", "val_loss"):
            history = client.get_metric_history(lstm, f"{prefix}{loss}")
            assert [m.step for m in history] == [0, 1], (prefix, loss)
    assert "attention.png" in _artifacts(runs["transformer"].info.run_id)
    assert "attention.png" not in _artifacts(lstm)


def test_every_candidate_is_registered_with_its_metrics(first_race: Race) -> None:
    result = first_race.result
    assert set(result.versions) == {"snaive", "theta", "lstm", "transformer"}
    client = MlflowClient()
    for name, version in result.versions.items():
        tags = client.get_model_version(MODEL, str(version)).tags
        row = result.leaderboard.loc[name]
        assert tags["candidate"] == name
        assert float(tags["mase"]) == pytest.approx(row["mase"], rel=1e-5)
        assert tags["valid"] == "true" and tags["race_complete"] == "true"
        assert tags["data_fingerprint"] and tags["git_commit"]


def test_the_best_version_becomes_champion(first_race: Race) -> None:
    result = first_race.result
    board = result.leaderboard
    best = board[board["valid"]]["mase"].idxmin()
    assert result.winner == best and result.promoted and result.reason == "no champion yet"
    assert registry.aliases(MODEL) == {"champion": result.versions[best]}
    assert result.champion_version == result.versions[best]
    assert result.champion_score == pytest.approx(board.loc[best, "mase"])
    tags = MlflowClient().get_model_version(MODEL, str(result.winner_version)).tags
    assert tags["decision"] == "promoted" and tags["decision_reason"] == "no champion yet"
    text = format_leaderboard(result)
    assert "★" in text and "promoted to @champion: no champion yet" in text


def test_the_champion_model_reproduces_its_estimator(first_race: Race) -> None:
    config, result = first_race.config, first_race.result
    history = load_race_data(config.data).long
    # the champion through its alias, and a neural version through its number
    for uri, name in ((f"models:/{MODEL}@champion", result.winner),
                      (f"models:/{MODEL}/{result.versions['lstm']}", "lstm")):
        estimator = result.estimators[name]
        expected = forecast_frame(estimator, model_levels(estimator, config.forecast_levels))
        served = mlflow.pyfunc.load_model(uri).predict(history)
        pd.testing.assert_frame_equal(served, expected, check_exact=True, check_dtype=False)
    # the horizon param shortens the forecast; the model's signature declares it
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}/{result.versions['lstm']}")
    assert len(model.predict(history, params={"horizon": 6})) == 6 * 8
    assert [p.name for p in model.metadata.get_params_schema().params] == ["horizon"]


def test_the_models_command_lists_versions_and_aliases(
        first_race: Race, capsys: pytest.CaptureFixture) -> None:
    main(["models", "--name", MODEL, "--tracking-uri", first_race.config.tracking_uri])
    lines = capsys.readouterr().out.splitlines()
    champion = [line for line in lines if "| champion " in line]
    assert len(champion) == 1 and f"| {first_race.result.winner} " in champion[0]
    assert len(lines) >= 2 + 4  # header, rule, one line per version (later tests add more)


def test_a_worse_challenger_leaves_the_champion(first_race: Race, data_dir: Path) -> None:
    with clean_mlflow_environment():
        config = race_config(first_race.store, data_dir, [NAIVE])
        result = run_race(config, progress=False)
    before = first_race.result
    assert result.winner == "naive" and not result.promoted
    assert result.previous_champion_version == before.champion_version
    assert result.champion_version == before.champion_version
    # the champion is re-scored on the same folds: a baseline refits, so the score is the same
    if before.winner in ("snaive", "theta"):
        assert result.previous_champion_score == pytest.approx(before.champion_score)
    assert registry.aliases(MODEL) == {"champion": before.champion_version,
                                       "challenger": result.winner_version}
    tags = MlflowClient().get_model_version(MODEL, str(result.winner_version)).tags
    assert tags["decision"] == "challenger"
    assert tags["champion_version"] == str(before.champion_version)
    assert float(tags["candidate_score"]) > float(tags["champion_score"])
    assert "does not beat champion" in tags["decision_reason"]


def test_a_job_killed_halfway_leaves_the_champion_alone(
        first_race: Race, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = registry.aliases(MODEL)
    assert "champion" in before
    newest = max(int(v.version) for v in MlflowClient().search_model_versions(f"name='{MODEL}'"))
    with clean_mlflow_environment():
        config = race_config(first_race.store, data_dir, [NAIVE, THETA])

        # the race dies right after registering its first version
        register = registry.register_version
        calls = []

        def dies_on_the_second(*args: object, **kwargs: object) -> object:
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("killed")
            return register(*args, **kwargs)

        monkeypatch.setattr(registry, "register_version", dies_on_the_second)
        with pytest.raises(RuntimeError, match="killed"):
            run_race(config, progress=False)
        monkeypatch.undo()

        assert registry.aliases(MODEL) == before  # champion and challenger untouched
        client = MlflowClient()
        orphan = client.get_model_version(MODEL, str(newest + 1))
        assert orphan.tags["candidate"] == "naive"
        assert "race_complete" not in orphan.tags and not orphan.aliases
        with pytest.raises(mlflow.exceptions.MlflowException):
            client.get_model_version(MODEL, str(newest + 2))
        failed = client.search_runs([first_race.result.experiment_id],
                                    filter_string="attributes.status = 'FAILED'")
        assert {run.info.run_name for run in failed} == {"test-race", "theta"}

        # running again works: a complete race, and the aliases follow its decision
        again = run_race(config, progress=False)
    assert again.versions == {"naive": newest + 2, "theta": newest + 3}
    for version in again.versions.values():
        assert client.get_model_version(MODEL, str(version)).tags["race_complete"] == "true"
    expected = dict(before)
    expected["champion" if again.promoted else "challenger"] = again.winner_version
    assert registry.aliases(MODEL) == expected


def test_forecasts_that_fail_validation_are_never_promoted(
        first_race: Race, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = registry.aliases(MODEL)
    real = race_module.forecast_frame

    def with_a_nan(*args: object, **kwargs: object) -> pd.DataFrame:
        frame = real(*args, **kwargs)
        frame.loc[0, "q_0.95"] = float("nan")
        return frame

    # a seasonal naive forecast would win (it did, or came close, in the first race)
    monkeypatch.setattr(race_module, "forecast_frame", with_a_nan)
    with clean_mlflow_environment():
        result = run_race(race_config(first_race.store, data_dir, [SNAIVE]), progress=False)
    assert result.winner is None and not result.promoted
    assert result.reason == "no candidate produced valid forecasts"
    assert registry.aliases(MODEL) == before
    row = result.leaderboard.loc["snaive"]
    assert not row["valid"] and "non-finite forecasts" in row["note"]
    tags = MlflowClient().get_model_version(MODEL, str(result.versions["snaive"])).tags
    assert tags["valid"] == "false" and "decision" not in tags
    assert "no winner: no candidate produced valid forecasts" in format_leaderboard(result)


def test_the_folds_end_with_the_data(first_race: Race) -> None:
    prepared = prepare_race(first_race.config)
    last = prepared.plan.folds[-1]
    assert last.y_test.groupby(level=0).tail(1).index.equals(
        prepared.data.panel.groupby(level=0).tail(1).index)
    assert [len(f.y_test) for f in prepared.plan.folds] == [24 * 8, 24 * 8]
