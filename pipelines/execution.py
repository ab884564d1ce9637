"""Where the race's model work runs: in this process, or as Ray tasks on a cluster.

The race hands an engine its units of work, each a function ``work(shared, *args,
on_epoch=None) -> FitRecord`` (a candidate's fit on one fold, or its refit on all data), and
asks for their records in the order it logs them. Everything that touches MLflow or the
registry stays with the caller, on the driver.

``local`` (:class:`LocalEngine`) runs each unit when its record is asked for, in this process,
its learning curve reported epoch by epoch as it trains; it imports nothing of Ray.
``ray`` (:class:`RayEngine`) submits every unit as a Ray task as soon as it is known, holding
its candidate's resources and retried when its worker dies (``max_retries``); the race's data
go to the object store once (:meth:`RayEngine.share`); a record's learning curve is replayed
through the same ``on_epoch`` callback when it arrives, so the caller logs the same numbers
either way. A progress bar counts the tasks done out of the tasks planned.

A task's own exception reaches the caller as itself (the candidate fails, the race goes on);
a worker that keeps dying past its retries fails the candidate too (``WorkerCrashedError``);
a cluster that goes away raises :class:`ClusterLost`, which fails the race.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, Protocol
from urllib.parse import urlsplit

from tqdm.auto import tqdm

from pipelines.warning_capture import recorded_warnings

if TYPE_CHECKING:  # kept light: the command line imports ClusterLost
    import pandas as pd
    from sktime.forecasting.base import BaseForecaster

    from forecaster.trainer import EpochCallback, EpochRecord
    from pipelines.config import ExecutionConfig, ResourcesConfig

CONNECT_TIMEOUT_S = 5.0  # an address that does not answer this fast is reported, not waited on
# while waiting on its tasks, the driver checks this often that the cluster still answers:
# Ray itself only notices a lost head after a minute, and then ends the process
WATCH_INTERVAL_S = 5.0
# Ray's switch for clusters of several machines (off: everything on 127.0.0.1)
SINGLE_MACHINE_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@dataclass
class FitRecord:
    """What one unit of work gives back: a fold's forecast or a refitted estimator, its
    learning curve (networks), its time, and the warnings it raised."""

    forecast: pd.DataFrame | None = None
    estimator: BaseForecaster | None = None
    curve: list[EpochRecord] = field(default_factory=list)
    seconds: float = 0.0
    warnings: list[warnings.WarningMessage] = field(default_factory=list)


Work = Callable[..., FitRecord]


@contextmanager
def recording(on_epoch: EpochCallback | None, record: FitRecord) -> Iterator[EpochCallback]:
    """The ``on_epoch`` a unit of work trains with: it keeps the curve and the warnings in
    ``record`` (and the time spent inside), and passes each epoch on to ``on_epoch``."""

    def epoch(item: EpochRecord) -> None:
        record.curve.append(item)
        if on_epoch is not None:
            on_epoch(item)

    started = time.perf_counter()
    with recorded_warnings() as caught:
        yield epoch
    record.seconds = time.perf_counter() - started
    # the source object of a warning may not pickle; the rest is all that is logged
    record.warnings = [warnings.WarningMessage(w.message, w.category, w.filename, w.lineno)
                       for w in caught]


class ClusterLost(RuntimeError):
    """The Ray cluster went away during the race: nothing more can be trained or fetched (the
    aliases, moved last, are untouched)."""


class Task(Protocol):
    """A submitted unit of work, as the engine that took it knows it."""


class Engine(Protocol):
    name: str

    def share(self, value: Any) -> Any:
        """A handle for ``value`` (the race's data) that every unit of work receives."""

    def submit(self, work: Work, shared: Any, *args: Any, resources: ResourcesConfig,
               name: str) -> Task:
        """Plan ``work(shared, *args)`` holding ``resources``; ``name`` names it on the cluster."""

    def plan(self, tasks: int) -> None:
        """Announce ``tasks`` more units of work, for the progress count."""

    def result(self, task: Task, on_epoch: EpochCallback | None = None) -> FitRecord:
        """The unit's record; ``on_epoch`` gets its learning curve. Raises what it raised."""

    def close(self) -> None: ...


@dataclass
class _LocalTask:
    work: Work
    shared: Any
    args: tuple[Any, ...]


class LocalEngine:
    """One unit after another, each when its record is asked for, in this process."""

    name = "local"

    def share(self, value: Any) -> Any:
        return value

    def submit(self, work: Work, shared: Any, *args: Any, resources: ResourcesConfig,
               name: str) -> _LocalTask:
        return _LocalTask(work, shared, args)

    def plan(self, tasks: int) -> None:
        pass  # the race's own bars count folds and epochs

    def result(self, task: _LocalTask, on_epoch: EpochCallback | None = None) -> FitRecord:
        return task.work(task.shared, *task.args, on_epoch=on_epoch)

    def close(self) -> None:
        pass


def _host_port(address: str) -> tuple[str, int]:
    where = urlsplit(address if "://" in address else f"//{address}")
    if where.hostname is None or where.port is None:
        raise ValueError(f"execution.address: {address!r} names no host and port")
    return where.hostname, where.port


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise ValueError unless something listens at ``address`` (HOST:PORT or ray://...):
    Ray itself would wait a minute or more on an address that does not answer."""
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as error:
        raise ValueError(f"execution.address: no Ray cluster reachable at {address} "
                         f"({error.strerror or error}); start one (`ray start --head`) or "
                         "fix the address") from None


class RayEngine:
    """Every unit of work a Ray task: submitted at once, run wherever the cluster has the
    resources, fetched in the order the race logs them."""

    name = "ray"

    def __init__(self, execution: ExecutionConfig, progress: bool = True):
        address = execution.address or os.environ.get("RAY_ADDRESS") or None
        if address is None and "ray" not in sys.modules:
            # a Ray started here is this process's alone: Ray's single-machine mode keeps it
            # on the loopback address rather than the machine's network address (read when
            # Ray is imported)
            os.environ.setdefault(SINGLE_MACHINE_VARIABLE, "0")
        import ray

        self._ray = ray
        self.max_retries = execution.max_retries
        if address not in (None, "auto"):
            check_reachable(address)
        self.owned = not ray.is_initialized()  # a caller's own connection is left open
        if self.owned:
            try:
                # "local": a new Ray, never one that `ray start` left running on this machine
                ray.init(address=address or "local", logging_level=logging.WARNING,
                         # the workers' output stays in the cluster's logs: their warnings
                         # come back in the records, their errors as exceptions
                         log_to_driver=False)
            except ConnectionError as error:
                raise ValueError(f"execution.address: {address}: {error}") from None
        self.address = address or "a Ray started in this process"
        # what must keep answering while the race waits: the cluster's address (a Ray started
        # here ends with this process)
        self._watch = None if address is None else (
            address if address != "auto" else ray.get_runtime_context().gcs_address)
        self.lost = False
        self._remotes: dict[Work, Any] = {}
        self._pending: set[Any] = set()
        self._planned = 0
        self._bar = tqdm(total=0, desc="ray tasks", unit="task", disable=not progress,
                         leave=True)

    def share(self, value: Any) -> Any:
        return self._ray.put(value)

    def plan(self, tasks: int) -> None:
        self._planned += tasks
        self._bar.total = self._planned
        self._bar.refresh()

    def submit(self, work: Work, shared: Any, *args: Any, resources: ResourcesConfig,
               name: str) -> Any:
        remote = self._remotes.get(work)
        if remote is None:
            remote = self._remotes[work] = self._ray.remote(work)
        ref = remote.options(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
                             max_retries=self.max_retries, name=name).remote(shared, *args)
        self._pending.add(ref)
        if len(self._pending) + self._bar.n > self._planned:  # more than announced
            self.plan(len(self._pending) + int(self._bar.n) - self._planned)
        return ref

    def result(self, task: Any, on_epoch: EpochCallback | None = None) -> FitRecord:
        ray = self._ray
        try:
            while task in self._pending:  # count every task that ends meanwhile
                ready, _ = ray.wait(list(self._pending), num_returns=1,
                                    timeout=WATCH_INTERVAL_S)
                if not ready:
                    self._check_cluster()
                self._pending.difference_update(ready)
                self._bar.update(len(ready))
            record: FitRecord = ray.get(task)
        except ray.exceptions.RayTaskError as error:
            # the task's own exception, as a local race raises it; the remote traceback
            # stays in the chain
            raise error.cause from error
        except (ray.exceptions.RaySystemError, ray.exceptions.ObjectLostError,
                ray.exceptions.LocalRayletDiedError) as error:
            self._lose(type(error).__name__, error)
        for epoch in record.curve:
            if on_epoch is not None:
                on_epoch(epoch)
        return record

    def _check_cluster(self) -> None:
        if self._watch is None:
            return
        try:
            check_reachable(self._watch)
        except ValueError as error:
            self._lose("no answer", error)

    def _lose(self, why: str, error: Exception) -> NoReturn:
        self.lost = True
        raise ClusterLost(f"the Ray cluster at {self.address} went away ({why}); the race "
                          "stopped and the champion is untouched") from error

    def close(self) -> None:
        self._bar.close()
        if self.lost:  # nothing to cancel or disconnect from: Ray's calls would only hang
            return
        for ref in self._pending:  # a failed race leaves nothing running on the cluster
            self._ray.cancel(ref, force=True)
        self._pending.clear()
        if self.owned:
            self._ray.shutdown()


@contextmanager
def start_engine(execution: ExecutionConfig, progress: bool = True) -> Iterator[Engine]:
    """The configured engine, closed on exit. Connecting to Ray happens here: an address that
    does not answer raises ValueError, before anything trains."""
    engine: Engine = (RayEngine(execution, progress) if execution.engine == "ray"
                      else LocalEngine())
    try:
        yield engine
    finally:
        engine.close()
