"""POST /explain for real: a race of a tiny Transformer and a tiny hybrid (beside the seasonal
naive baseline) on M4 Hourly, its champion served by a real ``forecaster serve`` while the
alias moves to each model in turn. Over HTTP the answer equals ``attention_maps`` of the
registered model spread over the time steps (tests/explain_support.py), bad input gets the 4xx
/forecast gives, a champion without attention gets a 400 naming the families that explain, and
fuzzing finds no 5xx. The race logged both families' heat maps and forecast plots, and
``forecaster explain CONFIG`` draws the champion's."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from matplotlib import image
from mlflow import MlflowClient

from cli.main import main
from forecaster.data import SERIES, panel_to_long
from pipelines import registry
from pipelines.config import RaceConfig
from pipelines.race import RaceResult
from tests.explain_support import reference_attention
from tests.pipeline_support import HYBRID, TRANSFORMER, clean_mlflow_environment
from tests.serving_support import call, race, running_service, series_of
from tests.test_serving_e2e import BAD_REQUEST_IDS, BAD_REQUESTS, MAX_BODY

pytestmark = pytest.mark.slow
MODEL = "test-forecaster"
FAMILIES = "the families that explain are TransformerForecaster, HybridForecaster"


@dataclass
class Served:
    url: str
    config: RaceConfig
    race: RaceResult
    panel: pd.DataFrame
    store: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[Served]:
    store = tmp_path_factory.mktemp("explain-e2e")
    config, result, panel = race(store, data_dir, [TRANSFORMER, HYBRID])
    assert set(result.versions) == {"transformer", "hybrid", "snaive"}
    with running_service(config, store / "serve.log", poll_seconds="1",
                         max_body_bytes=str(MAX_BODY)) as url:
        yield Served(url, config, result, panel, store)


def serve(served: Served, candidate: str) -> int:
    """Point @champion at ``candidate``'s version; its number once the service answers with
    it."""
    version = served.race.versions[candidate]
    with clean_mlflow_environment():
        mlflow.set_registry_uri(served.config.tracking_uri)
        registry.set_alias(MODEL, registry.CHAMPION, version)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, info = call(f"{served.url}/model")
        if status == 200 and info["version"] == version:
            return version
        time.sleep(0.3)
    pytest.fail(f"the service never served {candidate} (v{version})")


def test_the_race_logs_both_heat_maps_and_forecast_plots(served: Served) -> None:
    client = MlflowClient(served.config.tracking_uri)
    runs = {run.info.run_name: run.info.run_id
            for run in client.search_runs([served.race.experiment_id])}
    for name in ("transformer", "hybrid"):
        artifacts = {item.path for item in client.list_artifacts(runs[name])}
        assert {"attention.png", "explanation.png", "forecasts.png"} <= artifacts, name
    naive = {item.path for item in client.list_artifacts(runs["snaive"])}
    assert "forecasts.png" in naive and "explanation.png" not in naive


@pytest.mark.parametrize("candidate", ["transformer", "hybrid"])
def test_the_http_answer_equals_the_models_attention_maps(served: Served,
                                                          candidate: str) -> None:
    version = serve(served, candidate)
    assert call(f"{served.url}/model")[1]["explains"] is True
    series = series_of(served.panel)
    series[0] |= {"start": "2024-01-01T00:00:00", "freq": "h"}
    status, body = call(f"{served.url}/explain", {"series": series, "horizon": 24})
    assert status == 200, body
    assert body["model"] == {"name": MODEL, "version": version, "alias": "champion"}
    with clean_mlflow_environment():
        mlflow.set_tracking_uri(served.config.tracking_uri)
        estimator = mlflow.pyfunc.load_model(f"models:/{MODEL}/{version}") \
            .unwrap_python_model().estimator
    assert [e["id"] for e in body["explanations"]] == [s["id"] for s in series]
    for request, explanation in zip(series, body["explanations"], strict=True):
        attention = np.asarray(explanation["attention"])
        assert attention.shape == (24, 48)  # the horizon x the input window
        np.testing.assert_allclose(attention.sum(axis=1), 1.0, rtol=1e-6)
        np.testing.assert_allclose(
            attention, reference_attention(estimator, np.asarray(request["values"], np.float32)),
            rtol=1e-4, atol=1e-6)
        assert len(explanation["top_inputs"]) == 5
        assert "covariate_importance" not in explanation
    times = body["explanations"][0]["input_timestamps"]
    assert (times[0], times[-1]) == ("2024-01-07T08:00:00", "2024-01-09T07:00:00")  # 152..199


def test_a_champion_without_attention_gets_a_400(served: Served) -> None:
    version = serve(served, "snaive")
    assert call(f"{served.url}/model")[1]["explains"] is False
    body = {"series": series_of(served.panel)[:1], "horizon": 3}
    status, answer = call(f"{served.url}/explain", body)
    assert status == 400
    assert answer["error"] == (f"model {MODEL} v{version} (NaiveForecaster) has no attention "
                               f"to explain its forecasts with; {FAMILIES}")
    assert answer["detail"][0]["type"] == "model_cannot_explain"
    assert call(f"{served.url}/forecast", body)[0] == 200


@pytest.mark.parametrize("body, status, names", BAD_REQUESTS, ids=BAD_REQUEST_IDS)
def test_bad_input_gets_the_4xx_forecast_gives(served: Served, body: bytes, status: int,
                                               names: str) -> None:
    serve(served, "hybrid")
    got, answer = call(f"{served.url}/explain", body)
    assert got == status, answer
    assert names in json.dumps(answer).lower()
    assert call(f"{served.url}/forecast", body)[0] == status  # as /forecast answers it
    good = {"series": series_of(served.panel)[:1], "horizon": 3}
    assert call(f"{served.url}/explain", good)[0] == 200  # and it keeps explaining


def test_fuzzing_explain_finds_no_server_error(served: Served) -> None:
    serve(served, "hybrid")
    schema = schemathesis.openapi.from_url(f"{served.url}/docs.json")
    [operation] = [result.ok() for result in schema.get_all_operations()
                   if result.ok().path == "/explain"]

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    @given(case=operation.as_strategy())
    def no_server_error(case: schemathesis.Case) -> None:
        response = case.call(timeout=30)
        assert response.status_code < 500, \
            f"{case.method} {case.path}: {response.status_code} {response.text[:500]}"

    no_server_error()


def test_the_explain_command_draws_the_champion(served: Served, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    serve(served, "transformer")
    config = tmp_path / "race.yaml"
    config.write_text(yaml.safe_dump(served.config.model_dump(mode="json")))
    long = panel_to_long(served.panel)
    first = long[SERIES].iloc[0]
    series = tmp_path / "series.csv"
    long[long[SERIES] == first].to_csv(series, index=False)
    out = tmp_path / "heatmap.png"
    with clean_mlflow_environment():
        main(["explain", str(config), "--series", str(series), "--out", str(out)])
    assert f"series {first}, 24 forecast steps x 48 input steps" in capsys.readouterr().out
    assert image.imread(out).shape[:2] == (840, 1320)


def test_refusals_are_warnings_without_traceback(served: Served) -> None:
    """Last in this file: every 4xx above is one WARNING line, none an ERROR or a traceback."""
    log = (served.store / "serve.log").read_text(errors="replace")
    assert "POST /explain: 400" in log
    assert "Traceback" not in log and "[ERROR]" not in log
