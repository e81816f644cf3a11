"""A folder of PNG label masks (``cmrN_mask.png`` or ``cmrN.png``) as submission rows: what ``score --truth
DIR`` and ``encode DIR`` read."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kagglecmr.cfg.config import DataSpec
from kagglecmr.data.loader import mask_id, png_size, read_mask
from kagglecmr.formats.rle import check_image_id
from kagglecmr.formats.submission import CMR
from kagglecmr.utils.errors import DataError, SubmissionError
from kagglecmr.utils.naming import natural_key


def mask_folder_paths(folder: str | Path) -> dict[str, Path]:
    """``{image id: png}`` of a mask folder (``cmrN_mask.png`` or ``cmrN.png``), in natural order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: mask folder not found")
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not (p.is_file() and p.suffix.lower() == ".png" and not p.name.startswith(".")):
            continue
        i = mask_id(p)
        try:
            check_image_id(i)
        except SubmissionError as exc:
            raise DataError(f"{p}: {exc}") from None
        if i in found:
            raise DataError(f"{p}: same image id '{i}' as {found[i].name}")
        found[i] = p
    if not found:
        raise DataError(f"{folder}: no PNG masks in folder")
    return dict(sorted(found.items(), key=lambda kv: natural_key(kv[0])))


def read_label_mask(path: str | Path, num_classes: int = 4) -> np.ndarray:
    """``data.read_mask`` at the mask's own size (any square size; labels ``< num_classes``)."""
    path = Path(path)
    h, w = png_size(path)
    if h != w:
        raise DataError(f"{path}: mask is {w}x{h}; only square masks are supported")
    return read_mask(path, DataSpec(size=h, num_classes=num_classes))


def masks_to_rows(paths: dict[str, Path], num_classes: int = 4, fmt=None):
    """Submission rows of label masks ``{image id: png}`` in format ``fmt`` (default CMR), and their size.

    The size is ``(H, W)`` when every mask has the same, else ``{image id: (H, W)}``; both are
    what :func:`kagglecmr.formats.metric.write_submission` and ``read_submission`` take as ``shape``.
    """
    fmt = CMR if fmt is None else fmt
    rows: list[tuple[str, str]] = []
    shapes: dict[str, tuple[int, int]] = {}
    for i, p in paths.items():
        m = read_label_mask(p, num_classes)
        shapes[i] = m.shape
        rows.extend(fmt.rows(i, m, num_classes))
    if not shapes:
        raise DataError("no masks given")
    sizes = set(shapes.values())
    return rows, (sizes.pop() if len(sizes) == 1 else shapes)
