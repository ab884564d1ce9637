"""The GPU path, proven: ``make gpu-check`` (``python -m benchmarks.gpu_check``).

    python -m benchmarks.gpu_check [--steps 300] [--size default|tiny] [--cpu-only]
                                   [--no-race] [--out gpu_check.md]

For every network family of ``forecaster.estimators.ESTIMATORS`` it trains the same model
on the same synthetic panel (64 noisy hourly sines of 1,000 hours, horizon 24) for ``--steps``
optimiser steps on the CPU and, when CUDA is there, on the GPU, where the trainer runs under
bf16 autocast. It checks that the training loss falls on each device, and that the
GPU-trained model, saved and loaded back, forecasts on the CPU (finite values, every series,
every step). Then, on a GPU, it runs a small race with ``execution.engine: ray``, each network
holding ``num_gpus: 0.25`` (four fits share the GPU), and checks every candidate finished.

It prints steps per second per family on each device and the GPU's speed-up, writes the same
table to ``--out``, and exits non-zero when a check fails, or when CUDA is missing unless
``--cpu-only`` says that only the CPU half is wanted (what CI runs).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from forecaster.data import SERIES, TARGET, TIME
from forecaster.estimators import ESTIMATORS, NeuralForecaster
from forecaster.trainer import EpochRecord

SERIES_COUNT, LENGTH, HORIZON, PERIOD = 64, 1000, 24, 24
STEPS_PER_EPOCH = 50
RACE_GPU_SHARE = 0.25


def synthetic_long(series: int = SERIES_COUNT, length: int = LENGTH, seed: int = 0
                   ) -> pd.DataFrame:
    """Noisy daily sines of different levels, amplitudes and phases, hourly."""
    rng = np.random.default_rng(seed)
    t = np.arange(length)
    frames = []
    for i in range(series):
        level, amplitude, phase = rng.uniform(5, 50), rng.uniform(1, 10), rng.uniform(0, 6.3)
        target = (level + amplitude * np.sin(2 * np.pi * t / PERIOD + phase)
                  + 0.1 * amplitude * rng.standard_normal(length))
        frames.append(pd.DataFrame({SERIES: f"s{i}", TARGET: target,
                                    TIME: pd.date_range("2024-01-01", periods=length,
                                                        freq="h")}))
    return pd.concat(frames, ignore_index=True)[[SERIES, TIME, TARGET]]


def settings(cls: type[NeuralForecaster], size: str, steps: int, device: str
             ) -> dict[str, Any]:
    """The family's own defaults (``size`` default) or its tiny test settings, trained for
    ``steps`` steps on ``device`` with no early stop."""
    per_epoch = max(1, min(STEPS_PER_EPOCH, steps // 4))  # four epochs at least: a curve
    epochs = max(1, steps // per_epoch)
    base = {} if size == "default" else {**cls.get_test_params()[0], "input_len": 48,
                                         "batch_size": 64}
    return {**base, "max_epochs": epochs, "steps_per_epoch": per_epoch, "patience": epochs,
            "device": device, "random_state": 0, "verbose": False}


@dataclass
class Training:
    curve: list[EpochRecord] = field(default_factory=list)
    steps: int = 0
    model: NeuralForecaster | None = None

    @property
    def steps_per_second(self) -> float:
        seconds = sum(r.seconds for r in self.curve)
        return self.steps / seconds if seconds else math.nan

    @property
    def falls(self) -> bool:
        return len(self.curve) > 1 and self.curve[-1].train_loss < self.curve[0].train_loss

    def losses(self) -> str:
        return f"{self.curve[0].train_loss:.3f} → {self.curve[-1].train_loss:.3f}"


def train(cls: type[NeuralForecaster], y: pd.DataFrame, size: str, steps: int,
          device: str) -> Training:
    run = Training()
    params = settings(cls, size, steps, device)
    model = cls(**params, on_epoch=run.curve.append)
    model.fit(y, fh=np.arange(1, HORIZON + 1))
    run.steps = params["steps_per_epoch"] * len(run.curve)
    run.model = model
    return run


def forecasts_on_cpu(model: NeuralForecaster, y: pd.DataFrame) -> str | None:
    """Why a model, saved and loaded back on the CPU, cannot forecast ``y``'s series."""
    with tempfile.TemporaryDirectory() as folder:
        model.save_model(folder)
        loaded = NeuralForecaster.load_model(folder)
    loaded.fit(y, fh=np.arange(1, HORIZON + 1))  # pretrained: only the context is set
    point = loaded.predict()
    series = y.index.get_level_values(0).nunique()
    if len(point) != series * HORIZON:
        return f"{len(point)} forecasts for {series} series x {HORIZON} steps"
    if not np.isfinite(point.to_numpy()).all():
        return "non-finite forecasts"
    if next(loaded.network_.parameters()).device.type != "cpu":
        return "the loaded network is not on the CPU"
    return None


def race_on_ray(long: pd.DataFrame, size: str, steps: int, folder: Path,
                gpu_share: float = RACE_GPU_SHARE) -> tuple[float, str]:
    """A small race, engine ray, every network holding ``gpu_share`` of a GPU: its wall time
    and its candidates' statuses."""
    from pipelines.config import parse_config
    from pipelines.race import run_race

    path = folder / "panel.csv"
    long.to_csv(path, index=False)
    candidates = [{"name": "snaive", "model": "NaiveForecaster", "params": {"strategy": "last"}}]
    for cls in ESTIMATORS:
        params = settings(cls, size, steps, "auto")
        params.pop("device")
        params.pop("verbose")
        candidates.append({"name": cls.__name__.removesuffix("Forecaster").lower(),
                           "model": cls.__name__, "params": params,
                           "resources": {"num_cpus": 1, "num_gpus": gpu_share}})
    config = parse_config({
        "name": "gpu-check", "data": {"path": str(path)}, "frequency": "h",
        "horizon": HORIZON, "candidates": candidates, "backtest": {"folds": 2},
        "registry": {"model_name": "gpu-check"},
        "tracking": {"tracking_uri": f"sqlite:///{folder / 'mlflow.db'}",
                     "artifact_location": str(folder / "artifacts"),
                     "enable_system_metrics_logging": False},
        "execution": {"engine": "ray"}})
    started = time.perf_counter()
    result = run_race(config, progress=False)
    seconds = time.perf_counter() - started
    board = result.leaderboard
    return seconds, ", ".join(f"{name} {status}" for name, status in board["status"].items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300,
                        help="optimiser steps per family and device (default 300)")
    parser.add_argument("--size", choices=["default", "tiny"], default="default",
                        help="each family's default sizes, or its tiny test settings")
    parser.add_argument("--cpu-only", action="store_true",
                        help="the CPU half only (no GPU needed): what CI runs")
    parser.add_argument("--no-race", action="store_true", help="leave out the race on Ray")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.md"),
                        help="where the table goes (default gpu_check.md)")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.cpu_only
    problems: list[str] = []
    if not cuda and not args.cpu_only:
        problems.append(f"CUDA is not available (torch {torch.__version__}): only the CPU half "
                        "ran; install the CUDA build of torch on a GPU machine")
    from forecaster.data import long_to_panel

    long = synthetic_long()
    y = long_to_panel(long)
    rows = []
    for cls in ESTIMATORS:
        family = cls.__name__
        cpu = train(cls, y, args.size, args.steps, "cpu")
        row = {"family": family, "cpu steps/s": cpu.steps_per_second,
               "cpu loss": cpu.losses()}
        if not cpu.falls:
            problems.append(f"{family}: the training loss did not fall on the CPU "
                            f"({cpu.losses()})")
        if cuda:
            gpu = train(cls, y, args.size, args.steps, "cuda")
            row |= {"gpu steps/s": gpu.steps_per_second,
                    "speed-up": gpu.steps_per_second / cpu.steps_per_second,
                    "gpu loss (bf16)": gpu.losses()}
            if not gpu.falls:
                problems.append(f"{family}: the training loss did not fall on the GPU "
                                f"({gpu.losses()})")
            assert gpu.model is not None
            why = forecasts_on_cpu(gpu.model, y)
            row["gpu model on cpu"] = why or "forecasts"
            if why:
                problems.append(f"{family}: the GPU-trained model on the CPU: {why}")
        else:  # the same round trip, of the CPU-trained model
            assert cpu.model is not None
            why = forecasts_on_cpu(cpu.model, y)
            row["saved, loaded, forecast"] = why or "ok"
            if why:
                problems.append(f"{family}: the saved model: {why}")
        rows.append(row)
        print(f"{family}: {row}", flush=True)
    table = pd.DataFrame(rows).set_index("family")
    device = torch.cuda.get_device_name(0) if cuda else "no GPU"
    lines = [f"# gpu check: {args.steps} steps per family, {args.size} sizes, "
             f"{SERIES_COUNT} series x {LENGTH} hours; {device}; CPU: "
             f"{torch.get_num_threads()} threads", "", table.to_markdown(floatfmt=".2f")]
    if cuda and not args.no_race:
        with tempfile.TemporaryDirectory() as folder:
            seconds, statuses = race_on_ray(long, args.size, args.steps, Path(folder))
        lines += ["", f"race on Ray (num_gpus {RACE_GPU_SHARE} per network): "
                      f"{seconds:.1f} s; {statuses}"]
        if "failed" in statuses:
            problems.append(f"the race on Ray: {statuses}")
    lines += ["", *(f"FAILED: {p}" for p in problems)] if problems else ["", "all checks pass"]
    text = "\n".join(lines)
    print(text)
    args.out.write_text(text + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
