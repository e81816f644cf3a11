"""Batched inference: uint8 images -> class probabilities (softmax; a sigmoid per class for overlapping
classes, :func:`kagglecmr.models.factory.probabilities`), with flip/rotation test-time augmentation.

TTA passes are the 8 symmetries of the square (the dihedral group D4): ``none, hflip, vflip, hvflip``
(= a half turn), and ``rot90, rot270`` (quarter turns, counter-clockwise), ``transpose`` and
``antitranspose`` (mirrors on the diagonals).  Each pass transforms the input and undoes itself on
the output before averaging.  The four quarter-turn passes swap height and width: fine for square
images and for the model wrapper's padding, but only sensible for models trained with 90-degree
rotations (``augment.rot90``), e.g. histology.
"""

from __future__ import annotations

import numpy as np
import torch

from kagglecmr.data.batches import to_tensor
from kagglecmr.engine.tiles import needs_tiles, predict_tiled_images
from kagglecmr.models.factory import probabilities
from kagglecmr.utils.runtime import autocast

TTA_FLIPS = {"none": (), "hflip": (-1,), "vflip": (-2,), "hvflip": (-2, -1)}
TTA_TURNS = {"rot90": (1, ()), "rot270": (3, ()), "transpose": (1, (-1,)), "antitranspose": (1, (-2,))}
TTA_PASSES = (*TTA_FLIPS, *TTA_TURNS)  # (quarter turns, flip dims applied first) for the turned ones


def tta_apply(x: torch.Tensor, name: str) -> torch.Tensor:
    """The TTA pass ``name`` on an ``[N, C, H, W]`` tensor."""
    if name in TTA_FLIPS:
        dims = TTA_FLIPS[name]
        return x.flip(dims) if dims else x
    turns, dims = TTA_TURNS[name]
    return torch.rot90(x.flip(dims) if dims else x, turns, (-2, -1))


def tta_undo(p: torch.Tensor, name: str) -> torch.Tensor:
    """The inverse of :func:`tta_apply` (flips are their own inverse; turns turn back, then unflip)."""
    if name in TTA_FLIPS:
        return tta_apply(p, name)
    turns, dims = TTA_TURNS[name]
    p = torch.rot90(p, -turns, (-2, -1))
    return p.flip(dims) if dims else p


@torch.inference_mode()
def tta_mean(models, images: np.ndarray | torch.Tensor, device: torch.device, output, *, tta=("none",),
             batch_size: int = 64, channels_last: bool = True, weights=None) -> np.ndarray:
    """The mean of ``output(model, x, pass)`` (a float32 tensor of a batch ``x`` under one TTA pass) over
    ``models`` (one or a list, weighed by ``weights``) and the passes ``tta``, a batch of images at a time."""
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    weights = np.ones(len(models)) if weights is None else np.asarray(weights, dtype=np.float64)
    weights = weights / weights.sum()
    for m in models:
        m.eval()
    x_all = images if isinstance(images, torch.Tensor) else to_tensor(images, device, channels_last)
    out = []
    for start in range(0, x_all.shape[0], batch_size):
        x = x_all[start:start + batch_size]
        acc = None
        for w, model in zip(weights, models):
            for name in tta:
                p = output(model, x, name) * (w / len(tta))
                acc = p if acc is None else acc + p
        out.append(acc.cpu())
    return torch.cat(out).numpy()


def predict_proba(models, images: np.ndarray | torch.Tensor, device: torch.device, *, tta=("none",),
                  batch_size: int = 64, amp: torch.dtype | None = None, channels_last: bool = True,
                  weights=None) -> np.ndarray:
    """Mean probabilities (softmax, or sigmoid per class) over ``models`` (one or a list) and TTA passes:
    float32 ``[N, K, H, W]``.

    Each pass is undone on the output before averaging; ``weights`` weighs the models.
    """
    def output(model, x, name):
        with autocast(device, amp):
            logits = model(tta_apply(x, name))
        return tta_undo(probabilities(model, logits), name)

    return tta_mean(models, images, device, output, tta=tta, batch_size=batch_size, channels_last=channels_last,
                    weights=weights)


def predict_proba_tiled(models, images: np.ndarray, device: torch.device, *, tile, tta=("none",),
                        batch_size: int = 64, amp: torch.dtype | None = None, channels_last: bool = True,
                        weights=None) -> np.ndarray:
    """:func:`predict_proba` where images larger than ``tile`` (a ``TileConfig``; None: never) are predicted by
    overlapping windows (:func:`kagglecmr.engine.tiles.predict_tiled`, TTA applied per window); the others as
    whole images.  uint8 ``[N, H, W, C]`` -> float32 ``[N, K, H, W]``, one image's windows in memory at a time."""
    kw = {"tta": tta, "amp": amp, "channels_last": channels_last, "weights": weights}
    if tile is None or not needs_tiles(images.shape[1:3], tile.size):
        return predict_proba(models, images, device, batch_size=batch_size, **kw)
    return predict_tiled_images(lambda windows: predict_proba(models, windows, device, batch_size=tile.batch, **kw),
                                images, tile)
