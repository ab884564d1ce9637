"""The training loop's moving average of the weights: what validation sees and what it keeps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from forecaster.models import build_model
from forecaster.models.losses import make_loss
from forecaster.trainer import TrainingSettings, _average_weight, train
from forecaster.windows import Panel, WindowSampler

QUANTILES = (0.1, 0.5, 0.9)


def test_the_average_ramps_up_to_its_decay() -> None:
    # after 0 updates the old average weighs 1/10, after 90 it weighs 91/100, then the decay caps it
    assert _average_weight(0, 0.99) == pytest.approx(0.1)
    assert _average_weight(90, 0.99) == pytest.approx(0.91)
    assert _average_weight(5000, 0.99) == pytest.approx(0.99)


def test_training_keeps_the_moving_average_of_each_steps_weights() -> None:
    """The kept weights are the average of the weights after every optimizer step, computed
    here by hand from the steps of the same seeded run (the average does not steer training)."""
    rng = np.random.default_rng(0)
    panel = Panel([np.sin(np.arange(120) / 3.0)[:, None] + 0.1 * rng.standard_normal((120, 1))])
    sampler = WindowSampler(panel, input_len=12, horizon=4)
    settings = TrainingSettings(max_epochs=1, steps_per_epoch=12, batch_size=16, patience=5,
                                progress=False, average_decay=0.8)

    torch.manual_seed(0)
    model = build_model("rnn", input_len=12, horizon=4, n_quantiles=len(QUANTILES),
                        past_features=2, future_features=0, hidden_size=8, num_layers=1)
    steps: list[dict[str, torch.Tensor]] = []
    hook = register_optimizer_step_post_hook(
        lambda *_: steps.append({k: v.detach().clone() for k, v in model.named_parameters()}))
    try:
        train(model, sampler, make_loss("pinball", QUANTILES), settings)
    finally:
        hook.remove()

    assert len(steps) == settings.steps_per_epoch
    expected = dict(steps[0])  # the first update copies the weights
    for n, step in enumerate(steps[1:], start=1):
        weight = _average_weight(n, 0.8)
        expected = {k: weight * expected[k] + (1 - weight) * step[k] for k in expected}
    for name, weight in model.named_parameters():
        torch.testing.assert_close(weight.detach(), expected[name])
        assert not torch.equal(weight.detach(), steps[-1][name]), name  # not the last step's


def test_a_fixed_number_of_epochs_trains_that_many_without_validating(monkeypatch) -> None:
    """What a refit runs: every step of the given epochs (patience cannot end it), the
    validation windows never read, and no curve."""
    panel = Panel([np.sin(np.arange(120) / 3.0)[:, None]])
    sampler = WindowSampler(panel, input_len=12, horizon=4)
    monkeypatch.setattr(sampler, "validation", lambda: pytest.fail("a refit validated"))
    settings = TrainingSettings(max_epochs=10, steps_per_epoch=5, batch_size=8, patience=1,
                                progress=False)
    torch.manual_seed(0)
    model = build_model("rnn", input_len=12, horizon=4, n_quantiles=len(QUANTILES),
                        past_features=2, future_features=0, hidden_size=8, num_layers=1)
    steps: list[int] = []
    hook = register_optimizer_step_post_hook(lambda *_: steps.append(1))
    try:
        history = train(model, sampler, make_loss("pinball", QUANTILES), settings,
                        on_epoch=lambda record: pytest.fail("a refit reported an epoch"),
                        epochs=3)
    finally:
        hook.remove()
    assert history == []
    assert len(steps) == 3 * settings.steps_per_epoch
    assert not model.training
