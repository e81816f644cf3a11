"""Training losses of overlapping classes (``task: multilabel``): one sigmoid per class, from
segmentation-models-pytorch's multilabel losses.

Targets come as packed label maps (long ``[B, H, W]``, bit ``k`` = class ``k + 1``;
:mod:`kagglecmr.formats.multilabel`) exactly as the data layer batches softmax label maps; :class:`MultilabelLoss`
unpacks them to ``[B, K, H, W]`` on the device, so batches, augmentation and the CUDA-graph step are the
same for both tasks.  Pixels valued :data:`~kagglecmr.models.losses.IGNORE` (patch padding) are left out.

The config's loss names keep their meaning with the multilabel counterpart of each term: ``ce`` is binary
cross-entropy per class and pixel (smp ``SoftBCEWithLogitsLoss``; ``label_smoothing`` = its ``smooth_factor``,
``class_weights`` weigh the classes), ``dice`` smp ``DiceLoss("multilabel")`` (or with
``loss.dice_per_image`` a soft Dice per image and class), ``focal`` smp's sigmoid focal loss, ``lovasz`` smp's
Lovász hinge per class, ``tversky`` smp ``TverskyLoss("multilabel")``.  ``dice_ce`` (the default) is Dice +
BCE, the recipe of the UW-Madison GI-tract winners.
"""

from __future__ import annotations

import torch
from torch import nn

from kagglecmr.cfg.config import LossConfig
from kagglecmr.models.losses import IGNORE, WeightedSum


def unpack_targets(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Long ``[B, H, W]`` packed maps -> float ``[B, K, H, W]`` of 0/1, :data:`IGNORE` where ignored."""
    bits = (packed.unsqueeze(1) >> torch.arange(k, device=packed.device).view(1, k, 1, 1)) & 1
    return torch.where((packed == IGNORE).unsqueeze(1), float(IGNORE), bits.float())


class MultilabelLoss(nn.Module):
    """``loss(logits [B, K, H, W], packed targets [B, H, W])``: the weighted terms on the unpacked targets."""

    def __init__(self, terms: WeightedSum, num_classes: int):
        super().__init__()
        self.terms, self.num_classes = terms, num_classes

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.terms(logits, unpack_targets(target, self.num_classes))


class PerImageSigmoidDice(nn.Module):
    """Soft Dice per image and class, averaged (the metric's rows; empty/empty scores ~1 through ``smooth``)."""

    def __init__(self, smooth: float = 1.0):
        super().__init__()
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        keep = target != IGNORE
        probs, t = logits.float().sigmoid() * keep, torch.where(keep, target, 0.0)
        inter, denom = (probs * t).sum((2, 3)), probs.sum((2, 3)) + t.sum((2, 3))
        return 1 - ((2 * inter + self.smooth) / (denom + self.smooth)).mean()


class SigmoidFocal(nn.Module):
    """smp's sigmoid focal loss, the mean over the pixels (and classes) that are not ignored."""

    def __init__(self, gamma: float):
        super().__init__()
        from segmentation_models_pytorch.losses._functional import focal_loss_with_logits

        self.gamma, self.fn = gamma, focal_loss_with_logits

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        keep = (target != IGNORE).float()  # a mask, not boolean indexing: shapes stay static (CUDA graphs)
        loss = self.fn(logits, target * keep, gamma=self.gamma, alpha=None, reduction="none")
        return (loss * keep).sum() / keep.sum().clamp_min(1.0)


class PerClassLovasz(nn.Module):
    """smp's Lovász hinge of each class on its own, averaged over classes."""

    def __init__(self):
        super().__init__()
        from segmentation_models_pytorch import losses as L

        self.hinge = L.LovaszLoss("binary", ignore_index=IGNORE, from_logits=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.hinge(logits[:, c:c + 1], target[:, c:c + 1])
                            for c in range(logits.shape[1])]).mean()


def build_multilabel_loss(cfg: LossConfig, num_classes: int) -> MultilabelLoss:
    from segmentation_models_pytorch import losses as L

    weight = None
    if cfg.class_weights:
        weight = torch.tensor(cfg.class_weights, dtype=torch.float32).view(1, -1, 1, 1)
    bce = L.SoftBCEWithLogitsLoss(weight=weight, ignore_index=IGNORE, smooth_factor=cfg.label_smoothing or None)
    dice = PerImageSigmoidDice() if cfg.dice_per_image else \
        L.DiceLoss("multilabel", from_logits=True, ignore_index=IGNORE)
    focal = SigmoidFocal(cfg.focal_gamma)
    lovasz = PerClassLovasz()
    tversky = L.TverskyLoss("multilabel", from_logits=True, alpha=cfg.tversky_alpha, beta=1 - cfg.tversky_alpha,
                            ignore_index=IGNORE)
    d, c = cfg.dice_weight, cfg.ce_weight
    table = {
        "dice_ce": [(d, dice), (c, bce)],
        "dice_focal": [(d, dice), (c, focal)],
        "dice": [(1.0, dice)],
        "ce": [(1.0, bce)],
        "focal": [(1.0, focal)],
        "lovasz": [(1.0, lovasz)],
        "lovasz_ce": [(d, lovasz), (c, bce)],
        "tversky": [(1.0, tversky)],
        "tversky_ce": [(d, tversky), (c, bce)],
    }
    return MultilabelLoss(WeightedSum([(w, t) for w, t in table[cfg.name] if w > 0]), num_classes)
