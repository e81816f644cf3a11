"""Losses: every configured name builds and gives a finite, differentiable value; the per-image Dice
loss has the shape of the leaderboard metric."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kagglecmr.cfg.config import LossConfig
from kagglecmr.formats.metric import dice_table
from kagglecmr.models.losses import PerImageDiceLoss, build_loss

NAMES = ["dice_ce", "dice_focal", "dice", "ce", "focal", "lovasz", "lovasz_ce", "tversky", "tversky_ce"]


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_every_loss_is_finite_and_differentiable(name, per_image):
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 16, 16, requires_grad=True)
    target = torch.randint(0, 4, (3, 16, 16))
    loss = build_loss(LossConfig(name=name, dice_per_image=per_image), 4)(logits, target)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def _hard_logits(labels: torch.Tensor, k: int = 4) -> torch.Tensor:
    return F.one_hot(labels, k).permute(0, 3, 1, 2).float() * 60.0  # softmax == one-hot in float32


def test_per_image_dice_equals_one_minus_the_metric_on_hard_predictions():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, (6, 24, 24))
    pred = truth.copy()
    pred[:, :8] = rng.integers(0, 4, (6, 8, 24))  # damage a third of every image
    pred[0][pred[0] == 1] = 0  # image 0: class 1 missed entirely
    truth[1][truth[1] == 2] = 0
    pred[1][pred[1] == 2] = 0  # image 1: class 2 absent in both -> scores 1 under the metric
    loss = PerImageDiceLoss(4, smooth=1e-6)(_hard_logits(torch.from_numpy(pred)), torch.from_numpy(truth))
    assert loss.item() == pytest.approx(1 - dice_table(pred, truth, 4).mean(), abs=1e-4)


def test_per_image_dice_rewards_predicting_nothing_on_an_empty_slice():
    empty = torch.zeros(1, 16, 16, dtype=torch.long)
    stray = empty.clone()
    stray[0, 3, 3] = 1  # one stray RV pixel on a slice without RV: a row scored 0 by the metric
    loss = PerImageDiceLoss(4)
    assert loss(_hard_logits(empty), empty).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(_hard_logits(stray), empty).item() > 0.1


def _batch_with_ignored_rows(seed: int = 0):
    """Logits and targets whose bottom 6 rows are marked ignore (255) in every image."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 4, 16, 16, generator=g)
    target = torch.randint(0, 4, (3, 16, 16), generator=g)
    ignored = target.clone()
    ignored[:, 10:] = 255
    return logits, target, ignored


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_ignored_pixels_do_not_change_any_loss(name, per_image):
    from kagglecmr.models.losses import IGNORE

    assert IGNORE == 255
    logits, _, ignored = _batch_with_ignored_rows()
    loss_fn = build_loss(LossConfig(name=name, dice_per_image=per_image), 4)
    other = logits.clone()
    other[:, :, 10:] = torch.randn(3, 4, 6, 16) * 5  # different logits on the ignored pixels only
    a = loss_fn(logits, ignored)
    assert torch.isfinite(a)
    assert loss_fn(other, ignored).item() == pytest.approx(a.item(), abs=1e-5)
    # and the ignored pixels get no gradient
    x = logits.clone().requires_grad_(True)
    loss_fn(x, ignored).backward()
    assert x.grad[:, :, 10:].abs().max().item() == 0.0
    assert x.grad[:, :, :10].abs().sum().item() > 0


@pytest.mark.parametrize("name", ["dice_ce", "ce", "focal", "tversky", "lovasz"])
def test_ignored_pixels_equal_cropping_them_away(name):
    logits, target, ignored = _batch_with_ignored_rows(1)
    for per_image in (False, True):
        loss_fn = build_loss(LossConfig(name=name, dice_per_image=per_image), 4)
        cropped = loss_fn(logits[:, :, :10], target[:, :10])
        assert loss_fn(logits, ignored).item() == pytest.approx(cropped.item(), abs=1e-5)
