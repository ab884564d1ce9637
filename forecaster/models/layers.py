"""Pieces shared by the model families: input segments, the direct head and the highway."""

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
        self.length = length

    def forward(self, past: torch.Tensor) -> torch.Tensor:
        S = self.length
        return past[:, past.shape[1] % S :].unfold(1, S, S).flatten(2)


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
