"""One training loop for every model family.

AdamW with a one-cycle learning-rate schedule, gradient clipping, an exponential moving
average of the weights, early stopping on the validation windows with the best average
restored, bf16 autocast on CUDA, and a progress bar. Seeded runs on the CPU are deterministic.
Given a number of epochs instead, it trains exactly that many with no validation, as a refit on
every row does after early stopping has chosen them (``NeuralForecaster``'s ``refit_full``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from forecaster.models.losses import Loss
from forecaster.windows import Windows, WindowSampler


@dataclass(frozen=True)
class TrainingSettings:
    max_epochs: int = 30
    steps_per_epoch: int = 50
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    gradient_clip: float = 1.0
    patience: int = 5  # epochs without a better validation loss before stopping
    # the moving average's decay per step (at most; less over the first steps, so short runs
    # average their own weights rather than the initial ones): validation and the fitted model
    # use the average, which smooths the steps' noise out of the forecast (docs/benchmarks.md)
    average_decay: float = 0.99
    device: str = "auto"
    seed: int = 0
    progress: bool = True


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    train_loss: float
    val_loss: float
    seconds: float


EpochCallback = Callable[[EpochRecord], None]


def choose_device(name: str = "auto") -> torch.device:
    """"auto" picks cuda, then mps, then cpu; any other name is taken as it is."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def model_inputs(windows: Windows, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(past, future) tensors for a model; static covariates are broadcast onto every step."""
    past, future, static = windows.past, windows.future, windows.static
    if static.shape[1]:
        past = np.concatenate([past, np.repeat(static[:, None], past.shape[1], 1)], axis=-1)
        future = np.concatenate([future, np.repeat(static[:, None], future.shape[1], 1)], axis=-1)
    return torch.from_numpy(past).to(device), torch.from_numpy(future).to(device)


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA; full precision elsewhere."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=device.type == "cuda")


@torch.no_grad()
def predict_scaled(model: nn.Module, windows: Windows, device: torch.device,
                   batch_size: int = 1024) -> np.ndarray:
    """Model output in the windows' scaled units: (B, H, Q) float32."""
    model.eval()
    outputs = []
    for start in range(0, len(windows.past), batch_size):
        chunk = windows.slice(start, start + batch_size)
        past, future = model_inputs(chunk, device)
        with autocast(device):
            outputs.append(model(past, future).float().cpu().numpy())
    return np.concatenate(outputs)


def _average_weight(steps: int, decay: float) -> float:
    """How much the old average weighs after ``steps`` updates: at most ``decay``, less at first
    ((1 + steps) / (10 + steps), as TensorFlow's ExponentialMovingAverage ramps up)."""
    return min(decay, (1.0 + steps) / (10.0 + steps))


def _moving_average(averages: list[torch.Tensor], currents: list[torch.Tensor],
                    steps: torch.Tensor, decay: float) -> None:
    """``AveragedModel``'s update, in place over all the weights at once: one read of the step
    count per step (a device sync on CUDA), not one per weight."""
    weight = _average_weight(int(steps), decay)
    for average, current in zip(averages, currents, strict=True):
        average.lerp_(current, 1.0 - weight)


def best_epoch(history: list[EpochRecord]) -> int:
    """The epoch whose weights early stopping restores: the first with the lowest validation
    loss (``train`` keeps it as it goes)."""
    return min(history, key=lambda record: record.val_loss).epoch


def train(model: nn.Module, sampler: WindowSampler, loss_fn: Loss, settings: TrainingSettings,
          on_epoch: EpochCallback | None = None, epochs: int | None = None
          ) -> list[EpochRecord]:
    """Train ``model`` in place and return the learning curve.

    Without ``epochs``: early stopping on the sampler's validation windows, the best average
    restored. With ``epochs``: exactly that many of the same one-cycle schedule, no validation
    (a refit trains on the validation rows), the last average kept, and no curve returned.
    """
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    device = choose_device(settings.device)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings.learning_rate,
        total_steps=settings.max_epochs * settings.steps_per_epoch)
    averaged = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=partial(_moving_average, decay=settings.average_decay))
    if not epochs:
        validation = sampler.validation()
        val_target = torch.from_numpy(validation.target)

    history: list[EpochRecord] = []
    best_loss, best_state, stale = float("inf"), copy.deepcopy(model.state_dict()), 0
    bar = tqdm(range(epochs or settings.max_epochs), desc="refitting" if epochs else "training",
               unit="epoch", disable=not settings.progress, leave=False)
    for epoch in bar:
        started = time.perf_counter()
        model.train()
        total = 0.0
        for _ in range(settings.steps_per_epoch):
            batch = sampler.sample(settings.batch_size, rng)
            past, future = model_inputs(batch, device)
            with autocast(device):
                prediction = model(past, future)
            loss = loss_fn(prediction.float(), torch.from_numpy(batch.target).to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), settings.gradient_clip)
            optimizer.step()
            schedule.step()
            averaged.update_parameters(model)
            total += loss.item()
        if epochs:
            bar.set_postfix(train=f"{total / settings.steps_per_epoch:.4f}")
            continue
        val_loss = loss_fn(torch.from_numpy(predict_scaled(averaged.module, validation, device)),
                           val_target).item()
        record = EpochRecord(epoch, total / settings.steps_per_epoch, val_loss,
                             time.perf_counter() - started)
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        bar.set_postfix(train=f"{record.train_loss:.4f}", val=f"{val_loss:.4f}")
        if val_loss < best_loss:
            best_loss, best_state, stale = (val_loss,
                                            copy.deepcopy(averaged.module.state_dict()), 0)
        else:
            stale += 1
            if stale >= settings.patience:
                break
    model.load_state_dict(averaged.module.state_dict() if epochs else best_state)
    model.eval()
    return history
