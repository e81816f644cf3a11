"""Training curves and image/mask contact sheets, drawn with OpenCV (no matplotlib).

Both functions write PNGs atomically (:mod:`kagglecmr.io`) and return the path.  Colours are
BGR tuples, as OpenCV uses them.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import cv2
import numpy as np

from .io import atomic_write_bytes

FONT = cv2.FONT_HERSHEY_SIMPLEX
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
GRID = (225, 225, 225)
AXIS = (90, 90, 90)
TEXT = (40, 40, 40)

CURVES_SIZE = (900, 380)  # width, height
SHEET_PAD = 2  # pixels between (and around) contact-sheet cells
OVERLAY_ALPHA = 0.45

# Label colours (BGR): 1 RV red, 2 myocardium green, 3 LV blue, then generic ones.
CLASS_COLOURS = {
    1: (0, 0, 255),
    2: (0, 200, 0),
    3: (255, 0, 0),
}
_GENERIC = [(0, 215, 255), (255, 0, 255), (255, 255, 0), (0, 128, 255), (128, 0, 128), (128, 128, 0),
            (0, 128, 128), (203, 192, 255)]
LOSS_COLOURS = {"train_loss": (200, 100, 0), "val_loss": (0, 140, 255)}
OVERALL_COLOUR = (30, 30, 30)


def class_colour(k: int) -> tuple[int, int, int]:
    """BGR colour of label ``k`` (>= 1): RV red, Myo green, LV blue, then a fixed cycle."""
    k = int(k)
    return CLASS_COLOURS.get(k, _GENERIC[(k - 4) % len(_GENERIC)])


def _write_png(img: np.ndarray, out_png: str | os.PathLike) -> Path:
    ok, buf = cv2.imencode(".png", img)
    if not ok:  # pragma: no cover - cv2 can always encode uint8 BGR
        raise RuntimeError(f"{out_png}: PNG encoding failed")
    return atomic_write_bytes(out_png, buf.tobytes())


# --------------------------------------------------------------------------------------------
# curves


def _nice_step(span: float, n: int = 5) -> float:
    raw = span / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag  # pragma: no cover


def _value_range(series: list[np.ndarray], clip: tuple[float, float] | None = None) -> tuple[float, float]:
    vals = np.concatenate([s[np.isfinite(s)] for s in series]) if series else np.zeros(0)
    if vals.size == 0:
        lo, hi = (clip if clip else (0.0, 1.0))
        return float(lo), float(hi)
    lo, hi = float(vals.min()), float(vals.max())
    if hi - lo < 1e-12:  # constant series: centre it
        pad = max(abs(lo) * 0.1, 0.05)
        lo, hi = lo - pad, hi + pad
    else:
        pad = (hi - lo) * 0.08
        lo, hi = lo - pad, hi + pad
    if clip:
        lo, hi = max(lo, clip[0]), min(hi, clip[1])
        if hi - lo < 1e-12:
            lo, hi = clip
    return lo, hi


def _fmt(v: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 0
    if step * 10 ** decimals % 1 > 1e-6:  # steps like 0.25
        decimals += 1
    return f"{v:.{min(decimals, 6)}f}"


def _text(img, s: str, org, scale=0.4, colour=TEXT, thickness=1) -> None:
    cv2.putText(img, s, (int(org[0]), int(org[1])), FONT, scale, colour, thickness, cv2.LINE_AA)


def _text_size(s: str, scale=0.4, thickness=1) -> tuple[int, int]:
    (w, h), _ = cv2.getTextSize(s, FONT, scale, thickness)
    return w, h


def _panel(img, box, x: np.ndarray, lines: list[tuple[str, np.ndarray, tuple, int]], *, title: str,
           clip=None) -> None:
    """Draw one line chart into ``box`` = (x0, y0, x1, y1) of ``img``."""
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 52, x1 - 12, y0 + 26, y1 - 34
    _text(img, title, (left, y0 + 17), 0.5, TEXT, 1)

    finite = [s for _, s, _, _ in lines if np.isfinite(s).any()]
    ylo, yhi = _value_range(finite, clip)
    ystep = _nice_step(yhi - ylo)
    xs_finite = x[np.isfinite(x)]
    xlo, xhi = (float(xs_finite.min()), float(xs_finite.max())) if xs_finite.size else (0.0, 1.0)
    if xhi - xlo < 1e-12:
        xlo, xhi = xlo - 1, xhi + 1

    def px(v):
        return left + (v - xlo) / (xhi - xlo) * (right - left)

    def py(v):
        return bottom - (v - ylo) / (yhi - ylo) * (bottom - top)

    # grid and y ticks
    t = math.ceil(ylo / ystep - 1e-9) * ystep
    while t <= yhi + 1e-9 * ystep:
        yy = round(py(t))
        cv2.line(img, (left, yy), (right, yy), GRID, 1)
        label = _fmt(t, ystep)
        w, h = _text_size(label, 0.35)
        _text(img, label, (left - 6 - w, yy + h // 2), 0.35, AXIS)
        t += ystep
    # x ticks: integers (epochs), at most ~8
    xstep = max(1.0, _nice_step(xhi - xlo, 6))
    xstep = float(math.ceil(xstep))
    t = math.ceil(xlo / xstep - 1e-9) * xstep
    while t <= xhi + 1e-9:
        xx = round(px(t))
        cv2.line(img, (xx, bottom), (xx, bottom + 4), AXIS, 1)
        label = f"{t:g}"
        w, h = _text_size(label, 0.35)
        _text(img, label, (xx - w // 2, bottom + 8 + h), 0.35, AXIS)
        t += xstep
    cv2.rectangle(img, (left, top), (right, bottom), AXIS, 1)
    w, _ = _text_size("epoch", 0.38)
    _text(img, "epoch", ((left + right - w) // 2, y1 - 4), 0.38, AXIS)

    if not finite:
        w, h = _text_size("no data", 0.5)
        _text(img, "no data", ((left + right - w) // 2, (top + bottom + h) // 2), 0.5, AXIS)
        return

    # lines: consecutive finite points joined; isolated points (or few epochs) get markers
    few = len(x) <= 25
    for _, s, colour, thick in lines:
        ok = np.isfinite(s) & np.isfinite(x)
        pts = np.rint(np.nan_to_num(np.stack([px(x), py(s)], axis=1), nan=0.0, posinf=0.0, neginf=0.0)).astype(np.int32)
        run: list[tuple[int, int]] = []
        for i in range(len(s) + 1):
            if i < len(s) and ok[i]:
                run.append((int(pts[i, 0]), int(pts[i, 1])))
                continue
            if len(run) >= 2:
                cv2.polylines(img, [np.array(run, np.int32)], False, colour, thick, cv2.LINE_AA)
            if len(run) == 1 or (few and run):
                for p in run:
                    cv2.circle(img, p, thick + 1, colour, -1, cv2.LINE_AA)
            run = []

    # legend: in whichever corner of the plot area covers the fewest data points
    entries = [(name, colour, thick) for name, s, colour, thick in lines if np.isfinite(s).any()]
    lw = max(_text_size(name, 0.35)[0] for name, _, _ in entries) + 30
    lh = 14 * len(entries) + 6
    allx = np.concatenate([px(x)] * len(lines))
    ally = np.concatenate([py(s) for _, s, _, _ in lines])
    best = None
    for lx, ly in ((right - lw - 6, top + 6), (right - lw - 6, bottom - lh - 6), (left + 6, top + 6),
                   (left + 6, bottom - lh - 6)):
        inside = int(np.sum((allx >= lx - 4) & (allx <= lx + lw + 4) & (ally >= ly - 4) & (ally <= ly + lh + 4)))
        if best is None or inside < best[0]:
            best = (inside, lx, ly)
    _, lx, ly = best
    cv2.rectangle(img, (lx, ly), (lx + lw, ly + lh), WHITE, -1)
    cv2.rectangle(img, (lx, ly), (lx + lw, ly + lh), GRID, 1)
    for j, (name, colour, thick) in enumerate(entries):
        yy = ly + 11 + 14 * j
        cv2.line(img, (lx + 5, yy - 4), (lx + 21, yy - 4), colour, thick, cv2.LINE_AA)
        _text(img, name, (lx + 26, yy), 0.35, TEXT)


def _column(df, name: str) -> np.ndarray:
    import pandas as pd

    if name not in df.columns:
        return np.full(len(df), np.nan)
    values = pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    return np.where(np.isfinite(values), values, np.nan)  # inf is as unplottable as NaN


def plot_curves(metrics, out_png: str | os.PathLike, *, title: str = "") -> Path:
    """Loss and Dice curves over epochs, two panels side by side (900x380 PNG, written atomically).

    ``metrics``: a list of per-epoch dicts or a DataFrame with ``epoch`` (else 1, 2, ...),
    ``train_loss``, ``val_loss``, ``val_dice`` and any ``dice_<k>`` columns; missing columns
    and NaNs are skipped (a single finite point is drawn as a dot).
    """
    import pandas as pd

    df = metrics.copy() if isinstance(metrics, pd.DataFrame) else pd.DataFrame(list(metrics))
    n = len(df)
    x = _column(df, "epoch") if "epoch" in df.columns else np.arange(1, n + 1, dtype=np.float64)
    if n and not np.isfinite(x).any():
        x = np.arange(1, n + 1, dtype=np.float64)

    width, height = CURVES_SIZE
    img = np.full((height, width, 3), 255, np.uint8)
    top = 0
    if title:
        top = 26
        w, _ = _text_size(title, 0.55)
        _text(img, title, ((width - w) // 2, 19), 0.55, TEXT, 1)

    loss_lines = [(name, _column(df, name), LOSS_COLOURS[name], 2) for name in ("train_loss", "val_loss")]
    dice_cols = sorted((c for c in df.columns if re.fullmatch(r"dice_\d+", str(c))), key=lambda c: int(c[5:]))
    dice_lines = [(f"class {c[5:]}", _column(df, c), class_colour(int(c[5:])), 1) for c in dice_cols]
    dice_lines.append(("val_dice", _column(df, "val_dice"), OVERALL_COLOUR, 3))

    half = width // 2
    _panel(img, (0, top, half, height), x, loss_lines, title="loss")
    _panel(img, (half, top, width, height), x, dice_lines, title="Dice", clip=(0.0, 1.0))
    return _write_png(img, out_png)


# --------------------------------------------------------------------------------------------
# contact sheet


def _to_bgr(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    c = img.shape[-1]
    if c == 1:
        return cv2.cvtColor(img[..., 0], cv2.COLOR_GRAY2BGR)
    if c == 3:
        return img.copy()
    if c == 4:
        return img[..., :3].copy()
    return cv2.cvtColor(np.ascontiguousarray(img[..., 0]), cv2.COLOR_GRAY2BGR)


def overlay(image: np.ndarray, label: np.ndarray | None, *, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """One image (``[H, W]`` or ``[H, W, C]`` uint8) as BGR with label colours blended over it."""
    bgr = _to_bgr(np.asarray(image, dtype=np.uint8))
    if label is None:
        return bgr
    label = np.asarray(label)
    out = bgr.astype(np.float32)
    for k in np.unique(label):
        if k <= 0:
            continue
        m = label == k
        out[m] = (1 - alpha) * out[m] + alpha * np.asarray(class_colour(int(k)), np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def contact_sheet(images: np.ndarray, labels: np.ndarray | None, ids, out_png: str | os.PathLike, *,
                  cols: int = 8, scale: int = 2) -> Path:
    """Grid of images with their label masks overlaid (RV red, Myo green, LV blue), id in the corner.

    ``images``: uint8 ``[N, H, W]`` or ``[N, H, W, C]`` (C = 1 gray, 3 BGR); ``labels``: ``[N, H, W]``
    or None (images only); ``ids``: N names (or None: 0..N-1).  Cells are ``H*scale x W*scale``
    (nearest neighbour) with ``SHEET_PAD`` pixels between and around them on a dark background;
    the sheet has ``min(cols, N)`` columns.  Written atomically as PNG.
    """
    images = np.asarray(images)
    if images.ndim not in (3, 4) or images.shape[0] == 0:
        raise ValueError(f"images must be [N, H, W] or [N, H, W, C] with N >= 1, got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    n, h, w = images.shape[:3]
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n, h, w):
            raise ValueError(f"labels shape {labels.shape} does not match images {(n, h, w)}")
    ids = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
    if len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} images")
    scale, cols = int(scale), int(cols)
    if scale < 1 or cols < 1:
        raise ValueError(f"cols and scale must be >= 1, got cols={cols}, scale={scale}")

    ncols = min(cols, n)
    nrows = -(-n // ncols)
    ch, cw = h * scale, w * scale
    sheet = np.full((nrows * ch + (nrows + 1) * SHEET_PAD, ncols * cw + (ncols + 1) * SHEET_PAD, 3), 32, np.uint8)
    font_scale = float(np.clip(cw / 550.0, 0.25, 0.6))
    for i in range(n):
        cell = overlay(images[i], None if labels is None else labels[i])
        if scale > 1:
            cell = cv2.resize(cell, (cw, ch), interpolation=cv2.INTER_NEAREST)
        r, c = divmod(i, ncols)
        y0, x0 = SHEET_PAD + r * (ch + SHEET_PAD), SHEET_PAD + c * (cw + SHEET_PAD)
        tw, th = _text_size(ids[i], font_scale)
        cv2.rectangle(cell, (0, 0), (min(tw + 5, cw - 1), th + 6), BLACK, -1)  # keeps the id legible
        cv2.putText(cell, ids[i], (2, th + 3), FONT, font_scale, WHITE, 1, cv2.LINE_AA)
        sheet[y0:y0 + ch, x0:x0 + cw] = cell
    return _write_png(sheet, out_png)
