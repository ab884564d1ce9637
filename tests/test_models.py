"""The networks: output shapes, causality, attention maps and the losses; hand-picked
settings of each family, and the network of every estimator of the library (``ESTIMATORS``)
with each of its ``get_test_params`` settings."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from forecaster import NeuralForecaster, estimators
from forecaster.models import FAMILIES, build_model
from forecaster.models.losses import mae_loss, make_loss, mse_loss, pinball_loss
from forecaster.models.tcn import TCNModel
from forecaster.models.transformer import TransformerModel, sinusoidal_positions
from forecaster.windows import Panel
from tests.conftest import estimator_variants, make_panel

B, L, H, Q = 4, 12, 5, 3

RNN_CONFIGS = [
    ("rnn", {"cell": cell, "decoder": decoder, "segment_len": segment, "hidden_size": 8,
             "num_layers": 2})
    for cell in ("rnn", "lstm", "gru")
    for decoder in ("mlp", "seq2seq")
    for segment in (1, 4)
]
CONFIGS = [
    *RNN_CONFIGS,
    ("rnn", {"cell": "gru", "segment_len": 5, "hidden_size": 8}),  # 12 % 5: oldest steps dropped
    ("rnn", {"cell": "lstm", "segment_len": 4, "hidden_size": 8, "highway": False}),
    ("tcn", {"channels": 8, "num_layers": 3, "kernel_size": 3}),
    ("tcn", {"channels": 8, "num_layers": 3, "kernel_size": 3, "highway": False}),
    ("tcn", {"channels": 8, "num_layers": 2, "kernel_size": 3, "segment_len": 4}),
    *[
        ("transformer", {"encoder": encoder, "positional_encoding": encoding, "d_model": 8,
                         "n_heads": 2, "encoder_layers": 1, "decoder_layers": 2, "patch_len": 4,
                         "patch_stride": 2})
        for encoder in ("patch", "timestep")
        for encoding in ("sinusoidal", "learned")
    ],
    ("transformer", {"encoder": "patch", "d_model": 8, "n_heads": 2, "encoder_layers": 1,
                     "patch_len": 4, "patch_stride": 2, "highway": False}),
]


def _config_id(config: tuple[str, dict[str, Any]]) -> str:
    family, kwargs = config
    return "-".join([family, *(f"{v}" for k, v in kwargs.items()
                               if k in ("cell", "decoder", "segment_len", "encoder",
                                        "positional_encoding"))]
                    + (["no-highway"] if kwargs.get("highway") is False else []))


def _build(family: str, kwargs: dict[str, Any], covariates: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(family, input_len=L, horizon=H, n_quantiles=Q,
                        past_features=2 + covariates, future_features=covariates, **kwargs)
    return model.eval()


def _inputs(covariates: int, batch: int = B, seed: int = 1, input_len: int = L,
            horizon: int = H) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    past = torch.randn(batch, input_len, 2 + covariates, generator=generator)
    past[:, :, 1] = 1.0  # observed mask
    future = torch.randn(batch, horizon, covariates, generator=generator)
    return past, future


def _assert_output_shape(model: torch.nn.Module, covariates: int, input_len: int = L,
                         horizon: int = H, outputs: int = Q) -> None:
    past, future = _inputs(covariates, input_len=input_len, horizon=horizon)
    out = model(past, future)
    assert out.shape == (B, horizon, outputs)
    assert torch.isfinite(out).all()
    if covariates:  # known-future covariates reach the forecast
        changed = model(past, future + 1.0)
        assert not torch.allclose(out, changed)


@pytest.mark.parametrize("covariates", [0, 2], ids=["no-covariates", "covariates"])
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_output_shape(config, covariates) -> None:
    family, kwargs = config
    _assert_output_shape(_build(family, kwargs, covariates), covariates)


def _assert_depends_only_on_its_own_window(model: torch.nn.Module, input_len: int = L,
                                           horizon: int = H) -> None:
    """No leakage across the batch, and nothing outside the input window reaches the forecast:
    the target after the origin and the history before the window are never read. ``model``
    reads one known-future covariate."""
    L, H = input_len, horizon
    rng = np.random.default_rng(0)
    n, origin = 40, 25
    original = np.column_stack([rng.standard_normal(n), rng.standard_normal(n)])
    altered = original.copy()
    altered[origin:, 0] += 100.0 * rng.standard_normal(n - origin)  # target after the origin
    altered[: origin - L, 0] = rng.standard_normal(origin - L) * 50  # history before the window
    window_only = original[origin - L : origin + H]  # nothing but the window and horizon rows
    panel = Panel([original, altered, window_only])
    windows = panel.windows(np.array([0, 1, 2]), np.array([origin, origin, L]), L, H)
    past, future = torch.from_numpy(windows.past), torch.from_numpy(windows.future)
    with torch.no_grad():
        together = model(past, future)
        alone = torch.cat([model(past[i : i + 1], future[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together[1], together[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(together[2], together[0], rtol=1e-5, atol=1e-6)
    # while a change inside the window does change the forecast
    inside = original.copy()
    inside[origin - 1, 0] += 3.0
    moved = Panel([inside]).windows(np.array([0]), np.array([origin]), L, H)
    with torch.no_grad():
        changed = model(torch.from_numpy(moved.past), torch.from_numpy(moved.future))
    assert not torch.allclose(changed[0], together[0])


@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_each_forecast_depends_only_on_its_own_window(config) -> None:
    family, kwargs = config
    _assert_depends_only_on_its_own_window(_build(family, kwargs, covariates=1))


# ---------------------------------------------------------------- every estimator's network
def _estimator_network(cls: type[NeuralForecaster], settings: dict[str, Any]
                       ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The network ``cls`` builds with ``settings``, and its settings (``model_kwargs_``): the
    estimator is fitted on a small panel with one known-future covariate, and its network
    rebuilt from the settings with fresh seeded weights, as ``load_model`` rebuilds it."""
    panel = make_panel()
    times = panel.index.get_level_values(-1).to_numpy()
    X = pd.DataFrame({"promo": (times % 5 == 0).astype(float)}, index=panel.index)
    estimator = cls(**{**settings, "verbose": False}).fit(panel, X=X, fh=range(1, H + 1))
    kwargs = estimator.model_kwargs_
    torch.manual_seed(0)
    return build_model(cls._family, **kwargs).eval(), kwargs


@pytest.mark.parametrize(("cls", "settings"), estimator_variants())
def test_every_estimators_network_forecasts_each_window_on_its_own(cls, settings) -> None:
    model, kwargs = _estimator_network(cls, settings)
    assert (kwargs["past_features"], kwargs["future_features"], kwargs["horizon"]) == (3, 1, H)
    with torch.no_grad():
        _assert_output_shape(model, 1, kwargs["input_len"], H, kwargs["n_quantiles"])
    _assert_depends_only_on_its_own_window(model, kwargs["input_len"], H)


@pytest.mark.parametrize("t", [0, 5, 10])
def test_tcn_convolutions_are_causal(t) -> None:
    torch.manual_seed(0)
    model = TCNModel(input_len=L, horizon=H, n_quantiles=Q, past_features=3, future_features=1,
                     channels=8, num_layers=3, kernel_size=3).eval()
    captured: list[torch.Tensor] = []
    model.blocks.register_forward_hook(lambda module, inputs, output: captured.append(output))
    past, future = _inputs(covariates=1)
    changed = past.clone()
    changed[:, t + 1 :] = torch.randn_like(changed[:, t + 1 :]) * 10
    with torch.no_grad():
        model(past, future)
        model(changed, future)
    before, after = captured
    assert before.shape == (B, 8, L)  # (batch, channels, time)
    torch.testing.assert_close(after[:, :, : t + 1], before[:, :, : t + 1], rtol=0, atol=0)
    assert not torch.allclose(after[:, :, t + 1 :], before[:, :, t + 1 :])


def test_tcn_receptive_field_covers_the_window() -> None:
    """With dilations 1, 2, 4 and kernel 3 the last step sees 1 + 2 * 2 * 7 = 29 steps: the
    convolutions' last output reads the oldest of 29 inputs (the linear highway aside)."""
    torch.manual_seed(0)
    model = TCNModel(input_len=29, horizon=H, n_quantiles=Q, past_features=2, future_features=0,
                     channels=8, num_layers=3, kernel_size=3).eval()
    captured: list[torch.Tensor] = []
    model.blocks.register_forward_hook(lambda module, inputs, output: captured.append(output))
    past = torch.randn(1, 29, 2)
    future = torch.zeros(1, H, 0)
    changed = past.clone()
    changed[:, 0] += 5.0  # the oldest step
    with torch.no_grad():
        model(past, future)
        model(changed, future)
    assert not torch.allclose(captured[0][:, :, -1], captured[1][:, :, -1])


# ---------------------------------------------------------------- transformer attention
@pytest.mark.parametrize(("encoder", "tokens"), [("patch", (L - 4) // 2 + 1), ("timestep", L)])
def test_transformer_attention_maps(encoder, tokens) -> None:
    torch.manual_seed(0)
    model = TransformerModel(input_len=L, horizon=H, n_quantiles=Q, past_features=3,
                             future_features=1, encoder=encoder, patch_len=4, patch_stride=2,
                             d_model=8, n_heads=2, encoder_layers=2, decoder_layers=1)
    model.eval()
    past, future = _inputs(covariates=1)
    maps = model.attention_maps(past, future)
    assert set(maps) == {
        "encoder_layers.0.self_attention",
        "encoder_layers.1.self_attention",
        "decoder_layers.0.self_attention",
        "decoder_layers.0.cross_attention",
    }
    for name in ("encoder_layers.0.self_attention", "encoder_layers.1.self_attention"):
        assert maps[name].shape == (B, 2, tokens, tokens)
    decoder_self = maps["decoder_layers.0.self_attention"]
    cross = maps["decoder_layers.0.cross_attention"]
    assert decoder_self.shape == (B, 2, H, H)
    assert cross.shape == (B, 2, H, tokens)
    # causal: a horizon step never attends to a later one
    assert (torch.triu(decoder_self, diagonal=1) == 0).all()
    assert (decoder_self.diagonal(dim1=-2, dim2=-1) > 0).all()
    np.testing.assert_allclose(decoder_self[..., 0, 0].numpy(), 1.0, rtol=1e-6)
    for weights in maps.values():
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
        assert (weights >= 0).all()
    # the modules stop keeping weights afterwards
    for module in model.modules():
        if hasattr(module, "keep_attention"):
            assert module.keep_attention is False and module.attention is None


def test_transformer_decoder_self_attention_is_causal_in_the_output() -> None:
    """A covariate change at horizon step k must not change the decoder's outputs before k
    when the cross-attention and queries for earlier steps are unchanged."""
    torch.manual_seed(0)
    model = TransformerModel(input_len=L, horizon=H, n_quantiles=Q, past_features=3,
                             future_features=1, encoder="timestep", d_model=8, n_heads=2,
                             encoder_layers=1, decoder_layers=2).eval()
    past, future = _inputs(covariates=1)
    changed = future.clone()
    changed[:, 3:] += 5.0
    with torch.no_grad():
        a, b = model(past, future), model(past, changed)
    torch.testing.assert_close(a[:, :3], b[:, :3], rtol=0, atol=0)
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def test_sinusoidal_positions_follow_the_paper() -> None:
    d = 8
    table = sinusoidal_positions(10, d)
    assert table.shape == (10, d)
    for pos in (0, 3, 9):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


# ---------------------------------------------------------------- invalid configurations
@pytest.mark.parametrize(
    ("family", "kwargs", "message"),
    [
        ("rnn", {"cell": "elman"}, "cell must be one of"),
        ("rnn", {"decoder": "attention"}, "decoder must be"),
        ("rnn", {"segment_len": L + 1}, "segment_len must be in"),
        ("rnn", {"segment_len": 0}, "segment_len must be in"),
        ("tcn", {"segment_len": L + 1}, "segment_len must be in"),
        ("tcn", {"segment_len": 0}, "segment_len must be in"),
        ("transformer", {"encoder": "conv"}, "encoder must be"),
        ("transformer", {"patch_len": L + 1}, "exceeds input_len"),
        ("transformer", {"d_model": 10, "n_heads": 4, "patch_len": 4}, "divisible"),
        ("transformer", {"positional_encoding": "rotary", "patch_len": 4},
         "positional_encoding must be"),
    ],
)
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")
def test_invalid_model_settings_raise(family, kwargs, message) -> None:
    """Rejected when the model is built or, at the latest, on its first forward pass."""
    with pytest.raises(ValueError, match=message):
        model = build_model(family, input_len=L, horizon=H, n_quantiles=Q, past_features=2,
                            future_features=0, **kwargs)
        model(*_inputs(covariates=0))


def test_every_family_has_an_estimator_and_every_estimator_a_family() -> None:
    families = {cls.__name__: cls._family for cls in estimators.ESTIMATORS}
    assert set(families.values()) == set(FAMILIES), (
        f"estimators' families {families} against the models' {sorted(FAMILIES)}")


def test_build_model_rejects_an_unknown_family() -> None:
    assert "lstm" not in FAMILIES  # a cell of the rnn family, not a family
    with pytest.raises(ValueError, match="unknown model family 'lstm'"):
        build_model("lstm")


# ---------------------------------------------------------------- losses
# target (1, 2); predictions (1, 2, 3) for the quantile levels 0.1, 0.5, 0.9
TARGET = torch.tensor([[1.0, 2.0]])
PREDICTION = torch.tensor([[[0.5, 1.0, 2.0], [4.0, 2.0, 1.0]]])


def test_pinball_loss_matches_a_hand_computation() -> None:
    # errors y - q: step 1 (0.5, 0, -1), step 2 (-2, 0, 1)
    # losses max(q e, (q - 1) e): 0.1*0.5=0.05, 0, 0.1*1=0.1, 0.9*2=1.8, 0, 0.9*1=0.9
    expected = (0.05 + 0.0 + 0.1 + 1.8 + 0.0 + 0.9) / 6
    loss = pinball_loss([0.1, 0.5, 0.9])(PREDICTION, TARGET)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert make_loss("pinball", [0.1, 0.5, 0.9])(PREDICTION, TARGET).item() == pytest.approx(
        expected, rel=1e-6)


def test_pinball_loss_at_the_median_is_half_the_mae() -> None:
    rng = np.random.default_rng(0)
    prediction = torch.from_numpy(rng.standard_normal((6, 4, 1)).astype(np.float32))
    target = torch.from_numpy(rng.standard_normal((6, 4)).astype(np.float32))
    assert pinball_loss([0.5])(prediction, target).item() == pytest.approx(
        0.5 * mae_loss(prediction, target).item(), rel=1e-6)


def test_point_losses_match_a_hand_computation() -> None:
    # point forecasts are the first output: (0.5, 4.0) against (1, 2)
    assert mae_loss(PREDICTION, TARGET).item() == pytest.approx((0.5 + 2.0) / 2)
    assert mse_loss(PREDICTION, TARGET).item() == pytest.approx((0.25 + 4.0) / 2)
    assert make_loss("mae", [0.5]) is mae_loss
    assert make_loss("mse", [0.5]) is mse_loss


def test_make_loss_rejects_an_unknown_name() -> None:
    with pytest.raises(ValueError, match="loss must be"):
        make_loss("huber", [0.5])


def test_pinball_loss_is_differentiable() -> None:
    prediction = PREDICTION.clone().requires_grad_(True)
    pinball_loss([0.1, 0.5, 0.9])(prediction, TARGET).backward()
    # d/dq of max(q e, (q - 1) e) with e = y - pred: -q where e > 0, 1 - q where e < 0, over 6
    expected = torch.tensor([[[-0.1, 0.0, 0.1], [0.9, 0.0, -0.9]]]) / 6
    torch.testing.assert_close(prediction.grad[..., [0, 2]], expected[..., [0, 2]])
