"""The demo's first request: wait for the service, forecast one series, print the curl; for a
model that explains, the inputs its attention weighed most (POST /explain)."""

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


def post(url: str, route: str, body: dict) -> dict:
    """POST ``body`` as JSON to ``url + route`` (``/forecast``, ``/explain``): the answer."""
    request = urllib.request.Request(f"{url}{route}", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def get(url: str, route: str) -> dict:
    with urllib.request.urlopen(f"{url}{route}", timeout=30) as response:
        return json.loads(response.read())


def curl_command(url: str, body: dict, route: str = "/forecast") -> str:
    return (f"curl -s -X POST {url}{route} -H 'content-type: application/json' "
            f"-d {shlex.quote(json.dumps(body, separators=(',', ':')))}")


def top_inputs_summary(answer: dict) -> str:
    """An /explain answer in a line per series: its most-attended input steps by lag (and time,
    when the request gave ``start``) with their mean attention, against an even spread. Runs
    of neighbouring steps of equal weight (the steps of one patch or segment) read as one."""
    lines = []
    for entry in answer["explanations"]:
        runs: list[list[dict]] = []
        for top in entry["top_inputs"]:  # by weight, then oldest first: lags count down
            last = runs[-1][-1] if runs else None
            if last and top["lag"] == last["lag"] - 1 and \
                    f"{top['weight']:.3f}" == f"{last['weight']:.3f}":
                runs[-1].append(top)
            else:
                runs.append([top])
        even = 1 / len(entry["attention"][0])
        lines.append(f"{entry['id']}: {', '.join(_run_text(run) for run in runs)} "
                     f"(an even spread: {even:.3f} each)")
    return "\n".join(lines)


def _run_text(run: list[dict]) -> str:
    first, last = run[0], run[-1]
    if len(run) == 1:
        times = f" ({first['timestamp']})" if "timestamp" in first else ""
        return f"{first['lag']} back{times} {first['weight']:.3f}"
    times = f" ({first['timestamp']} to {last['timestamp']})" if "timestamp" in first else ""
    return f"{first['lag']}-{last['lag']} back{times} {first['weight']:.3f} each"
