"""The pure parts of a fair race: which candidate is the baseline (and when the race adds the
seasonal naive one), the promotion rule with its baseline floor, and reading a champion's
configuration back from the strings its run logged."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines import registry
from pipelines.candidates import (
    build_estimator,
    loggable_params,
    params_from_logged,
    resolved_config,
)
from pipelines.config import CandidateConfig, ConfigError
from pipelines.race import prepare_race
from tests.pipeline_support import (
    LSTM,
    NAIVE,
    SNAIVE,
    THETA,
    TRANSFORMER,
    clean_mlflow_environment,
    race_config,
)


@pytest.fixture(autouse=True)
def no_mlflow_variables() -> Iterator[None]:
    with clean_mlflow_environment():
        yield


def test_the_seasonal_naive_baseline_is_added_when_absent(tmp_path: Path,
                                                          data_dir: Path) -> None:
    prepared = prepare_race(race_config(tmp_path, data_dir, [THETA]))
    assert prepared.baseline == "snaive" and prepared.baseline_added
    assert [c.name for c in prepared.candidates] == ["theta", "snaive"]
    added = build_estimator(prepared.candidates[-1], prepared.config).get_params()
    assert (added["strategy"], added["sp"]) == ("last", 24)  # the season of hourly data
    assert [c.name for c in prepared.config.candidates] == ["theta"]  # the config is as written


def test_a_candidate_that_is_the_seasonal_naive_forecast_is_the_baseline(
        tmp_path: Path, data_dir: Path) -> None:
    # named otherwise, its sp left to the season length, its strategy the default "last"
    same = {"name": "seasonal", "model": "NaiveForecaster", "params": {"sp": 24}}
    prepared = prepare_race(race_config(tmp_path, data_dir, [THETA, same]))
    assert prepared.baseline == "seasonal" and not prepared.baseline_added
    assert [c.name for c in prepared.candidates] == ["theta", "seasonal"]
    # a different model under the name "snaive": the added baseline takes another name
    other = {**NAIVE, "name": "snaive"}
    prepared = prepare_race(race_config(tmp_path, data_dir, [other]))
    assert [c.name for c in prepared.candidates] == ["snaive", "snaive-baseline"]
    assert prepared.baseline == "snaive-baseline" and prepared.baseline_added


def test_a_named_baseline_is_used_and_must_be_a_candidate(tmp_path: Path,
                                                          data_dir: Path) -> None:
    prepared = prepare_race(race_config(tmp_path, data_dir, [NAIVE, THETA],
                                        selection={"baseline": "theta"}))
    assert prepared.baseline == "theta" and not prepared.baseline_added
    assert [c.name for c in prepared.candidates] == ["naive", "theta"]
    with pytest.raises(ConfigError, match=r"selection\.baseline: 'prophet' is not a candidate; "
                                          r"name one of \['naive', 'theta'\]"):
        race_config(tmp_path, data_dir, [NAIVE, THETA], selection={"baseline": "prophet"})


def test_the_floor_comes_before_the_champion() -> None:
    floor = registry.Floor("snaive", 1.0)
    # the baseline itself may win, and is compared with the champion as usual
    assert registry.decide("mase", 1.0, None, None, 0.0, winner="snaive", floor=floor).promoted
    # anything else must beat it, champion or not, and a tie does not
    for score in (1.0, 1.2):
        blocked = registry.decide("mase", score, None, None, 0.0, winner="lstm", floor=floor)
        assert not blocked.promoted and blocked.floor_blocked
        assert blocked.reason == (f"blocked by the baseline floor: mase {score:.4f} does not "
                                  "beat the baseline snaive's 1.0000 on the same folds")
    assert registry.decide("mase", 0.9, None, None, 0.0, winner="lstm", floor=floor).promoted
    beaten = registry.decide("mase", 0.9, 3, 0.8, 0.0, winner="lstm", floor=floor,
                             champion_scored="refitted on each fold from its tag")
    assert not beaten.promoted and not beaten.floor_blocked
    assert beaten.reason.endswith("(refitted on each fold from its tag)")
    # a baseline without a score blocks every promotion but its own
    unscored = registry.Floor("snaive", None, "refit on all data failed: ValueError: x")
    blocked = registry.decide("mase", 0.5, None, None, 0.0, winner="lstm", floor=unscored)
    assert not blocked.promoted and "could not be scored on the folds (refit on all data " \
        "failed: ValueError: x)" in blocked.reason


@pytest.mark.parametrize("candidate", [LSTM, TRANSFORMER, SNAIVE, THETA,
                                       {"model": "AutoETS", "params": {"auto": True}},
                                       {"name": "tcn-auto", "model": "TCNForecaster"}],
                         ids=lambda c: c.get("name", c["model"]))
def test_a_config_reads_back_from_its_logged_params(
        candidate: dict, tmp_path: Path, data_dir: Path) -> None:
    config = race_config(tmp_path, data_dir, [candidate])
    logged = loggable_params(build_estimator(config.candidates[0], config))
    params = params_from_logged(candidate["model"], logged)
    again = CandidateConfig(name="again", model=candidate["model"], params=params)
    assert resolved_config(again, config) == resolved_config(config.candidates[0], config)


def test_logged_params_that_do_not_read_back_are_refused(tmp_path: Path,
                                                         data_dir: Path) -> None:
    config = race_config(tmp_path, data_dir, [LSTM])
    logged = loggable_params(build_estimator(config.candidates[0], config))
    with pytest.raises(ValueError, match=r"missing: \['hidden_size'\], unknown: \['width'\]"):
        params_from_logged("LSTMForecaster", {**{k: v for k, v in logged.items()
                                                 if k != "hidden_size"}, "width": "8"})
    with pytest.raises(ValueError, match=r"the logged params \['learning_rate'\] of "
                                         r"LSTMForecaster do not read back as logged"):
        params_from_logged("LSTMForecaster", {**logged, "learning_rate": "1e-2"})
    with pytest.raises(ValueError, match="unknown model 'Prophet'"):
        params_from_logged("Prophet", logged)
