"""``predict``'s files: image files (PNG, TIFF, JPEG; folders and globs) in, mask PNGs in the dataset's own values
out (one per image, or one per image and class with overlapping classes), optional contour overlays.  Files are
decoded and predicted a chunk at a time (:data:`~kagglecmr.engine.predictor.READ_PIXELS`), so a folder of large
images never sits in memory at once.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from kagglecmr.data.image_formats import to_uint8
from kagglecmr.data.loader import IMAGE_SUFFIXES, image_size, imread
from kagglecmr.engine.predictor import CHUNK, READ_PIXELS, Predictor
from kagglecmr.formats.multilabel import class_mask
from kagglecmr.utils.errors import DataError, KaggleCMRError
from kagglecmr.utils.io import atomic_path
from kagglecmr.utils.naming import natural_sorted


def image_files(inputs) -> list[Path]:
    """Image files (PNG, TIFF, JPEG) named directly or found (natural order) in folders; stems must be unique."""
    files: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            found = natural_sorted([q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES
                                    and not q.name.startswith(".")], key=lambda q: q.name)
            if not found:
                raise DataError(f"{p}: no PNG images in this folder (nor TIFF or JPEG)")
            files += found
        elif not p.is_file():
            raise DataError(f"{p}: file not found")
        elif p.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"{p}: not a PNG file (nor TIFF or JPEG)")
        else:
            files.append(p)
    if not files:
        raise DataError("predict: no images given")
    seen: dict[str, Path] = {}
    for f in files:
        if f.stem in seen:
            raise DataError(f"{f}: same name as {seen[f.stem]} (masks are written as <name>.png)")
        seen[f.stem] = f
    return files


def read_any_image(path: Path) -> np.ndarray:
    """A PNG, TIFF or JPEG as grey ``[H, W]`` or RGB ``[H, W, 3]`` (RGB order), pixel type as stored."""

    img = imread(Path(path), cv2.IMREAD_UNCHANGED)
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    if img.ndim == 3 and img.shape[2] == 3:
        img = np.ascontiguousarray(img[:, :, ::-1])
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    return img


PALETTE = [(0, 255, 255), (255, 0, 255), (255, 255, 0), (0, 128, 255), (0, 255, 0), (255, 64, 64), (128, 0, 255)]


def overlay_contours(image: np.ndarray, labels: np.ndarray, multilabel: int | None = None) -> np.ndarray:
    """BGR picture of ``image`` (grey or RGB, drawn in its true colours) with each class's outline in a
    bright colour from :data:`PALETTE` (BGR), on a dark edge so it reads on light and dark tissue
    (``multilabel``: the number of classes of a packed map, each class outlined on its own)."""
    img = to_uint8(np.asarray(image), "overlay")
    bgr = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if img.ndim == 2 else np.ascontiguousarray(img[:, :, ::-1])
    thick = max(1, round(min(labels.shape) / 256))
    present = range(1, multilabel + 1) if multilabel else [int(v) for v in np.unique(labels) if v > 0]
    for k in present:
        inside = class_mask(labels, k) if multilabel else labels == k
        contours, _ = cv2.findContours(inside.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(bgr, contours, -1, (0, 0, 0), thick + 2)
        cv2.drawContours(bgr, contours, -1, PALETTE[(k - 1) % len(PALETTE)], thick)
    return bgr


def _write_png(path: Path, arr: np.ndarray, force: bool) -> None:
    with atomic_path(path, overwrite=force) as tmp:
        if not cv2.imwrite(str(tmp), arr):
            raise KaggleCMRError(f"{path}: cannot write PNG")


def predict_files(predictor: Predictor, inputs, out: Path, *, overlay: bool = False,
                  force: bool = False) -> dict:
    """Masks ``out/<stem>.png`` (dataset mask values, each image's own size) and, with ``overlay``,
    ``out/<stem>_overlay.png``.  Existing files are refused before anything is predicted unless ``force``."""
    files = image_files(inputs)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KaggleCMRError(f"{out}: exists and is not a folder")
    targets = [out / name for f in files for name in predictor.mask_files(f.stem)]
    overlays = [out / f"{f.stem}_overlay.png" for f in files] if overlay else []
    if not force:
        clash = [t for t in targets + overlays if t.exists()]
        if clash:
            raise KaggleCMRError(f"{clash[0]}: already exists ({len(clash)} of the outputs do; use --force)")
    for f in files:  # a damaged or oversized file fails here, before any mask is written
        image_size(f)
    out.mkdir(parents=True, exist_ok=True)
    labels: list[np.ndarray] = []
    pending: list[np.ndarray] = []  # decoded, not yet predicted: at most CHUNK images or READ_PIXELS pixels
    per = len(predictor.mask_files("x"))  # one file per image, or one per class (task multilabel)

    def flush() -> None:
        for img, lab in zip(pending, predictor.predict(pending)):
            k = len(labels)
            raw = predictor.to_raw(lab)
            for j, target in enumerate(targets[k * per:(k + 1) * per]):
                _write_png(target, raw[j] if predictor.multilabel else raw, force=True)
            if overlay:
                _write_png(overlays[k], overlay_contours(img, lab, predictor.num_classes if predictor.multilabel
                                                         else None), force=True)
            labels.append(lab)
        pending.clear()

    for f in files:
        pending.append(read_any_image(f))
        if len(pending) >= CHUNK or sum(im.shape[0] * im.shape[1] for im in pending) >= READ_PIXELS:
            flush()
    flush()
    sizes = sorted({f"{m.shape[1]}x{m.shape[0]}" for m in labels})
    print(f"predict: {len(files)} images ({', '.join(sizes[:4])}{', ...' if len(sizes) > 4 else ''}) | "
          f"{predictor.n_models} models | TTA {'+'.join(predictor.passes)} -> {len(targets)} masks"
          f"{' + overlays' if overlay else ''} in {out}", flush=True)
    return {"masks": targets, "overlays": overlays, "labels": labels, "files": files}
