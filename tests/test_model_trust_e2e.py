"""The registry cannot run code in the service, and a replica keeps a last good model: a real
race into a real ``mlflow server`` on PostgreSQL, a real ``forecaster serve`` on it.

A version made from the champion's files with its Python code changed to write a marker file is
registered and moved to @champion three ways (without the race's tags, with the champion's
tags, with its own digest under the champion's signature): each is refused before any of its
code is imported, the marker never appears, and the service keeps serving its model. A replica
restarted while the registry is unreachable, or while @champion is a version it refuses, serves
its cached last good model and is ready. A replica with nothing to serve answers 503s that name
neither the registry's URI, its credentials nor a path, with an error id found in its log. Two
replicas on one BentoML home keep their own Prometheus folders, removed when they exit.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from prometheus_client.parser import text_string_to_metric_families

from pipelines import registry, signing
from pipelines.race import run_race
from pipelines.sources import load_race_data
from tests.conftest import _free_port
from tests.pipeline_support import SNAIVE, clean_mlflow_environment, race_config
from tests.serving_support import call, series_of, serving

pytestmark = pytest.mark.slow
KEY = "the key of the trainer and the service"


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` with these labels on the service's /metrics."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == name
               and all(sample.labels.get(k) == v for k, v in labels.items()))


def wait_until(check: Callable[[], bool], what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture
def signed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The race in this process signs with KEY, as the trainer of a deployment does."""
    monkeypatch.setenv(signing.KEY_VARIABLE, KEY)
    yield


def race_into(server: str, store: Path, data_dir: Path, model: str) -> tuple[int, dict]:
    """A seasonal naive race into the server under ``model``: the champion's version, and a
    request for two of the series it trained on."""
    with clean_mlflow_environment():
        config = race_config(store, data_dir, [SNAIVE], registry={"model_name": model},
                             tracking={"tracking_uri": server, "artifact_location": None,
                                       "experiment_name": model,
                                       "enable_system_metrics_logging": False})
        result = run_race(config, progress=False)
        panel: pd.DataFrame = load_race_data(config.data).panel
    assert result.promoted
    return result.champion_version, {"series": series_of(panel)[:2], "horizon": 6}


def register_tampered(server: str, model: str, champion: int, marker: Path, folder: Path,
                      tags: str) -> int:
    """What someone who can write to MLflow does: the champion's files with its code changed
    to write ``marker`` when imported, registered as a new version with ``tags``: "none", the
    champion's ("copied"), or the champion's with the new files' own digest ("own digest")."""
    client = MlflowClient(server, server)
    files = signing.download(client.get_model_version_download_uri(model, str(champion)),
                             folder, server)
    code = files / "pyfunc_model.py"
    code.write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
                    + code.read_text())
    champion_tags = client.get_model_version(model, str(champion)).tags
    chosen = {"none": {}, "copied": champion_tags,
              "own digest": {**champion_tags,
                             signing.TAG_FILES: signing.files_digest(files)}}[tags]
    experiment = client.get_experiment_by_name(model).experiment_id
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(files), "model")
    client.set_terminated(run.info.run_id)
    version = client.create_model_version(model, f"runs:/{run.info.run_id}/model",
                                          run_id=run.info.run_id, tags=chosen)
    return int(version.version)


def test_a_version_no_race_vouched_for_never_runs_in_the_service(
        mlflow_server: str, tmp_path: Path, data_dir: Path, signed: None) -> None:
    model = "trust-e2e"
    champion, body = race_into(mlflow_server, tmp_path, data_dir, model)
    marker = tmp_path / "the-registry-ran-code-here"
    client = MlflowClient(mlflow_server, mlflow_server)
    log = tmp_path / "serve.log"
    with serving(mlflow_server, log, ["--model-name", model], poll_seconds="1",
                 cache_dir=str(tmp_path / "cache"),
                 environment={signing.KEY_VARIABLE: KEY}) as url:
        assert call(f"{url}/model")[1]["version"] == champion
        for n, (tags, reason) in enumerate([("none", "incomplete"), ("copied", "files"),
                                            ("own digest", "signature")], start=1):
            version = register_tampered(mlflow_server, model, champion, marker,
                                        tmp_path / f"attack-{n}", tags)
            client.set_registered_model_alias(model, registry.CHAMPION, str(version))
            wait_until(lambda reason=reason: metric(url, "forecaster_model_refusals_total",
                                                    reason=reason) == 1,
                       f"the refusal of v{version} ({tags})")
            assert not marker.exists(), f"the code of v{version} ({tags}) ran in the service"
            status, info = call(f"{url}/model")
            assert (status, info["version"], info["source"]) == (200, champion, "registry")
            status, answer = call(f"{url}/forecast", body)
            assert status == 200 and answer["model"]["version"] == champion
            assert metric(url, "forecaster_registry_divergence") == 1
        assert metric(url, "forecaster_model_loads_total", outcome="failed") == 0
        # the alias back on the race's version: no longer diverging
        client.set_registered_model_alias(model, registry.CHAMPION, str(champion))
        wait_until(lambda: metric(url, "forecaster_registry_divergence") == 0,
                   "the divergence to end")
    assert not marker.exists()
    text = log.read_text(errors="replace")
    refused = [line for line in text.splitlines() if "refused before loading" in line]
    assert len(refused) == 3 and all("[ERROR]" in line and re.search(r"error [0-9a-f]{12}: ",
                                                                      line) for line in refused)


def prometheus_folder(log: Path) -> Path:
    [folder] = re.findall(r"Prometheus multiprocess folder: (\S+)", log.read_text())
    return Path(folder)


def test_a_replica_without_its_registry_serves_its_last_good_model(
        mlflow_server: str, tmp_path: Path, data_dir: Path, signed: None) -> None:
    model = "cache-e2e"
    champion, body = race_into(mlflow_server, tmp_path, data_dir, model)
    cache = tmp_path / "cache"
    home = str(tmp_path / "bentoml-home")  # one BentoML home for all the replicas here
    env = {signing.KEY_VARIABLE: KEY, "BENTOML_HOME": home}
    first = tmp_path / "first.log"
    with serving(mlflow_server, first, ["--model-name", model], cache_dir=str(cache),
                 environment=env) as url:
        assert call(f"{url}/model")[1]["source"] == "registry"
        expected = call(f"{url}/forecast", body)[1]
    assert not prometheus_folder(first).exists()  # removed at exit

    # restarted while the registry does not answer (credentials in its URI: never shown)
    dead = f"http://trainer:s3cret@127.0.0.1:{_free_port()}"
    second = tmp_path / "second.log"
    with serving(dead, second, ["--model-name", model], cache_dir=str(cache),
                 environment=env) as url:
        status, info = call(f"{url}/model")
        assert (status, info["version"], info["source"]) == (200, champion, "cache")
        assert call(f"{url}/forecast", body) == (200, expected)
        assert metric(url, "forecaster_served_from_cache") == 1
        forecasts = metric(url, "forecaster_series_forecast_total")

        # a replica with no last good model, on the same BentoML home: not ready, and its 503s
        # name no URI, credential or path; their error id leads to the details in its log
        third = tmp_path / "third.log"
        with serving(dead, third, ["--model-name", model], ready="/livez",
                     cache_dir=str(tmp_path / "empty-cache"), environment=env) as other:
            wait_until(lambda: "unreachable" in str(call(f"{other}/readyz")[1]),
                       "the registry to be found unreachable")
            ids = set()
            for path, request in (("/forecast", body), ("/model", None), ("/readyz", None)):
                status, text = call(f"{other}{path}", request)
                assert status == 503, (path, text)
                said = re.fullmatch(r"(no model is served|not ready): the model registry is "
                                    r"unreachable \(error id ([0-9a-f]{12})\)", text["error"])
                assert said, (path, text)
                assert text.get("error_id", said[2]) == said[2]
                ids.add(said[2])
                for secret in ("s3cret", "trainer", "127.0.0.1", "/tmp", str(tmp_path)):
                    assert secret not in str(text), (path, secret, text)
            details = [line for line in third.read_text().splitlines()
                       if any(f"error {error_id}: " in line for error_id in ids)]
            assert details and "could not read cache-e2e@champion" in details[0]
            assert "s3cret" not in third.read_text()  # nor in the log
            # the second replica's metrics survived the third's start on the same home
            assert metric(url, "forecaster_series_forecast_total") == forecasts > 0
            assert prometheus_folder(third) != prometheus_folder(second)

    # restarted while @champion is a version no race vouched for: the last good model again
    client = MlflowClient(mlflow_server, mlflow_server)
    source = client.get_model_version(model, str(champion)).source  # models:/<logged model>
    unvouched = client.create_model_version(model, source,
                                            model_id=source.removeprefix("models:/"))
    client.set_registered_model_alias(model, registry.CHAMPION, unvouched.version)
    with serving(mlflow_server, tmp_path / "fourth.log", ["--model-name", model],
                 cache_dir=str(cache), environment=env) as url:
        status, info = call(f"{url}/model")
        assert (status, info["version"], info["source"]) == (200, champion, "cache")
        assert metric(url, "forecaster_model_refusals_total", reason="incomplete") == 1
        assert metric(url, "forecaster_registry_divergence") == 1
    # the one download kept is the last good model; nothing else was left behind
    assert not any((cache / ".staging").iterdir())
    kept = sorted(entry.name for entry in (cache / f"{model}@champion").iterdir())
    assert kept == ["last", f"v{champion}"]
