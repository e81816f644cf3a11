"""Batched inference: uint8 images -> softmax probabilities, with flip test-time augmentation."""

from __future__ import annotations

import numpy as np
import torch

from .runtime import autocast

TTA_FLIPS = {"none": (), "hflip": (-1,), "vflip": (-2,), "hvflip": (-2, -1)}


def to_tensor(images: np.ndarray, device: torch.device, channels_last: bool = True) -> torch.Tensor:
    """uint8 ``[N,H,W,C]`` -> float ``[N,C,H,W]`` in [0, 1] on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


@torch.inference_mode()
def predict_proba(models, images: np.ndarray | torch.Tensor, device: torch.device, *, tta=("none",),
                  batch_size: int = 64, amp: torch.dtype | None = None, channels_last: bool = True,
                  weights=None) -> np.ndarray:
    """Mean softmax over ``models`` (one or a list) and TTA flips: float32 ``[N, K, H, W]``.

    Each flip is undone on the output before averaging; ``weights`` weighs the models.
    """
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
                dims = TTA_FLIPS[name]
                xi = x.flip(dims) if dims else x
                with autocast(device, amp):
                    logits = model(xi)
                p = torch.softmax(logits.float(), dim=1)
                p = p.flip(dims) if dims else p
                p = p * (w / len(tta))
                acc = p if acc is None else acc + p
        out.append(acc.cpu())
    return torch.cat(out).numpy()
