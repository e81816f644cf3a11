"""The cls head's probabilities (``model.cls_head``): "class k is present in this image", per fold model and run.

:func:`presence_proba` is :func:`kagglecmr.engine.infer.predict_proba`'s twin for the head: the sigmoid of
:meth:`~kagglecmr.models.factory.SegModel.presence_logits` (the encoder and the head, no decoder) averaged
over the models (weighted) and the TTA passes (a flipped or turned image holds the same classes).  An image
larger than the tile (``infer.tile``) is judged window by window and a class is as present as in its most
confident window.  :func:`runs_presence` and :func:`runs_presence_oof` serve the ensemble: the runs that have
a head, weighted as the ensemble weighs them; out of fold, each image only by the fold models that held it
out.  Models without a head give None.
"""

from __future__ import annotations

import numpy as np
import torch

from kagglecmr.data.context import add_context
from kagglecmr.engine.infer import tta_apply, tta_mean
from kagglecmr.engine.tiles import as_hw, needs_tiles, window_starts
from kagglecmr.utils.runtime import amp_dtype, autocast


def has_presence(model) -> bool:
    return bool(getattr(model, "has_presence", False))


def presence_proba(models, images: np.ndarray | torch.Tensor, device: torch.device, *, tta=("none",),
                   batch_size: int = 64, amp: torch.dtype | None = None, channels_last: bool = True,
                   weights=None) -> np.ndarray:
    """Mean sigmoid of the heads of ``models`` (one or a list) over TTA passes: float32 ``[N, K-1]``."""
    def output(model, x, name):
        with autocast(device, amp):
            logits = model.presence_logits(tta_apply(x, name))
        return torch.sigmoid(logits.float())

    return tta_mean(models, images, device, output, tta=tta, batch_size=batch_size, channels_last=channels_last,
                    weights=weights)


def presence_tiled(models, images: np.ndarray, device: torch.device, *, tile, **kw) -> np.ndarray:
    """:func:`presence_proba` of uint8 ``[N, H, W, C]`` images; larger than ``tile``: the maximum over windows."""
    if tile is None or not needs_tiles(images.shape[1:3], tile.size):
        return presence_proba(models, images, device, **kw)
    th, tw = as_hw(tile.size)
    out = []
    for image in images:
        h, w = image.shape[:2]
        if h < th or w < tw:  # as predict_tiled: pad up to the tile
            image = np.pad(image, ((0, max(0, th - h)), (0, max(0, tw - w)), (0, 0)))
        windows = np.stack([image[y:y + th, x:x + tw] for y in window_starts(image.shape[0], th, tile.overlap)
                            for x in window_starts(image.shape[1], tw, tile.overlap)])
        out.append(presence_proba(models, windows, device, **(kw | {"batch_size": tile.batch})).max(0))
    return np.stack(out).astype(np.float32)


def _with_heads(runs, weights) -> list:
    return [(r, w) for r, w in zip(runs, weights) if r.models and all(has_presence(m) for m in r.models.values())]


def runs_presence(runs, images: np.ndarray, device, passes, weights, batch_size) -> np.ndarray | None:
    """The head's probabilities of ``images`` from every fold model of the runs that have a head (None: none has)."""
    heads = _with_heads(runs, weights)
    if not heads or sum(w for _, w in heads) <= 0:
        return None
    total = sum(w for _, w in heads)
    out = None
    for r, w in heads:
        p = presence_tiled(list(r.models.values()), add_context(images, r.cfg.data.context), device, tile=r.cfg.tile,
                           tta=passes, batch_size=batch_size, amp=amp_dtype(r.cfg.train.amp, device))
        out = p * (w / total) if out is None else out + p * (w / total)
    return out.astype(np.float32)


def runs_presence_oof(runs, data, device, passes, weights, batch_size) -> np.ndarray | None:
    """Out-of-fold head probabilities of the labelled ``data``: each image by the fold models that held it out."""
    heads = _with_heads(runs, weights)
    if not heads or sum(w for _, w in heads) <= 0:
        return None
    total = sum(w for _, w in heads)
    out = np.zeros((len(data), heads[0][0].cfg.data.num_classes - 1), np.float32)
    pos = {i: k for k, i in enumerate(data.ids)}
    for r, w in heads:
        images = add_context(data.images, r.cfg.data.context)
        for k, model in r.models.items():
            idx = np.array([pos[i] for i in r.holdout.get(k, []) if i in pos], dtype=np.int64)
            if len(idx):
                out[idx] += (w / total) * presence_tiled(model, images[idx], device, tile=r.cfg.tile, tta=passes,
                                                         batch_size=batch_size, amp=amp_dtype(r.cfg.train.amp, device))
    return out
