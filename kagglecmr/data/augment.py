"""Training augmentation from config, in two equivalent implementations.

* :func:`build_albumentations` — the per-sample CPU pipeline (albumentations on uint8 arrays).
* :class:`TorchAugment` — the same transforms with the same parameter ranges, applied to a whole
  batch of tensors at once on any device (the GPU fast path: no host round trip per step).

Both draw, per sample: horizontal/vertical flips, a 90° rotation, an affine (rotation about the
centre, isotropic scale, translation), an elastic warp, brightness/contrast
(``x * alpha + beta``), a per-channel colour jitter (``x_c * gain_c + shift_c``: stain and scanner
variation in histology), gamma (``x ** g``) and gaussian noise, each with its own probability.
Images are ``[0, 1]`` floats (torch) or uint8 (albumentations); masks use nearest neighbour, and the pixels a
warp brings in from outside the image get ``mask_fill`` (0; void for datasets with void labels).
"""

from __future__ import annotations

import math
import os

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from kagglecmr.cfg.config import AugmentConfig

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


# ----------------------------------------------------------------------------------- albumentations
def build_albumentations(cfg: AugmentConfig, seed: int | None = None, *, square: bool = True, mask_fill: int = 0):
    """The per-sample pipeline; ``square=False`` leaves out 90-degree rotations (they would swap H and W);
    ``mask_fill``: the mask value of pixels warped in from outside the image."""
    import albumentations as A

    t = [
        A.HorizontalFlip(p=cfg.hflip),
        A.VerticalFlip(p=cfg.vflip),
        A.RandomRotate90(p=cfg.rot90 if square else 0.0),
        A.Affine(
            scale=cfg.scale, keep_ratio=True,  # isotropic, as TorchAugment
            translate_percent=(-cfg.translate, cfg.translate), rotate=(-cfg.rotate, cfg.rotate),
            interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
            border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=mask_fill, p=cfg.affine,
        ),
        A.ElasticTransform(alpha=cfg.elastic_alpha, sigma=cfg.elastic_sigma, interpolation=cv2.INTER_LINEAR,
                           mask_interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_CONSTANT, fill_mask=mask_fill,
                           p=cfg.elastic),
        A.RandomBrightnessContrast(brightness_limit=cfg.brightness, contrast_limit=cfg.contrast, p=cfg.intensity),
        A.Sequential([  # per channel: gain, then shift (TorchAugment's x_c * gain_c + shift_c)
            A.MultiplicativeNoise(multiplier=(1 - cfg.color_gain, 1 + cfg.color_gain), per_channel=True,
                                  elementwise=False, p=1.0),
            A.AdditiveNoise(noise_type="uniform", spatial_mode="constant",
                            noise_params={"ranges": [(-cfg.color_shift, cfg.color_shift)]}, p=1.0),
        ], p=cfg.color),
        A.RandomGamma(gamma_limit=(cfg.gamma_range[0] * 100, cfg.gamma_range[1] * 100), p=cfg.gamma),
        A.GaussNoise(std_range=(0.0, cfg.noise_std), p=cfg.noise),
    ]
    return A.Compose([x for x in t if x.p > 0], seed=seed)


def augment_batch_albumentations(pipeline, images: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply the per-sample pipeline to uint8 ``[B,H,W,C]`` images and ``[B,H,W]`` masks."""
    out_i = np.empty_like(images)
    out_m = np.empty_like(masks)
    for k in range(len(images)):
        r = pipeline(image=images[k], mask=masks[k])
        img = r["image"]
        out_i[k] = img.reshape(out_i[k].shape)
        out_m[k] = r["mask"]
    return out_i, out_m


# --------------------------------------------------------------------------------------- torch
def affine_matrix(angle_deg: float, scale: float, tx: float, ty: float, h: int, w: int) -> np.ndarray:
    """2x3 pixel-space matrix (cv2 convention, src -> dst): rotate ``angle_deg`` counter-clockwise and
    scale about the image centre, then shift by ``(tx, ty)`` pixels."""
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    m = cv2.getRotationMatrix2D((cx, cy), angle_deg, scale)
    m[0, 2] += tx
    m[1, 2] += ty
    return m


def _pixel_to_norm(h: int, w: int, device, dtype) -> torch.Tensor:
    """3x3 map from pixel coords (x, y, 1) to grid_sample's normalised coords (align_corners=False)."""
    return torch.tensor([[2.0 / w, 0, 1.0 / w - 1], [0, 2.0 / h, 1.0 / h - 1], [0, 0, 1]], device=device, dtype=dtype)


def invert_affine(m: torch.Tensor) -> torch.Tensor:
    """Closed-form inverse of ``[B,2,3]`` affine matrices (no cuSOLVER start-up on a GPU)."""
    a, b, c = m[:, 0, 0], m[:, 0, 1], m[:, 0, 2]
    d, e, f = m[:, 1, 0], m[:, 1, 1], m[:, 1, 2]
    det = a * e - b * d
    ia, ib, id_, ie = e / det, -b / det, -d / det, a / det
    return torch.stack([torch.stack([ia, ib, -(ia * c + ib * f)], -1),
                        torch.stack([id_, ie, -(id_ * c + ie * f)], -1)], 1)


def theta_from_pixel_matrices(m: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``[B,2,3]`` src->dst pixel matrices -> ``[B,2,3]`` thetas for ``F.affine_grid`` (dst -> src, normalised)."""
    inv = invert_affine(m)  # dst pixel -> src pixel
    b = m.shape[0]
    full = torch.zeros(b, 3, 3, device=m.device, dtype=m.dtype)
    full[:, :2] = inv
    full[:, 2, 2] = 1
    n = _pixel_to_norm(h, w, m.device, m.dtype)
    n_inv = torch.tensor([[w / 2.0, 0, (w - 1) / 2.0], [0, h / 2.0, (h - 1) / 2.0], [0, 0, 1]],
                         device=m.device, dtype=m.dtype)
    return (n @ full @ n_inv)[:, :2]


def warp(x: torch.Tensor, y: torch.Tensor | None, grid: torch.Tensor, mask_fill: int = 0):
    """Sample images bilinearly and masks by nearest neighbour; outside pixels become 0 (masks: ``mask_fill``)."""
    xo = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if y is None:
        return xo, None
    yo = F.grid_sample(y[:, None].float() - mask_fill, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return xo, (yo[:, 0] + mask_fill).round().to(y.dtype)


def _gaussian_kernel(sigma: float, device, dtype) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


class TorchAugment:
    """Batched augmentation on tensors: ``x`` float ``[B,C,H,W]`` in [0,1], ``y`` long ``[B,H,W]``."""

    def __init__(self, cfg: AugmentConfig, *, mask_fill: int = 0):
        self.cfg, self.mask_fill = cfg, mask_fill

    def _u(self, b: int, lo: float, hi: float, g: torch.Generator, device) -> torch.Tensor:
        return torch.rand(b, generator=g, device=device) * (hi - lo) + lo

    def _p(self, b: int, p: float, g: torch.Generator, device) -> torch.Tensor:
        return torch.rand(b, generator=g, device=device) < p

    def __call__(self, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        c, (b, _, h, w), dev = self.cfg, x.shape, x.device
        if c.hflip > 0:
            f = self._p(b, c.hflip, g, dev)
            x = torch.where(f[:, None, None, None], x.flip(-1), x)
            y = torch.where(f[:, None, None], y.flip(-1), y)
        if c.vflip > 0:
            f = self._p(b, c.vflip, g, dev)
            x = torch.where(f[:, None, None, None], x.flip(-2), x)
            y = torch.where(f[:, None, None], y.flip(-2), y)
        if c.rot90 > 0 and h == w:
            f = self._p(b, c.rot90, g, dev)
            k = torch.randint(0, 4, (b,), generator=g, device=dev)  # 0..3, as albumentations' RandomRotate90
            for r in (1, 2, 3):
                sel = f & (k == r)
                x = torch.where(sel[:, None, None, None], torch.rot90(x, r, (-2, -1)), x)
                y = torch.where(sel[:, None, None], torch.rot90(y, r, (-2, -1)), y)
        grid = None
        if c.affine > 0:
            on = self._p(b, c.affine, g, dev)
            ang = torch.where(on, self._u(b, -c.rotate, c.rotate, g, dev), torch.zeros(b, device=dev))
            sc = torch.where(on, self._u(b, c.scale[0], c.scale[1], g, dev), torch.ones(b, device=dev))
            tx = torch.where(on, self._u(b, -c.translate, c.translate, g, dev), torch.zeros(b, device=dev)) * w
            ty = torch.where(on, self._u(b, -c.translate, c.translate, g, dev), torch.zeros(b, device=dev)) * h
            m = batch_affine_matrices(ang, sc, tx, ty, h, w)
            grid = F.affine_grid(theta_from_pixel_matrices(m, h, w), (b, 1, h, w), align_corners=False)
        if c.elastic > 0:
            on = self._p(b, c.elastic, g, dev).float()[:, None, None, None]
            noise = torch.rand(b, 2, h, w, generator=g, device=dev) * 2 - 1
            k = _gaussian_kernel(c.elastic_sigma, dev, noise.dtype)
            pad = len(k) // 2
            noise = F.conv2d(F.pad(noise.reshape(-1, 1, h, w), (pad, pad, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
            noise = F.conv2d(F.pad(noise, (0, 0, pad, pad), mode="reflect"), k.view(1, 1, -1, 1)).reshape(b, 2, h, w)
            disp = noise * c.elastic_alpha * on  # pixels
            if grid is None:
                grid = F.affine_grid(torch.eye(2, 3, device=dev).expand(b, 2, 3), (b, 1, h, w), align_corners=False)
            grid = grid + torch.stack([disp[:, 0] * 2 / w, disp[:, 1] * 2 / h], dim=-1)
        if grid is not None:
            x, y = warp(x, y, grid, self.mask_fill)
        if c.intensity > 0:
            on = self._p(b, c.intensity, g, dev)
            alpha = torch.where(on, 1 + self._u(b, -c.contrast, c.contrast, g, dev), torch.ones(b, device=dev))
            beta = torch.where(on, self._u(b, -c.brightness, c.brightness, g, dev), torch.zeros(b, device=dev))
            x = (x * alpha[:, None, None, None] + beta[:, None, None, None]).clamp(0, 1)
        if c.color > 0:
            on = self._p(b, c.color, g, dev)[:, None, None, None]
            n_ch = x.shape[1]
            gain = 1 + (torch.rand(b, n_ch, 1, 1, generator=g, device=dev) * 2 - 1) * c.color_gain
            shift = (torch.rand(b, n_ch, 1, 1, generator=g, device=dev) * 2 - 1) * c.color_shift
            x = torch.where(on, ((x * gain).clamp(0, 1) + shift).clamp(0, 1), x)  # clipped twice, as uint8
        if c.gamma > 0:
            on = self._p(b, c.gamma, g, dev)
            gam = torch.where(on, self._u(b, *c.gamma_range, g, dev), torch.ones(b, device=dev))
            x = x.clamp_min(0) ** gam[:, None, None, None]
        if c.noise > 0:
            on = self._p(b, c.noise, g, dev).float()
            std = self._u(b, 0.0, c.noise_std, g, dev) * on
            x = (x + torch.randn(x.shape, generator=g, device=dev) * std[:, None, None, None]).clamp(0, 1)
        return x, y


def batch_affine_matrices(angle_deg: torch.Tensor, scale: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor,
                          h: int, w: int) -> torch.Tensor:
    """Batched :func:`affine_matrix` on tensors (same convention as ``cv2.getRotationMatrix2D``)."""
    a = torch.deg2rad(angle_deg)
    alpha, beta = scale * torch.cos(a), scale * torch.sin(a)
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    m = torch.stack([
        torch.stack([alpha, beta, (1 - alpha) * cx - beta * cy + tx], -1),
        torch.stack([-beta, alpha, beta * cx + (1 - alpha) * cy + ty], -1),
    ], 1)
    return m


def resolve_backend(cfg: AugmentConfig, device: torch.device) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "torch" if device.type == "cuda" else "albumentations"
