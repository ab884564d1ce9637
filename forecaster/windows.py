"""Ragged panels -> fixed-size (input, horizon) windows, vectorised and instance-normalised.

A window is cut at a forecast *origin* t of one series: the input is rows [t - input_len, t),
the horizon rows [t, t + horizon). Rows before the series' start are zero-padded on the left
and flagged in an observed mask, so short series still make windows. The target is scaled per
window by the mean and standard deviation of its observed input (instance normalisation, as in
RevIN); ``Windows.unscale`` reverses it on the model's output.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields

import numpy as np

SCALE_FLOOR = 1e-3  # relative to the window's level: flat inputs must not blow up the loss


@dataclass(frozen=True)
class Windows:
    """A batch of windows; each array is float32 and leads with the batch axis."""

    past: np.ndarray  # (B, input_len, 2 + n_covariates): scaled target, observed mask, covariates
    future: np.ndarray  # (B, horizon, n_covariates): known-future covariates
    static: np.ndarray  # (B, n_static)
    target: np.ndarray  # (B, horizon): scaled target after the origin (zeros when unknown)
    loc: np.ndarray  # (B, 1)
    scale: np.ndarray  # (B, 1)

    def slice(self, start: int, stop: int) -> Windows:
        return Windows(*(getattr(self, f.name)[start:stop] for f in fields(self)))

    def unscale(self, scaled: np.ndarray) -> np.ndarray:
        """Scaled model output (B, horizon, ...) -> original units."""
        shape = (-1,) + (1,) * (scaled.ndim - 1)
        return scaled * self.scale.reshape(shape) + self.loc.reshape(shape)


class Panel:
    """Many series of different lengths in one flat array, for vectorised gathers.

    Each series is an array (time, 1 + n_covariates) whose first column is the target.
    """

    def __init__(self, series: list[np.ndarray], static: np.ndarray | None = None):
        if not series:
            raise ValueError("the panel has no series")
        self.lengths = np.array([len(s) for s in series], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        self.values = np.concatenate(series).astype(np.float32)
        n = len(series)
        self.static = np.zeros((n, 0), np.float32) if static is None else static.astype(np.float32)

    def __len__(self) -> int:
        return len(self.lengths)

    def windows(
        self, series: np.ndarray, origins: np.ndarray, input_len: int, horizon: int
    ) -> Windows:
        """Windows of the given series at the given origins (row offsets within each series)."""
        offsets = np.arange(-input_len, horizon)  # (L + H,)
        local = origins[:, None] + offsets  # (B, L + H) row within the series
        inside = (local >= 0) & (local < self.lengths[series, None])
        rows = np.where(inside, self.starts[series, None] + local, 0)
        block = np.where(inside[..., None], self.values[rows], 0.0)  # (B, L + H, C)

        observed = inside[:, :input_len].astype(np.float32)  # (B, L)
        history = block[:, :input_len, 0]
        count = observed.sum(1, keepdims=True).clip(min=1)
        loc = (history * observed).sum(1, keepdims=True) / count
        var = (((history - loc) * observed) ** 2).sum(1, keepdims=True) / count
        scale = np.maximum(np.sqrt(var), SCALE_FLOOR * (np.abs(loc) + 1.0))
        scaled = (block[..., 0] - loc) / scale * inside  # zeros where padded

        past = np.concatenate(
            [scaled[:, :input_len, None], observed[..., None], block[:, :input_len, 1:]], axis=-1
        )
        return Windows(
            past=past.astype(np.float32),
            future=block[:, input_len:, 1:].astype(np.float32),
            static=self.static[series],
            target=scaled[:, input_len:].astype(np.float32),
            loc=loc.astype(np.float32),
            scale=scale.astype(np.float32),
        )


class WindowSampler:
    """Random training windows and fixed validation windows from a panel.

    The last ``validation_rows`` rows of each series are held out: training windows end before
    them, and validation windows forecast inside them, at origins ``validation_stride`` apart.
    A refit, after early stopping, samples over them too (``including_validation``).
    """

    def __init__(self, panel: Panel, input_len: int, horizon: int, min_history: int = 1,
                 validation_rows: int | None = None, validation_stride: int | None = None):
        self.panel, self.input_len, self.horizon = panel, input_len, horizon
        self.validation_rows = horizon if validation_rows is None else validation_rows
        if self.validation_rows < horizon:
            raise ValueError(
                f"validation_rows ({self.validation_rows}) must be at least the horizon ({horizon})"
            )
        self.validation_stride = validation_stride or max(1, horizon // 4)
        self.low = min_history
        self.high = panel.lengths - self.validation_rows - horizon  # last training origin
        usable = self.high >= self.low
        if not usable.any():
            raise ValueError(
                f"no series is long enough for training: each needs at least "
                f"{min_history + horizon + self.validation_rows} observations ({min_history} of "
                f"history, {horizon} to learn from and {self.validation_rows} for validation)"
            )
        self._weigh(usable)

    def _weigh(self, usable: np.ndarray) -> None:
        self.usable = np.flatnonzero(usable)
        # sample series in proportion to how many windows they hold, i.e. uniformly over windows
        counts = (self.high - self.low + 1)[self.usable].astype(np.float64)
        self.weights = counts / counts.sum()

    def including_validation(self) -> WindowSampler:
        """The same sampler with training origins up to each series' last horizon, over the
        validation rows too (for a refit); its validation windows are then in-sample."""
        full = copy.copy(self)
        full.high = self.panel.lengths - self.horizon
        full._weigh(full.high >= full.low)
        return full

    def sample(self, batch_size: int, rng: np.random.Generator) -> Windows:
        series = rng.choice(self.usable, size=batch_size, p=self.weights)
        origins = rng.integers(self.low, self.high[series] + 1)
        return self.panel.windows(series, origins, self.input_len, self.horizon)

    def validation(self) -> Windows:
        steps = np.arange(0, self.validation_rows - self.horizon + 1, self.validation_stride)
        series = np.repeat(self.usable, len(steps))
        starts = self.panel.lengths[series] - self.validation_rows
        origins = starts + np.tile(steps, len(self.usable))
        return self.panel.windows(series, origins, self.input_len, self.horizon)
