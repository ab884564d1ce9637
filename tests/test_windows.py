"""Window cutting: shapes, left padding, instance normalisation and the training sampler."""

from __future__ import annotations

import numpy as np
import pytest

from forecaster.windows import SCALE_FLOOR, Panel, Windows, WindowSampler

L, H = 8, 4


def _two_series_panel() -> tuple[Panel, list[np.ndarray]]:
    """A 30-row and a 5-row series, each with one covariate column."""
    rng = np.random.default_rng(0)
    series = [
        np.column_stack([10 + 3 * rng.standard_normal(30), np.arange(30) + 100.0]),
        np.column_stack([-2 + rng.standard_normal(5), np.arange(5) + 200.0]),
    ]
    return Panel(series, static=np.array([[1.0], [2.0]])), series


def _reference_window(panel_series: list[np.ndarray], series: int, origin: int, input_len: int,
                      horizon: int) -> dict[str, np.ndarray]:
    """The slow, obvious gather: one row at a time."""
    values = panel_series[series].astype(np.float32)
    n_columns = values.shape[1]
    rows, inside = [], []
    for offset in range(-input_len, horizon):
        local = origin + offset
        ok = 0 <= local < len(values)
        rows.append(values[local] if ok else np.zeros(n_columns, np.float32))
        inside.append(ok)
    block, inside = np.array(rows), np.array(inside)
    observed = inside[:input_len]
    history = block[:input_len, 0][observed]
    loc = history.mean() if observed.any() else 0.0
    std = history.std() if observed.any() else 0.0
    scale = max(std, SCALE_FLOOR * (abs(loc) + 1.0))
    scaled = np.where(inside, (block[:, 0] - loc) / scale, 0.0)
    return {
        "past": np.column_stack([scaled[:input_len], observed, block[:input_len, 1:]]),
        "future": block[input_len:, 1:],
        "target": scaled[input_len:],
        "loc": np.array([loc]),
        "scale": np.array([scale]),
    }


def test_window_shapes_and_dtypes() -> None:
    panel, _ = _two_series_panel()
    w = panel.windows(np.array([0, 0, 1]), np.array([10, 20, 3]), L, H)
    assert w.past.shape == (3, L, 3)  # scaled target, observed mask, one covariate
    assert w.future.shape == (3, H, 1)
    assert w.static.shape == (3, 1)
    assert w.target.shape == (3, H)
    assert w.loc.shape == w.scale.shape == (3, 1)
    for name in ("past", "future", "static", "target", "loc", "scale"):
        assert getattr(w, name).dtype == np.float32, name
    np.testing.assert_array_equal(w.static[:, 0], [1.0, 1.0, 2.0])
    part = w.slice(1, 3)
    assert part.past.shape == (2, L, 3)
    np.testing.assert_array_equal(part.target, w.target[1:3])


def test_window_without_covariates_has_empty_covariate_axes() -> None:
    panel = Panel([np.arange(20, dtype=float)[:, None]])
    w = panel.windows(np.array([0]), np.array([12]), L, H)
    assert w.past.shape == (1, L, 2)
    assert w.future.shape == (1, H, 0)
    assert w.static.shape == (1, 0)


def test_short_series_is_left_padded_and_masked() -> None:
    panel, series = _two_series_panel()
    w = panel.windows(np.array([1]), np.array([5]), L, H)  # 5 rows of history, L = 8
    np.testing.assert_array_equal(w.past[0, :, 1], [0, 0, 0, 1, 1, 1, 1, 1])  # observed mask
    np.testing.assert_array_equal(w.past[0, :3], 0.0)  # padded rows are all zeros
    np.testing.assert_array_equal(w.past[0, 3:, 2], series[1][:, 1])  # covariate, unscaled
    # the horizon lies after the series' end: no target and no covariates there
    np.testing.assert_array_equal(w.target, 0.0)
    np.testing.assert_array_equal(w.future, 0.0)
    # statistics come from the 5 observed values only, not from the zero padding
    np.testing.assert_allclose(w.loc[0, 0], series[1][:, 0].mean(), rtol=1e-5)
    np.testing.assert_allclose(w.scale[0, 0], series[1][:, 0].std(), rtol=1e-5)


def test_instance_normalisation_and_unscale() -> None:
    panel, series = _two_series_panel()
    origins = np.array([8, 15, 26, 3])
    ids = np.array([0, 0, 0, 1])
    w = panel.windows(ids, origins, L, H)
    for i, (s, t) in enumerate(zip(ids, origins, strict=True)):
        observed = w.past[i, :, 1] == 1
        scaled = w.past[i, observed, 0]
        np.testing.assert_allclose(scaled.mean(), 0.0, atol=1e-5)
        np.testing.assert_allclose(scaled.std(), 1.0, atol=1e-5)
        raw_history = series[s][max(t - L, 0) : t, 0]
        np.testing.assert_allclose(scaled * w.scale[i] + w.loc[i], raw_history,
                                   rtol=1e-5, atol=1e-4)
    # unscale inverts the scaling of the target, in original units
    restored = w.unscale(w.target)  # (B, H)
    for i, (s, t) in enumerate(zip(ids[:3], origins[:3], strict=True)):
        np.testing.assert_allclose(restored[i], series[s][t : t + H, 0], rtol=1e-5, atol=1e-4)
    # and broadcasts over a trailing quantile axis
    quantiles = np.stack([w.target, w.target + 1.0], axis=-1)  # (B, H, 2)
    unscaled = w.unscale(quantiles)
    assert unscaled.shape == (4, H, 2)
    np.testing.assert_allclose(unscaled[..., 1] - unscaled[..., 0],
                               np.broadcast_to(w.scale, (4, H)), rtol=1e-6)


def test_unscale_of_past_values_restores_the_history() -> None:
    panel, series = _two_series_panel()
    w = panel.windows(np.array([0]), np.array([20]), L, H)
    np.testing.assert_allclose(w.unscale(w.past[:, :, 0])[0], series[0][12:20, 0], rtol=1e-5)


def test_flat_history_does_not_blow_up() -> None:
    panel = Panel([np.full((20, 1), 5.0)])
    w = panel.windows(np.array([0]), np.array([10]), L, H)
    assert np.isfinite(w.past).all() and np.isfinite(w.target).all()
    np.testing.assert_allclose(w.scale[0, 0], SCALE_FLOOR * 6.0, rtol=1e-6)
    np.testing.assert_array_equal(w.target, 0.0)


def test_windows_is_a_frozen_dataclass() -> None:
    panel, _ = _two_series_panel()
    w = panel.windows(np.array([0]), np.array([10]), L, H)
    assert isinstance(w, Windows)
    with pytest.raises(AttributeError):
        w.loc = np.zeros((1, 1), np.float32)  # type: ignore[misc]


def test_panel_rejects_no_series() -> None:
    with pytest.raises(ValueError, match="no series"):
        Panel([])


# ---------------------------------------------------------------- the sampler
def _position_panel(lengths: list[int]) -> Panel:
    """Series whose covariate is the row number + 1, so windows reveal where they were cut."""
    series = [np.column_stack([np.sin(np.arange(n) / 3.0) + k, np.arange(n) + 1.0])
              for k, n in enumerate(lengths)]
    return Panel(series, static=np.arange(len(lengths), dtype=float)[:, None])


def test_training_windows_never_reach_into_the_validation_rows() -> None:
    lengths = [40, 25, 60, 18, 9]  # the last is too short to train on
    panel = _position_panel(lengths)
    validation_rows, min_history = 10, 2
    sampler = WindowSampler(panel, L, H, min_history=min_history, validation_rows=validation_rows)
    rng = np.random.default_rng(0)
    for _ in range(5):
        w = sampler.sample(1000, rng)
        series = w.static[:, 0].astype(int)
        rows = w.future[:, :, 0] - 1  # row number of every horizon step
        assert (rows >= 0).all(), "a training target lies outside its series"
        np.testing.assert_array_equal(np.diff(rows, axis=1), 1.0)  # consecutive steps
        last_allowed = np.array(lengths)[series] - validation_rows - 1
        assert (rows[:, -1] <= last_allowed).all(), "a training target reaches validation rows"
        assert (rows[:, 0] >= min_history).all(), "a window has less than min_history history"
        assert 4 not in series, "the series too short to train on was sampled"
    # every usable series is sampled, the longest most often
    counts = np.bincount(series, minlength=5)
    assert (counts[:4] > 0).all() and counts[2] == counts.max()


def test_a_refit_samples_training_windows_over_the_validation_rows_too() -> None:
    lengths = [40, 25, 60, 15, 5]  # 15 trains only on a refit; 5 never
    panel = _position_panel(lengths)
    held_out = WindowSampler(panel, L, H, min_history=2, validation_rows=10)
    sampler = held_out.including_validation()
    w = sampler.sample(4000, np.random.default_rng(0))
    series = w.static[:, 0].astype(int)
    last_row = w.future[:, -1, 0] - 1
    assert (last_row < np.array(lengths)[series]).all(), "a target lies outside its series"
    assert (w.past[:, :, 1].sum(1) >= 2).all(), "a window has less than min_history history"
    # every series with a training window is sampled, and each one's last row is reached
    assert set(series) == {0, 1, 2, 3}
    for k in range(4):
        assert last_row[series == k].max() == lengths[k] - 1
    # the sampler it came from is unchanged: its targets stop before the validation rows
    held_out_rows = held_out.sample(1000, np.random.default_rng(0)).future[:, -1, 0] - 1
    assert held_out_rows.max() <= max(lengths) - 10 - 1
    assert 3 not in held_out.usable


def test_validation_windows_forecast_inside_the_held_out_rows() -> None:
    lengths = [40, 25, 60]
    panel = _position_panel(lengths)
    sampler = WindowSampler(panel, L, H, validation_rows=12, validation_stride=4)
    w = sampler.validation()
    series = w.static[:, 0].astype(int)
    rows = w.future[:, :, 0] - 1
    starts = np.array(lengths)[series] - 12
    assert len(w.target) == 3 * 3  # origins at steps 0, 4, 8 of the 12 held-out rows
    assert (rows[:, 0] >= starts).all()
    assert (rows[:, -1] < np.array(lengths)[series]).all()
    np.testing.assert_array_equal(rows[:, 0] - starts, np.tile([0, 4, 8], 3))


def test_sampler_rejects_too_short_panels_and_small_validation() -> None:
    panel = _position_panel([10, 12])
    with pytest.raises(ValueError, match="no series is long enough"):
        WindowSampler(panel, L, H, min_history=2, validation_rows=8)
    with pytest.raises(ValueError, match="validation_rows"):
        WindowSampler(_position_panel([100]), L, H, validation_rows=H - 1)


def test_sampling_is_seeded() -> None:
    sampler = WindowSampler(_position_panel([40, 60]), L, H)
    a = sampler.sample(64, np.random.default_rng(3))
    b = sampler.sample(64, np.random.default_rng(3))
    np.testing.assert_array_equal(a.past, b.past)
    np.testing.assert_array_equal(a.target, b.target)


def test_vectorised_gather_matches_a_row_by_row_reference() -> None:
    rng = np.random.default_rng(42)
    lengths = [3, 17, 50, 9, 120]
    raw = [np.column_stack([rng.normal(5 * k, 1 + k, n), rng.normal(0, 1, (n, 2))])
           for k, n in enumerate(lengths)]
    panel = Panel(raw)
    series = rng.integers(0, len(lengths), 1000)
    origins = rng.integers(0, np.array(lengths)[series] + 1)  # any origin, even the very end
    w = panel.windows(series, origins, 10, 5)
    assert w.past.shape == (1000, 10, 4)
    assert w.future.shape == (1000, 5, 2)
    assert w.target.shape == (1000, 5)
    assert w.loc.shape == w.scale.shape == (1000, 1)
    assert w.static.shape == (1000, 0)
    for i in rng.choice(1000, 25, replace=False):
        ref = _reference_window(raw, series[i], origins[i], 10, 5)
        for name, expected in ref.items():
            np.testing.assert_allclose(getattr(w, name)[i], expected, rtol=1e-4, atol=1e-4,
                                       err_msg=f"{name} of window {i}")
