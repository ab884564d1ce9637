"""deploy/alertmanager/alertmanager.yml: checked by amtool, then run by a real Alertmanager
that, given a firing ForecastAccuracyDegraded, POSTs to a real scheduler's /retrain with the
bearer token from its credentials file, and a race starts.

amtool and Alertmanager come from Debian's ``prometheus-alertmanager`` package, which .ci/run
installs; without them these tests fail (never skip) with the command that installs them.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines.schedule import (
    TrainingMetrics,
    TrainingScheduler,
    cron_trigger,
    start_metrics_server,
)
from pipelines.scheduler_http import RETRAIN_PATH
from serving.first_forecast import wait_for_ok
from tests.conftest import _free_port
from tests.monitoring_support import require_binaries
from tests.serving_support import started
from tests.test_retrain_endpoint import (
    FAR_CRON,
    GatedJob,
    retrain_counts,
    runs_succeeded,
    wait_until,
)

ALERTMANAGER_CONFIG = Path(__file__).parents[1] / "deploy" / "alertmanager" / "alertmanager.yml"
TOKEN = "alertmanager-test-token"
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def binaries() -> dict[str, str]:
    return require_binaries({"amtool": "prometheus-alertmanager",
                             "prometheus-alertmanager": "prometheus-alertmanager"})


def amtool(binaries: dict[str, str], *arguments: str) -> str:
    result = subprocess.run([binaries["amtool"], *arguments], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, f"amtool {arguments}:\n{result.stdout}{result.stderr}"
    return result.stdout


def test_config_is_valid(binaries: dict[str, str]) -> None:
    assert "SUCCESS" in amtool(binaries, "check-config", str(ALERTMANAGER_CONFIG))


@pytest.mark.parametrize(("labels", "receiver"), [
    (["alertname=ForecastAccuracyDegraded", "severity=warning", "model_version=3"], "retrain"),
    (["alertname=ForecastServiceDown", "severity=critical"], "nobody"),
    (["alertname=RetrainingStale", "severity=warning"], "nobody"),
])
def test_only_the_drift_alert_retrains(binaries: dict[str, str], labels: list[str],
                                       receiver: str) -> None:
    routed = amtool(binaries, "config", "routes", "test",
                    f"--config.file={ALERTMANAGER_CONFIG}", *labels)
    assert routed.strip() == receiver


@pytest.fixture
def scheduler_port() -> Iterator[tuple[int, GatedJob, TrainingMetrics]]:
    """An in-process scheduler on a far cron, its /retrain behind TOKEN."""
    job = GatedJob()
    metrics = TrainingMetrics.create()
    scheduler = TrainingScheduler(job, cron_trigger(FAR_CRON), metrics)
    server = start_metrics_server(0, scheduler, addr="127.0.0.1", token=TOKEN)
    scheduler.start()
    try:
        yield server.server_port, job, metrics
    finally:
        job.gate.set()
        scheduler.shutdown(wait=True)
        server.shutdown()
        server.server_close()


def local_config(tmp_path: Path, retrain_port: int) -> Path:
    """The project's config with the compose addresses replaced by this machine's: the
    webhook to the test's scheduler, the token file in ``tmp_path``; no minute of group_wait."""
    config: dict[str, Any] = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    [route] = [r for r in config["route"]["routes"] if r["receiver"] == "retrain"]
    route["group_wait"] = "0s"
    [receiver] = [r for r in config["receivers"] if r["name"] == "retrain"]
    [webhook] = receiver["webhook_configs"]
    assert webhook["url"] == f"http://trainer:9101{RETRAIN_PATH}"
    webhook["url"] = f"http://127.0.0.1:{retrain_port}{RETRAIN_PATH}"
    token_file = tmp_path / "api-token"
    token_file.write_text(TOKEN + "\n")  # as `echo` or a secret manager writes it
    webhook["http_config"]["authorization"]["credentials_file"] = str(token_file)
    path = tmp_path / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def post_alerts(manager: str, alerts: list[dict[str, Any]]) -> None:
    request = urllib.request.Request(f"{manager}/api/v2/alerts", data=json.dumps(alerts).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def alert(name: str, **labels: str) -> dict[str, Any]:
    return {"labels": {"alertname": name, **labels},
            "annotations": {"summary": f"{name} (test)"},
            "startsAt": datetime.now(timezone.utc).isoformat()}


def test_the_drift_alert_starts_a_race_through_the_webhook(
        binaries: dict[str, str], tmp_path: Path,
        scheduler_port: tuple[int, GatedJob, TrainingMetrics]) -> None:
    port, job, metrics = scheduler_port
    manager_port = _free_port()
    manager = f"http://127.0.0.1:{manager_port}"
    log = tmp_path / "alertmanager.log"
    with started([binaries["prometheus-alertmanager"],
                  f"--config.file={local_config(tmp_path, port)}",
                  f"--storage.path={tmp_path / 'data'}",
                  f"--web.listen-address=127.0.0.1:{manager_port}",
                  "--cluster.listen-address="], log) as process:
        try:
            wait_for_ok(f"{manager}/-/ready", TIMEOUT_S, alive=lambda: process.poll() is None)
        except TimeoutError as error:
            pytest.fail(f"{error}:\n{log.read_text()}")
        # another alert first: it goes nowhere
        post_alerts(manager, [alert("ForecastServiceDown", severity="critical")])
        post_alerts(manager, [alert("ForecastAccuracyDegraded", severity="warning",
                                    model_name="m4-hourly", model_version="3")])
        assert job.entered.wait(TIMEOUT_S), f"no race started:\n{log.read_text()}"
        job.gate.set()
        wait_until(lambda: runs_succeeded(metrics) == 1, "the race to end")
    assert job.calls == 1
    assert retrain_counts(port) == {"started": 1, "coalesced": 0, "unauthorized": 0}
