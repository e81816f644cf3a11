"""Tiled (sliding-window) inference: an image larger than the model's tile is predicted by overlapping
windows whose probabilities are weighted and normalised by the summed weights (MONAI's
``sliding_window_inference``, nnU-Net's gaussian-weighted sliding window).

* Windows of ``tile = (th, tw)`` start every ``step = tile * (1 - overlap)`` pixels along each axis; the
  last window of an axis is moved back to end exactly at the border, so every pixel is covered and no
  window reaches past the image.  An image smaller than the tile along an axis is padded (zeros) up to the
  tile there and the padding is cropped from the result.
* ``weight="gaussian"``: each window's probabilities are weighted by a gaussian of sigma ``tile / 8``
  centred on the window (clamped away from zero, as nnU-Net), so pixels near a window's border, where the
  model sees less context, count less; ``"constant"``: a plain average of the overlapping windows.
* The stitched result is one image's ``[K, H, W]`` float32 accumulator and one ``[H, W]`` weight sum:
  memory grows with one image, never with the number of windows; :func:`predict_tiled_images` stitches each
  image of a batch straight into its slot of the result.

``predict_window`` is any function ``uint8 [n, th, tw, C] -> float32 [n, K, th, tw]`` (e.g. the ensemble's
softmax over folds and TTA passes, :func:`kagglecmr.engine.infer.predict_proba`); windows are passed to it
``batch`` at a time.  Pure numpy: the model lives behind ``predict_window``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np

from kagglecmr.cfg.config import hw_of
from kagglecmr.utils.errors import ConfigError

WEIGHTS = ("gaussian", "constant")
SIGMA_SCALE = 1 / 8  # gaussian sigma as a fraction of the tile side (nnU-Net)
MIN_WEIGHT = 1e-3  # the gaussian's floor relative to its peak (no pixel of a window is ignored outright)


def as_hw(size) -> tuple[int, int]:
    """``256`` or ``[H, W]`` -> ``(H, W)``, positive."""
    h, w = hw_of(int(size) if isinstance(size, np.integer) else size)
    if h < 1 or w < 1:
        raise ConfigError(f"tile size {size}: expected positive integers")
    return h, w


def window_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of the windows covering ``[0, length)``: every ``tile * (1 - overlap)`` pixels (at least 1),
    the last one moved back to end at ``length``; one window at 0 when ``length <= tile``."""
    if not 0 <= overlap < 1:
        raise ConfigError(f"tile overlap {overlap}: expected 0 <= overlap < 1")
    if length <= tile:
        return [0]
    step = max(1, int(round(tile * (1 - overlap))))
    starts = list(range(0, length - tile + 1, step))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


@lru_cache(maxsize=8)
def window_weight(tile: tuple[int, int], kind: str = "gaussian") -> np.ndarray:
    """float32 ``[th, tw]`` weight of one window's pixels (read-only, cached)."""
    if kind not in WEIGHTS:
        raise ConfigError(f"tile weight {kind!r}: expected one of {', '.join(WEIGHTS)}")
    th, tw = tile
    if kind == "constant":
        w = np.ones(tile, np.float32)
    else:
        axes = [np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2) / max(n * SIGMA_SCALE, 1e-6)) ** 2) for n in (th, tw)]
        w = np.outer(axes[0], axes[1])
        w = np.maximum(w / w.max(), MIN_WEIGHT).astype(np.float32)
    w.setflags(write=False)
    return w


def predict_tiled(predict_window: Callable[[np.ndarray], np.ndarray], image: np.ndarray, tile, *,
                  overlap: float = 0.5, weight: str = "gaussian", batch: int = 8,
                  out: np.ndarray | None = None) -> np.ndarray:
    """float32 ``[K, H, W]`` probabilities of one uint8 ``[H, W, C]`` image, predicted by overlapping windows
    of ``tile`` (see the module docstring); accumulated in ``out`` (float32 ``[K, H, W]``) when given."""
    th, tw = as_hw(tile)
    if image.ndim != 3:
        raise ValueError(f"expected one image [H, W, C], got shape {image.shape}")
    if batch < 1:
        raise ConfigError(f"tile batch {batch}: expected at least 1")
    h, w = image.shape[:2]
    ph, pw = max(h, th), max(w, tw)
    if (ph, pw) != (h, w):  # smaller than the tile along an axis: pad with zeros, crop afterwards
        padded = np.zeros((ph, pw, image.shape[2]), image.dtype)
        padded[:h, :w] = image
        image = padded
    wt = window_weight((th, tw), weight)
    corners = [(y, x) for y in window_starts(ph, th, overlap) for x in window_starts(pw, tw, overlap)]
    acc: np.ndarray | None = None
    norm = np.zeros((ph, pw), np.float32)
    for i in range(0, len(corners), batch):
        chunk = corners[i:i + batch]
        windows = np.stack([image[y:y + th, x:x + tw] for y, x in chunk])
        probs = np.asarray(predict_window(windows), dtype=np.float32)
        if probs.ndim != 4 or probs.shape[0] != len(chunk) or probs.shape[2:] != (th, tw):
            raise ValueError(f"predict_window returned shape {probs.shape}, expected [{len(chunk)}, K, {th}, {tw}]")
        if acc is None:
            direct = out is not None and (ph, pw) == (h, w) and out.shape == (probs.shape[1], h, w)
            acc = out if direct else np.empty((probs.shape[1], ph, pw), np.float32)
            acc[...] = 0
        for (y, x), p in zip(chunk, probs):
            acc[:, y:y + th, x:x + tw] += p * wt
            norm[y:y + th, x:x + tw] += wt
    acc /= norm
    if out is not None and acc is not out:
        out[...] = acc[:, :h, :w]
        return out
    return acc[:, :h, :w]


def predict_tiled_images(predict_window: Callable[[np.ndarray], np.ndarray], images: np.ndarray, tile) -> np.ndarray:
    """float32 ``[N, K, H, W]`` of uint8 ``[N, H, W, C]`` images, each stitched by :func:`predict_tiled` with the
    settings of ``tile`` (a :class:`~kagglecmr.cfg.config.TileConfig`: ``size, overlap, weight, batch``), straight
    into the result: one image's weight sum besides it, never a second copy of the probabilities."""
    kw = {"overlap": tile.overlap, "weight": tile.weight, "batch": tile.batch}
    first = predict_tiled(predict_window, images[0], tile.size, **kw)
    if len(images) == 1:
        return first[None]
    out = np.empty((len(images), *first.shape), np.float32)
    out[0] = first
    del first
    for n in range(1, len(images)):
        predict_tiled(predict_window, images[n], tile.size, out=out[n], **kw)
    return out


def needs_tiles(hw: tuple[int, int], tile) -> bool:
    """Whether an image of size ``hw`` is larger than ``tile`` along an axis (so one window is not enough)."""
    th, tw = as_hw(tile)
    return hw[0] > th or hw[1] > tw
