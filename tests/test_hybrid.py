"""The hybrid network: the causal decoder, its attention and its variable selection."""

from __future__ import annotations

import pytest
import torch

from forecaster.models.hybrid import HybridModel, InterpretableAttention

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
    assert maps["past_variables"].shape == (B, L, 4)
    assert maps["future_variables"].shape == (B, H, 2)
    for weights in (maps["past_variables"], maps["future_variables"]):
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
    assert "future_variables" not in model.attention_maps(past, future)


def test_bad_arguments_name_themselves() -> None:
    with pytest.raises(ValueError, match="cell must be one of"):
        HybridModel(L, H, Q, 2, 0, cell="rnn")
    with pytest.raises(ValueError, match="divisible by n_heads"):
        HybridModel(L, H, Q, 2, 0, d_model=10, n_heads=4)
