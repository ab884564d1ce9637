"""The demo's first request: wait for the service, forecast one series, print the curl."""

from __future__ import annotations

import json
import shlex
import time
import urllib.request
from collections.abc import Callable

import pandas as pd

from forecaster.data import SERIES, TARGET, TIME

HISTORY = 96  # values sent: enough for every demo model's input window


def example_request(long: pd.DataFrame, horizon: int, frequency: str) -> dict:
    """A request for the last HISTORY values of the first series of a long frame."""
    first = long[long[SERIES] == long[SERIES].iloc[0]].tail(HISTORY)
    series = {"id": str(first[SERIES].iloc[0]),
              "values": [round(float(v), 3) for v in first[TARGET]]}
    if pd.api.types.is_datetime64_any_dtype(first[TIME]):
        series |= {"start": first[TIME].iloc[0].isoformat(), "freq": frequency}
    return {"series": [series], "horizon": horizon, "quantiles": [0.1, 0.5, 0.9]}


def wait_for_ok(url: str, timeout: float = 300.0, alive: Callable[[], bool] = lambda: True,
                interval: float = 0.5) -> None:
    """Poll ``url`` until it answers 200. TimeoutError after ``timeout`` seconds, or as soon
    as ``alive`` says the process that should answer has gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise TimeoutError(f"the process behind {url} exited before it answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:  # refused, reset, timed out or not 200 yet while it starts
            pass
        time.sleep(interval)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def wait_until_ready(url: str, timeout: float = 300.0, alive: Callable[[], bool] = lambda: True
                     ) -> None:
    """Poll the service at ``url`` until its /readyz answers 200 (see ``wait_for_ok``)."""
    wait_for_ok(f"{url}/readyz", timeout, alive)


def post_forecast(url: str, body: dict) -> dict:
    request = urllib.request.Request(f"{url}/forecast", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def curl_command(url: str, body: dict) -> str:
    return (f"curl -s -X POST {url}/forecast -H 'content-type: application/json' "
            f"-d {shlex.quote(json.dumps(body, separators=(',', ':')))}")
