"""Adaptive batching: BentoML's dispatcher, fed in-process, without its learned hold-back.

Why not a batchable ``@bentoml.api`` called from ``/forecast``: BentoML 1.4 routes a call from
one API to another API of the same service through its own HTTP client (an in-process ASGI
round trip), which costs more CPU than the forward pass it would batch. So ``/forecast`` puts
its series straight into the ``CorkDispatcher`` BentoML builds for batchable APIs: the same
queue, batch-size-aware splitting, one batch in flight at a time, and shedding of requests
that would wait longer than ``max_latency_ms``.

Why no hold-back: the dispatcher's optimizer holds a request back for the mean wait it has
observed, and those waits include the time spent queued behind a running batch. After a burst
that mean is large, and it then holds every request that long even at one client, which in
turn keeps the mean up (measured: p50 2.8 ms for one client before a 64-client burst, 46 ms
after). On a CPU the queue fills while a batch runs anyway, so the next batch leaves as soon
as the model is free and takes everything queued.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from bentoml._internal.marshal.dispatcher import CorkDispatcher, Optimizer


class _NoHoldBack(Optimizer):
    """Keeps BentoML's latency model (used to shed load) but never holds a batch back."""

    def trigger_refresh(self) -> None:
        super().trigger_refresh()
        self.wait = 0


def batched(function: Callable[[Sequence[list[Any]]], list[Any]], max_batch_size: int,
            max_latency_ms: int, on_overload: Callable[[], Any]
            ) -> Callable[[list[Any]], Any]:
    """An async callable taking one request's items (a list) and returning its results;
    ``function`` maps a batch of such lists to their results in one call, in a thread."""
    dispatcher = CorkDispatcher(max_latency_in_ms=max_latency_ms, max_batch_size=max_batch_size,
                                fallback=on_overload, get_batch_size=len)
    dispatcher.optimizer = _NoHoldBack(dispatcher.max_latency)
    return dispatcher(function)
