"""The demo's first request: wait for the service, forecast one series, print the curl."""

from __future__ import annotations

import json
import shlex
import time
import urllib.error
import urllib.request

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


def wait_until_ready(url: str, timeout: float = 300.0, alive: callable = lambda: True) -> None:
    """Poll ``url``/readyz until it answers 200; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} was not ready within {timeout:.0f} s")


def post_forecast(url: str, body: dict) -> dict:
    request = urllib.request.Request(f"{url}/forecast", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def curl_command(url: str, body: dict) -> str:
    return (f"curl -s -X POST {url}/forecast -H 'content-type: application/json' "
            f"-d {shlex.quote(json.dumps(body, separators=(',', ':')))}")
