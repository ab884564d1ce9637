"""Serving benchmark: throughput and latency of POST /forecast against its peers.

    python benchmarks/serving.py [--repeats 3] [--seconds 10] [--clients 64]

Trains the benchmark model once (benchmarks/serving_lstm.yaml: an LSTM with hidden size 128,
two layers, input length 96, horizon 48) into its own MLflow store, then, in each repeat,
starts each server on loopback and drives it with closed-loop clients that each post one
series: the service with adaptive batching on, the same with batching off, and
``mlflow models serve -w 2`` of the same registered version. The load generator shares the
machine's cores with the server under test, for every peer alike. Prints medians over the
repeats, the ratio to mlflow measured in the same repeats, and the ratio to the bare forward
pass at batch 64 (the floor: what the model alone could answer).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from tqdm.auto import tqdm

from benchmarks.load import run_load
from forecaster.datasets import load_m4_hourly
from pipelines.config import load_config
from pipelines.race import run_race
from serving.first_forecast import wait_until_ready
from serving.model import load_version, resolve_alias

ROOT = Path(__file__).resolve().parents[1]
RACE = ROOT / "benchmarks" / "serving_lstm.yaml"
INPUT, HORIZON = 96, 48


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_store(store: Path) -> tuple[dict[str, str], int]:
    """The benchmark registry (trained on first use) and the champion's version."""
    store.mkdir(parents=True, exist_ok=True)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}",
           "MLFLOW_ARTIFACT_LOCATION": str(store / "mlartifacts")}
    os.environ.update(env)
    config = load_config(RACE)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    version = resolve_alias(client, config.registered_model, "champion")
    if version is None:
        run_race(config, progress=True)
        version = resolve_alias(client, config.registered_model, "champion")
    return env, int(version.version)


def bare_forward(version: int) -> dict[int, float]:
    """Median seconds of the served model's forward pass at batch sizes 1 and 64."""
    import torch

    torch.set_num_threads(1)
    client = MlflowClient()
    model = load_version(client, client.get_model_version(RACE_MODEL, str(version)),
                         "champion")
    history = example_history()
    times = {}
    for batch in (1, 64):
        samples = []
        for _ in range(50):
            start = time.perf_counter()
            model.predict([history] * batch)
            samples.append(time.perf_counter() - start)
        times[batch] = float(np.median(samples))
    return times


def example_history() -> np.ndarray:
    train, _ = load_m4_hourly(ROOT.parent / "shared" / "data" / "m4")
    first = train[train["series_id"] == train["series_id"].iloc[0]]
    return first["target"].to_numpy(np.float32)[-INPUT:]


def service_body(history: np.ndarray) -> bytes:
    return json.dumps({"series": [{"id": "H1", "values": history.tolist()}],
                       "horizon": HORIZON}).encode()


def mlflow_body(history: np.ndarray) -> bytes:
    # the registered signature's timestamps are integers, as the M4 loader gives them
    frame = pd.DataFrame({"series_id": "H1", "timestamp": np.arange(len(history)),
                          "target": history.astype(float)})
    return json.dumps({"dataframe_split": frame.to_dict(orient="split", index=False),
                       "params": {"horizon": HORIZON}}).encode()


def start_server(kind: str, port: int, env: dict[str, str], version: int) -> subprocess.Popen:
    full_env = {**os.environ, **env, "OMP_NUM_THREADS": "1",
                # mlflow models serve runs `uvicorn` from PATH: this environment's
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    if kind == "mlflow":
        command = [sys.executable, "-m", "mlflow", "models", "serve", "-m",
                   f"models:/{RACE_MODEL}/{version}", "-w", "2", "-p", str(port),
                   "--env-manager", "local"]
    else:
        # two workers, like mlflow's best configuration: one per core
        full_env |= {"FORECASTER_MODEL_NAME": RACE_MODEL, "FORECASTER_WORKERS": "2",
                     "FORECASTER_BATCHING": str(kind == "batching on").lower()}
        command = [sys.executable, "-m", "pipelines.cli", "serve", "--host", "127.0.0.1",
                   "--port", str(port)]
    return subprocess.Popen(command, env=full_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def wait_for_mlflow(url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"mlflow models serve at {url} did not start")


RACE_MODEL = load_config(RACE).registered_model
PEERS = ("batching on", "batching off", "mlflow")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--store", type=Path, default=Path("/tmp/forecaster-serving-bench"))
    args = parser.parse_args()

    env, version = prepare_store(args.store)
    floor = bare_forward(version)
    history = example_history()
    bodies = {"batching on": service_body(history), "batching off": service_body(history),
              "mlflow": mlflow_body(history)}
    results: dict[tuple[str, int], list] = {}
    runs = [(r, peer) for r in range(args.repeats) for peer in PEERS]
    for _, peer in tqdm(runs, desc="serving benchmark"):
        port = free_port()
        server = start_server(peer, port, env, version)
        url = f"http://127.0.0.1:{port}"
        try:
            if peer == "mlflow":
                wait_for_mlflow(url)
                endpoint = f"{url}/invocations"
            else:
                wait_until_ready(url, timeout=180, alive=lambda s=server: s.poll() is None)
                endpoint = f"{url}/forecast"
            for clients in (args.clients, 1):
                result = run_load(endpoint, bodies[peer], clients, args.seconds)
                results.setdefault((peer, clients), []).append(result)
                tqdm.write(f"{peer:>12} {clients:>3} clients: {result.throughput:7.1f} "
                           f"series/s, p50 {result.percentile(50):6.1f} ms, p99 "
                           f"{result.percentile(99):6.1f} ms, failures {dict(result.failures)}")
        finally:
            server.terminate()
            server.wait(30)
    print(table(results, floor, args.clients, args.repeats))


def table(results: dict, floor: dict[int, float], clients: int, repeats: int) -> str:
    floor_rate = 64 / floor[64]
    mlflow_rate = np.median([r.throughput for r in results[("mlflow", clients)]])
    rows = []
    for (peer, n), runs in sorted(results.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        rate = float(np.median([r.throughput for r in runs]))
        rows.append({
            "server": peer, "clients": n, "series/s": rate,
            "p50 ms": np.median([r.percentile(50) for r in runs]),
            "p95 ms": np.median([r.percentile(95) for r in runs]),
            "p99 ms": np.median([r.percentile(99) for r in runs]),
            "errors": int(sum(r.errors for r in runs)),
            "x mlflow": rate / mlflow_rate if n == clients else np.nan,
            "x floor": rate / floor_rate,
        })
    rows.append({"server": "bare forward pass", "clients": 64, "series/s": floor_rate,
                 "p50 ms": floor[64] * 1000, "x floor": 1.0})
    rows.append({"server": "bare forward pass", "clients": 1, "series/s": 1 / floor[1],
                 "p50 ms": floor[1] * 1000})
    frame = pd.DataFrame(rows)
    note = (f"medians over {repeats} repeats; clients post one series each; "
            f"x mlflow: throughput / mlflow models serve -w 2 at {clients} clients, same "
            "repeats; x floor: throughput / bare forward pass at batch 64")
    return frame.to_markdown(index=False, floatfmt=".1f") + "\n\n" + note


if __name__ == "__main__":
    main()
