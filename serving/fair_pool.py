"""The threads that forecast with a refitted model, shared fairly between requests.

An sktime baseline is a local model: each series is a fit of its own (tens of milliseconds to
seconds, growing with the history), independent of the others. The pool runs the series of
every request on ``threads`` threads, taking one series from each request in turn, so that a
request of many series cannot hold the threads while small ones wait: a small request waits
for the series in progress, not for the large request to finish. A request whose caller is
cancelled (BentoML's timeout has answered it) leaves the pool: its series not yet started are
never run, and one that fails drops its remaining series too.

Each series states its cost (seconds of the threads' time); ``finish_estimate`` says when a
new request would be answered if it shared the threads equally with every request in progress,
so that the service can refuse what would overrun its timeout before any work starts.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class _Request:
    pending: deque[tuple[int, Callable[[], Any], float]]  # (position, task, cost)
    future: asyncio.Future
    results: list[Any]
    unfinished: int
    cost_left: float
    loop: asyncio.AbstractEventLoop = field(repr=False)


class FairPool:
    """``threads`` daemon threads serving requests round-robin, one task at a time."""

    def __init__(self, threads: int) -> None:
        self._lock = threading.Condition()
        self._turns: deque[_Request] = deque()  # requests with tasks not started, in turn
        self._open: set[_Request] = set()  # requests not answered yet
        for i in range(threads):
            threading.Thread(target=self._work, name=f"fair-pool-{i}", daemon=True).start()

    async def run(self, tasks: Sequence[Callable[[], Any]], costs: Sequence[float]
                  ) -> list[Any]:
        """The tasks' results, in order; the first exception a task raises is raised here."""
        if not tasks:
            return []
        loop = asyncio.get_running_loop()
        request = _Request(deque((i, task, cost) for i, (task, cost)
                                 in enumerate(zip(tasks, costs, strict=True))),
                           loop.create_future(), [None] * len(tasks), len(tasks),
                           float(sum(costs)), loop)
        with self._lock:
            self._turns.append(request)
            self._open.add(request)
            self._lock.notify(len(tasks))
        try:
            return await request.future
        except asyncio.CancelledError:
            with self._lock:
                self._close(request)
            raise

    def finish_estimate(self, cost: float) -> float:
        """Seconds until a new request of ``cost`` would be answered, sharing the threads
        equally with the requests in progress: each delays it by at most its own cost."""
        with self._lock:
            return cost + sum(min(request.cost_left, cost) for request in self._open)

    def _close(self, request: _Request) -> None:
        """Forget ``request``: its tasks not started never run (the lock is held)."""
        request.pending.clear()
        self._open.discard(request)
        if request in self._turns:
            self._turns.remove(request)

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._turns:
                    self._lock.wait()
                request = self._turns.popleft()
                position, task, cost = request.pending.popleft()
                if request.pending:
                    self._turns.append(request)  # the back of the line: the others' turn
            try:
                result, error = task(), None
            except Exception as raised:  # noqa: BLE001 - reported to the request's caller
                result, error = None, raised
            with self._lock:
                request.results[position] = result
                request.unfinished -= 1
                request.cost_left -= cost
                done = error is not None or request.unfinished == 0
                if done:
                    self._close(request)
            if done:
                request.loop.call_soon_threadsafe(_settle, request.future, request.results,
                                                  error)


def _settle(future: asyncio.Future, results: list[Any], error: Exception | None) -> None:
    if future.done():  # cancelled: its caller has gone
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(results)
