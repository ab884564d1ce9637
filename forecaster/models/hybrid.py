"""A recurrent + attention hybrid after the Temporal Fusion Transformer (Lim et al., 2021).

    past (B, L, F_past)     --variable selection--> (B, L, d) --segments--> (B, N, d)
        --LSTM encoder--> gate, add & norm --> encoded (B, N, d), state
    future (B, H, F_future) --variable selection--> (B, H, d)
        --LSTM decoder from state--> gate, add & norm --> decoded (B, H, d)
    decoded attends over [encoded ; decoded] (interpretable multi-head attention, causal on
        the decoder side) --> gate, add & norm --> GRN --> gate, add & norm --> (B, H, Q)
    plus a linear highway from the input target to the output (see layers.Highway)

Variable selection weighs every input feature (the target, the observed mask, each covariate)
per time step, so the weights say which inputs the forecast used; statics arrive broadcast
onto every step, as for the other families. Gated residual networks (GRN, with GLU gating)
let the network switch off any block it does not need, which keeps the model trainable on
small data. Attention heads have their own queries and keys but share one value projection
(TFT's interpretable attention), so the head-averaged weights are one meaningful map over time.

The encoder reads segments of ``segment_len`` steps per recurrent step, as the RNN family does
(SegRNN): the recurrence over long hourly inputs gets 24 times shorter. Attention keys are then
segments; ``attention_maps`` reports them, ``explain`` spreads each over its time steps.
``variable_weights`` returns the selection weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from forecaster.models.layers import Highway, Segments

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


class GatedResidualNetwork(nn.Module):
    """GRN(x) = LayerNorm(skip(x) + GLU(W2 ELU(W1 x))): a block that can gate itself off."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int, dropout: float):
        super().__init__()
        self.skip = nn.Linear(input_size, output_size) if input_size != output_size else None
        self.hidden = nn.Linear(input_size, hidden_size)
        self.gate = nn.Linear(hidden_size, 2 * output_size)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.skip is None else self.skip(x)
        h = self.dropout(F.elu(self.hidden(x)))
        return self.norm(skip + F.glu(self.gate(h), dim=-1))


class GateAddNorm(nn.Module):
    """LayerNorm(residual + GLU(x)): how each block's output joins the stream it refines."""

    def __init__(self, size: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.gate = nn.Linear(size, 2 * size)
        self.norm = nn.LayerNorm(size)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.norm(residual + F.glu(self.gate(self.dropout(x)), dim=-1))


class VariableSelection(nn.Module):
    """Embeds each of V scalar inputs, weighs them per step, and returns the weighted sum.

        x (B, T, V) -> embedded (B, T, V, d) -> weights (B, T, V) softmax over V
                    -> (B, T, d) = sum_v weights * GRN(embedded_v)
    """

    def __init__(self, n_variables: int, d_model: int, dropout: float):
        super().__init__()
        # one linear embedding per variable: weight (V, d), bias (V, d)
        self.embed_weight = nn.Parameter(torch.randn(n_variables, d_model) * 0.1)
        self.embed_bias = nn.Parameter(torch.zeros(n_variables, d_model))
        self.selector = GatedResidualNetwork(n_variables * d_model, d_model, n_variables, dropout)
        self.transform = GatedResidualNetwork(d_model, d_model, d_model, dropout)
        self.weights: torch.Tensor | None = None  # (B, T, V), kept when keep_weights is set
        self.keep_weights = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embedded = x.unsqueeze(-1) * self.embed_weight + self.embed_bias  # (B, T, V, d)
        weights = self.selector(embedded.flatten(-2)).softmax(dim=-1)  # (B, T, V)
        if self.keep_weights:
            self.weights = weights.detach()
        return (weights.unsqueeze(-1) * self.transform(embedded)).sum(dim=-2)  # (B, T, d)


class InterpretableAttention(nn.Module):
    """Multi-head attention whose heads share the value projection, averaged over heads.

    Each head h has its own queries and keys; all use the same values V, so
    out = W_o (mean_h softmax(Q_h K_h^T / sqrt(d_h)) V) = W_o (mean_h A_h) V: the mean map
    is exactly what mixes the values.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads, self.head_size = n_heads, d_model // n_heads
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, self.head_size)
        self.out = nn.Linear(self.head_size, d_model)
        self.dropout = nn.Dropout(dropout)
        self.keep_attention = False
        self.attention: torch.Tensor | None = None  # (B, heads, T_query, T_key) when kept

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor
                ) -> torch.Tensor:
        B, T, _ = x.shape
        S = context.shape[1]
        q = self.query(x).view(B, T, self.n_heads, -1).transpose(1, 2)  # (B, h, T, d/h)
        k = self.key(context).view(B, S, self.n_heads, -1).transpose(1, 2)  # (B, h, S, d/h)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_size)  # (B, h, T, S)
        weights = scores.masked_fill(mask, float("-inf")).softmax(dim=-1)
        if self.keep_attention:
            self.attention = weights.detach()
        mixed = self.dropout(weights).mean(dim=1) @ self.value(context)  # (B, T, d/h)
        return self.out(mixed)


class HybridModel(nn.Module):
    def __init__(
        self,
        input_len: int,
        horizon: int,
        n_quantiles: int,
        past_features: int,
        future_features: int,
        cell: str = "lstm",
        d_model: int = 32,
        n_heads: int = 4,
        num_layers: int = 1,
        segment_len: int = 1,
        dropout: float = 0.1,
        highway: bool = True,
    ):
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {cell!r}")
        rnn = CELLS[cell]
        self.horizon = horizon
        self.highway = Highway(input_len, horizon) if highway else None
        self.past_selection = VariableSelection(past_features, d_model, dropout)
        # decoder steps without covariates still need an input: a learned embedding per lead time
        self.future_selection = (VariableSelection(future_features, d_model, dropout)
                                 if future_features else None)
        self.step_embedding = nn.Parameter(torch.randn(horizon, d_model) * 0.02)
        self.segments = Segments(segment_len, input_len)
        self.segment_projection = nn.Linear(segment_len * d_model, d_model)
        layer_dropout = dropout if num_layers > 1 else 0.0
        self.encoder = rnn(d_model, d_model, num_layers, batch_first=True, dropout=layer_dropout)
        self.decoder = rnn(d_model, d_model, num_layers, batch_first=True, dropout=layer_dropout)
        self.encoder_gate = GateAddNorm(d_model, dropout)
        self.decoder_gate = GateAddNorm(d_model, dropout)
        self.attention = InterpretableAttention(d_model, n_heads, dropout)
        self.attention_gate = GateAddNorm(d_model, dropout)
        self.position_wise = GatedResidualNetwork(d_model, d_model, d_model, dropout)
        self.output_gate = GateAddNorm(d_model, dropout)
        self.head = nn.Linear(d_model, n_quantiles)

    def forward(self, past: torch.Tensor, future: torch.Tensor) -> torch.Tensor:
        B, H = past.shape[0], self.horizon
        selected_past = self.past_selection(past)  # (B, L, d)
        tokens = self.segment_projection(self.segments(selected_past))  # (B, N, d)
        encoded, state = self.encoder(tokens)  # (B, N, d)
        encoded = self.encoder_gate(encoded, tokens)

        steps = self.step_embedding.expand(B, -1, -1)  # (B, H, d)
        selected_future = steps if self.future_selection is None \
            else self.future_selection(future) + steps
        decoded, _ = self.decoder(selected_future, state)  # (B, H, d)
        decoded = self.decoder_gate(decoded, selected_future)

        # each decoder step sees every encoder token and the decoder steps up to itself
        context = torch.cat([encoded, decoded], dim=1)  # (B, N + H, d)
        N = encoded.shape[1]
        later = torch.ones(H, H, dtype=torch.bool, device=past.device).triu(1)
        mask = torch.cat([torch.zeros(H, N, dtype=torch.bool, device=past.device), later], 1)
        attended = self.attention(decoded, context, mask)  # (B, H, d)
        x = self.attention_gate(attended, decoded)
        x = self.output_gate(self.position_wise(x), decoded)
        y = self.head(x)  # (B, H, Q)
        return y if self.highway is None else y + self.highway(past)

    @torch.no_grad()
    def attention_maps(self, past: torch.Tensor, future: torch.Tensor) -> dict[str, torch.Tensor]:
        """The decoder's attention (B, heads, H, N + H) over encoder tokens, then decoder steps."""
        return {"attention": self._recorded(past, future)[0]}

    @torch.no_grad()
    def variable_weights(self, past: torch.Tensor, future: torch.Tensor
                         ) -> dict[str, torch.Tensor]:
        """Variable-selection weights (B, T, V) of the past inputs and, when the model has
        known-future inputs, of those: how much each input feature counted at each step."""
        return self._recorded(past, future)[1]

    @torch.no_grad()
    def explain(self, past: torch.Tensor, future: torch.Tensor) -> dict[str, torch.Tensor]:
        """One forward pass's ``attention`` (B, H, input_len) over the input time steps, and
        the variable-selection weights ``past`` and ``future`` of ``variable_weights``.

        The attention is the head-averaged map restricted to the encoder keys and renormalised:
        the share a step puts on the decoder steps (the known-future side, itself read from the
        history through the decoder's recurrent state) is left out, since those keys are no
        input time step. Each segment's weight is then spread over its steps; rows sum to 1.
        """
        attention, variables = self._recorded(past, future)
        encoder_keys = attention.shape[-1] - self.horizon
        history = attention.mean(dim=1)[..., :encoder_keys]  # (B, H, N)
        history = history / history.sum(dim=-1, keepdim=True)
        return {"attention": self.segments.spread(history), **variables}

    def _recorded(self, past: torch.Tensor, future: torch.Tensor
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One forward pass, keeping the attention (B, heads, H, N + H) and the selection
        weights by name; nothing stays kept afterwards."""
        selections = {"past": self.past_selection, "future": self.future_selection}
        selections = {name: m for name, m in selections.items() if m is not None}
        self.attention.keep_attention = True
        for selection in selections.values():
            selection.keep_weights = True
        try:
            self(past, future)
            return self.attention.attention, {name: m.weights for name, m in selections.items()}
        finally:
            self.attention.keep_attention, self.attention.attention = False, None
            for selection in selections.values():
                selection.keep_weights, selection.weights = False, None
