"""The hybrid: its network (the causal decoder, attention, variable selection) and estimator."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from forecaster import HybridForecaster, NeuralForecaster
from forecaster.data import SERIES, TARGET, TIME
from forecaster.models.hybrid import HybridModel, InterpretableAttention
from tests.conftest import tiny

FH = [1, 2, 3]

B, L, H, Q = 4, 24, 6, 3


def _model(segment_len: int = 1, covariates: int = 2, seed: int = 0) -> HybridModel:
    torch.manual_seed(seed)
    return HybridModel(L, H, Q, past_features=2 + covariates, future_features=covariates,
                       d_model=16, n_heads=4, segment_len=segment_len).eval()


def _inputs(covariates: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    past = torch.randn(B, L, 2 + covariates, generator=generator)
    past[:, :, 1] = 1.0  # observed mask
    return past, torch.randn(B, H, covariates, generator=generator)


@pytest.mark.parametrize("segment_len", [1, 4])
def test_attention_rows_are_distributions_and_later_steps_are_masked(segment_len) -> None:
    model = _model(segment_len)
    past, future = _inputs()
    maps = model.attention_maps(past, future)
    tokens = L // segment_len
    attention = maps["attention"]
    assert attention.shape == (B, 4, H, tokens + H)
    torch.testing.assert_close(attention.sum(-1), torch.ones(B, 4, H))
    decoder_side = attention[..., tokens:]  # (B, heads, H, H): step t may see steps <= t only
    assert (decoder_side.triu(1) == 0).all()
    assert (decoder_side.diagonal(dim1=-2, dim2=-1) > 0).all()
    variables = model.variable_weights(past, future)
    assert variables["past"].shape == (B, L, 4)
    assert variables["future"].shape == (B, H, 2)
    for weights in variables.values():
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:2]))
    # nothing is kept once the maps are returned
    assert model.attention.attention is None and model.past_selection.weights is None


def test_a_forecast_step_never_reads_later_known_future_inputs() -> None:
    model = _model()
    past, future = _inputs()
    changed = future.clone()
    changed[:, 3:] += 10.0
    with torch.no_grad():
        before, after = model(past, future), model(past, changed)
    torch.testing.assert_close(before[:, :3], after[:, :3])
    assert not torch.allclose(before[:, 3:], after[:, 3:])


def test_heads_share_values_so_the_mean_map_mixes_them() -> None:
    """out = W_o (mean over heads of A_h) V: the averaged map is what the layer applies."""
    torch.manual_seed(0)
    layer = InterpretableAttention(d_model=8, n_heads=2, dropout=0.0).eval()
    layer.keep_attention = True
    x, context = torch.randn(3, 5, 8), torch.randn(3, 7, 8)
    mask = torch.zeros(5, 7, dtype=torch.bool)
    out = layer(x, context, mask)
    expected = layer.out(layer.attention.mean(dim=1) @ layer.value(context))
    torch.testing.assert_close(out, expected)


def test_without_covariates_the_decoder_reads_its_lead_time() -> None:
    model = _model(covariates=0)
    past, future = _inputs(covariates=0)
    out = model(past, future)
    assert out.shape == (B, H, Q) and torch.isfinite(out).all()
    assert set(model.variable_weights(past, future)) == {"past"}


def test_bad_arguments_name_themselves() -> None:
    with pytest.raises(ValueError, match="cell must be one of"):
        HybridModel(L, H, Q, 2, 0, cell="rnn")
    with pytest.raises(ValueError, match="divisible by n_heads"):
        HybridModel(L, H, Q, 2, 0, d_model=10, n_heads=4)


# ---------------------------------------------------------------- the estimator
def _panel(series: dict[str, np.ndarray]) -> pd.DataFrame:
    return pd.concat([pd.DataFrame({SERIES: key, TIME: np.arange(len(values)), TARGET: values})
                      for key, values in series.items()]).set_index([SERIES, TIME])


def test_hybrid_learns_a_noisy_sine_better_than_seasonal_naive() -> None:
    """As the LSTM's test (tests/test_estimators.py): sines of period 24 with N(0, 0.2^2)
    noise; seasonal naive's MAE is about 0.23 and the noise floor 0.16."""
    period, horizon, noise = 24, 12, 0.2
    rng = np.random.default_rng(0)

    def noisy(n: int, phase: float) -> np.ndarray:
        return np.sin(2 * np.pi * np.arange(n) / period + phase) + noise * rng.standard_normal(n)

    train = _panel({f"s{i}": noisy(300, 0.8 * i) for i in range(8)})
    model = HybridForecaster(d_model=16, segment_len=4, input_len=96, dropout=0.0,
                             max_epochs=5, steps_per_epoch=100, batch_size=32, verbose=False)
    model.fit(train, fh=range(1, horizon + 1))
    test = noisy(600, 2.0)
    origins = np.arange(100, len(test) - horizon, 7)
    forecast = model.forecast_histories([test[:o] for o in origins])[
        :, :, model.levels_.index(0.5)]
    actual = np.stack([test[o : o + horizon] for o in origins])
    naive = np.stack([test[o - period : o - period + horizon] for o in origins])
    mae, naive_mae = np.abs(forecast - actual).mean(), np.abs(naive - actual).mean()
    assert mae < 0.9 * naive_mae, f"MAE {mae:.3f} vs seasonal naive {naive_mae:.3f}"


def test_the_covariate_that_drives_the_target_gets_the_larger_weight() -> None:
    """target = 2 * driver + small noise, with a second covariate of pure noise: variable
    selection must learn to read the driver."""
    rng = np.random.default_rng(0)
    frames, covariates = {}, []
    for i in range(6):
        n = 200
        driver = (rng.random(n) < 0.3).astype(float)
        noise = rng.standard_normal(n)
        frames[f"s{i}"] = 2.0 * driver + 0.05 * rng.standard_normal(n)
        covariates.append(pd.DataFrame({"driver": driver, "noise": noise}))
    y = _panel(frames)
    X = pd.concat(covariates).set_index(y.index)
    model = HybridForecaster(d_model=16, segment_len=1, input_len=24, dropout=0.0,
                             max_epochs=6, steps_per_epoch=60, batch_size=64, verbose=False)
    model.fit(y, X=X, fh=range(1, 7))
    known = X.loc["s0"].to_numpy()
    # the history's covariates, then the horizon's (here the last ones again)
    importance = model.covariate_importance(y.loc["s0", TARGET].to_numpy(),
                                            np.concatenate([known, known[-6:]]))
    assert set(importance) == {"driver", "noise"}
    assert importance["driver"] > 2 * importance["noise"], importance


def test_attention_maps_explain_one_history(sine_panel) -> None:
    model = tiny(HybridForecaster).fit(sine_panel, fh=FH)
    maps = model.attention_maps(sine_panel.loc["a", TARGET].to_numpy())
    attention = maps["attention"]  # (heads, H, segments + H)
    tokens = model.resolved_params_["input_len"] // model.resolved_params_["segment_len"]
    assert attention.shape == (model.n_heads, len(FH), tokens + len(FH))
    np.testing.assert_allclose(attention.sum(-1), 1.0, rtol=1e-5)
    assert model.covariate_importance(sine_panel.loc["a", TARGET].to_numpy()) == {}


def test_save_and_load_give_identical_forecasts(sine_panel, tmp_path) -> None:
    model = tiny(HybridForecaster).fit(sine_panel, fh=FH)
    loaded = NeuralForecaster.load_model(model.save_model(tmp_path / "hybrid"))
    loaded.fit(sine_panel, fh=FH)
    np.testing.assert_array_equal(loaded.predict().to_numpy(), model.predict().to_numpy())
