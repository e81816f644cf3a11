"""The image-level "class present" head (``model.cls_head: true``).

smp builds it from ``aux_params`` (:class:`segmentation_models_pytorch.base.ClassificationHead`: global
average pooling of the encoder's deepest features, dropout ``model.cls_dropout``, one linear layer) with one
logit per foreground class.  In training mode the model returns ``(segmentation logits, presence logits)``
and the loss adds ``loss.cls_weight`` times the binary cross-entropy of the presence logits against "the
class has at least one pixel in the image's target" (:func:`presence_targets`; pixels valued ``IGNORE``
count for no class).  In eval mode the model returns the segmentation alone, so inference, validation,
export and every caller of ``model(x)`` see the same thing as without a head; the head's probabilities come
from :meth:`kagglecmr.models.factory.SegModel.presence_logits` (the encoder and the head only), and its
OOF-tuned threshold gates a class's mask (:mod:`kagglecmr.engine.gating`).
"""

from __future__ import annotations

import torch
from torch import nn

from kagglecmr.cfg.config import Config
from kagglecmr.utils.errors import ConfigError


def aux_params(cfg: Config) -> dict:
    """smp's ``aux_params`` for the configured head (``{}`` without one)."""
    if not cfg.model.cls_head:
        return {}
    if "aux_params" in cfg.model.params:
        raise ConfigError("model.cls_head: true builds smp's aux_params itself; remove model.params.aux_params")
    return {"aux_params": {"classes": max(1, (cfg.data.num_classes or 4) - 1), "dropout": cfg.model.cls_dropout}}


def presence_targets(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """float ``[B, K-1]``: 1 where foreground class ``k`` (1..K-1) has a pixel in the ``[B, H, W]`` target."""
    flat = target.reshape(target.shape[0], -1)
    cls = torch.arange(1, num_classes, device=target.device)
    return (flat[:, None, :] == cls[None, :, None]).any(-1).float()


def seg_of(out):
    """The segmentation logits of a model output (a tensor, or ``(segmentation, presence)``)."""
    return out[0] if isinstance(out, tuple) else out


def part(out, rows: slice):
    """Rows ``rows`` of a model output, a tensor or a ``(segmentation, presence)`` pair."""
    return tuple(o[rows] for o in out) if isinstance(out, tuple) else out[rows]


class PresenceLoss(nn.Module):
    """``seg_loss(segmentation, target) + weight * BCE(presence, presence_targets(target))``; a plain tensor
    output (eval mode, validation) gets the segmentation loss alone."""

    def __init__(self, seg_loss: nn.Module, num_classes: int, weight: float):
        super().__init__()
        self.seg_loss, self.num_classes, self.weight = seg_loss, num_classes, float(weight)
        self.bce = nn.BCEWithLogitsLoss()

    def forward(self, out, target: torch.Tensor) -> torch.Tensor:
        if not isinstance(out, tuple):
            return self.seg_loss(out, target)
        seg, presence = out
        loss = self.seg_loss(seg, target)
        if self.weight > 0:
            loss = loss + self.weight * self.bce(presence.float(), presence_targets(target, self.num_classes))
        return loss


def with_presence(seg_loss: nn.Module, cfg: Config) -> nn.Module:
    """The training loss: ``seg_loss`` as it is, or wrapped in :class:`PresenceLoss` with ``model.cls_head``."""
    return PresenceLoss(seg_loss, cfg.data.num_classes, cfg.loss.cls_weight) if cfg.model.cls_head else seg_loss
