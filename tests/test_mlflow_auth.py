"""MLflow's basic-auth app as docker-compose.yml runs it, on a real server and PostgreSQL.

The server runs the compose ``mlflow`` service's command and environment (.env = .env.example):
the basic-auth app with deploy/mlflow-auth/basic_auth.ini, its users in the server's own
database through libpq's variables; only the artifacts go to a local folder instead of MinIO,
and the database is a fresh one on the local PostgreSQL. The users are made by the step compose
runs (create_users.py, with the ``mlflow-users`` service's environment). Then, over HTTP:

- no login, or a wrong password: 401;
- the trainer's user runs a whole (tiny) race: runs, registered versions, @champion;
- the service's user finds and downloads the champion, and every write it tries is a 403;
- the same step run again with a new password rotates it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipelines.race import run_race
from pipelines.registry import CHAMPION
from tests.conftest import _free_port, _postgres_admin, _stop, _wait_for_health
from tests.pipeline_support import clean_mlflow_environment
from tests.test_deploy_manifests import command_of, compose, environment, image_file
from tests.test_pipeline_postgres import MODEL_NAME, tiny_race, write_hourly_csv

pytestmark = pytest.mark.slow

POSTGRES = {"host": "127.0.0.1", "port": "5432", "user": "postgres"}
# what compose's mlflow service has and this server does without: MinIO
S3_VARIABLES = ("MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def services() -> dict:
    return compose("docker-compose.yml")["services"]


def login(service: str) -> tuple[str, str]:
    """The MLflow user a compose service logs in as."""
    env = environment(services()[service])
    return env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]


def create_users(uri: str, **overrides: str) -> subprocess.CompletedProcess[str]:
    """create_users.py, as compose's ``mlflow-users`` runs it, against ``uri``."""
    env = {**os.environ, **environment(services()["mlflow-users"]),
           "MLFLOW_TRACKING_URI": uri, **overrides}
    return subprocess.run([sys.executable, str(image_file("/app/mlflow-auth/create_users.py"))],
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    admin = _postgres_admin()
    database = f"forecaster_auth_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{database}"')
    root = tmp_path_factory.mktemp("mlflow_auth")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"

    spec = services()["mlflow"]
    argv = command_of(spec)
    assert argv[:2] == ["mlflow", "server"] and "basic-auth" in argv
    local = {"--artifacts-destination": str(root / "artifacts"), "--host": "127.0.0.1",
             "--port": str(port)}
    argv = [local.get(argv[i - 1], arg) if i else arg for i, arg in enumerate(argv)]
    env = {key: value for key, value in environment(spec).items() if key not in S3_VARIABLES}
    assert env["PGHOST"] == "postgres"  # compose's; here the local server (trust, no password)
    env.pop("PGPASSWORD")
    env.update(
        PGHOST=POSTGRES["host"], PGPORT=POSTGRES["port"], PGUSER=POSTGRES["user"],
        PGDATABASE=database,
        MLFLOW_BACKEND_STORE_URI="postgresql+psycopg2://{user}@{host}:{port}/".format(
            **POSTGRES) + database,
        MLFLOW_AUTH_CONFIG_PATH=str(image_file(env["MLFLOW_AUTH_CONFIG_PATH"])))
    process_env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PG"))},
                   **env, "OMP_NUM_THREADS": "1"}
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", *argv[1:], "--workers", "1"], stdout=log,
            stderr=subprocess.STDOUT, env=process_env, cwd=root, start_new_session=True)
    try:
        _wait_for_health(server, uri, log_path)
        result = create_users(uri)
        assert result.returncode == 0, result.stdout + result.stderr
        yield uri
    finally:
        _stop(server)
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def as_user(monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """Log MLflow's client in as a user (the variables it reads at every request)."""
    with clean_mlflow_environment():
        def switch(user: tuple[str, str]) -> None:
            monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user[0])
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", user[1])

        yield switch


def status_of(call) -> int:
    try:
        call()
    except MlflowException as error:
        return error.get_http_status_code()
    return 200


def test_trainer_writes_and_service_only_reads(auth_server: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               as_user) -> None:
    uri = auth_server
    probe = f"{uri}/api/2.0/mlflow/registered-models/search"
    assert requests.get(probe, timeout=10).status_code == 401
    trainer, service = login("trainer"), login("service")
    assert requests.get(probe, auth=(service[0], "wrong-password"), timeout=10).status_code == 401

    # the trainer: a whole race, registering every candidate and promoting the winner
    as_user(trainer)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    write_hourly_csv(tmp_path / "hourly.csv")
    result = run_race(tiny_race(tmp_path / "hourly.csv"), progress=False)
    assert result.promoted and result.champion_version == result.winner_version

    # the service: finds the champion and downloads it ...
    as_user(service)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    champion = client.get_model_version_by_alias(MODEL_NAME, CHAMPION)
    assert int(champion.version) == result.winner_version
    local = mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}@{CHAMPION}",
                                                dst_path=str(tmp_path / "champion"),
                                                tracking_uri=uri)
    assert (Path(local) / "MLmodel").is_file()
    # ... and may change nothing the trainer made
    other = next(v for v in result.versions.values() if v != result.winner_version)
    writes = {
        "move @champion": lambda: client.set_registered_model_alias(MODEL_NAME, CHAMPION, other),
        "tag a version": lambda: client.set_model_version_tag(
            MODEL_NAME, str(other), "race_complete", "true"),
        "register a version": lambda: client.create_model_version(
            MODEL_NAME, champion.source, run_id=champion.run_id),
        "delete a version": lambda: client.delete_model_version(MODEL_NAME, str(other)),
        "log to the race's run": lambda: client.log_metric(result.run_id, "mase", 0.0),
        "rename the model": lambda: client.rename_registered_model(MODEL_NAME, "taken"),
    }
    assert {what: status_of(call) for what, call in writes.items()} == dict.fromkeys(writes, 403)
    artifact = f"{uri}/api/2.0/mlflow-artifacts/artifacts/{result.experiment_id}/injected.py"
    assert requests.put(artifact, data=b"print('pwned')", auth=service,
                        timeout=10).status_code == 403
    assert int(client.get_model_version_by_alias(MODEL_NAME, CHAMPION).version) == (
        result.winner_version)


def test_create_users_rotates_a_password(auth_server: str) -> None:
    probe = f"{auth_server}/api/2.0/mlflow/registered-models/search"
    username, old = login("service")
    new = "rotated-service-password"
    result = create_users(auth_server, MLFLOW_SERVICE_PASSWORD=new)
    assert result.returncode == 0, result.stdout + result.stderr
    try:
        assert requests.get(probe, auth=(username, old), timeout=10).status_code == 401
        assert requests.get(probe, auth=(username, new), timeout=10).status_code == 200
    finally:
        # put the compose password back for the other tests of the module
        assert create_users(auth_server).returncode == 0
