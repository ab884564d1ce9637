"""Training losses on scaled targets: point losses, and the pinball loss for quantiles."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def pinball_loss(quantiles: Sequence[float]) -> Loss:
    """Mean pinball loss of predictions (B, H, Q) against targets (B, H), one level per Q."""
    levels = torch.tensor(list(quantiles), dtype=torch.float32)

    def loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        error = target.unsqueeze(-1) - prediction  # (B, H, Q)
        q = levels.to(prediction.device)
        return torch.maximum(q * error, (q - 1) * error).mean()

    return loss


def mae_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (prediction[..., 0] - target).abs().mean()


def mse_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((prediction[..., 0] - target) ** 2).mean()


def make_loss(name: str, quantiles: Sequence[float]) -> Loss:
    """The named loss: "pinball" (over ``quantiles``), "mae" or "mse" (one point output)."""
    if name == "pinball":
        return pinball_loss(quantiles)
    if name in ("mae", "mse"):
        return {"mae": mae_loss, "mse": mse_loss}[name]
    raise ValueError(f"loss must be 'pinball', 'mae' or 'mse', got {name!r}")
