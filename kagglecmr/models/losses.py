"""Training losses from config, built from segmentation-models-pytorch's losses.

``dice_ce`` (default) = ``dice_weight * Dice + ce_weight * CrossEntropy``; the other names combine
Focal, Lovasz-softmax and Tversky the same way.  Logits are cast to float32 before the loss.

Target pixels valued :data:`IGNORE` (255, the void label: a dataset's ``ignore`` values, low-confidence
pixels of ``pseudo-label`` masks, padding of patches) are left out of every loss: their logits change
nothing, as if those pixels were cropped away.
"""

from __future__ import annotations

import torch
from torch import nn

from kagglecmr.cfg.config import LossConfig
from kagglecmr.formats.competition_metric import VOID

IGNORE = VOID  # mask value of pixels no loss looks at: void labels, low-confidence pseudo labels, padding


class WeightedSum(nn.Module):
    def __init__(self, terms: list[tuple[float, nn.Module]]):
        super().__init__()
        self.weights = [w for w, _ in terms]
        self.terms = nn.ModuleList([t for _, t in terms])

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        return sum(w * t(logits, target) for w, t in zip(self.weights, self.terms))


class PerImageDiceLoss(nn.Module):
    """Soft Dice computed per image and foreground class, then averaged: the shape of the leaderboard
    metric (a row per image and class).  ``smooth`` makes an empty truth with an empty prediction score
    ~1, as the metric does, so slices without a structure teach the model to predict none."""

    def __init__(self, num_classes: int, smooth: float = 1.0):
        super().__init__()
        self.num_classes, self.smooth = num_classes, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        keep = (target != IGNORE).unsqueeze(1)  # ignored pixels count in neither the sums nor the overlap
        probs = logits.float().softmax(1)[:, 1:] * keep
        onehot = torch.nn.functional.one_hot(torch.where(keep[:, 0], target, 0), self.num_classes)
        onehot = onehot.permute(0, 3, 1, 2)[:, 1:].to(probs.dtype) * keep
        inter = (probs * onehot).sum((2, 3))
        denom = probs.sum((2, 3)) + onehot.sum((2, 3))
        return 1 - ((2 * inter + self.smooth) / (denom + self.smooth)).mean()


def build_loss(cfg: LossConfig, num_classes: int) -> nn.Module:
    from segmentation_models_pytorch import losses as L

    weight = torch.tensor(cfg.class_weights, dtype=torch.float32) if cfg.class_weights else None
    ce = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing, ignore_index=IGNORE)
    dice = PerImageDiceLoss(num_classes) if cfg.dice_per_image else \
        L.DiceLoss("multiclass", from_logits=True, ignore_index=IGNORE)
    focal = L.FocalLoss("multiclass", gamma=cfg.focal_gamma, ignore_index=IGNORE)
    lovasz = L.LovaszLoss("multiclass", from_logits=True, ignore_index=IGNORE)
    tversky = L.TverskyLoss("multiclass", from_logits=True, alpha=cfg.tversky_alpha, beta=1 - cfg.tversky_alpha,
                            ignore_index=IGNORE)
    d, c = cfg.dice_weight, cfg.ce_weight
    table = {
        "dice_ce": [(d, dice), (c, ce)],
        "dice_focal": [(d, dice), (c, focal)],
        "dice": [(1.0, dice)],
        "ce": [(1.0, ce)],
        "focal": [(1.0, focal)],
        "lovasz": [(1.0, lovasz)],
        "lovasz_ce": [(d, lovasz), (c, ce)],
        "tversky": [(1.0, tversky)],
        "tversky_ce": [(d, tversky), (c, ce)],
    }
    return WeightedSum([(w, t) for w, t in table[cfg.name] if w > 0])
