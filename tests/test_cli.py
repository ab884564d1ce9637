"""The ``forecaster`` command line, run for real: its help (examples, the environment, where a
race's results go) and how ``schedule --run-at-start`` and ``serve`` read their arguments."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import build_parser
from serving.config import ENV_PREFIX, ServingConfig
from tests.serving_support import clean_environment


def forecaster(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *arguments], capture_output=True,
                          text=True, timeout=120, env=clean_environment())


def test_help_shows_examples_and_the_environment() -> None:
    result = forecaster("--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "examples:" in text and "forecaster train configs/quick.yaml" in text
    assert "forecaster serve --model-name m4-hourly --alias challenger" in text
    assert "forecaster schedule --run-at-start configs/m4_hourly.yaml" in text
    for variable in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PUSHGATEWAY_URL",
                     "FORECASTER_DATA_DIR", "FORECASTER_MODEL_NAME", "FORECASTER_MODEL_ALIAS",
                     "FORECASTER_TIMEOUT_SECONDS", "FORECASTER_REFIT_THREADS",
                     "FORECASTER_API_TOKEN"):
        assert variable in text, variable
    # every serving setting the environment can set (the tracking URIs are MLflow's names)
    settings = [ENV_PREFIX + name.upper() for name, field in ServingConfig.model_fields.items()
                if field.validation_alias is None]
    assert [s for s in settings if s not in text.replace("\n", " ")] == []


def test_train_help_says_where_the_results_go() -> None:
    result = forecaster("train", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for words in ("MLflow tracking store", "model registry", "registry.model_name",
                  "alias champion", "$MLFLOW_TRACKING_URI", "sqlite:///mlflow.db",
                  "$MLFLOW_REGISTRY_URI"):
        assert words in text, words


def test_schedule_help_tells_of_post_retrain() -> None:
    result = forecaster("schedule", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for words in ("/metrics and POST /retrain on --metrics-port", '202 {"started": true}',
                  '"coalesced": true', "Alertmanager webhook", "$FORECASTER_API_TOKEN",
                  "Authorization: Bearer TOKEN", "401"):
        assert words in text, words


def test_schedule_run_at_start_before_the_config(tmp_path: Path) -> None:
    config = tmp_path / "race.yaml"
    config.write_text("name: race\nhorizon: 24\nregistry: {model_name: m}\ncandidates: []\n"
                      "unknown_key: 1\n")
    # the config is read as the config (and refused for its content), not as a --run-at-start
    # mode (argparse's "invalid choice", exit status 2)
    result = forecaster("schedule", "--run-at-start", str(config), "--metrics-port", "0")
    assert result.returncode == 1, result.stderr
    assert "forecaster schedule: invalid race config" in result.stderr
    assert "unknown_key: unknown key" in result.stderr
    missing = forecaster("schedule", "--run-at-start")
    assert missing.returncode == 2
    assert "the following arguments are required: config" in missing.stderr


@pytest.mark.parametrize("arguments, config, mode", [
    (["--run-at-start", "c.yaml"], "c.yaml", "always"),
    (["c.yaml", "--run-at-start"], "c.yaml", "always"),
    (["--run-at-start", "c.yaml", "--cron", "0 4 * * *"], "c.yaml", "always"),
    (["--run-at-start", "if-no-champion", "c.yaml"], "c.yaml", "if-no-champion"),
    (["--run-at-start=never", "c.yaml"], "c.yaml", "never"),
    (["c.yaml", "--run-at-start", "always"], "c.yaml", "always"),
    (["c.yaml"], "c.yaml", "never"),
])
def test_schedule_arguments(arguments: list[str], config: str, mode: str) -> None:
    args = build_parser().parse_args(["schedule", *arguments])
    assert (args.config, args.run_at_start) == (Path(config), mode)


@pytest.mark.parametrize("arguments, message", [
    (["c.yaml", "--run-at-start", "sometimes"], "invalid choice: 'sometimes'"),
    (["--run-at-start", "a.yaml", "b.yaml"], "unrecognized arguments: b.yaml"),
])
def test_schedule_refuses(arguments: list[str], message: str,
                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["schedule", *arguments])
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_serve_takes_the_model_name_and_alias() -> None:
    args = build_parser().parse_args(["serve", "--model-name", "sales", "--alias", "blue"])
    assert (args.model_name, args.alias) == ("sales", "blue")
    defaults = build_parser().parse_args(["serve"])
    assert (defaults.model_name, defaults.alias) == (None, None)  # the settings' own


@pytest.mark.parametrize(("arguments", "words"), [
    (["m4-hourly", "--models", "LSTMForecaster", "Theta"],
     "--models: LSTMForecaster not benchmarked on m4-hourly; choose from sNaive, Theta"),
    (["etth1", "--models", "GRU"], "--models: GRU not benchmarked on etth1; choose from "),
    (["m4-hourly", "--models", "Ensemble", "GRU", "Theta"],
     "--models: Ensemble weighs the networks benchmarked with it: name two or more of RNN, "),
    (["m4-hourly", "--seeds", "0"], "argument --seeds: must be a positive integer, got '0'"),
])
def test_bench_refuses_unknown_models_and_seeds(arguments: list[str], words: str) -> None:
    result = forecaster("bench", *arguments)
    assert result.returncode == 2, result.stderr
    assert words in result.stderr and "Traceback" not in result.stderr, result.stderr
