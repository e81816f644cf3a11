"""Image channels as a user means them: which channels a dataset keeps, and one rule from any decoded image to them.

Images are decoded in RGB(A) order (:func:`kagglecmr.data.loader.decode_image`).  A dataset's channel space,
``source_channels``, is grey (1), grey + alpha (2), RGB (3) or RGBA (4); its ``channels`` are the kept indices
of that space (``0`` = red, or grey).  :func:`to_channels` brings any image into the space:

- grey in a colour space is repeated (grey among colour images);
- colour in a grey space becomes its luminance (exact for grey stored as RGB);
- an alpha channel the space lacks is dropped; one the space has but the image lacks is 255 (opaque).

So an RGBA image with alpha 255, an RGB image and (in a grey space) a grey image of the same picture give
the same array.  Training, ensembling and prediction on arbitrary images all go through it.

:func:`resolve_channels` picks the space and the kept channels from the training images.  ``channels: auto``:
a constant alpha (255 everywhere) counts as none, images whose colour channels are equal count as grey, and
images are compared after that: grey ones among colour ones are expanded; alpha is kept when every image has
a varying one, and a varying alpha in some images but not in others is the one error left (naming both files
and the ``channels:`` that works).  Then a colour channel constant in every training image (an empty stain) is
dropped, with a note line.  An explicit list picks those channels (RGB(A) numbering) from every image; alpha
only when listed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from kagglecmr.utils.errors import DataError

NAMES = {1: "grey", 2: "grey+alpha", 3: "RGB", 4: "RGBA"}


def _parts(n: int) -> tuple[int, bool]:
    """Channel count -> (colour channels 1 or 3, has alpha)."""
    return (n - 1, True) if n in (2, 4) else (n, False)


def to_channels(img: np.ndarray, channels: list[int], source: int, where: str = "image") -> np.ndarray:
    """One decoded image (``[H, W]`` or ``[H, W, C]``, C in 1..4, RGB(A) order) -> ``[H, W, len(channels)]``:
    the image brought into the ``source`` space (grey 1, grey+alpha 2, RGB 3, RGBA 4; see the module doc),
    then ``channels`` of it in that order."""
    img = np.asarray(img)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or not 1 <= img.shape[2] <= 4 or min(img.shape[:2]) < 1:
        raise DataError(f"{where}: shape {img.shape}, expected [H, W] or [H, W, C] with C in 1..4")
    if source not in NAMES or not channels or min(channels) < 0 or max(channels) >= source:
        raise DataError(f"{where}: channels {list(channels)} of a {source}-channel space")
    c = img.shape[2]
    if c != source:
        (colour, alpha), (want, want_alpha) = _parts(c), _parts(source)
        col = img[:, :, :colour]
        if colour == 3 and want == 1:
            col = cv2.cvtColor(np.ascontiguousarray(col), cv2.COLOR_RGB2GRAY)[:, :, None]
        elif colour == 1 and want == 3:
            col = np.repeat(col, 3, axis=2)
        if want_alpha:
            opaque = np.iinfo(img.dtype).max if img.dtype.kind in "ui" else 1
            a = img[:, :, -1:] if alpha else np.full((*img.shape[:2], 1), opaque, img.dtype)
            col = np.concatenate([col, a], axis=2)
        img = col
    return np.ascontiguousarray(img[:, :, list(channels)])


def channel_rule(info: dict) -> tuple[list[int], int]:
    """``(channels, source_channels)`` of a trained run from its ``dataset.json`` (or an export's input
    description): ``channels`` and ``source_channels`` as saved; older files without ``source_channels``
    (or a config's ``in_channels`` alone) get the space their kept channels imply."""
    n = int(info["in_channels"])
    keep = info.get("channels")
    if not (isinstance(keep, list) and keep and all(isinstance(k, int) for k in keep)):
        keep = list(range(n))
    source = info.get("source_channels")
    if not isinstance(source, int) or source not in NAMES or max(keep) >= source:
        source = 4 if max(keep) == 3 else 3 if (max(keep) >= 1 or n > 1) else 1
    return [int(k) for k in keep], int(source)


# ----------------------------------------------------------------------- the dataset's channels
@dataclass
class _Seen:
    """What one training image holds, after the per-image rule."""

    path: Path
    stored: int  # channels on disk (after decoding)
    grey: bool  # one colour channel, or R = G = B everywhere
    alpha: str  # none | constant | varying
    lo: np.ndarray  # per colour channel min (3 values; a grey image's repeated)
    hi: np.ndarray

    @classmethod
    def of(cls, path: Path, img: np.ndarray) -> _Seen:
        colour, has_alpha = _parts(img.shape[2])
        col = img[:, :, :colour]
        flat = col.reshape(-1, colour)
        lo, hi = flat.min(0), flat.max(0)
        grey = colour == 1 or bool((col == col[:, :, :1]).all())
        alpha = "none"
        if has_alpha:
            a = img[:, :, -1]
            alpha = "constant" if a.min() == a.max() else "varying"
        return cls(path, img.shape[2], grey, alpha, np.resize(lo, 3), np.resize(hi, 3))


def resolve_channels(path: Path, train_images: list[tuple[Path, np.ndarray]], setting) -> tuple[int, list[int], list[str]]:
    """``(source_channels, kept channels, note lines)`` of a dataset from its decoded training images
    (``setting``: ``auto`` or the dataset file's list)."""
    seen = [_Seen.of(p, img) for p, img in train_images]
    if setting != "auto":
        return _explicit(path, seen, list(setting))
    colour = 1 if all(s.grey for s in seen) else 3
    varying = [s for s in seen if s.alpha == "varying"]
    plain = [s for s in seen if s.alpha != "varying"]
    if varying and plain:
        a, b = varying[0], plain[0]
        what = "a constant alpha channel" if b.alpha == "constant" else f"no alpha channel ({NAMES[b.stored]})"
        keep = "[0, 1, 2]" if colour == 3 else "[0]"
        both = "[0, 1, 2, 3]" if colour == 3 else "[0, 3]" if any(s.stored >= 3 for s in seen) else "[0, 1]"
        raise DataError(f"{b.path}: has {what}, {a.path} has a varying alpha; training images must agree: set "
                        f"channels: {keep} in the dataset file to leave alpha out (or channels: {both} to keep it, "
                        f"255 where an image has none)")
    alpha = bool(varying)
    notes = []
    if colour == 1:
        if any(s.stored >= 3 for s in seen):
            notes.append(f"note: {path}: the colour channels are equal in every training image; using one (grey)")
        return 1 + alpha, [0, 1] if alpha else [0], notes
    const = [all(s.lo[k] == s.hi[k] for s in seen) for k in range(3)]
    keep = [k for k in range(3) if not const[k]] or [0, 1, 2]
    dropped = ["RGB"[k] for k in range(3) if k not in keep] + (["A"] if not alpha and any(s.alpha != "none" for s in seen)
                                                                else [])
    if dropped:
        notes.append(f"note: {path}: dropping channel(s) {', '.join(dropped)}: constant in every training image "
                     f"(set channels: to keep them)")
    return 3 + alpha, keep + ([3] if alpha else []), notes


def _explicit(path: Path, seen: list[_Seen], keep: list[int]) -> tuple[int, list[int], list[str]]:
    """An explicit ``channels:`` list: indices of the stored layout (RGB(A), or grey(+alpha) when no image
    has colour); alpha only when listed, 255 in images without one."""
    colour = 3 if any(s.stored >= 3 for s in seen) else 1
    has_alpha = any(s.alpha != "none" for s in seen)
    space = colour + has_alpha
    if max(keep) >= space:
        raise DataError(f"{path}: channels: index {max(keep)} but the images have {space} channel(s) "
                        f"({NAMES[space]})")
    if not (has_alpha and colour in keep):
        return colour, keep, []
    missing = [s for s in seen if s.alpha == "none"]
    notes = [f"note: {path}: {len(missing)} of {len(seen)} training images (e.g. {missing[0].path.name}) have no "
             f"alpha channel; their channel {colour} is 255 (opaque)"] if missing else []
    return space, keep, notes
