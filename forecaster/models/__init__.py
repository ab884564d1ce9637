"""Model families. Every model maps (past (B, L, F_past), future (B, H, F_future)) -> (B, H, Q)."""

from __future__ import annotations

from torch import nn

from forecaster.models.hybrid import HybridModel
from forecaster.models.rnn import RNNModel
from forecaster.models.tcn import TCNModel
from forecaster.models.transformer import TransformerModel

FAMILIES: dict[str, type[nn.Module]] = {
    "rnn": RNNModel,
    "tcn": TCNModel,
    "transformer": TransformerModel,
    "hybrid": HybridModel,
}


def build_model(family: str, **kwargs: object) -> nn.Module:
    """A model of the named family from the JSON-able keyword arguments saved with its weights."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[family](**kwargs)


__all__ = ["FAMILIES", "HybridModel", "RNNModel", "TCNModel", "TransformerModel", "build_model"]
