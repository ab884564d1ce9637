"""Shared fixtures: a small synthetic panel and tiny estimator settings that train in well under
a second on a CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from forecaster import (
    GRUForecaster,
    LSTMForecaster,
    NeuralForecaster,
    RNNForecaster,
    TCNForecaster,
    TransformerForecaster,
)
from forecaster.data import SERIES, TARGET, TIME

# ../shared/data relative to the repository root (tests/ -> repo root -> its parent)
DATA_DIR = Path(__file__).parents[1].parent / "shared" / "data"

PERIOD = 12
LENGTHS = {"a": 80, "b": 64, "c": 48}  # different lengths: a ragged panel

# training settings shared by every estimator in the suite
TINY_TRAINING: dict[str, Any] = {
    "input_len": 12,
    "max_epochs": 2,
    "steps_per_epoch": 3,
    "batch_size": 16,
    "verbose": False,
    "random_state": 0,
}

# the smallest networks of each family
TINY_NETWORKS: dict[type[NeuralForecaster], dict[str, Any]] = {
    RNNForecaster: {"hidden_size": 8, "num_layers": 1, "segment_len": 4},
    LSTMForecaster: {"hidden_size": 8, "num_layers": 1, "segment_len": 4},
    GRUForecaster: {"hidden_size": 8, "num_layers": 1, "segment_len": 4},
    TCNForecaster: {"channels": 8, "num_layers": 2},
    TransformerForecaster: {"d_model": 8, "n_heads": 2, "encoder_layers": 1, "patch_len": 4,
                            "patch_stride": 2},
}
ESTIMATOR_CLASSES = list(TINY_NETWORKS)


def tiny(cls: type[NeuralForecaster], **overrides: Any) -> NeuralForecaster:
    """A tiny, fast, seeded estimator of the given class."""
    return cls(**{**TINY_TRAINING, **TINY_NETWORKS[cls], **overrides})


def sine_series(length: int, phase: float = 0.0, level: float = 0.0, noise: float = 0.05,
                seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(length)
    return level + np.sin(2 * np.pi * t / PERIOD + phase) + noise * rng.standard_normal(length)


def make_panel(lengths: dict[str, int] | None = None, seed: int = 0) -> pd.DataFrame:
    """pd-multiindex panel (series_id, timestamp) of noisy sines with integer timestamps."""
    lengths = LENGTHS if lengths is None else lengths
    frames = []
    for i, (key, length) in enumerate(lengths.items()):
        frames.append(pd.DataFrame({
            SERIES: key,
            TIME: np.arange(length),
            TARGET: sine_series(length, phase=0.7 * i, level=0.5 * i, seed=seed + i),
        }))
    return pd.concat(frames).set_index([SERIES, TIME])


@pytest.fixture
def sine_panel() -> pd.DataFrame:
    """Three noisy sines (period 12) of lengths 80, 64 and 48, ids "a", "b", "c"."""
    return make_panel()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"reference data not found at {DATA_DIR} (expected ../shared/data beside "
                    "the repository root)")
    return DATA_DIR


def pytest_configure(config: pytest.Config) -> None:
    # the tiny test networks are far faster on one thread: with several, torch's thread pool
    # spins against whatever else shares the CPU (10x slower on a busy 2-core machine)
    torch.set_num_threads(1)
    # sktime 1.2 warns on every fit that the default of ``remember_data`` will change in 1.3;
    # test_estimators.py::test_forecasts_do_not_rely_on_remember_data covers what that means
    config.addinivalue_line(
        "filterwarnings", "ignore:The default of config ``remember_data``:FutureWarning")
