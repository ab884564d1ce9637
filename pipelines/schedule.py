"""Retrain on a cron schedule, with Prometheus metrics about the runs.

``forecaster schedule CONFIG --cron "0 3 * * *"`` is a long-running process: APScheduler fires
the training race on the cron, one run at a time; a run that fails is logged and counted and the
next one still fires; SIGTERM or SIGINT lets a run in progress finish and exits 0.

The metrics live in a registry of their own (so that tests, and several schedulers in one
process, never share counters), are served on ``/metrics`` and, when a Pushgateway is
configured, pushed to it after every run:

=======================================================  ===========================================
``forecaster_training_runs_total{outcome}``              runs by outcome, ``success`` or ``failure``
``forecaster_training_skipped_runs_total``               fires skipped: a run still in progress
``forecaster_training_last_success_timestamp_seconds``   end of the last successful run (Unix time)
``forecaster_training_last_failure_timestamp_seconds``   end of the last failed run (Unix time)
``forecaster_training_last_run_duration_seconds``        wall time of the last run
``forecaster_champion_version``                          the registry's champion after the last run
``forecaster_champion_score``                            its score on its folds (lower is better)
``forecaster_training_retrain_requests_total{outcome}``  POST /retrain: ``started``, ``coalesced``
                                                         or ``unauthorized``
=======================================================  ===========================================

The same port answers ``POST /retrain`` (:mod:`pipelines.scheduler_http`): a race now, the cron
job's own run brought forward (:meth:`TrainingScheduler.request_run`), unless one is running or
about to, which the request is then folded into. Alertmanager's webhook can call it when
ForecastAccuracyDegraded fires. With ``FORECASTER_API_TOKEN`` set it asks for that bearer token;
unset, the scheduler says so in its log at start.

An alert on ``time() - forecaster_training_last_success_timestamp_seconds`` catches failing
and stuck runs alike; through the Pushgateway, whose values outlive the process, a dead
scheduler too.

A one-off race (``forecaster train``, :func:`train_once` for a CronJob) turns SIGTERM and SIGINT
into :class:`Interrupted` (:func:`interrupt_on_signals`): the race marks its runs KILLED, the
failure is counted and pushed, and the process exits 128 + the signal (143 for SIGTERM).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any
from wsgiref.simple_server import WSGIServer

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    push_to_gateway,
    pushadd_to_gateway,
)

from pipelines.api_token import NO_TOKEN_NOTE, api_token
from pipelines.scheduler_http import (
    RETRAIN_OUTCOMES,
    SchedulerNotRunning,
    scheduler_app,
    start_server,
)

logger = logging.getLogger(__name__)

JOB_ID = "training"
PUSH_JOB = "forecaster_training"
# a missed fire (the process was busy or asleep) still runs if it is at most this late; with
# coalesce=True a backlog of missed fires runs once, not once per fire
MISFIRE_GRACE_S = 300


class RunAtStart(str, Enum):
    """Whether the scheduler trains once as soon as it starts, before the first cron fire."""

    ALWAYS = "always"
    NEVER = "never"
    IF_NO_CHAMPION = "if-no-champion"


@dataclass(frozen=True)
class TrainingMetrics:
    """The scheduler's Prometheus metrics, all in ``registry``."""

    registry: CollectorRegistry
    runs: Counter
    skipped: Counter
    last_success: Gauge
    last_failure: Gauge
    last_duration: Gauge
    champion_score: Gauge
    champion_version: Gauge
    retrain_requests: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> TrainingMetrics:
        registry = CollectorRegistry() if registry is None else registry
        runs = Counter("forecaster_training_runs", "Training runs by outcome",
                       ["outcome"], registry=registry)
        # both outcomes exported from the start: an alert on rate(...{outcome="failure"}) must
        # see a 0 before the first failure, not a missing series
        for outcome in ("success", "failure"):
            runs.labels(outcome=outcome)
        retrain_requests = Counter("forecaster_training_retrain_requests",
                                   "POST /retrain requests by outcome", ["outcome"],
                                   registry=registry)
        for outcome in RETRAIN_OUTCOMES:
            retrain_requests.labels(outcome=outcome)
        return cls(
            registry=registry,
            runs=runs,
            skipped=Counter("forecaster_training_skipped_runs",
                            "Scheduled runs skipped because a run was still in progress or the "
                            "fire was missed", registry=registry),
            last_success=Gauge("forecaster_training_last_success_timestamp_seconds",
                               "Unix time at which the last successful run finished",
                               registry=registry),
            last_failure=Gauge("forecaster_training_last_failure_timestamp_seconds",
                               "Unix time at which the last failed run finished",
                               registry=registry),
            last_duration=Gauge("forecaster_training_last_run_duration_seconds",
                                "Wall time of the last run, successful or not",
                                registry=registry),
            champion_score=Gauge("forecaster_champion_score",
                                 "Validation score of the registered champion (lower is better)",
                                 registry=registry),
            champion_version=Gauge("forecaster_champion_version",
                                   "Registry version of the champion model",
                                   registry=registry),
            retrain_requests=retrain_requests,
        )

    def observe_champion(self, result: Any) -> None:
        """Set the champion gauges from a race result, when it names a champion.

        Duck-typed on ``champion_version`` and ``champion_score`` so that the scheduler does not
        depend on the race's result class (and tests can pass any object).
        """
        version = getattr(result, "champion_version", None)
        score = getattr(result, "champion_score", None)
        if version is not None:
            self.champion_version.set(float(version))
        if score is not None:
            self.champion_score.set(float(score))


class TrainingScheduler:
    """Runs ``job`` on ``trigger`` in a background APScheduler, one run at a time.

    ``job`` is the training itself (``run_race`` bound to a config in production, any callable
    in tests); what it returns is read for the champion gauges. It is injected, like the
    trigger, so that tests drive the real scheduler with a fast trigger and a fake job.
    """

    def __init__(
        self,
        job: Callable[[], Any],
        trigger: BaseTrigger,
        metrics: TrainingMetrics | None = None,
        *,
        pushgateway: str | None = None,
        push_job: str = PUSH_JOB,
        run_at_start: RunAtStart | str = RunAtStart.NEVER,
        champion_exists: Callable[[], bool] | None = None,
    ) -> None:
        run_at_start = RunAtStart(run_at_start)
        if run_at_start is RunAtStart.IF_NO_CHAMPION and champion_exists is None:
            raise ValueError("run_at_start='if-no-champion' needs a champion_exists check")
        self.job = job
        self.trigger = trigger
        self.metrics = TrainingMetrics.create() if metrics is None else metrics
        self.pushgateway = pushgateway
        self.push_job = push_job
        self.run_at_start = run_at_start
        self.champion_exists = champion_exists
        # read and cleared by the first execution only: the start run is the same APScheduler
        # job as the cron runs (fired early through next_run_time), so max_instances=1 keeps
        # it from overlapping a cron fire as well
        self._start_check_pending = self.run_at_start is RunAtStart.IF_NO_CHAMPION
        # True from a run's request (request_run) or start until its end: a request meanwhile
        # is coalesced into that run
        self._busy = False
        self._busy_lock = threading.Lock()
        self.scheduler = BackgroundScheduler(
            # one worker: runs never overlap, whatever the job defaults say
            executors={"default": ThreadPoolExecutor(max_workers=1)},
            job_defaults={"max_instances": 1, "coalesce": True,
                          "misfire_grace_time": MISFIRE_GRACE_S},
            timezone=getattr(trigger, "timezone", None) or "UTC",
        )
        self.scheduler.add_listener(self._on_skipped, EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED)

    def run_once(self) -> bool:
        """One training run: times it, records the outcome, pushes the metrics.

        Never raises on a failure: it is logged with its traceback and counted, so that the
        scheduler goes on to the next fire. Returns whether the run succeeded. An interrupt
        (KeyboardInterrupt, or :class:`Interrupted`) is counted and pushed as a failure, then
        raised.
        """
        with self._busy_lock:
            self._busy = True
        try:
            return self._run_once()
        finally:
            with self._busy_lock:
                self._busy = False

    def request_run(self) -> bool:
        """Run now (``POST /retrain``), unless a run is in progress or already requested: then
        the request is coalesced into it. Returns whether a run was started.

        The run is the scheduled job's own, brought forward (its next run time set to now),
        so it can never overlap a cron fire; the cron goes on from its next fire after that.
        Raises :class:`SchedulerNotRunning` before :meth:`start` and after :meth:`shutdown`.
        """
        with self._busy_lock:
            if not self.scheduler.running:
                raise SchedulerNotRunning("the scheduler is not running (starting or stopping)")
            if self._busy:
                return False
            self._busy = True  # until the run this brings forward ends
            # asked for explicitly: it trains even where the start check would not
            self._start_check_pending = False
            self.scheduler.modify_job(JOB_ID, next_run_time=datetime.now(self.scheduler.timezone))
        return True

    def _run_once(self) -> bool:
        if self._start_check_pending:
            self._start_check_pending = False
            if self._champion_exists():
                logger.info("a champion is registered: no training at start")
                return True
        logger.info("training run started")
        start = time.perf_counter()
        try:
            result = self.job()
        except (Exception, KeyboardInterrupt) as error:
            duration = time.perf_counter() - start
            if isinstance(error, KeyboardInterrupt):  # a one-off run stopped by a signal
                logger.error("training run interrupted after %.1f s: %s", duration,
                             error or "KeyboardInterrupt")
            else:
                logger.exception("training run failed after %.1f s", duration)
            self.metrics.runs.labels(outcome="failure").inc()
            self.metrics.last_failure.set_to_current_time()
            self.metrics.last_duration.set(duration)
            self.push()
            if isinstance(error, KeyboardInterrupt):
                raise
            return False
        else:
            duration = time.perf_counter() - start
            logger.info("training run succeeded in %.1f s", duration)
            self.metrics.runs.labels(outcome="success").inc()
            self.metrics.last_success.set_to_current_time()
            self.metrics.observe_champion(result)
        self.metrics.last_duration.set(duration)
        self.push()
        return True

    def push(self) -> None:
        """Push the registry to the Pushgateway, if one is configured; a failure only logs."""
        if not self.pushgateway:
            return
        try:
            push_to_gateway(self.pushgateway, job=self.push_job, registry=self.metrics.registry,
                            timeout=10)
        except Exception:
            # the gateway being down must not stop training; /metrics still has the numbers
            logger.exception("pushing metrics to %s failed", self.pushgateway)

    def start(self) -> None:
        """Schedule the job and start the scheduler's thread (returns at once)."""
        first: dict[str, Any] = {}
        if self.run_at_start is not RunAtStart.NEVER:
            first["next_run_time"] = datetime.now(self.scheduler.timezone)
        self.scheduler.add_job(self.run_once, self.trigger, id=JOB_ID, name="training race",
                               **first)
        self.scheduler.start()
        job = self.scheduler.get_job(JOB_ID)
        logger.info("scheduler started; next run at %s", job.next_run_time if job else None)

    def shutdown(self, wait: bool = True) -> None:
        """Stop firing; with ``wait``, let a run in progress finish first."""
        if self.scheduler.running:
            self.scheduler.shutdown(wait=wait)

    def _champion_exists(self) -> bool:
        assert self.champion_exists is not None
        try:
            return self.champion_exists()
        except Exception:
            # cannot tell (registry unreachable...): train, as a fresh deployment needs a model
            # and a failing run is counted and retried on the next fire anyway
            logger.exception("could not check for a champion; training at start")
            return False

    def _on_skipped(self, event: JobEvent) -> None:
        # APScheduler logs the skip itself; the counter makes a run longer than the cron
        # interval visible on a dashboard
        self.metrics.skipped.inc()


def cron_trigger(expression: str, timezone: str = "UTC") -> CronTrigger:
    """A trigger from a five-field crontab expression, e.g. ``"0 3 * * *"``."""
    return CronTrigger.from_crontab(expression, timezone=timezone)


def race_job(config_path: Path, ray: str | None = None) -> Callable[[], Any]:
    """The production job: load the race config and run the race (on Ray at ``ray``, over
    the config, when given: see :func:`pipelines.config.load_config`).

    The YAML is read again at every run, so an edited config applies from the next run on
    without a restart (the CLI validates it once at start, to fail fast on a typo).
    """

    def job() -> Any:
        from pipelines.config import load_config
        from pipelines.race import run_race

        # no progress bars: in a service's log they are noise
        return run_race(load_config(config_path, ray=ray), progress=False)

    return job


def start_metrics_server(port: int, scheduler: TrainingScheduler, addr: str = "0.0.0.0",
                         token: str | None = None) -> WSGIServer:
    """Serve the scheduler's metrics on ``http://addr:port/metrics`` and ``POST /retrain``
    (behind the bearer ``token``, when given) from a daemon thread.

    Port 0 picks a free port (read it from ``server.server_port``). Returns the server so that
    a caller (a test) can stop it with ``shutdown()`` and ``server_close()``.
    """
    metrics = scheduler.metrics
    server = start_server(scheduler_app(metrics.registry, scheduler.request_run,
                                        metrics.retrain_requests, token), port, addr)
    logger.info("metrics on http://%s:%d/metrics, POST /retrain on the same port (%s)", addr,
                server.server_port, "bearer token required" if token else "no token")
    return server


def serve_forever(scheduler: TrainingScheduler, metrics_port: int | None = None,
                  metrics_addr: str = "0.0.0.0", stop: threading.Event | None = None,
                  token: str | None = None) -> None:
    """Serve the metrics and ``POST /retrain`` (behind ``token``), start ``scheduler`` and
    block until SIGTERM or SIGINT, then shut down cleanly.

    The scheduler runs in a background thread while the main thread waits on an event that
    the signal handlers set: the handlers only set the event (nothing that could deadlock
    inside a signal handler) and the main thread does the shutdown, waiting for a run in
    progress to finish. The handlers go in first, so that once /metrics answers, a SIGTERM is
    a clean shutdown.
    """
    stop = threading.Event() if stop is None else stop

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("received %s: shutting down after the current run, if any (a second "
                    "signal stops at once)", signal.Signals(signum).name)
        # a second Ctrl-C or SIGTERM takes the default action: whoever insists does not
        # have to wait for a long training run
        for sig in previous:
            signal.signal(sig, signal.SIG_DFL)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    server = None
    try:
        if metrics_port is not None:
            server = start_metrics_server(metrics_port, scheduler, metrics_addr, token)
        scheduler.start()
        # wait with a timeout: an Event.wait() without one is not interruptible on every
        # platform, and the loop costs nothing
        while not stop.wait(timeout=1.0):
            pass
    finally:
        scheduler.shutdown(wait=True)
        if server is not None:
            server.shutdown()
            server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    logger.info("scheduler stopped")


def registry_has_champion(registry_uri: str, model_name: str) -> bool:
    """Whether the model registry at ``registry_uri`` holds ``model_name`` with a version
    under the champion alias.

    Its own client on an explicit URI (rather than :mod:`pipelines.registry`, which uses
    MLflow's global URI): the check runs in the scheduler's thread, before any race has
    configured tracking, and must not change global state.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    from pipelines.registry import CHAMPION

    client = MlflowClient(tracking_uri=registry_uri, registry_uri=registry_uri)
    try:
        model = client.get_registered_model(model_name)
    except MlflowException as error:
        if error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return False
        raise
    # the aliases of the registered model rather than get_model_version_by_alias: a missing
    # alias is then a plain lookup, not an error to tell apart from a failed request
    return CHAMPION in model.aliases


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT during a one-off race (:func:`interrupt_on_signals`): a
    KeyboardInterrupt, so that the race marks its runs KILLED. ``exit_code``: 128 + the
    signal's number, as a shell reports a process the signal ended (143 for SIGTERM)."""

    def __init__(self, signum: int):
        super().__init__(f"received {signal.Signals(signum).name}")
        self.exit_code = 128 + signum


@contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise :class:`Interrupted` in the main thread inside, where a
    one-off race runs (``forecaster train``: a CronJob's deadline, an eviction, Ctrl-C), so that
    it cleans up; a second signal takes the default action, for whoever will not wait."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        for sig in previous:
            signal.signal(sig, signal.SIG_DFL)
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train_once(config_path: Path, pushgateway: str, push_job: str = PUSH_JOB,
               ray: str | None = None) -> Any:
    """One race now, with the scheduler's metrics pushed to ``pushgateway`` when it ends:
    for a Kubernetes CronJob, whose pod is gone before Prometheus could scrape it. Returns the
    race's result; a failed race is counted, pushed, then raised, and so is an interrupted one.

    Each run is a new process, so the timestamp of the outcome that did not happen was never
    set: it is left out, and the push adds to the job's group instead of replacing it, so a
    failed run keeps the last success of an earlier run on the gateway.
    """
    outcome: dict[str, Any] = {}

    def job() -> Any:
        try:
            outcome["result"] = race_job(config_path, ray)()
        except Exception as error:
            outcome["error"] = error
            raise
        return outcome["result"]

    # the cron trigger is never started: run_once is the whole job
    scheduler = TrainingScheduler(job, cron_trigger("0 3 * * *"))
    try:
        succeeded = scheduler.run_once()
    except KeyboardInterrupt:
        _push_outcome(scheduler.metrics, False, pushgateway, push_job)
        raise
    _push_outcome(scheduler.metrics, succeeded, pushgateway, push_job)
    if not succeeded:
        raise outcome["error"]
    return outcome["result"]


def _push_outcome(metrics: TrainingMetrics, succeeded: bool, pushgateway: str,
                  push_job: str) -> None:
    metrics.registry.unregister(metrics.last_failure if succeeded else metrics.last_success)
    try:
        pushadd_to_gateway(pushgateway, job=push_job, registry=metrics.registry, timeout=10)
    except Exception:
        logger.exception("pushing metrics to %s failed", pushgateway)


def schedule_command(config_path: Path, cron: str, *, timezone: str = "UTC",
                     metrics_port: int | None = 9101, metrics_addr: str = "0.0.0.0",
                     pushgateway: str | None = None, push_job: str = PUSH_JOB,
                     run_at_start: RunAtStart | str = RunAtStart.NEVER,
                     ray: str | None = None) -> None:
    """``forecaster schedule``: validate the config and the cron, then serve until SIGTERM.
    ``ray``: each race on Ray at this address (see :func:`race_job`)."""
    from pipelines.config import load_config

    config = load_config(config_path, ray=ray)  # fail fast on a bad config, not at 3 a.m.
    trigger = cron_trigger(cron, timezone)
    mode = RunAtStart(run_at_start)
    champion_check = None
    if mode is RunAtStart.IF_NO_CHAMPION:
        champion_check = partial(registry_has_champion,
                                 config.tracking.registry_uri or config.tracking_uri,
                                 config.registered_model)
    scheduler = TrainingScheduler(race_job(config_path, ray), trigger, pushgateway=pushgateway,
                                  push_job=push_job, run_at_start=mode,
                                  champion_exists=champion_check)
    token = api_token()
    if token is None and metrics_port is not None:
        logger.warning(NO_TOKEN_NOTE)
    serve_forever(scheduler, metrics_port, metrics_addr, token=token)
