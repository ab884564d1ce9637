"""Temporal convolutional network: dilated causal convolutions in residual blocks.

    past (B, L, F_past) -> segments (B, L / S, S * F_past) -> (B, S * F_past, L / S)
        -> [residual block, dilation 2**i] x num_layers
        -> last time step (B, C) -> DirectHead -> (B, H, Q), plus a linear highway

Block i doubles the dilation, so the receptive field 1 + 2 (k - 1) (2**n - 1) grows
exponentially with depth; padding only on the left keeps every output causal. With
``segment_len`` S > 1 the convolutions run over segments of S steps (as the RNN's encoder
does), which divides their cost by S on long inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from forecaster.models.layers import DirectHead, Highway, Segments


class CausalConv1d(nn.Conv1d):
    def __init__(self, channels_in: int, channels_out: int, kernel_size: int, dilation: int):
        super().__init__(channels_in, channels_out, kernel_size, dilation=dilation)
        self.left_pad = (kernel_size - 1) * dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.left_pad, 0)))  # (B, C, L) -> (B, C, L)


class ResidualBlock(nn.Module):
    def __init__(self, channels_in: int, channels: int, kernel_size: int, dilation: int,
                 dropout: float):
        super().__init__()
        self.conv1 = CausalConv1d(channels_in, channels, kernel_size, dilation)
        self.conv2 = CausalConv1d(channels, channels, kernel_size, dilation)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv1d(channels_in, channels, 1) if channels_in != channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(F.gelu(self.conv1(x)))
        h = self.dropout(F.gelu(self.conv2(h)))
        return F.gelu(h + (x if self.skip is None else self.skip(x)))


class TCNModel(nn.Module):
    def __init__(
        self,
        input_len: int,
        horizon: int,
        n_quantiles: int,
        past_features: int,
        future_features: int,
        channels: int = 64,
        num_layers: int = 6,
        kernel_size: int = 3,
        dropout: float = 0.0,
        segment_len: int = 1,
        highway: bool = True,
    ):
        super().__init__()
        self.segments = Segments(segment_len, input_len)
        self.highway = Highway(input_len, horizon) if highway else None
        widths = [segment_len * past_features] + [channels] * num_layers
        self.blocks = nn.Sequential(*[
            ResidualBlock(widths[i], channels, kernel_size, dilation=2**i, dropout=dropout)
            for i in range(num_layers)
        ])
        self.head = DirectHead(channels, horizon, future_features, n_quantiles, 2 * channels,
                               dropout)

    def forward(self, past: torch.Tensor, future: torch.Tensor) -> torch.Tensor:
        x = self.segments(past).transpose(1, 2)  # (B, S * F_past, L / S)
        h = self.blocks(x)  # (B, C, L / S)
        y = self.head(h[:, :, -1], future)  # the last step sees the whole receptive field
        return y if self.highway is None else y + self.highway(past)
