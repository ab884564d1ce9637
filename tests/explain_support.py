"""For the explanation tests: the attention over input time steps that POST /explain and
``explain_histories`` answer, computed here independently from ``attention_maps`` (the raw
per-module weights), with plain loops over each token's time steps."""

from __future__ import annotations

import numpy as np

from forecaster import NeuralForecaster


def reference_attention(estimator: NeuralForecaster, history: np.ndarray,
                        covariates: np.ndarray | None = None,
                        static: np.ndarray | None = None) -> np.ndarray:
    """(horizon, min(len(history), input_len)): the last attention from the horizon steps to
    the history, averaged over heads; for the hybrid only its encoder keys, renormalised; each
    token's weight shared equally among the time steps it reads; the observed steps kept and
    each row renormalised over them."""
    maps = estimator.attention_maps(history, covariates, static)
    sizes = estimator.resolved_params_  # what the network was built with, "auto" resolved
    L, H = sizes["input_len"], estimator.horizon_
    if "attention" in maps:  # the hybrid: encoder segments, then the decoder steps
        S = sizes["segment_len"]
        tokens = maps["attention"].mean(axis=0)[:, : L // S].astype(np.float64)
        tokens /= tokens.sum(axis=1, keepdims=True)
        reads = [range(L % S + i * S, L % S + (i + 1) * S) for i in range(L // S)]
    else:  # the Transformer: its last decoder layer's cross-attention over patches
        layers = [name for name in maps if name.endswith("cross_attention")]
        last = max(layers, key=lambda name: int(name.split(".")[1]))
        tokens = maps[last].mean(axis=0).astype(np.float64)
        length, stride = ((sizes["patch_len"], sizes["patch_stride"])
                          if estimator.encoder == "patch" else (1, 1))
        reads = [range(i * stride, i * stride + length) for i in range(tokens.shape[1])]
    steps = np.zeros((H, L))
    for token, read in enumerate(reads):
        for step in read:
            steps[:, step] += tokens[:, token] / len(read)
    observed = steps[:, L - min(len(history), L):]
    return observed / observed.sum(axis=1, keepdims=True)
