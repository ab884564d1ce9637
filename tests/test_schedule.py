"""The retraining scheduler: real APScheduler and prometheus-client, with a fake training job
and fast triggers injected so that each test takes a second or two."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.interval import IntervalTrigger
from prometheus_client.parser import text_string_to_metric_families

from pipelines import schedule as schedule_module
from pipelines.api_token import NO_TOKEN_NOTE, TOKEN_VARIABLE
from pipelines.schedule import (
    Interrupted,
    RunAtStart,
    TrainingMetrics,
    TrainingScheduler,
    cron_trigger,
    interrupt_on_signals,
    start_metrics_server,
    train_once,
)
from tests.conftest import _free_port

REPO = Path(__file__).resolve().parents[1]
QUICK_CONFIG = REPO / "configs" / "quick.yaml"


class FireTimes(BaseTrigger):
    """Fires at once, then ``count - 1`` more times, each ``interval`` seconds after the
    scheduler handled the previous fire, then never again.

    A finite trigger makes the number of runs exact (with an endless one, a run could sneak in
    between the last awaited run and the shutdown), and timing each fire from the previous one
    keeps a stalled scheduler thread on a busy machine from finding two fires due at once,
    which coalescing would merge into one run.
    """

    def __init__(self, count: int, interval: float) -> None:
        self.count = count
        self.interval = timedelta(seconds=interval)
        self.fired: set[datetime] = set()  # APScheduler asks more than once per fire
        self.timezone = timezone.utc

    def get_next_fire_time(self, previous_fire_time: datetime | None,
                           now: datetime) -> datetime | None:
        if previous_fire_time is None:
            return now
        self.fired.add(previous_fire_time)
        return now + self.interval if len(self.fired) < self.count else None


class Script:
    """A fake training job that plays its steps in order: each returns a result or raises."""

    def __init__(self, *steps: Callable[[], Any]) -> None:
        self.steps = list(steps)
        self.calls = 0
        self.done = threading.Event()

    def __call__(self) -> Any:
        step = self.steps[self.calls]
        self.calls += 1
        if self.calls == len(self.steps):
            self.done.set()
        return step()


def champion(version: int, score: float) -> Callable[[], SimpleNamespace]:
    return lambda: SimpleNamespace(champion_version=version, champion_score=score)


def boom() -> None:
    raise RuntimeError("training exploded")


def sample(metrics: TrainingMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics and parse it: {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def metrics() -> TrainingMetrics:
    return TrainingMetrics.create()


@pytest.fixture
def metrics_port(metrics: TrainingMetrics) -> Iterator[int]:
    # a scheduler never started: these tests read its metrics (POST /retrain, on the same
    # server, is test_retrain_endpoint.py's)
    scheduler = TrainingScheduler(lambda: None, IntervalTrigger(hours=1), metrics)
    server = start_metrics_server(0, scheduler, addr="127.0.0.1")
    yield server.server_port
    server.shutdown()
    server.server_close()


def run_until_done(scheduler: TrainingScheduler, done: threading.Event,
                   timeout: float = 20) -> None:
    scheduler.start()
    try:
        assert done.wait(timeout), "the scheduled runs did not happen in time"
    finally:
        scheduler.shutdown(wait=True)  # waits for the last run to record its metrics


def test_a_failing_run_is_counted_and_the_next_one_still_fires(
        metrics: TrainingMetrics, metrics_port: int, caplog: pytest.LogCaptureFixture) -> None:
    job = Script(champion(3, 0.9), boom, champion(4, 0.7))
    scheduler = TrainingScheduler(job, FireTimes(3, interval=0.3), metrics)
    before = time.time()
    with caplog.at_level(logging.INFO, logger="pipelines.schedule"):
        run_until_done(scheduler, job.done)

    assert job.calls == 3
    assert sample(metrics, "forecaster_training_runs_total", outcome="success") == 2
    assert sample(metrics, "forecaster_training_runs_total", outcome="failure") == 1
    assert sample(metrics, "forecaster_champion_version") == 4
    assert sample(metrics, "forecaster_champion_score") == pytest.approx(0.7)
    last_success = sample(metrics, "forecaster_training_last_success_timestamp_seconds")
    last_failure = sample(metrics, "forecaster_training_last_failure_timestamp_seconds")
    assert last_success is not None and last_failure is not None
    assert before <= last_failure <= last_success <= time.time()
    assert 0 <= (sample(metrics, "forecaster_training_last_run_duration_seconds") or -1) < 5
    # the failure is logged with its traceback
    failed = [r for r in caplog.records if r.message.startswith("training run failed")]
    assert len(failed) == 1 and failed[0].exc_info is not None
    assert "training exploded" in caplog.text

    # the same numbers over real HTTP, as Prometheus scrapes them
    scraped = scrape(metrics_port)
    assert scraped["forecaster_training_runs_total", (("outcome", "success"),)] == 2
    assert scraped["forecaster_training_runs_total", (("outcome", "failure"),)] == 1
    assert scraped["forecaster_champion_version", ()] == 4
    assert scraped["forecaster_champion_score", ()] == pytest.approx(0.7)
    assert scraped["forecaster_training_last_success_timestamp_seconds", ()] == last_success


def test_both_outcomes_are_exported_before_any_run(metrics: TrainingMetrics,
                                                   metrics_port: int) -> None:
    scraped = scrape(metrics_port)
    assert scraped["forecaster_training_runs_total", (("outcome", "success"),)] == 0
    assert scraped["forecaster_training_runs_total", (("outcome", "failure"),)] == 0


def test_runs_never_overlap(metrics: TrainingMetrics) -> None:
    lock = threading.Lock()
    running = 0
    most = 0
    calls = 0
    two_done = threading.Event()

    def slow_job() -> None:
        nonlocal running, most, calls
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.6)  # six fires of the trigger
        with lock:
            running -= 1
            calls += 1
            if calls == 2:
                two_done.set()

    scheduler = TrainingScheduler(slow_job, IntervalTrigger(seconds=0.1), metrics)
    run_until_done(scheduler, two_done)

    job_settings = scheduler.scheduler  # shut down, but the settings are still there to read
    assert job_settings._job_defaults["max_instances"] == 1
    assert job_settings._job_defaults["coalesce"] is True
    assert most == 1
    assert 2 <= calls <= 3
    # the fires that came while a run was in progress were skipped, not queued
    assert (sample(metrics, "forecaster_training_skipped_runs_total") or 0) >= 1
    assert sample(metrics, "forecaster_training_runs_total", outcome="success") == calls


def test_run_at_start_fires_at_once_on_a_far_cron(metrics: TrainingMetrics) -> None:
    job = Script(champion(1, 1.0))
    scheduler = TrainingScheduler(job, cron_trigger("0 3 1 1 *"), metrics,
                                  run_at_start=RunAtStart.ALWAYS)
    run_until_done(scheduler, job.done, timeout=10)
    assert job.calls == 1


@pytest.mark.parametrize(("exists", "trains"), [(True, False), (False, True)])
def test_run_at_start_if_no_champion(metrics: TrainingMetrics, exists: bool,
                                     trains: bool) -> None:
    calls = []
    scheduler = TrainingScheduler(lambda: calls.append(1), cron_trigger("0 3 1 1 *"), metrics,
                                  run_at_start=RunAtStart.IF_NO_CHAMPION,
                                  champion_exists=lambda: exists)
    assert scheduler.run_once()  # the start run
    assert scheduler.run_once()  # a cron run: trains whatever the registry holds
    assert len(calls) == (2 if trains else 1)


def test_run_at_start_if_no_champion_needs_a_check(metrics: TrainingMetrics) -> None:
    with pytest.raises(ValueError, match="champion_exists"):
        TrainingScheduler(lambda: None, cron_trigger("0 3 * * *"), metrics,
                          run_at_start="if-no-champion")


class _Recorder(BaseHTTPRequestHandler):
    """Records each request; a stand-in for the Pushgateway binary, which is not installed
    here. It answers like the real one: 200 to a PUT/POST on /metrics/job/<job>."""

    requests: list[tuple[str, str, bytes]]

    def _record(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.requests.append((self.command, self.path, body))  # type: ignore[attr-defined]
        self.send_response(200)
        self.end_headers()

    do_PUT = do_POST = _record

    def log_message(self, format: str, *args: Any) -> None:  # keep the test output quiet
        pass


@pytest.fixture
def fake_pushgateway() -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    server = HTTPServer(("127.0.0.1", 0), _Recorder)
    server.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_port}", server.requests  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()


def test_metrics_are_pushed_after_each_run(
        metrics: TrainingMetrics,
        fake_pushgateway: tuple[str, list[tuple[str, str, bytes]]]) -> None:
    gateway, requests = fake_pushgateway
    scheduler = TrainingScheduler(Script(champion(2, 0.5), boom), IntervalTrigger(hours=1),
                                  metrics, pushgateway=gateway, push_job="retrain")
    assert scheduler.run_once()
    assert not scheduler.run_once()

    assert [(method, path) for method, path, _ in requests] == [
        ("PUT", "/metrics/job/retrain"), ("PUT", "/metrics/job/retrain")]
    pushed = requests[-1][2].decode()
    assert 'forecaster_training_runs_total{outcome="success"} 1.0' in pushed
    assert 'forecaster_training_runs_total{outcome="failure"} 1.0' in pushed
    assert "forecaster_champion_version 2.0" in pushed


@pytest.mark.parametrize("succeeds", [True, False])
def test_train_once_pushes_for_a_cronjob(
        fake_pushgateway: tuple[str, list[tuple[str, str, bytes]]],
        monkeypatch: pytest.MonkeyPatch, succeeds: bool) -> None:
    gateway, requests = fake_pushgateway
    monkeypatch.setattr(schedule_module, "race_job",
                        lambda path, ray=None: champion(3, 0.4) if succeeds else boom)
    if succeeds:
        assert train_once(Path("race.yaml"), gateway, "cronjob").champion_version == 3
    else:
        with pytest.raises(RuntimeError):
            train_once(Path("race.yaml"), gateway, "cronjob")
    [(method, path, body)] = requests
    assert (method, path) == ("POST", "/metrics/job/cronjob")  # adds to the group
    pushed = body.decode()
    outcome = "success" if succeeds else "failure"
    assert f'forecaster_training_runs_total{{outcome="{outcome}"}} 1.0' in pushed
    assert ("forecaster_champion_version 3.0" in pushed) == succeeds
    # the timestamp of what did not happen is not pushed: it would hide an earlier success
    assert ("last_success_timestamp" in pushed) == succeeds
    assert ("last_failure_timestamp" in pushed) != succeeds


def test_an_interrupted_cronjob_run_is_pushed_as_a_failure(
        fake_pushgateway: tuple[str, list[tuple[str, str, bytes]]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM, as interrupt_on_signals turns it into Interrupted, in the middle of the job:
    the failure is counted and pushed, then the interrupt goes on (the CLI exits 143)."""
    gateway, requests = fake_pushgateway

    def terminated() -> Callable[[], None]:
        def job() -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises in this thread long before
        return job

    monkeypatch.setattr(schedule_module, "race_job", lambda path, ray=None: terminated())
    before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or what an earlier in-process Ray set
    with pytest.raises(Interrupted) as interrupted, interrupt_on_signals():
        train_once(Path("race.yaml"), gateway, "cronjob")
    assert interrupted.value.exit_code == 143 and str(interrupted.value) == "received SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before  # restored on the way out
    [(method, path, body)] = requests
    assert (method, path) == ("POST", "/metrics/job/cronjob")
    pushed = body.decode()
    assert 'forecaster_training_runs_total{outcome="failure"} 1.0' in pushed
    assert "last_failure_timestamp" in pushed and "last_success_timestamp" not in pushed


def test_a_failing_push_is_logged_and_training_goes_on(
        metrics: TrainingMetrics, caplog: pytest.LogCaptureFixture) -> None:
    job = Script(champion(1, 1.0), champion(2, 0.8))
    # nothing listens on this port: every push is refused
    scheduler = TrainingScheduler(job, FireTimes(2, interval=0.3), metrics,
                                  pushgateway=f"127.0.0.1:{_free_port()}")
    run_until_done(scheduler, job.done)
    assert sample(metrics, "forecaster_training_runs_total", outcome="success") == 2
    assert caplog.text.count("pushing metrics to") == 2


def test_sigterm_stops_the_schedule_command_cleanly(tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           # nothing in this test reaches MLflow; keep it away from a real server anyway
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop(TOKEN_VARIABLE, None)  # no token: the scheduler says so
    process = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "schedule", str(QUICK_CONFIG),
         "--cron", "0 3 1 1 *", "--metrics-port", str(port), "--metrics-addr", "127.0.0.1"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # /metrics answers once the signal handlers are in place and the scheduler starts
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.communicate()[0].decode()
            try:
                scraped = scrape(port)
                break
            except OSError:
                assert time.monotonic() < deadline, "forecaster schedule did not come up"
                time.sleep(0.2)
        assert scraped["forecaster_training_runs_total", (("outcome", "success"),)] == 0

        process.send_signal(signal.SIGTERM)
        start = time.monotonic()
        output, _ = process.communicate(timeout=10)
        assert time.monotonic() - start < 5
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output.decode()
    assert "received SIGTERM" in output.decode()
    assert "scheduler stopped" in output.decode()
    assert NO_TOKEN_NOTE in output.decode()


def test_cli_rejects_a_bad_cron() -> None:
    from cli.main import build_parser

    args = build_parser().parse_args(["schedule", "any.yaml", "--cron", "0 3 * *",
                                      "--run-at-start=if-no-champion"])
    assert args.run_at_start == "if-no-champion"
    with pytest.raises(ValueError, match="Wrong number of fields"):
        cron_trigger(args.cron)

