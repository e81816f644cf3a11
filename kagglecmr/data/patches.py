"""Patch training (``data.patch``): random crops of the training images instead of whole images, a share of
each batch (``data.fg_oversample``, nnU-Net's third) centred on a foreground pixel of a randomly chosen class
present in the image.

Foreground locations are computed once per training set (:func:`class_locations`: per image and class at
most :data:`MAX_LOCATIONS` pixel indices, a seeded subsample), so drawing a foreground-centred crop costs
nothing per step.  An image smaller than the patch along an axis is padded: images with 0, masks with
:data:`~kagglecmr.data.patches.IGNORE` (255, a pixel no loss looks at).  Pure numpy.
"""

from __future__ import annotations

import numpy as np

from kagglecmr.formats.competition_metric import VOID

IGNORE = VOID  # padded mask pixels are void: left out of every loss (kagglecmr.models.losses.IGNORE)
MAX_LOCATIONS = 4096  # foreground pixel indices kept per image and class


def class_locations(masks: np.ndarray, seed: int = 0) -> list[dict[int, np.ndarray]]:
    """Per image, ``{class: flat pixel indices}`` of every foreground class present (at most
    :data:`MAX_LOCATIONS` each, a seeded subsample)."""
    rng = np.random.default_rng(seed)
    out = []
    for m in masks:  # one mask at a time (the cache's lazy rows are read in blocks)
        flat = np.asarray(m).reshape(-1)
        found = {}
        present = np.flatnonzero(np.bincount(flat, minlength=1)) if flat.dtype == np.uint8 else np.unique(flat)
        for k in present:
            if k == 0 or k == IGNORE:
                continue
            where = np.flatnonzero(flat == k)
            if len(where) > MAX_LOCATIONS:
                where = np.sort(rng.choice(where, MAX_LOCATIONS, replace=False))
            found[int(k)] = where.astype(np.int32) if flat.size < 2**31 else where  # half the memory of int64
        out.append(found)
    return out


def crop_corners(idx: np.ndarray, shape: tuple[int, int], patch: tuple[int, int], locations: list[dict],
                 fg_share: float, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Top-left corners ``(y, x)`` of one batch's crops of images of ``shape`` (H, W): the last
    ``round(fg_share * len(idx))`` samples centred on a foreground pixel when their image has one, the others
    uniform.  A corner may be negative or reach past the image when the patch is larger (then padded)."""
    h, w = shape
    ph, pw = patch
    n_fg = int(round(fg_share * len(idx)))
    corners = []
    for j, i in enumerate(idx):
        loc = locations[int(i)]
        if j >= len(idx) - n_fg and loc:
            cls = sorted(loc)[int(rng.integers(len(loc)))]
            p = int(loc[cls][int(rng.integers(len(loc[cls])))])
            cy, cx = divmod(p, w)
            y, x = cy - ph // 2, cx - pw // 2
        else:
            y = int(rng.integers(0, h - ph + 1)) if h > ph else 0
            x = int(rng.integers(0, w - pw + 1)) if w > pw else 0
        # inside the image where it fits; a patch larger than the image is centred on it (padded both sides)
        y = min(max(y, 0), h - ph) if h >= ph else -((ph - h) // 2)
        x = min(max(x, 0), w - pw) if w >= pw else -((pw - w) // 2)
        corners.append((y, x))
    return corners


def crop(arr: np.ndarray, y: int, x: int, patch: tuple[int, int], fill: int) -> np.ndarray:
    """The ``patch`` of ``arr`` (``[H, W]`` or ``[H, W, C]``) at corner ``(y, x)``, padded with ``fill`` where it
    leaves the image."""
    ph, pw = patch
    h, w = arr.shape[:2]
    if y >= 0 and x >= 0 and y + ph <= h and x + pw <= w:
        return arr[y:y + ph, x:x + pw]
    out = np.full((ph, pw, *arr.shape[2:]), fill, arr.dtype)
    sy, sx = max(0, y), max(0, x)
    ey, ex = min(h, y + ph), min(w, x + pw)
    out[sy - y:ey - y, sx - x:ex - x] = arr[sy:ey, sx:ex]
    return out


def crop_batch(images: np.ndarray, masks: np.ndarray, corners: list[tuple[int, int]],
               patch: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``[B, ph, pw, C]`` crops of ``images`` and ``[B, ph, pw]`` of ``masks`` (one corner each)."""
    xs = np.stack([crop(im, y, x, patch, 0) for im, (y, x) in zip(images, corners)])
    ys = np.stack([crop(m, y, x, patch, IGNORE) for m, (y, x) in zip(masks, corners)])
    return xs, ys
