"""The encoder-decoder Transformer of "Attention Is All You Need", for direct forecasting.

    past (B, L, F_past) --tokens--> (B, N, d) + positions --encoder x n--> memory (B, N, d)
    memory --flatten--> (B, N * d) --linear--> draft (B, H, Q)            (PatchTST's head)
    [future (B, H, F_future) ; draft] --> queries (B, H, d) + positions
        --decoder x n (masked self-attention, cross-attention to memory)--> (B, H, d)
        --> (B, H, Q), added to the draft
    plus a linear highway from the input target to the output (see layers.Highway)

Tokens are either one per time step (N = L) or, with ``encoder="patch"``, one per patch of
``patch_len`` steps taken every ``patch_stride`` steps as in PatchTST, which shortens long inputs
by the stride and lets each token carry local shape. PatchTST's flatten head, one linear map
from all the encoded tokens to every horizon step, drafts the forecast; the decoder refines
it: each horizon step's query starts from its draft values and its covariates, so the
cross-attention looks for the input tokens that matter to the value drafted for that step, not
only to its position. (Without the flatten head, queries of position and covariates alone, the
model scored M4 Hourly OWA 0.485 against 0.441; see docs/benchmarks.md.) Layers are pre-norm
(as in GPT-2), which trains more stably than the paper's post-norm without a warm-up. Every
attention module keeps its last weights when ``keep_attention`` is set: ``attention_maps``
returns them, and ``explain`` the last decoder layer's cross-attention spread over the input
time steps.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from forecaster.models.layers import Highway, spread_over_steps


class MultiHeadAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.query = nn.Linear(d_model, d_model)
        self.key_value = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.keep_attention = False
        self.attention: torch.Tensor | None = None  # (B, heads, T_query, T_key) when kept

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                causal: bool = False) -> torch.Tensor:
        B, T, d = x.shape
        S = context.shape[1]
        q = self.query(x).view(B, T, self.n_heads, -1).transpose(1, 2)  # (B, h, T, d/h)
        k, v = self.key_value(context).view(B, S, 2, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, h, T, S)
        if causal:  # a decoder step may not look at later steps
            future_steps = torch.ones(T, S, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(future_steps, float("-inf"))
        weights = scores.softmax(dim=-1)
        if self.keep_attention:
            self.attention = weights.detach()
        y = weights @ v  # (B, h, T, d/h); no dropout here: it costs half the step on a CPU
        return self.out(y.transpose(1, 2).reshape(B, T, d))


class FeedForward(nn.Sequential):
    def __init__(self, d_model: int, dropout: float):
        super().__init__(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(4 * d_model, d_model))


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.self_attention = MultiHeadAttention(d_model, n_heads)
        self.feed_forward = FeedForward(d_model, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.dropout(self.self_attention(h, h))
        return x + self.dropout(self.feed_forward(self.norm2(x)))


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.self_attention = MultiHeadAttention(d_model, n_heads)
        self.cross_attention = MultiHeadAttention(d_model, n_heads)
        self.feed_forward = FeedForward(d_model, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.dropout(self.self_attention(h, h, causal=True))
        x = x + self.dropout(self.cross_attention(self.norm2(x), memory))
        return x + self.dropout(self.feed_forward(self.norm3(x)))


def sinusoidal_positions(length: int, d_model: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...): (length, d_model)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32)
                          * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: d_model // 2])
    return table


class PositionalEncoding(nn.Module):
    """Adds a position vector to each token: fixed sinusoids, or learned."""

    def __init__(self, length: int, d_model: int, kind: str):
        super().__init__()
        if kind == "sinusoidal":
            self.register_buffer("table", sinusoidal_positions(length, d_model), persistent=False)
        elif kind == "learned":
            self.table = nn.Parameter(torch.randn(length, d_model) * 0.02)
        else:
            raise ValueError(f"positional_encoding must be 'sinusoidal' or 'learned', got {kind!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table[: x.shape[1]]


class TransformerModel(nn.Module):
    def __init__(
        self,
        input_len: int,
        horizon: int,
        n_quantiles: int,
        past_features: int,
        future_features: int,
        encoder: str = "patch",
        patch_len: int = 16,
        patch_stride: int = 8,
        d_model: int = 64,
        n_heads: int = 4,
        encoder_layers: int = 2,
        decoder_layers: int = 1,
        dropout: float = 0.1,
        positional_encoding: str = "sinusoidal",
        highway: bool = True,
    ):
        super().__init__()
        self.input_len = input_len
        self.highway = Highway(input_len, horizon) if highway else None
        if encoder == "patch":
            if patch_len > input_len:
                raise ValueError(f"patch_len ({patch_len}) exceeds input_len ({input_len})")
            self.patch_len, self.patch_stride = patch_len, patch_stride
            n_tokens = (input_len - patch_len) // patch_stride + 1
            self.tokens = nn.Linear(patch_len * past_features, d_model)
        elif encoder == "timestep":
            self.patch_len = self.patch_stride = 1
            n_tokens = input_len
            self.tokens = nn.Linear(past_features, d_model)
        else:
            raise ValueError(f"encoder must be 'patch' or 'timestep', got {encoder!r}")
        self.encoder_positions = PositionalEncoding(n_tokens, d_model, positional_encoding)
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(d_model, n_heads, dropout) for _ in range(encoder_layers))
        self.encoder_norm = nn.LayerNorm(d_model)
        self.flatten_head = nn.Linear(n_tokens * d_model, horizon * n_quantiles)
        # a decoder query per horizon step: its covariates, its draft values, and its position
        self.queries = nn.Linear(future_features + n_quantiles, d_model)
        self.decoder_positions = PositionalEncoding(horizon, d_model, positional_encoding)
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(d_model, n_heads, dropout) for _ in range(decoder_layers))
        self.decoder_norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_quantiles)
        self.dropout = nn.Dropout(dropout)

    def forward(self, past: torch.Tensor, future: torch.Tensor) -> torch.Tensor:
        B, H = future.shape[:2]
        # (B, L, F) -> (B, N, patch_len * F): PatchTST tokens, or one token per step
        patches = past.unfold(1, self.patch_len, self.patch_stride).flatten(2)
        x = self.dropout(self.encoder_positions(self.tokens(patches)))  # (B, N, d)
        for layer in self.encoder_layers:
            x = layer(x)
        memory = self.encoder_norm(x)  # (B, N, d)

        # PatchTST's flatten head: every token to every horizon step and quantile
        draft = self.flatten_head(memory.flatten(1)).view(B, H, -1)  # (B, H, Q)
        y = self.queries(torch.cat([future, draft], dim=-1))  # (B, H, d)
        y = self.dropout(self.decoder_positions(y))
        for layer in self.decoder_layers:
            y = layer(y, memory)
        y = draft + self.head(self.decoder_norm(y))  # (B, H, Q): the decoder's correction
        return y if self.highway is None else y + self.highway(past)

    @torch.no_grad()
    def attention_maps(self, past: torch.Tensor, future: torch.Tensor) -> dict[str, torch.Tensor]:
        """Attention weights (B, heads, T_query, T_key) of every attention module, by name."""
        modules = {n: m for n, m in self.named_modules() if isinstance(m, MultiHeadAttention)}
        for module in modules.values():
            module.keep_attention = True
        try:
            self(past, future)
            return {name: module.attention for name, module in modules.items()}
        finally:
            for module in modules.values():
                module.keep_attention, module.attention = False, None

    @torch.no_grad()
    def explain(self, past: torch.Tensor, future: torch.Tensor) -> dict[str, torch.Tensor]:
        """One forward pass's ``attention`` (B, H, input_len): the last decoder layer's
        cross-attention averaged over heads, each token's weight spread over the time steps
        of its patch (see layers.spread_over_steps); each row sums to 1."""
        module = self.decoder_layers[-1].cross_attention
        module.keep_attention = True
        try:
            self(past, future)
            tokens = module.attention.mean(dim=1)  # (B, H, N)
        finally:
            module.keep_attention, module.attention = False, None
        starts = torch.arange(tokens.shape[-1], device=tokens.device) * self.patch_stride
        return {"attention": spread_over_steps(tokens, starts, self.patch_len, self.input_len)}
