"""Augmented training batches from in-memory uint8 arrays (host albumentations or on-device torch)."""

from __future__ import annotations

import numpy as np
import torch

from kagglecmr.cfg.config import Config
from kagglecmr.data import augment as aug
from kagglecmr.data import patches
from kagglecmr.data.rows import is_lazy

DEVICE_SET_BYTES = 2 << 30  # augment.backend auto: a larger training set (uint8) is augmented on the host


def to_tensor(images: np.ndarray, device: torch.device, channels_last: bool = True) -> torch.Tensor:
    """uint8 ``[N,H,W,C]`` -> float ``[N,C,H,W]`` in [0, 1] on ``device``."""
    arr = np.ascontiguousarray(images)
    if not arr.flags.writeable:  # a read-only array (e.g. memory-mapped): torch wants memory it may write
        arr = arr.copy()
    x = torch.from_numpy(arr).to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


class BatchMaker:
    """Augmented training batches from in-memory uint8 arrays.

    ``albumentations``: per-sample pipeline on the host, then one upload per batch.
    ``torch``: the whole training set lives on the device and batches are augmented there (``auto`` picks the
    host instead when the set, read from the cache, is larger than :data:`DEVICE_SET_BYTES`).
    """

    def __init__(self, cfg: Config, images: np.ndarray, masks: np.ndarray, device: torch.device, *, mask_fill: int = 0):
        """``mask_fill``: the mask value of pixels an affine or elastic warp brings in from outside the image
        (0 = background; :data:`~kagglecmr.formats.competition_metric.VOID` for datasets with void labels)."""
        self.cfg, self.device = cfg, device
        self.backend = aug.resolve_backend(cfg.augment, device)
        if self.backend == "torch" and cfg.augment.backend == "auto" and is_lazy(images) and images.nbytes > DEVICE_SET_BYTES:
            self.backend = "albumentations"  # the set would not fit on the device: host batches read from the cache
        self.channels_last = cfg.train.channels_last
        self.patch = cfg.data.patch_hw  # random crops (data.patch) instead of whole images
        if self.patch is not None and tuple(self.patch) == tuple(images.shape[1:3]):
            self.patch = None  # a crop the size of the image is the image: whole-image batches, same draws
        if self.patch is not None:
            self.locations = patches.class_locations(masks, cfg.seed)
            self.rng = np.random.default_rng(cfg.seed)
            self.shape = images.shape[1:3]
        square = (self.patch or images.shape[1:3])[0] == (self.patch or images.shape[1:3])[1]
        if self.backend == "torch":
            self.x = to_tensor(images, device, channels_last=False)
            self.y = torch.from_numpy(np.asarray(masks)).to(device).long()
            self.torch_aug = aug.TorchAugment(cfg.augment, mask_fill=mask_fill)
            self.gen = torch.Generator(device=device)
        else:
            self.images, self.masks = images, masks
            self.pipeline = aug.build_albumentations(cfg.augment, square=square, mask_fill=mask_fill)

    def reseed(self, seed: int) -> None:
        if self.patch is not None:
            self.rng = np.random.default_rng([seed, 2])
        if self.backend == "torch":
            self.gen.manual_seed(seed)
        else:
            self.pipeline.set_random_seed(seed)

    def _crops(self, idx: np.ndarray) -> list[tuple[int, int]]:
        return patches.crop_corners(idx, self.shape, self.patch, self.locations, self.cfg.data.fg_oversample, self.rng)

    def __call__(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if self.backend == "torch":
            ii = torch.from_numpy(idx).to(self.device)
            xb, yb = self.x[ii], self.y[ii]
            if self.patch is not None:
                xb, yb = self._crop_tensors(xb, yb, self._crops(idx))
            x, y = self.torch_aug(xb, yb, self.gen)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return x, y
        images, masks = self.images[idx], self.masks[idx]
        if self.patch is not None:
            images, masks = patches.crop_batch(images, masks, self._crops(idx), self.patch)
        im, m = aug.augment_batch_albumentations(self.pipeline, images, masks)
        x = to_tensor(im, self.device, self.channels_last)
        return x, torch.from_numpy(m).to(self.device, non_blocking=True).long()

    def _crop_tensors(self, x: torch.Tensor, y: torch.Tensor, corners) -> tuple[torch.Tensor, torch.Tensor]:
        """The crops of device tensors ``[B, C, H, W]`` / ``[B, H, W]`` (padding: 0 / ignore, as on the host)."""
        ph, pw = self.patch
        h, w = x.shape[-2:]
        pad_h, pad_w = max(0, ph - h), max(0, pw - w)
        if pad_h or pad_w:  # centre the image in a patch-sized canvas, as patches.crop_corners assumes
            top, left = pad_h // 2, pad_w // 2
            x = torch.nn.functional.pad(x, (left, pad_w - left, top, pad_h - top), value=0.0)
            y = torch.nn.functional.pad(y, (left, pad_w - left, top, pad_h - top), value=patches.IGNORE)
            corners = [(cy + top, cx + left) for cy, cx in corners]
        return (torch.stack([x[k, :, cy:cy + ph, cx:cx + pw] for k, (cy, cx) in enumerate(corners)]),
                torch.stack([y[k, cy:cy + ph, cx:cx + pw] for k, (cy, cx) in enumerate(corners)]))
