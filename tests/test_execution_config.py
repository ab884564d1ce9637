"""The execution engine and the search as settings: every bad ``execution`` or ``search`` is
one line naming its key, before anything trains; an address that does not answer fails the
race before MLflow is touched; ``--ray`` on the command line; the local engine imports no
Ray. (The races on Ray themselves: tests/test_ray_race.py.)"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cli.main import main
from pipelines.config import ConfigError, load_config, on_ray, parse_config
from pipelines.race import prepare_race, run_race
from tests.pipeline_support import LSTM, SNAIVE, clean_mlflow_environment, race_config

REPO = Path(__file__).resolve().parents[1]
SEARCH = {"space": {"hidden_size": {"int": [4, 16]},
                    "learning_rate": {"loguniform": [1e-4, 1e-2]}}, "trials": 4}


@pytest.fixture(autouse=True)
def no_mlflow_variables() -> Iterator[None]:
    with clean_mlflow_environment():
        yield


def _raw(tmp_path: Path, data_dir: Path, **overrides: Any) -> dict[str, Any]:
    return race_config(tmp_path, data_dir, [SNAIVE, LSTM]).model_dump(
        mode="json", by_alias=True) | overrides


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def test_execution_defaults_to_local_and_candidates_may_hold_their_own_resources(
        tmp_path: Path, data_dir: Path) -> None:
    raw = _raw(tmp_path, data_dir, execution={"engine": "ray", "address": "ray://head:10001",
                                              "resources": {"num_cpus": 2}})
    raw["candidates"][1]["resources"] = {"num_cpus": 1, "num_gpus": 0.25}
    config = parse_config(raw)
    assert config.resources(config.candidates[0]).model_dump() == {"num_cpus": 2,
                                                                   "num_gpus": 0}
    assert config.resources(config.candidates[1]).model_dump() == {"num_cpus": 1,
                                                                   "num_gpus": 0.25}
    local = parse_config(_raw(tmp_path, data_dir))
    assert local.execution.engine == "local" and local.execution.address is None
    # --ray: the engine and the address over the file's, checked again as a whole
    assert on_ray(local, "127.0.0.1:6379").execution.model_dump(include={"engine", "address"}
                                                                ) == {"engine": "ray",
                                                                      "address": "127.0.0.1:6379"}


@pytest.mark.parametrize("execution, search, message", [
    ({"engine": "spark"}, None, "execution.engine: Input should be 'local' or 'ray'"),
    ({"engine": "ray", "address": "head"}, None,
     "execution.address: 'head' is not a Ray address: give auto, HOST:PORT or ray://HOST:PORT"),
    ({"address": "auto"}, None, "execution: `address` applies to engine ray only"),
    ({"engine": "ray", "resources": {"num_cpus": 0}}, None,
     "execution.resources.num_cpus: Input should be greater than 0"),
    ({"engine": "ray", "resources": {"gpus": 1}}, None,
     "execution.resources.gpus: unknown key"),
    ({}, SEARCH, "candidates.1.search: runs on Ray Tune: set execution.engine: ray"),
    ({"engine": "ray"}, {"space": {"hiden_size": {"int": [4, 16]}}},
     "candidates.1.search: space: unknown parameter(s) ['hiden_size'] for LSTMForecaster"),
    ({"engine": "ray"}, {"space": {"learning_rate": {"loguniform": [0, 0.1]}}},
     "candidates.1.search.space.learning_rate: loguniform bounds must be positive, not 0.0"),
    ({"engine": "ray"}, {"space": {"hidden_size": {"int": [16, 4]}}},
     "candidates.1.search.space.hidden_size: the low bound 16 must be below the high bound 4"),
    ({"engine": "ray"}, {"space": {"dropout": {"uniform": [0, 0.5], "choice": [0.1]}}},
     "candidates.1.search.space.dropout: give exactly one of loguniform, uniform, int or "
     "choice"),
    ({"engine": "ray"}, {"space": {"hidden_size": {"int": [4, 16]}}, "trials": 0},
     "candidates.1.search.trials: Input should be greater than 0"),
    ({"engine": "ray"}, {"space": {"hidden_size": {"int": [4, 16]}}, "scheduler": "pbt"},
     "candidates.1.search.scheduler: Input should be 'asha' or 'fifo'"),
])
def test_a_bad_execution_or_search_is_one_line_naming_its_key(
        tmp_path: Path, data_dir: Path, execution: dict[str, Any],
        search: dict[str, Any] | None, message: str) -> None:
    raw = _raw(tmp_path, data_dir, execution=execution)
    if search is not None:
        raw["candidates"][1]["search"] = search
    with pytest.raises(ConfigError) as error:
        parse_config(raw)
    assert error.value.problems == [error.value.problems[0]]  # exactly one problem
    assert error.value.problems[0].startswith(message), error.value.problems


def test_a_search_of_a_baseline_is_refused(tmp_path: Path, data_dir: Path) -> None:
    raw = _raw(tmp_path, data_dir, execution={"engine": "ray"})
    raw["candidates"][0]["search"] = {"space": {"sp": {"choice": [24, 168]}}}
    with pytest.raises(ConfigError, match=r"candidates\.0\.search: NaiveForecaster has no "
                                          r"training epochs to search over"):
        parse_config(raw)


def test_a_search_whose_fold_is_too_short_fails_before_training(
        tmp_path: Path, data_dir: Path) -> None:
    # 200 hours, two folds of 24: the first fold trains on 152, the search on 128; this
    # network needs 30 + 24 + 80 = 134
    raw = _raw(tmp_path, data_dir, execution={"engine": "ray"})
    raw["candidates"][1]["params"] |= {"input_len": 120, "validation_rows": 80}
    raw["candidates"][1]["search"] = SEARCH
    with pytest.raises(ConfigError, match=r"candidates\.1\.search: trials train on the first "
                                          r"fold's training window less its last 24 "
                                          r"observations \(128 on the shortest series\), and "
                                          r"the candidate needs at least 134"):
        prepare_race(parse_config(raw))


def test_an_unreachable_cluster_fails_before_anything_is_tracked(
        tmp_path: Path, data_dir: Path) -> None:
    port = _closed_port()
    config = parse_config(_raw(tmp_path, data_dir, execution={
        "engine": "ray", "address": f"127.0.0.1:{port}"}))
    with pytest.raises(ValueError, match=rf"^execution\.address: no Ray cluster reachable at "
                                         rf"127\.0\.0\.1:{port} \(Connection refused\)"):
        run_race(config, progress=False)
    assert not (tmp_path / "mlflow.db").exists()


def test_train_ray_names_an_unreachable_address_in_one_line(
        tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "race.yaml"
    path.write_text(yaml.safe_dump(_raw(tmp_path, data_dir)))
    port = _closed_port()
    with pytest.raises(SystemExit) as exited:
        main(["train", str(path), "--no-progress", "--ray", f"ray://127.0.0.1:{port}"])
    message = str(exited.value.code)
    assert message.startswith(f"forecaster train: execution.address: no Ray cluster reachable "
                              f"at ray://127.0.0.1:{port}") and "\n" not in message
    assert load_config(path, ray="").execution.engine == "ray"  # bare --ray
    assert load_config(path, ray="").execution.address is None  # RAY_ADDRESS, else local
    assert not (tmp_path / "mlflow.db").exists()


def test_the_local_engine_imports_no_ray() -> None:
    script = ("import sys\n"
              "import cli.main, pipelines.race\n"
              "from pipelines.config import ExecutionConfig\n"
              "from pipelines.execution import start_engine\n"
              "with start_engine(ExecutionConfig()) as engine:\n"
              "    assert engine.name == 'local'\n"
              "assert 'ray' not in sys.modules, 'ray imported'\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
