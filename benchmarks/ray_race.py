"""Local against Ray on this machine: a whole race, and the baselines against the number of
series.

    python -m benchmarks.ray_race [--config configs/quick.yaml] [--series 100 414 4140]
                                  [--chunks 4] [--skip-race] [--skip-baselines]

The race: the config's race run with ``execution.engine: local``, then ``ray`` (a Ray started
in the process, on every core), each into a fresh store; wall time, and per stage the sum over
candidates of the backtest's and the refit's own time (on Ray, the tasks' time: their sum
against the wall time is the parallel efficiency).

The baselines: sktime's seasonal naive forecast (fit and predict, horizon 48) on the first
100 and all 414 M4 Hourly series, and on 4,140 made by tiling them, in this process (sktime
loops over the series) against Ray with the panel in the object store once and one task per
chunk of series (``--chunks``, by default one per core).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from sktime.forecasting.naive import NaiveForecaster

from forecaster.data import SERIES, long_to_panel
from forecaster.datasets import (
    M4_HOURLY_HORIZON,
    M4_HOURLY_SEASONALITY,
    default_data_dir,
    load_m4_hourly,
)
from pipelines.execution import SINGLE_MACHINE_VARIABLE
from pipelines.warning_capture import without_sktime_notice


def race_times(config_path: Path, engine: str) -> dict[str, Any]:
    from pipelines.config import parse_config
    from pipelines.race import run_race

    raw = yaml.safe_load(config_path.read_text())
    with tempfile.TemporaryDirectory() as store:
        raw["tracking"] = {"tracking_uri": f"sqlite:///{store}/mlflow.db",
                           "artifact_location": f"{store}/artifacts",
                           "enable_system_metrics_logging": False}
        raw["execution"] = {"engine": engine}
        # a race exports its store's URIs, which would override the next race's
        for variable in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            os.environ.pop(variable, None)
        config = parse_config(raw, base_dir=config_path.resolve().parent)
        started = time.perf_counter()
        result = run_race(config, progress=False)
        wall = time.perf_counter() - started
    board = result.leaderboard
    return {"engine": engine, "wall s": wall,
            "backtests s (sum)": board["backtest_seconds"].sum(),
            "refits s (sum)": board["train_seconds"].sum(),
            "winner": result.winner, f"winner {result.metric}": result.winner_score}


def tiled_panel(data_dir: Path, series: int) -> pd.DataFrame:
    """``series`` M4 Hourly series: the first ones, or all of them repeated under new ids."""
    train, _ = load_m4_hourly(data_dir / "m4")
    ids = list(train[SERIES].drop_duplicates())
    copies = []
    for copy in range(-(-series // len(ids))):
        frame = train.copy()
        frame[SERIES] = frame[SERIES] + f"_{copy}"
        copies.append(frame)
    long = pd.concat(copies, ignore_index=True)
    keep = list(long[SERIES].drop_duplicates())[:series]
    return long_to_panel(long[long[SERIES].isin(keep)])


def naive_forecast(panel: pd.DataFrame, ids: list[Any] | None = None) -> int:
    """Fit and predict the seasonal naive forecast on ``panel`` (its series ``ids``); returns
    the number of forecast rows."""
    if ids is not None:
        panel = panel.loc[ids]
    # sktime builds one forecaster per series, each warning about remember_data: thousands of
    # lines over the table
    with without_sktime_notice():
        model = NaiveForecaster(strategy="last", sp=M4_HOURLY_SEASONALITY)
        model.fit(panel, fh=np.arange(1, M4_HOURLY_HORIZON + 1))
        return len(model.predict())


def baseline_times(data_dir: Path, counts: list[int], chunks: int) -> list[dict[str, Any]]:
    import ray

    rows = []
    remote = ray.remote(num_cpus=1)(naive_forecast)
    # the workers start (and import sktime) once, before anything is timed
    warm = ray.put(tiled_panel(data_dir, chunks))
    ray.get([remote.remote(warm) for _ in range(chunks)])
    for count in counts:
        panel = tiled_panel(data_dir, count)
        started = time.perf_counter()
        local_rows = naive_forecast(panel)
        local = time.perf_counter() - started
        started = time.perf_counter()
        shared = ray.put(panel)  # once; each task takes its chunk of series from it
        ids = list(panel.index.get_level_values(0).unique())
        parts = [list(part) for part in np.array_split(np.asarray(ids, dtype=object), chunks)]
        ray_rows = sum(ray.get([remote.remote(shared, part) for part in parts]))
        on_ray = time.perf_counter() - started
        assert ray_rows == local_rows == count * M4_HOURLY_HORIZON
        rows.append({"series": count, "local s": local, f"ray, {chunks} chunks s": on_ray,
                     "local ms/series": 1000 * local / count, "speed-up": local / on_ray})
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ray_race",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/quick.yaml"))
    parser.add_argument("--series", type=int, nargs="+", default=[100, 414, 4140])
    parser.add_argument("--chunks", type=int, default=os.cpu_count() or 1,
                        help="Ray tasks per panel (default: one per core)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="the folder holding m4/ (default: ../shared/data)")
    parser.add_argument("--skip-race", action="store_true")
    parser.add_argument("--skip-baselines", action="store_true")
    args = parser.parse_args(argv)
    # the Ray of this process stays on loopback (as the race's own does)
    os.environ.setdefault(SINGLE_MACHINE_VARIABLE, "0")
    if not args.skip_race:
        races = pd.DataFrame([race_times(args.config, engine) for engine in ("local", "ray")])
        print(f"\nrace {args.config}:\n" + races.to_markdown(index=False, floatfmt=".2f"))
    if not args.skip_baselines:
        import ray

        ray.init(address="local", logging_level="WARNING", log_to_driver=False)
        try:
            table = pd.DataFrame(baseline_times(args.data_dir or default_data_dir(),
                                                args.series, args.chunks))
        finally:
            ray.shutdown()
        # the series column is a count: no decimals
        print("\nseasonal naive, fit and predict:\n" + table.to_markdown(
            index=False, floatfmt=[".0f"] + [".2f"] * (table.shape[1] - 1)))


if __name__ == "__main__":
    main()
