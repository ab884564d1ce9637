"""Adaptive batching: BentoML's dispatcher, fed in-process, without its learned hold-back or
latency model.

Why not a batchable ``@bentoml.api`` called from ``/forecast``: BentoML 1.4 routes a call from
one API to another API of the same service through its own HTTP client (an in-process ASGI
round trip), which costs more CPU than the forward pass it would batch. So ``/forecast`` puts
its series straight into the ``CorkDispatcher`` BentoML builds for batchable APIs: the same
queue, batch-size-aware splitting, one batch in flight at a time, and shedding of requests
that have waited longer than ``max_latency_ms``.

Why no hold-back: the dispatcher's optimizer holds a request back for the mean wait it has
observed, and those waits include the time spent queued behind a running batch. After a burst
that mean is large, and it then holds every request that long even at one client, which in
turn keeps the mean up (measured: p50 2.8 ms for one client before a 64-client burst, 46 ms
after). On a CPU the queue fills while a batch runs anyway, so the next batch leaves as soon
as the model is free and takes everything queued.

Why no learned latency model: the dispatcher also sheds a queued request as soon as it
predicts that the request would wait past ``max_latency_ms``, from a line fitted over the last
batches' durations against the number of requests in them, whatever their size: one slow
batch (a large request, a pause) inflates the fit until a later refresh, and requests are
refused meanwhile that would have been answered in time. Here a request is shed
only once it has waited ``max_latency_ms``, as the setting says, and its 503 comes from
``on_overload``.

A request is fed one batch's worth of series at a time: each part queues behind the work
ahead of it, never behind its own earlier parts, so a request of any size is answered on an
idle server, and the requests that arrive meanwhile share the next forward passes with it.
A request whose caller is cancelled (BentoML's timeout has answered it) leaves the queue: its
parts not yet in a forward pass are never computed.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from bentoml._internal.marshal.dispatcher import CorkDispatcher, Job, Optimizer
from starlette.concurrency import run_in_threadpool


class _ActualWaits(Optimizer):
    """BentoML's optimizer with no latency model: never holds a batch back, and lets the
    dispatcher shed only the requests that have waited ``max_latency``."""

    def __init__(self, max_latency: float) -> None:
        super().__init__(max_latency)
        self.o_a = self.o_b = self.wait = 0

    def trigger_refresh(self) -> None:
        """Learns nothing (see the module doc)."""


def batched(function: Callable[[Sequence[list[Any]]], list[Any]], max_batch_size: int,
            max_latency_ms: int, on_overload: Callable[[], Any]
            ) -> Callable[[list[Any]], Awaitable[list[Any]]]:
    """An async callable taking one request's items (a list) and returning its results;
    ``function`` maps a batch of such lists to their results in one call, in a thread. A
    request shed from the queue gets ``on_overload()``, which may raise."""
    dispatcher = CorkDispatcher(max_latency_in_ms=max_latency_ms, max_batch_size=max_batch_size,
                                fallback=on_overload, get_batch_size=len)
    dispatcher.optimizer = _ActualWaits(dispatcher.max_latency)
    dispatcher.callback = functools.partial(run_in_threadpool, function)

    async def one_batch(items: list[Any]) -> list[Any]:
        # what CorkDispatcher's own wrapper does, except on cancellation: that one answers a
        # cancelled caller with the fallback, and leaves its job queued to be computed
        if dispatcher._controller is None:
            dispatcher._controller = asyncio.get_running_loop().create_task(
                dispatcher.controller())
        job = Job(time.time(), items, asyncio.get_running_loop().create_future())
        dispatcher._queue.append(job)
        async with dispatcher._wake_event:
            dispatcher._wake_event.notify_all()
        try:
            result = await job.future
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # our caller has gone
                _drop(dispatcher, job)
                raise
            return on_overload()  # the dispatcher shed it
        if isinstance(result, Exception):
            raise result
        return result

    async def call(items: list[Any]) -> list[Any]:
        results: list[Any] = []
        for start in range(0, len(items), max_batch_size):
            results += await one_batch(items[start:start + max_batch_size])
        return results

    return call


def _drop(dispatcher: CorkDispatcher, job: Job) -> None:
    """Take ``job`` out of the queue if it is still there (by identity: jobs compare by value,
    and their data hold arrays). The deque is changed in place, as the dispatcher's
    controller may be waiting on its length."""
    for position, queued in enumerate(dispatcher._queue):
        if queued is job:
            del dispatcher._queue[position]
            return
