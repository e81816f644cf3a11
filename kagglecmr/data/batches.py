"""Augmented training batches from in-memory uint8 arrays (host albumentations or on-device torch)."""

from __future__ import annotations

import numpy as np
import torch

from kagglecmr.cfg.config import Config
from kagglecmr.data import augment as aug


def to_tensor(images: np.ndarray, device: torch.device, channels_last: bool = True) -> torch.Tensor:
    """uint8 ``[N,H,W,C]`` -> float ``[N,C,H,W]`` in [0, 1] on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


class BatchMaker:
    """Augmented training batches from in-memory uint8 arrays.

    ``albumentations``: per-sample pipeline on the host, then one upload per batch.
    ``torch``: the whole training set lives on the device and batches are augmented there.
    """

    def __init__(self, cfg: Config, images: np.ndarray, masks: np.ndarray, device: torch.device):
        self.cfg, self.device = cfg, device
        self.backend = aug.resolve_backend(cfg.augment, device)
        self.channels_last = cfg.train.channels_last
        if self.backend == "torch":
            self.x = to_tensor(images, device, channels_last=False)
            self.y = torch.from_numpy(masks).to(device).long()
            self.torch_aug = aug.TorchAugment(cfg.augment)
            self.gen = torch.Generator(device=device)
        else:
            self.images, self.masks = images, masks
            self.pipeline = aug.build_albumentations(cfg.augment, square=images.shape[1] == images.shape[2])

    def reseed(self, seed: int) -> None:
        if self.backend == "torch":
            self.gen.manual_seed(seed)
        else:
            self.pipeline.set_random_seed(seed)

    def __call__(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if self.backend == "torch":
            ii = torch.from_numpy(idx).to(self.device)
            x, y = self.torch_aug(self.x[ii], self.y[ii], self.gen)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return x, y
        im, m = aug.augment_batch_albumentations(self.pipeline, self.images[idx], self.masks[idx])
        x = to_tensor(im, self.device, self.channels_last)
        return x, torch.from_numpy(m).to(self.device, non_blocking=True).long()
