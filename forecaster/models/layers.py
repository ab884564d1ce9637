"""Pieces shared by the model families: input segments, the direct head, the highway, and the
spreading of per-token attention over the time steps each token reads."""

from __future__ import annotations

import torch
from torch import nn


class Segments(nn.Module):
    """Non-overlapping segments of S steps, newest last: (B, L, F) -> (B, L // S, S * F).

    The oldest L % S steps, which fill no whole segment, are dropped, so the last segment always
    ends at the forecast origin.
    """

    def __init__(self, length: int, input_len: int):
        super().__init__()
        if not 1 <= length <= input_len:
            raise ValueError(f"segment_len must be in [1, input_len={input_len}], got {length}")
        self.length, self.input_len = length, input_len

    def forward(self, past: torch.Tensor) -> torch.Tensor:
        S = self.length
        return past[:, past.shape[1] % S :].unfold(1, S, S).flatten(2)

    def spread(self, weights: torch.Tensor) -> torch.Tensor:
        """Weights per segment (..., L // S) -> per input step (..., L); see spread_over_steps."""
        S, L = self.length, self.input_len
        starts = L % S + torch.arange(L // S, device=weights.device) * S
        return spread_over_steps(weights, starts, S, L)


def spread_over_steps(weights: torch.Tensor, starts: torch.Tensor, length: int,
                      input_len: int) -> torch.Tensor:
    """Weights per token (..., N) -> weights per input time step (..., input_len).

    Token i reads the ``length`` steps from ``starts[i]``: its weight is shared equally among
    them (overlapping tokens add up on the steps they share), so a row that sums to 1 over
    the tokens still does over the steps. A step that no token reads gets no weight.
    """
    steps = torch.arange(input_len, device=weights.device)
    reads = (steps >= starts[:, None]) & (steps < starts[:, None] + length)  # (N, L)
    return weights @ (reads.to(weights.dtype) / length)


class DirectHead(nn.Module):
    """Summary vector ++ known-future covariates -> MLP -> all horizon steps and quantiles at once.

        summary (B, D), future (B, H, F_future) -> (B, H, Q)
    """

    def __init__(self, summary_size: int, horizon: int, future_features: int, n_quantiles: int,
                 hidden_size: int, dropout: float):
        super().__init__()
        self.horizon, self.n_quantiles = horizon, n_quantiles
        self.mlp = nn.Sequential(
            nn.Linear(summary_size + horizon * future_features, hidden_size),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_size, horizon * n_quantiles),
        )

    def forward(self, summary: torch.Tensor, future: torch.Tensor) -> torch.Tensor:
        z = torch.cat([summary, future.flatten(1)], dim=-1)
        return self.mlp(z).view(-1, self.horizon, self.n_quantiles)


class Highway(nn.Module):
    """A linear map from the scaled input target to every horizon step (LSTNet's highway).

        past (B, L, F_past) -> past[..., 0] (B, L) -> (B, H, 1), added to every quantile

    The network then learns the non-linear remainder; on seasonal data this is most of the gain.
    """

    def __init__(self, input_len: int, horizon: int):
        super().__init__()
        self.linear = nn.Linear(input_len, horizon)

    def forward(self, past: torch.Tensor) -> torch.Tensor:
        return self.linear(past[..., 0]).unsqueeze(-1)
