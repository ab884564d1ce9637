"""Races on a real two-node Ray cluster on loopback (no mocks): a head started with
``ray start --head --block`` and a second node with ``ray start --address ... --block``, one
CPU each, each a process (group) this module holds and stops. The race's tasks run on both
nodes and give the leaderboard of the same race run locally, to 1e-6; the champion loads
from the registry; a worker killed mid-task is retried and the race completes; a search of
four trials is four nested runs, the best one's parameters the candidate's; a cluster that
goes away stops the race with one line, the champion untouched.

The race of the leaderboard test is the demo's (configs/quick.yaml: seven candidates), on eight
M4 Hourly series with networks of two epochs; the others are smaller:
two baselines and tiny LSTMs on the same series. Every address is on the
loopback range (the nodes at 127.0.0.2 and 127.0.0.3: Ray would replace 127.0.0.1 by the
machine's network address), with a token of the test's own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from ray._private.authentication_test_utils import reset_auth_token_state

from pipelines import registry
from pipelines.backtest import METRICS
from pipelines.config import RaceConfig, parse_config
from pipelines.ensemble import ENSEMBLE_MODEL
from pipelines.execution import check_reachable
from pipelines.race import RaceResult, prepare_race, run_race
from tests.pipeline_support import (
    LSTM,
    MLFLOW_VARIABLES,
    SNAIVE,
    clean_mlflow_environment,
    race_config,
)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
MODEL = "test-forecaster"
DEMO = REPO / "configs" / "quick.yaml"
DEMO_SERIES, DEMO_EPOCHS = 8, 2
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
START_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Cluster:
    address: str
    head: subprocess.Popen[bytes] | None
    worker: subprocess.Popen[bytes] | None
    env: dict[str, str]  # what a driver of the cluster runs with
    worker_node: str = ""  # the second node's id


def _ray_start(arguments: list[str], env: dict[str, str], log: Path
               ) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--block",
                                 "--num-cpus", "1", "--disable-usage-stats",
                                 "--dashboard-agent-listen-port", str(_free_port()),
                                 *arguments], stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=REPO, start_new_session=True)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the node's process group (raylet, GCS, workers), then SIGKILL what is left."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("ray")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # a second node needs it unset
    for name in MLFLOW_VARIABLES:  # each race names its own store
        env.pop(name, None)
    address = f"{HEAD_IP}:{port}"
    head = worker = None
    # this process drives the cluster too. Ray caches the token it read first (an earlier
    # test's in-process Ray, or ~/.ray/auth_token): drop that cache once the cluster's token
    # is set, and again once it is gone, as Ray's own tests do
    with pytest.MonkeyPatch.context() as patch:
        for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
            patch.setenv(name, env[name])
        reset_auth_token_state()
        try:
            head = _ray_start(["--head", "--port", str(port), "--node-ip-address", HEAD_IP,
                               "--dashboard-host", HEAD_IP,
                               "--dashboard-port", str(_free_port()),
                               "--ray-client-server-port", str(_free_port())], env,
                              root / "head.log")
            _wait_for_nodes(address, 1, head, root / "head.log")
            worker = _ray_start(["--address", address, "--node-ip-address", WORKER_IP], env,
                                root / "worker.log")
            nodes = _wait_for_nodes(address, 2, worker, root / "worker.log")
            yield Cluster(address, head, worker, env,
                          next(n.node_id for n in nodes if not n.is_head_node))
        finally:
            for process in (worker, head):
                if process is not None:
                    _stop(process)
    reset_auth_token_state()


def _wait_for_nodes(address: str, count: int, process: subprocess.Popen[bytes],
                    log: Path) -> list[Any]:
    from ray.util.state import list_nodes

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}:\n"
                               + log.read_text(errors="replace")[-3000:])
        try:
            nodes = [n for n in list_nodes(address=address, timeout=5) if n.state == "ALIVE"]
        except Exception:  # noqa: BLE001 - the GCS or the dashboard is not up yet
            nodes = []
        if len(nodes) >= count:
            return nodes
        time.sleep(1)
    raise RuntimeError(f"{count} Ray node(s) not alive after {START_TIMEOUT_S} s:\n"
                       + log.read_text(errors="replace")[-3000:])


def _config(store: Path, data_dir: Path, candidates: list[dict[str, Any]],
            execution: dict[str, Any] | None = None) -> RaceConfig:
    return race_config(store, data_dir, candidates, execution=execution or {},
                       tracking={"enable_system_metrics_logging": False})


def _demo(store: Path, execution: dict[str, Any]) -> RaceConfig:
    """The demo race (configs/quick.yaml: seven candidates), shrunk to eight M4 Hourly series
    and networks of two epochs to keep the test fast, tracked in ``store``."""
    raw = yaml.safe_load(DEMO.read_text())
    raw["data"]["max_series"] = DEMO_SERIES
    for candidate in raw["candidates"]:
        if "max_epochs" in candidate.get("params", {}):
            candidate["params"]["max_epochs"] = DEMO_EPOCHS
    raw["tracking"] = {"tracking_uri": f"sqlite:///{store / 'mlflow.db'}",
                       "artifact_location": str(store / "artifacts"),
                       "enable_system_metrics_logging": False}
    raw["execution"] = execution
    return parse_config(raw, base_dir=DEMO.parent)


@dataclass
class TwoRaces:
    local: RaceResult
    local_config: RaceConfig
    ray: RaceResult
    ray_config: RaceConfig


@pytest.fixture(scope="module")
def two_races(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory,
              data_dir: Path) -> TwoRaces:
    with clean_mlflow_environment():
        # both configs first: a race exports its tracking URI, which a config read later
        # would take from the environment
        local = _demo(tmp_path_factory.mktemp("local"), {})
        config = _demo(tmp_path_factory.mktemp("ray"),
                       {"engine": "ray", "address": cluster.address})
        return TwoRaces(run_race(local, progress=False), local,
                        run_race(config, progress=False), config)


def _tasks(cluster: Cluster, **filters: str) -> list[Any]:
    from ray.util.state import list_tasks

    return list_tasks(address=cluster.address, detail=True, limit=10_000, timeout=30,
                      filters=[(key, "=", value) for key, value in filters.items()])


def test_a_race_on_two_nodes_gives_the_local_leaderboard(two_races: TwoRaces,
                                                         cluster: Cluster) -> None:
    local, remote = two_races.local.leaderboard, two_races.ray.leaderboard
    assert list(remote.index) == list(local.index)
    assert (remote["status"] == "ok").all() and (local["status"] == "ok").all()
    np.testing.assert_allclose(remote.loc[local.index, list(METRICS)].to_numpy(float),
                               local[list(METRICS)].to_numpy(float), rtol=0, atol=1e-6)
    assert two_races.ray.winner == two_races.local.winner

    # every candidate's folds and refit were Ray tasks, on both nodes; the ensemble has none
    # (the driver combines its members' forecasts)
    candidates = set(local.index[local["model"] != ENSEMBLE_MODEL])
    finished = [t for t in _tasks(cluster, state="FINISHED")
                if t.name.split("/")[0] in candidates]
    assert {t.name for t in finished} >= {f"{c}/{part}" for c in candidates
                                          for part in ("fold_1", "fold_2", "refit")}
    assert len({t.node_id for t in finished}) == 2


def _logged(config: RaceConfig, result: RaceResult) -> dict[str, Any]:
    """Each run's params, metrics (but times), artifacts, and every network's curves."""
    with clean_mlflow_environment():
        mlflow.set_tracking_uri(config.tracking.tracking_uri)
        client = MlflowClient()
        logged = {}
        for run in client.search_runs([result.experiment_id]):
            run_id = run.info.run_id
            curves = {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
                      for key in run.data.metrics if key.endswith("_loss")}
            logged[run.info.run_name] = {
                "params": run.data.params,
                "metrics": {k: v for k, v in run.data.metrics.items()
                            if not k.endswith("seconds")},
                "artifacts": {a.path for a in client.list_artifacts(run_id)},
                "curves": curves, "status": run.info.status}
    return logged


def test_a_ray_race_logs_what_a_local_race_logs(two_races: TwoRaces) -> None:
    local = _logged(two_races.local_config, two_races.local)
    remote = _logged(two_races.ray_config, two_races.ray)
    assert set(remote) == set(local)
    race = local["m4-hourly-quick"]["params"]
    assert (race["execution.engine"], remote["m4-hourly-quick"]["params"]["execution.engine"]
            ) == ("local", "ray")
    for name, run in local.items():
        differ = {k for k, v in run["params"].items() if remote[name]["params"].get(k) != v}
        assert differ <= {"execution.engine", "execution.address"}, (name, differ)
        assert remote[name]["artifacts"] == run["artifacts"], name
        assert remote[name]["status"] == run["status"] == "FINISHED", name
        # the learning curves came back with the tasks: the same epochs, the same losses
        assert remote[name]["curves"] == run["curves"], name
        assert remote[name]["metrics"].keys() == run["metrics"].keys(), name
        for key, value in run["metrics"].items():
            assert remote[name]["metrics"][key] == pytest.approx(value, abs=1e-6), (name, key)
    assert {"fold_1/val_loss", "fold_2/val_loss", "val_loss"} <= set(local["lstm"]["curves"])
    assert "attention.png" in local["transformer"]["artifacts"]


def test_the_champion_of_a_ray_race_loads_from_the_registry(two_races: TwoRaces) -> None:
    result = two_races.ray
    with clean_mlflow_environment():
        mlflow.set_tracking_uri(two_races.ray_config.tracking.tracking_uri)
        mlflow.set_registry_uri(two_races.ray_config.tracking.tracking_uri)
        name = two_races.ray_config.registry.model_name
        assert registry.aliases(name) == {"champion": result.winner_version}
        model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
        long = prepare_race(two_races.ray_config).data.long
        history = long[long["series_id"] == long["series_id"].iloc[0]]
        forecast = model.predict(history, params={"horizon": 24})
    assert len(forecast) == 24 and np.isfinite(forecast["y_pred"]).all()


def test_a_worker_killed_mid_task_is_retried_and_the_race_completes(
        cluster: Cluster, tmp_path: Path, data_dir: Path) -> None:
    # a network long enough to be caught running: 15 epochs of 40 steps per fit
    # and two of them, so that both nodes train one
    slow = {**LSTM, "params": {**LSTM["params"], "max_epochs": 15, "steps_per_epoch": 40,
                               "patience": 15}}
    other = {**slow, "name": "lstm2", "params": {**slow["params"], "random_state": 1}}
    config = _config(tmp_path, data_dir, [SNAIVE, slow, other])
    path = tmp_path / "race.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", by_alias=True)))
    # bare --ray: the cluster in RAY_ADDRESS
    env = {**cluster.env, "RAY_ADDRESS": cluster.address}
    race = subprocess.Popen([sys.executable, "-m", "cli.main", "train", str(path), "--ray",
                             "--no-progress"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        killed = _kill_a_running_task(cluster, race, prefix="lstm")
        output, _ = race.communicate(timeout=600)
    finally:
        if race.poll() is None:
            race.kill()
    assert race.returncode == 0, output[-3000:]
    with clean_mlflow_environment():
        mlflow.set_tracking_uri(config.tracking.tracking_uri)
        runs = {run.info.run_name: run for run in mlflow.search_runs(
            experiment_names=[config.experiment_name], output_format="list")}
    assert {name: run.info.status for name, run in runs.items()} == {
        "test-race": "FINISHED", "snaive": "FINISHED", "lstm": "FINISHED",
        "lstm2": "FINISHED"}
    candidate = runs[killed.split("/")[0]]
    assert "registered_version" in candidate.data.tags and "error" not in candidate.data.tags
    retried = [t for t in _tasks(cluster, name=killed) if t.attempt_number >= 1]
    assert retried and retried[-1].state == "FINISHED", killed


def _kill_a_running_task(cluster: Cluster, race: subprocess.Popen[str], prefix: str) -> str:
    """SIGKILL the worker process of a task of ``prefix`` running on the second node, once
    it has run a moment; returns the task's name."""
    deadline = time.monotonic() + 300
    seen = set()
    while time.monotonic() < deadline and race.poll() is None:
        tasks = _tasks(cluster, state="RUNNING")
        seen |= {(t.name, t.node_id == cluster.worker_node, t.attempt_number) for t in tasks}
        running = [t for t in tasks if t.node_id == cluster.worker_node
                   and t.name.startswith(prefix) and t.attempt_number == 0 and t.worker_pid]
        if running:
            time.sleep(1)  # mid-task, not at its start
            os.kill(running[0].worker_pid, signal.SIGKILL)
            return running[0].name
        time.sleep(0.3)
    raise AssertionError(f"no task of the race ran on the second node to be killed: {seen}")


def test_a_search_of_four_trials_gives_the_candidate_the_best_parameters(
        cluster: Cluster, tmp_path: Path, data_dir: Path) -> None:
    searched = {**LSTM, "search": {"space": {"hidden_size": {"int": [4, 16]},
                                             "learning_rate": {"loguniform": [1e-3, 3e-2]}},
                                   "trials": 4}}
    with clean_mlflow_environment():
        config = _config(tmp_path, data_dir, [SNAIVE, searched],
                         {"engine": "ray", "address": cluster.address})
        result = run_race(config, progress=False)
        client = MlflowClient()
        runs = client.search_runs([result.experiment_id])
        tags = client.get_model_version(MODEL, str(result.versions["lstm"])).tags
    candidate = next(r for r in runs if r.info.run_name == "lstm")
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == candidate.info.run_id]
    assert len(trials) == 4
    assert result.leaderboard.loc["lstm", "status"] == "ok"
    [best] = [t for t in trials if t.data.tags["search_best"] == "true"]
    completed = [t for t in trials if t.data.tags["search_status"] == "completed"]
    assert best in completed
    assert best.data.metrics["mase"] == min(t.data.metrics["mase"] for t in completed)
    for key in ("hidden_size", "learning_rate"):
        assert candidate.data.params[f"search.best.{key}"] == best.data.params[key]
        assert candidate.data.params[f"model.{key}"] == best.data.params[key]
    # the registered version records the tuned parameters: what a later race refits
    recorded = yaml.safe_load(tags[registry.TAG_CONFIG])["params"]
    assert str(recorded["hidden_size"]) == best.data.params["hidden_size"]


def test_a_cluster_that_goes_away_stops_the_race_in_one_line(
        cluster: Cluster, tmp_path: Path, data_dir: Path) -> None:
    """A cluster of its own (the module's stays up), its head killed while a network trains:
    the race exits non-zero with one line of ours, and the champion is as it was."""
    with clean_mlflow_environment():
        # a champion first, from a local race into the same store
        before = run_race(_config(tmp_path, data_dir, [SNAIVE]), progress=False)
        assert before.promoted
        endless = {**LSTM, "params": {**LSTM["params"], "max_epochs": 5000, "patience": 5000}}
        config = _config(tmp_path, data_dir, [SNAIVE, endless])
    path = tmp_path / "race.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", by_alias=True)))
    port, ip = _free_port(), "127.0.0.4"
    head = _ray_start(["--head", "--port", str(port), "--node-ip-address", ip,
                       "--include-dashboard", "false"], cluster.env, tmp_path / "head.log")
    race = None
    try:
        address = f"{ip}:{port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and head.poll() is None:
            with contextlib.suppress(ValueError):
                check_reachable(address, timeout=1)
                break
            time.sleep(1)
        env = {key: value for key, value in cluster.env.items()
               if not key.startswith("MLFLOW_")}
        race = subprocess.Popen([sys.executable, "-m", "cli.main", "train", str(path),
                                 "--ray", address, "--no-progress"], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(25)  # connected, the data shared, the network training
        assert race.poll() is None, race.communicate()[0][-3000:]
        _stop(head)
        output, _ = race.communicate(timeout=120)
    finally:
        _stop(head)
        if race is not None and race.poll() is None:
            race.kill()
    ours = [line for line in output.splitlines() if line.startswith("forecaster train:")]
    assert race.returncode != 0
    assert ours == [f"forecaster train: the Ray cluster at {address} went away (no answer); "
                    "the race stopped and the champion is untouched"], output[-3000:]
    with clean_mlflow_environment():
        mlflow.set_tracking_uri(config.tracking.tracking_uri)
        mlflow.set_registry_uri(config.tracking.tracking_uri)
        assert registry.aliases(MODEL) == {"champion": before.winner_version}


def test_bare_ray_without_an_address_races_on_a_ray_of_its_own(
        tmp_path: Path, data_dir: Path) -> None:
    """``--ray`` with neither an address nor RAY_ADDRESS: a Ray started in the process (a new
    one, not the module's cluster that `ray start` left on this machine), on loopback."""
    with clean_mlflow_environment():
        config = _config(tmp_path, data_dir, [SNAIVE])
    path = tmp_path / "race.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", by_alias=True)))
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("MLFLOW_", "RAY_"))}
    done = subprocess.run([sys.executable, "-m", "cli.main", "train", str(path), "--ray",
                           "--no-progress"], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "winner: snaive (v1" in done.stdout
    with clean_mlflow_environment():
        mlflow.set_tracking_uri(config.tracking.tracking_uri)
        (race,) = [run for run in mlflow.search_runs(experiment_names=[config.experiment_name],
                                                     output_format="list")
                   if run.info.run_name == "test-race"]
    assert race.data.params["execution.engine"] == "ray"
    assert race.data.params["execution.address"] == "None"
