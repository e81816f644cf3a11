"""What a prediction pass writes: label maps at each image's own size, the split's score line (the dataset's
metric, Dice, IoU, pixel accuracy per class), PNG masks in the dataset's mask values and their overlay contact sheet."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kagglecmr.formats.metric import score_label_maps
from kagglecmr.utils.errors import KaggleCMRError
from kagglecmr.utils.io import atomic_path
from kagglecmr.utils.plots import contact_sheet


def probs_at_size(probs: np.ndarray, hw) -> np.ndarray:
    """``[K, h, w]`` probabilities resized (bilinear, channel by channel) to ``hw`` = ``(H, W)``."""
    import cv2

    if tuple(probs.shape[1:]) == tuple(hw):
        return probs
    return np.stack([cv2.resize(np.ascontiguousarray(c, dtype=np.float32), (hw[1], hw[0]),
                                interpolation=cv2.INTER_LINEAR) for c in probs])


def label_at_size(probs: np.ndarray, hw) -> np.ndarray:
    """Argmax of ``[K, h, w]`` probabilities after resizing them (bilinear) to ``hw`` = ``(H, W)``."""
    return probs_at_size(probs, hw).argmax(0).astype(np.uint8)


def score_report(split: str, pred: dict, truth: dict, ds) -> str:
    """``<split> Dice ... IoU ... pixel accuracy ...`` of label maps at their own sizes (per class)."""

    r = score_label_maps(pred, truth, ds.num_classes, fmt=ds.submission, metric=ds.metric)
    names = ds.classes

    def per(d):
        return " ".join(f"{names[int(c)] if str(c).isdigit() and int(c) < len(names) else c}:{v:.4f}"
                        for c, v in d.items())

    dice = "" if r.metric.title == "Dice" else f"Dice {r.dice:.4f} [{per(r.per_class_dice)}] | "
    return (f"{split} {r.metric.title}: {r.score:.4f} [{per(r.per_class)}] | {dice}IoU {r.iou:.4f} "
            f"[{per(r.per_class_iou)}] | pixel accuracy {r.pixel_accuracy:.4f} [{per(r.per_class_pixel_accuracy)}] "
            f"({len(truth)} images)")


def write_masks(folder: Path, ids: list[str], pred, images: np.ndarray, *, ds=None, preview=None) -> None:
    """PNG masks named ``<id>_mask.png`` (in the dataset's own mask values, e.g. 0/255, at each image's own
    size; 0..K-1 without a dataset), plus an overlay contact sheet beside the folder
    (``<folder>_contact_sheet.png``, at the model size), so the folder holds masks only."""
    import cv2

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, m in zip(ids, pred):
        with atomic_path(folder / f"{i}_mask.png") as tmp:  # the temp name ends in .png too
            if not cv2.imwrite(str(tmp), ds.to_raw(m) if ds is not None else m):
                raise KaggleCMRError(f"{folder}: cannot write PNG masks")
    sheet = contact_sheet_path(folder)
    contact_sheet(_bgr(images), np.stack(preview if preview is not None else pred), ids, sheet)
    print(f"wrote {len(ids)} masks to {folder} and the contact sheet {sheet}", flush=True)


def _bgr(images: np.ndarray) -> np.ndarray:
    """RGB(A) images with 1..4 kept channels -> grey or BGR for OpenCV drawing."""
    c = images.shape[-1]
    if c == 1:
        return images
    if c == 2:
        images = np.concatenate([images, np.zeros_like(images[..., :1])], -1)
    return np.ascontiguousarray(images[..., 2::-1])


def contact_sheet_path(mask_folder: Path) -> Path:
    folder = Path(mask_folder).resolve()
    return folder.with_name(f"{folder.name}_contact_sheet.png")
