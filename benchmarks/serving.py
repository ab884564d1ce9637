"""Serving benchmark: throughput and latency of POST /forecast against its peers.

    python -m benchmarks.serving [--repeats 3] [--seconds 10] [--clients 64] [--models ...]
    python -m benchmarks.serving --log-store postgresql://... [--models ...]

Trains the benchmark models once (benchmarks/serving_lstm.yaml: LSTMs with hidden size 128,
two layers, input length 96, horizon 48; one reads its input step by step, one in 24-step
segments; and the seasonal naive baseline, which the service refits on each series) into their
own MLflow store. In each repeat it starts every server on loopback and drives it with
closed-loop clients that each post one series: the service (two workers) with adaptive
batching on and off, and, for the step-by-step LSTM, ``mlflow models serve -w 2`` of the same
registered version; the baseline also with one client posting BIG_REQUEST series at a time.
The load generator shares the machine's cores with the server under test, for every peer
alike. Prints medians over the repeats, the ratios to mlflow and to batching off measured in
the same repeats, and the ratio to the bare model call (what the model alone could answer: a
network's forward pass at batch 64, the baseline's refits one after another).

With ``--log-store URL`` it measures the forecast log instead (serving.forecast_log): the
service with batching on, each request's series carrying ``start`` and ``freq``, with the log
off (FORECASTER_STORE_URL=none) and on (into the store at URL, an existing database) at each
of LOG_SHARES, at ``--clients`` clients; with the log on, its queues small (LOG_QUEUE_ROWS) so
that they are full in the measured window, the rows it wrote and dropped per second of that
window and the share of them it kept, and then the ingestion rate of POST /actuals into that
store (ACTUALS_CLIENTS clients posting ACTUALS_SERIES new series of ACTUALS_POINTS values each).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select
from tqdm.auto import tqdm

from benchmarks.load import LoadResult, run_load
from forecaster.datasets import default_data_dir, load_m4_hourly
from pipelines import registry
from pipelines.config import load_config
from pipelines.forecast_store import ForecastStore, forecasts
from pipelines.race import run_race
from serving.first_forecast import wait_for_ok, wait_until_ready
from serving.model import load_version

ROOT = Path(__file__).resolve().parents[1]
RACE = ROOT / "benchmarks" / "serving_lstm.yaml"
INPUT, HORIZON = 96, 48
MODELS = ("lstm-step", "lstm-segmented", "snaive")  # candidate names in RACE, served by alias
# (model, server); mlflow only for the model the reference timings describe; batching
# does not apply to the baseline, whose series run on the service's refit threads
PEERS = [("lstm-step", "batching on"), ("lstm-step", "batching off"), ("lstm-step", "mlflow"),
         ("lstm-segmented", "batching on"), ("lstm-segmented", "batching off"),
         ("snaive", "batching on")]
BIG_REQUEST = 64  # series per request of the baseline's single-client run
# --log-store: the service, batching on, with the log off, then on at each share of the time
# its thread may write (FORECASTER_FORECAST_LOG_MAX_SHARE; the default first)
LOG_SHARES = {"log on 5%": 0.05, "log on 10%": 0.10}
LOG_SERVERS = ("log off", *LOG_SHARES)
# while the log is on, each worker's queue holds one batch, so that it fills within the
# warm-up and the run measures the steady state (the default queue, 200,000 rows, would absorb
# a whole run's surplus and show nothing dropped); batches of 1,000 rows, not the default
# 5,000: the thread writes one, then rests (1 - share) / share as long, and a 10 s window
# must see many such cycles, not one or two, for its rate to be the steady one
LOG_QUEUE_ROWS = LOG_BATCH_ROWS = 1_000
ACTUALS_CLIENTS, ACTUALS_SERIES, ACTUALS_POINTS = 8, 10, 100  # the /actuals ingestion load
START = "2024-01-01T00:00:00"  # of each series sent in the log's runs
WARMUP_S = 2.0  # of each load, before its measured window


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_store(store: Path) -> tuple[dict[str, str], str, dict[str, int]]:
    """The benchmark registry (trained on first use): environment, model name, and the
    version of each model, which also holds an alias named after it."""
    store.mkdir(parents=True, exist_ok=True)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}",
           "MLFLOW_ARTIFACT_LOCATION": str(store / "mlartifacts")}
    os.environ.update(env)
    config = load_config(RACE)
    name = config.registered_model
    if set(registry.aliases(name)) < set(MODELS):
        result = run_race(config, progress=True)
        for model in MODELS:
            registry.set_alias(name, model, result.versions[model])
    return env, name, {model: registry.aliases(name)[model] for model in MODELS}


def bare_forward(name: str, version: int, history: np.ndarray) -> dict[int, float]:
    """Median seconds of the model's call at batch sizes 1 and 64 (for a refitted model, 64
    times its call on one series: it refits them one after another)."""
    import torch

    torch.set_num_threads(1)
    client = MlflowClient()
    model = load_version(client, client.get_model_version(name, str(version)), "bench")
    refits = model.info.refit_cost is not None
    times = {}
    for batch in (1,) if refits else (1, 64):
        samples = []
        for _ in range(5 if refits else 30):
            start = time.perf_counter()
            model.predict([history] * batch)
            samples.append(time.perf_counter() - start)
        times[batch] = float(np.median(samples))
    if refits:
        times[64] = 64 * times[1]
    return times


def example_history() -> np.ndarray:
    train, _ = load_m4_hourly(default_data_dir() / "m4")
    first = train[train["series_id"] == train["series_id"].iloc[0]]
    return first["target"].to_numpy(np.float32)[-INPUT:]


def service_body(history: np.ndarray, series: int = 1, timestamps: bool = False) -> bytes:
    times = {"start": START, "freq": "h"} if timestamps else {}
    return json.dumps({"series": [{"id": f"H{i + 1}", "values": history.tolist(), **times}
                                  for i in range(series)], "horizon": HORIZON}).encode()


def actuals_bodies() -> Callable[[], bytes]:
    """POST /actuals bodies of series never sent before: each request stores new points."""
    counter, run = itertools.count(), uuid.uuid4().hex[:8]  # new ids in every run too
    values = np.linspace(0, 1, ACTUALS_POINTS).tolist()

    def body() -> bytes:
        batch = next(counter)
        return json.dumps({"series": [{"id": f"A{run}-{batch}-{i}", "values": values,
                                       "start": START, "freq": "h"}
                                      for i in range(ACTUALS_SERIES)]}).encode()

    return body


def logged_rows(store_url: str) -> int:
    with ForecastStore.open(store_url) as store, store.engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(forecasts)).scalar_one()


def dropped_rows(url: str) -> float:
    metrics = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    return sum(sample.value for family in text_string_to_metric_families(metrics)
               for sample in family.samples
               if sample.name == "forecaster_forecast_log_dropped_total")


def record_log_counts(into: list[tuple[int, float, float]], store_url: str, url: str) -> None:
    """Append the rows the log has written and dropped so far, and the time."""
    into.append((logged_rows(store_url), dropped_rows(url), time.perf_counter()))


def mlflow_body(history: np.ndarray) -> bytes:
    # the registered signature's timestamps are integers, as the M4 loader gives them
    frame = pd.DataFrame({"series_id": "H1", "timestamp": np.arange(len(history)),
                          "target": history.astype(float)})
    return json.dumps({"dataframe_split": frame.to_dict(orient="split", index=False),
                       "params": {"horizon": HORIZON}}).encode()


def start_server(server: str, port: int, env: dict[str, str], name: str, model: str,
                 version: int, log: Path, store_url: str = "none",
                 log_share: float | None = None) -> subprocess.Popen:
    full_env = {**os.environ, **env, "OMP_NUM_THREADS": "1",
                # mlflow models serve runs `uvicorn` from PATH: this environment's
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    if server == "mlflow":
        command = [sys.executable, "-m", "mlflow", "models", "serve", "-m",
                   f"models:/{name}/{version}", "-w", "2", "-p", str(port),
                   "--env-manager", "local"]
    else:
        # two workers, like mlflow's best configuration: one per core
        full_env |= {"FORECASTER_MODEL_NAME": name, "FORECASTER_MODEL_ALIAS": model,
                     "FORECASTER_WORKERS": "2",
                     "FORECASTER_BATCHING": str(server != "batching off").lower(),
                     "FORECASTER_STORE_URL": store_url}
        if log_share is not None:
            full_env |= {"FORECASTER_FORECAST_LOG_MAX_SHARE": str(log_share),
                         "FORECASTER_FORECAST_LOG_QUEUE_ROWS": str(LOG_QUEUE_ROWS),
                         "FORECASTER_FORECAST_LOG_BATCH_ROWS": str(LOG_BATCH_ROWS)}
        command = [sys.executable, "-m", "cli.main", "serve", "--host", "127.0.0.1",
                   "--port", str(port)]
    with log.open("wb") as output:
        return subprocess.Popen(command, env=full_env, stdout=output, stderr=subprocess.STDOUT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--store", type=Path, default=Path("/tmp/forecaster-serving-bench"))
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                        help="the models to serve (default: all)")
    parser.add_argument("--log-store", help="measure the forecast log into this store (an "
                        "existing database's URL) instead of the peers: see the module doc")
    args = parser.parse_args()

    env, name, versions = prepare_store(args.store)
    history = example_history()
    logs = args.store / "logs"
    logs.mkdir(exist_ok=True)
    results: dict[tuple[str, str, int, int], list[LoadResult]] = {}
    # (model, server) -> (written, dropped) rows/s of each repeat
    log_rates: dict[tuple[str, str], list[tuple[float, float]]] = {}
    ingestion: list[LoadResult] = []
    if args.log_store:
        logged_rows(args.log_store)  # migrated before any service opens it
        runs = [(r, model, server) for r in range(args.repeats) for model in args.models
                for server in LOG_SERVERS]
    else:
        runs = [(r, *peer) for r in range(args.repeats) for peer in PEERS
                if peer[0] in args.models]
    for repeat, model, server in tqdm(runs, desc="serving benchmark"):
        port = free_port()
        log = logs / f"{model}-{server.replace(' ', '-')}-{repeat}.log"
        log_on = server in LOG_SHARES
        process = start_server(server, port, env, name, model, versions[model], log,
                               store_url=args.log_store if log_on else "none",
                               log_share=LOG_SHARES.get(server))
        url = f"http://127.0.0.1:{port}"
        try:
            loads = [(args.clients, 1)] if args.log_store else \
                [(args.clients, 1), (1, 1)] + ([(1, BIG_REQUEST)] if model == "snaive" else [])
            if server == "mlflow":
                wait_for_ok(f"{url}/ping", timeout=180, alive=lambda p=process: p.poll() is None)
                endpoint, bodies = f"{url}/invocations", {1: mlflow_body(history)}
            else:
                wait_until_ready(url, timeout=180, alive=lambda p=process: p.poll() is None)
                endpoint = f"{url}/forecast"
                bodies = {n: service_body(history, n, timestamps=bool(args.log_store))
                          for _, n in loads}
            for clients, series in loads:
                if log_on:  # the counts when the measured window opens, after the warm-up
                    before: list[tuple[int, float, float]] = []
                    timer = threading.Timer(WARMUP_S, record_log_counts,
                                            (before, args.log_store, url))
                    timer.start()
                result = run_load(endpoint, bodies[series], clients, args.seconds,
                                  warmup=WARMUP_S)
                results.setdefault((model, server, clients, series), []).append(result)
                tqdm.write(f"{model:>14} {server:>12} {clients:>3} clients x {series:>3} "
                           f"series: {result.throughput * series:7.1f} series/s, p50 "
                           f"{result.percentile(50):6.1f} ms, p99 {result.percentile(99):6.1f} "
                           f"ms, failures {dict(result.failures)}")
                if log_on:
                    timer.join()
                    written, dropped, started = before[0]
                    elapsed = time.perf_counter() - started
                    log_rates.setdefault((model, server), []).append(
                        ((logged_rows(args.log_store) - written) / elapsed,
                         (dropped_rows(url) - dropped) / elapsed))
            if server == LOG_SERVERS[1]:
                ingestion.append(run_load(f"{url}/actuals", actuals_bodies(), ACTUALS_CLIENTS,
                                          args.seconds))
                tqdm.write(f"/actuals: {ingestion[-1].throughput * points_per_post():.0f} "
                           f"points/s, failures {dict(ingestion[-1].failures)}")
        finally:
            process.terminate()
            process.wait(30)
    if args.log_store:
        print(log_table(results, log_rates, ingestion, args.clients, args.repeats))
    else:
        floors = {model: bare_forward(name, versions[model], history) for model in args.models}
        print(table(results, floors, args.clients, args.repeats))


def points_per_post() -> int:
    return ACTUALS_SERIES * ACTUALS_POINTS


def log_table(results: dict[tuple[str, str, int, int], list[LoadResult]],
              log_rates: dict[tuple[str, str], list[tuple[float, float]]],
              ingestion: list[LoadResult],
              clients: int, repeats: int) -> str:
    def rates(model: str, server: str) -> np.ndarray:
        return np.array([r.throughput for r in results[(model, server, clients, 1)]])

    rows = []
    for (model, server, _, _), runs in results.items():
        logged = server in LOG_SHARES
        written, dropped = np.array(log_rates.get((model, server), [(np.nan, np.nan)])).T
        rows.append({
            "model": model, "server": server, "clients": clients,
            "series/s": np.median(rates(model, server)),
            "p50 ms": np.median([r.percentile(50) for r in runs]),
            "p99 ms": np.median([r.percentile(99) for r in runs]),
            "failed": int(sum(r.errors for r in runs)),
            # each repeat's ratio to the log off measured just before it, then their median
            "x log off": np.median(rates(model, server) / rates(model, "log off")),
            "rows offered/s": np.median(rates(model, server)) * HORIZON if logged else np.nan,
            "rows written/s": np.median(written),
            "rows dropped/s": np.median(dropped),
            # of the rows the log received in the window: the share it wrote (steady state)
            "kept %": np.median(100 * written / (written + dropped)),
        })
    forecast_table = pd.DataFrame(rows).to_markdown(
        index=False,
        floatfmt=("", "", "", ".1f", ".1f", ".1f", "", ".2f", ".0f", ".0f", ".0f", ".1f"))
    actuals_table = pd.DataFrame([{
        "endpoint": "POST /actuals", "clients": ACTUALS_CLIENTS,
        "points/request": points_per_post(),
        "points/s": np.median([r.throughput * points_per_post() for r in ingestion]),
        "p50 ms": np.median([r.percentile(50) for r in ingestion]),
        "p99 ms": np.median([r.percentile(99) for r in ingestion]),
        "failed": int(sum(r.errors for r in ingestion))}]).to_markdown(index=False,
                                                                       floatfmt=".1f")
    note = (f"medians over {repeats} repeats of {clients} closed-loop clients posting one series "
            f"of {INPUT} values with start and freq, horizon {HORIZON} (a row per step); x log "
            "off: the median over repeats of the throughput over the log off's in the same "
            "repeat; rows offered: a row per step of each series answered; log on N%: its thread "
            f"writes at most N% of the time, each worker's queue {LOG_QUEUE_ROWS} rows (full "
            f"after the warm-up: the steady state), batches of {LOG_BATCH_ROWS}; written and "
            "dropped per second of the measured window; kept: written over written plus "
            "dropped. /actuals: new series each request, into the same store, after the first "
            "log-on run")
    return f"{forecast_table}\n\n{actuals_table}\n\n{note}"


def table(results: dict[tuple[str, str, int, int], list[LoadResult]],
          floors: dict[str, dict[int, float]], clients: int, repeats: int) -> str:
    def rate(model: str, server: str, n: int, series: int = 1) -> float:
        runs = results.get((model, server, n, series))
        return float(np.median([r.throughput * series for r in runs])) if runs else np.nan

    rows = []
    for (model, server, n, series), runs in sorted(
            results.items(), key=lambda kv: (MODELS.index(kv[0][0]), -kv[0][2], kv[0][3])):
        throughput = rate(model, server, n, series)
        rows.append({
            "model": model, "server": server, "clients": n, "series/request": series,
            "series/s": throughput,
            "p50 ms": np.median([r.percentile(50) for r in runs]),
            "p95 ms": np.median([r.percentile(95) for r in runs]),
            "p99 ms": np.median([r.percentile(99) for r in runs]),
            "failed": int(sum(r.errors for r in runs)),
            "x mlflow": throughput / rate(model, "mlflow", n) if n == clients else np.nan,
            "x off": throughput / rate(model, "batching off", n) if series == 1 else np.nan,
            "x floor": throughput / (64 / floors[model][64]),
        })
    for model, floor in floors.items():
        rows.append({"model": model, "server": "bare model call", "clients": 64,
                     "series/s": 64 / floor[64], "p50 ms": floor[64] * 1000, "x floor": 1.0})
        rows.append({"model": model, "server": "bare model call", "clients": 1,
                     "series/s": 1 / floor[1], "p50 ms": floor[1] * 1000})
    note = (f"medians over {repeats} repeats of {clients} and 1 closed-loop clients posting one "
            f"series each (and for snaive, 1 client posting {BIG_REQUEST}); x mlflow and x off: "
            "throughput over that of mlflow models serve -w 2 and of batching off, same model, "
            "clients and repeats; x floor: throughput over the bare model call at batch 64 (64 "
            "/ its time; for snaive, 64 refits one after another)")
    return pd.DataFrame(rows).to_markdown(index=False, floatfmt=".1f") + "\n\n" + note


if __name__ == "__main__":
    main()
