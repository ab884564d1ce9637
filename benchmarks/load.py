"""A closed-loop HTTP load generator: N clients, each posting its next request as soon as the
last one is answered, for a fixed time. One process, asyncio and aiohttp, so that it takes as
little of the shared CPU as it can."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import numpy as np


@dataclass(frozen=True)
class LoadResult:
    clients: int
    seconds: float
    latencies_ms: np.ndarray  # of the answered requests
    failures: Counter = field(default_factory=Counter)  # HTTP status or exception -> count

    @property
    def errors(self) -> int:
        return sum(self.failures.values())

    @property
    def throughput(self) -> float:
        """Answered requests (status 200) per second."""
        return len(self.latencies_ms) / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if len(self.latencies_ms) else np.nan


# a body for every request, or a function that makes each request's (new data each time)
Body = bytes | Callable[[], bytes]


async def _drive(url: str, body: Body, clients: int, seconds: float, warmup: float
                 ) -> LoadResult:
    latencies: list[float] = []
    failures: Counter = Counter()
    headers = {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        measure_from, end = start + warmup, start + warmup + seconds

        async def client() -> None:
            while time.perf_counter() < end:
                data = body() if callable(body) else body
                now = time.perf_counter()  # the request's, not the making of its body
                try:
                    async with session.post(url, data=data, headers=headers) as response:
                        await response.read()
                        outcome = response.status
                except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                    outcome = type(error).__name__
                if now < measure_from:
                    continue
                if outcome == 200:
                    latencies.append(time.perf_counter() - now)
                else:
                    failures[outcome] += 1

        await asyncio.gather(*(client() for _ in range(clients)))
    return LoadResult(clients, seconds, np.asarray(latencies) * 1000.0, failures)


def run_load(url: str, body: Body, clients: int, seconds: float, warmup: float = 2.0
             ) -> LoadResult:
    """Closed-loop load for ``warmup`` + ``seconds``; only the last ``seconds`` are measured."""
    return asyncio.run(_drive(url, body, clients, seconds, warmup))
