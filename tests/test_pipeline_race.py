"""End-to-end races on a small slice of M4 Hourly with tiny models, tracked in SQLite under
tmp_path: what is logged, what is registered, where the aliases go, that the served model
reproduces the estimator exactly, that a job dying halfway leaves the champion alone, that the
champion is refitted on the race's folds (one config raced twice ties), and that nothing below
the baseline floor, or failing at its refit, is promoted."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from cli.main import main
from pipelines import race as race_module
from pipelines import registry, signing
from pipelines.config import RaceConfig, parse_config
from pipelines.forecasts import forecast_frame
from pipelines.pyfunc_model import model_levels
from pipelines.race import RaceResult, format_leaderboard, prepare_race, run_race
from pipelines.sources import load_race_data
from tests.pipeline_support import (
    LSTM,
    MODEL,
    NAIVE,
    SNAIVE,
    THETA,
    TRANSFORMER,
    Race,
    clean_mlflow_environment,
    race_config,
)

pytestmark = pytest.mark.slow


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
    # the networks' parameters as given, "auto" ones too, and the sizes the refit resolved
    params = runs["lstm"].data.params
    assert params["model.validation_rows"] == "auto" and params["model.season_length"] == "24"
    assert {k: v for k, v in params.items() if k.startswith("resolved.")} == {
        "resolved.season_length": "24", "resolved.validation_rows": "24",
        "resolved.refit_full": "True", "resolved.input_len": "48", "resolved.segment_len": "4"}
    assert not any(k.startswith("resolved.") for k in runs["theta"].data.params)


def test_every_candidate_is_registered_with_its_metrics(first_race: Race) -> None:
    result = first_race.result
    assert set(result.versions) == {"snaive", "theta", "lstm", "transformer"}
    # the config's seasonal naive candidate is the baseline: none was added
    assert result.baseline == "snaive" and not result.baseline_added
    assert list(result.leaderboard.index[result.leaderboard["baseline"]]) == ["snaive"]
    client = MlflowClient()
    for name, version in result.versions.items():
        tags = client.get_model_version(MODEL, str(version)).tags
        row = result.leaderboard.loc[name]
        assert tags["candidate"] == name
        assert float(tags["mase"]) == pytest.approx(row["mase"], rel=1e-5)
        assert tags["valid"] == "true" and tags["race_complete"] == "true"
        assert tags["data_fingerprint"] and tags["git_commit"]
        # what a later race refits: the class and every constructor parameter
        config = json.loads(tags[registry.TAG_CONFIG])
        assert config["model"] == tags["model_class"]
    # the race vouched for each version: the digest of its files as stored, which check out
    for version in result.versions.values():
        model_version = client.get_model_version(MODEL, str(version))
        with tempfile.TemporaryDirectory() as folder:
            files = signing.download(client.get_model_version_download_uri(MODEL, str(version)),
                                     Path(folder))
            assert model_version.tags[signing.TAG_FILES] == signing.files_digest(files)
            signing.verify(files, MODEL, version, model_version.tags, key=None)
            assert model_version.tags[signing.TAG_SIGNATURE] == ""  # no key in this race
    lstm = json.loads(client.get_model_version(MODEL, str(result.versions["lstm"]))
                      .tags[registry.TAG_CONFIG])
    assert lstm["params"]["hidden_size"] == 8 and lstm["params"]["random_state"] == 0
    assert "on_epoch" not in lstm["params"]


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
        # the naive candidate is its own floor: no seasonal naive is added to beat it
        config = race_config(first_race.store, data_dir, [NAIVE],
                             selection={"baseline": "naive"})
        result = run_race(config, progress=False)
    before = first_race.result
    assert result.winner == "naive" and not result.promoted
    assert result.previous_champion_version == before.champion_version
    assert result.champion_version == before.champion_version
    # the champion's config is refitted on the same folds: the score it had as a candidate
    assert result.champion_scored == "refitted on each fold from its tag candidate_config"
    assert result.previous_champion_score == before.champion_score
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

        # running again works: a complete race, and the aliases follow its decision; the
        # version of the race that died is an orphan, tagged with the run that found it
        again = run_race(config, progress=False)
        assert again.orphans == [newest + 1]
        assert client.get_model_version(MODEL, str(newest + 1)).tags[registry.TAG_ORPHAN] == \
            again.run_id
        assert f"orphans: v{newest + 1} (registered by races that died before vouching for " \
               "them)" in format_leaderboard(again)
    # the seasonal naive baseline was added after the config's candidates
    assert again.baseline == "snaive" and again.baseline_added
    assert again.versions == {"naive": newest + 2, "theta": newest + 3, "snaive": newest + 4}
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

    # a seasonal naive forecast would win (it did, or came close, in the first race); it is
    # the baseline too
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


# ---------------------------------------------------------------------------- a fair champion
@dataclass
class TwoRaces:
    config: RaceConfig
    first: RaceResult
    second: RaceResult


@pytest.fixture(scope="module")
def lstm_twice(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[TwoRaces]:
    """One tiny LSTM raced twice into an empty store, margin 0; it is its own baseline, so
    that the LSTM, not a seasonal naive forecast, is the champion of the first race."""
    store = tmp_path_factory.mktemp("twice")
    with clean_mlflow_environment():
        config = race_config(store, data_dir, [LSTM],
                             selection={"baseline": "lstm", "promotion_margin": 0.0})
        first = run_race(config, progress=False)
        second = run_race(config, progress=False)
        yield TwoRaces(config, first, second)


def test_racing_one_config_twice_ties(lstm_twice: TwoRaces) -> None:
    first, second = lstm_twice.first, lstm_twice.second
    assert first.promoted and first.winner == "lstm"
    assert second.winner == "lstm" and second.previous_champion_version == first.winner_version
    tags = MlflowClient().get_model_version(MODEL, str(second.winner_version)).tags
    assert tags["candidate_score"] == tags["champion_score"]  # exactly
    assert float(tags["candidate_score"]) == pytest.approx(first.winner_score, rel=1e-5)
    assert second.previous_champion_score == second.winner_score == first.winner_score
    # a tie does not promote, even with margin 0
    assert not second.promoted and tags["decision"] == "challenger"
    assert "same config as candidate lstm: its fold scores are reused" in tags["decision_reason"]
    assert registry.aliases(MODEL) == {"champion": first.winner_version,
                                       "challenger": second.winner_version}
    assert "its fold scores are reused" in format_leaderboard(second)


def test_the_champion_is_refitted_on_the_folds_never_loaded(
        lstm_twice: TwoRaces, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[str] = []
    load = mlflow.pyfunc.load_model

    def recording(uri: str, *args: object, **kwargs: object) -> object:
        loaded.append(uri)
        return load(uri, *args, **kwargs)

    monkeypatch.setattr(mlflow.pyfunc, "load_model", recording)
    store = Path(lstm_twice.config.tracking_uri.removeprefix("sqlite:///")).parent
    with clean_mlflow_environment():
        # a different candidate: the champion LSTM has no twin and trains on each fold
        result = run_race(race_config(store, data_dir, [NAIVE],
                                      selection={"baseline": "naive"}), progress=False)
    champion = lstm_twice.first.winner_version
    assert result.previous_champion_version == champion
    assert result.champion_scored == "refitted on each fold from its tag candidate_config"
    # the weights refitted on all data would score better than this: the folds alone do it
    assert result.previous_champion_score == lstm_twice.first.winner_score
    # the race loads the candidate's own logged model (to check it), never the registry's
    assert loaded and not any(MODEL in uri for uri in loaded)
    # the champion's refits are tracked in the race's run, fold by fold
    run = MlflowClient().get_run(result.run_id)
    assert run.data.metrics["champion/mase"] == lstm_twice.first.winner_score
    assert {"champion/fold_1/mase", "champion/fold_2/mase"} <= set(run.data.metrics)
    assert MlflowClient().get_metric_history(result.run_id, "champion/fold_1/train_loss")
    assert run.data.tags["champion_scored"] == result.champion_scored


def test_a_champion_registered_without_its_config(lstm_twice: TwoRaces, data_dir: Path) -> None:
    champion = lstm_twice.first.winner_version
    store = Path(lstm_twice.config.tracking_uri.removeprefix("sqlite:///")).parent
    with clean_mlflow_environment():
        config = race_config(store, data_dir, [NAIVE], selection={"baseline": "naive"})
        # a version registered before the tag existed: its run's logged params are read back
        client = MlflowClient(config.tracking_uri)
        client.delete_model_version_tag(MODEL, str(champion), registry.TAG_CONFIG)
        result = run_race(config, progress=False)
        assert result.champion_scored == "refitted on each fold from its run's logged params"
        assert result.previous_champion_score == lstm_twice.first.winner_score
        assert not result.promoted

        # a config that cannot be read leaves the champion unscored, and says why
        client.set_model_version_tag(MODEL, str(champion), registry.TAG_CONFIG, "{not json")
        broken = run_race(config, progress=False)
    assert broken.previous_champion_score is None and broken.promoted
    assert (f"champion v{champion} could not be scored on the current folds: its config could "
            f"not be recovered: its tag candidate_config is not JSON") in broken.reason
    # the leaderboard says why, printed and in the race's run
    why = (f"champion before the race: v{champion} (on the same folds: could not be scored: "
           f"its config could not be recovered: its tag candidate_config is not JSON")
    assert why in format_leaderboard(broken)
    with clean_mlflow_environment():
        client = MlflowClient(config.tracking_uri)
        path = client.download_artifacts(broken.run_id, "leaderboard.md", str(store))
    assert why in Path(path).read_text()


# ---------------------------------------------------------------------------- the baseline floor
def test_the_seasonal_naive_baseline_is_added_and_beats_the_network(
        tmp_path: Path, data_dir: Path) -> None:
    with clean_mlflow_environment():
        result = run_race(race_config(tmp_path, data_dir, [LSTM]), progress=False)
        params = MlflowClient().get_run(result.run_id).data.params
        aliases = registry.aliases(MODEL)
    board = result.leaderboard
    assert result.baseline == "snaive" and result.baseline_added
    assert params["selection.baseline"] == "snaive" and params["candidates"] == "lstm,snaive"
    assert bool(board.loc["snaive", "baseline"]) and not bool(board.loc["lstm", "baseline"])
    assert board.loc["lstm", "mase"] > board.loc["snaive", "mase"]  # the tiny network is worse
    # no champion yet, and still the network is not promoted: the baseline wins
    assert result.winner == "snaive" and result.promoted and result.reason == "no champion yet"
    assert aliases == {"champion": result.versions["snaive"]}
    assert "baseline: snaive (the seasonal naive forecast, added to the candidates" in \
        format_leaderboard(result)


def _hourly_with_a_late_zero(path: Path, hours: int = 120) -> None:
    """Three smooth daily cycles; series a reads 0 three hours before its end, inside the last
    fold's test window but in no fold's training window."""
    rng = np.random.default_rng(0)
    index = pd.date_range("2024-01-01", periods=hours, freq="h")
    frames = []
    for i, key in enumerate("abc"):
        target = 10 + i + 3 * np.sin(2 * np.pi * np.arange(hours) / 24 + i) \
            + 0.1 * rng.standard_normal(hours)
        if key == "a":
            target[-3] = 0.0
        frames.append(pd.DataFrame({"series_id": key, "timestamp": index, "target": target}))
    pd.concat(frames).to_csv(path, index=False)


def test_a_refit_failure_is_no_winner_and_the_floor_blocks_a_worse_model(
        tmp_path: Path, data_dir: Path) -> None:
    _hourly_with_a_late_zero(tmp_path / "hourly.csv")
    with clean_mlflow_environment():
        raw = race_config(tmp_path, data_dir, [NAIVE, THETA],
                          selection={"baseline": "theta"}).model_dump(mode="json")
        raw |= {"data": {"path": str(tmp_path / "hourly.csv")}, "horizon": 6}
        config = parse_config(raw)
        result = run_race(config, progress=False)
        client = MlflowClient()
        runs = {run.info.run_name: run for run in client.search_runs([result.experiment_id])}
        theta_run = runs["theta"]
        error_text = (Path(mlflow.artifacts.download_artifacts(
            run_id=theta_run.info.run_id, artifact_path="error.txt", dst_path=str(tmp_path))
        ).read_text())
        aliases = registry.aliases(MODEL)
    error = ("refit on all data failed: ValueError: Multiplicative seasonality is not "
             "appropriate for zero and negative values")
    board = result.leaderboard
    # theta's backtest never saw the zero, its refit on all data did
    assert board.loc["theta", "status"] == "failed" and board.loc["theta", "note"] == error
    assert np.isfinite(board.loc["theta", "mase"])
    assert "theta" not in result.versions
    assert theta_run.info.status == "FAILED" and theta_run.data.tags["error"] == error
    assert "Multiplicative seasonality is not appropriate for zero and negative values" in \
        error_text
    assert f"theta: {error}" in format_leaderboard(result)  # in full, below the table

    # the naive forecast is the only valid candidate, and it is worse than theta's backtest
    assert board.loc["naive", "mase"] > board.loc["theta", "mase"]
    assert result.winner == "naive" and not result.promoted
    assert result.reason.startswith("blocked by the baseline floor: mase ")
    assert "does not beat the baseline theta's" in result.reason
    tags = client.get_model_version(MODEL, str(result.winner_version)).tags
    assert tags["decision"] == "not-promoted" and tags["decision_reason"] == result.reason
    assert aliases == {}  # no champion, and no challenger below the floor
    assert "-> not promoted, no alias: blocked by the baseline floor" in \
        format_leaderboard(result)
