"""Recurrent forecasters: an Elman RNN, LSTM or GRU encoder and a direct multi-horizon decoder.

    past (B, L, F_past) --segments--> (B, L / S, S * F_past) --encoder--> state
        --decoder--> (B, H, Q)

The encoder steps over segments of ``segment_len`` time steps rather than single steps (as in
SegRNN, Lin et al. 2023): a day of hourly data per step makes the recurrence 24 times shorter,
which is what makes these models fast on a CPU and keeps gradients alive over long inputs.
``segment_len=1`` is the classic step-by-step RNN. A linear highway from the input target to
the output (see layers.Highway) carries the seasonal level; the network learns the rest.

The decoder is either an MLP head on the encoder's last hidden state (fast, the default) or a
seq2seq RNN that starts from the encoder state and reads the known-future covariates step by
step. Both emit all H steps at once, so errors do not compound as in autoregressive decoding.
"""

from __future__ import annotations

import torch
from torch import nn

from forecaster.models.layers import DirectHead, Highway, Segments

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


class RNNModel(nn.Module):
    def __init__(
        self,
        input_len: int,
        horizon: int,
        n_quantiles: int,
        past_features: int,
        future_features: int,
        cell: str = "lstm",
        hidden_size: int = 64,
        num_layers: int = 2,
        dropout: float = 0.0,
        decoder: str = "mlp",
        segment_len: int = 1,
        highway: bool = True,
    ):
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {cell!r}")
        if decoder not in ("mlp", "seq2seq"):
            raise ValueError(f"decoder must be 'mlp' or 'seq2seq', got {decoder!r}")
        self.decoder_kind = decoder
        self.segments = Segments(segment_len, input_len)
        self.highway = Highway(input_len, horizon) if highway else None
        rnn = CELLS[cell]
        layer_dropout = dropout if num_layers > 1 else 0.0
        self.encoder = rnn(segment_len * past_features, hidden_size, num_layers, batch_first=True,
                           dropout=layer_dropout)
        if decoder == "mlp":
            self.head = DirectHead(hidden_size, horizon, future_features, n_quantiles,
                                   2 * hidden_size, dropout)
        else:
            # each decoder step reads its covariates plus a learned embedding of its lead time
            self.step_embedding = nn.Parameter(torch.randn(horizon, hidden_size) * 0.02)
            self.decoder = rnn(future_features + hidden_size, hidden_size, num_layers,
                               batch_first=True, dropout=layer_dropout)
            self.head = nn.Linear(hidden_size, n_quantiles)

    def forward(self, past: torch.Tensor, future: torch.Tensor) -> torch.Tensor:
        x = self.segments(past)  # (B, L / S, S * F_past)
        out, state = self.encoder(x)  # out (B, L / S, hidden); state (layers, B, hidden)
        if self.decoder_kind == "mlp":
            y = self.head(out[:, -1], future)  # (B, H, Q)
        else:
            steps = self.step_embedding.expand(past.shape[0], -1, -1)  # (B, H, hidden)
            decoded, _ = self.decoder(torch.cat([future, steps], dim=-1), state)  # (B, H, hidden)
            y = self.head(decoded)  # (B, H, Q)
        return y if self.highway is None else y + self.highway(past)
