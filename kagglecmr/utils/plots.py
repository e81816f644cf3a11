"""Plots: learning curves and per-class Dice bars (matplotlib, Agg canvas, no display needed) and
contact sheets of images with their masks (numpy + OpenCV: pixel-exact cells).

Every function writes one PNG atomically (:mod:`kagglecmr.utils.io`) and returns its path.  Colours are
RGB: images are drawn in their true colours (arrays are ``[..., R, G, B]``; a 2-channel image is
shown as R, G with B = 0; one channel is grey) and masks as class-coloured contours, the colour
swapped for a contrasting one where it would vanish into the image (red glands on red tissue).

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas, never ``pyplot``, so
importing this module does not change the backend of a notebook or a GUI session.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np

from kagglecmr.utils.io import atomic_path, atomic_write_bytes

DPI = 100
CURVES_SIZE = (1100, 400)  # width, height in pixels of plot_curves
RUN_CURVES_SIZE = (1500, 420)  # plot_run_curves
SHEET_PAD = 2  # pixels between (and around) contact-sheet cells
OVERLAY_ALPHA = 0.45
SHEET_BACKGROUND = 32

# Label colours (RGB): 1 RV red, 2 myocardium green, 3 LV blue, then generic ones.
CLASS_COLOURS = {1: (255, 0, 0), 2: (0, 200, 0), 3: (0, 0, 255)}
_GENERIC = [(255, 215, 0), (255, 0, 255), (0, 255, 255), (255, 128, 0), (128, 0, 128), (0, 128, 128),
            (128, 128, 0), (255, 192, 203)]
# Candidates when a class colour is too close to the image under it: far from most tissue colours.
_CONTRAST = [(255, 255, 0), (0, 255, 255), (0, 255, 0), (255, 255, 255), (0, 0, 0), (255, 0, 255)]
MIN_CONTRAST = 160.0  # RGB distance (10th percentile along the contour) below which a mask colour is replaced
LOSS_COLOURS = {"train_loss": "#0064c8", "val_loss": "#ff8c00"}


def class_colour(k: int) -> tuple[int, int, int]:
    """RGB colour of label ``k`` (>= 1): RV red, Myo green, LV blue, then a fixed cycle."""
    k = int(k)
    return CLASS_COLOURS.get(k, _GENERIC[(k - 4) % len(_GENERIC)])


def _rgb01(colour) -> tuple[float, float, float]:
    return tuple(c / 255.0 for c in colour)


# --------------------------------------------------------------------------------------- figures
def _figure(size: tuple[int, int]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out_png: str | os.PathLike) -> Path:
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return Path(out_png)


def _frame(metrics):
    import pandas as pd

    return metrics.copy() if isinstance(metrics, pd.DataFrame) else pd.DataFrame(list(metrics))


def _column(df, name: str) -> np.ndarray:
    import pandas as pd

    if name not in df.columns:
        return np.full(len(df), np.nan)
    values = pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    return np.where(np.isfinite(values), values, np.nan)  # inf is as unplottable as NaN


def _epochs(df) -> np.ndarray:
    n = len(df)
    x = _column(df, "epoch") if "epoch" in df.columns else np.arange(1, n + 1, dtype=np.float64)
    return x if (not n or np.isfinite(x).any()) else np.arange(1, n + 1, dtype=np.float64)


def _dice_columns(df) -> list[str]:
    return sorted((c for c in df.columns if re.fullmatch(r"dice_\d+", str(c))), key=lambda c: int(c[5:]))


def best_epoch(metrics) -> tuple[float, float] | None:
    """``(epoch, val_dice)`` of the kept checkpoint: the last row flagged ``best`` with a finite Dice,
    else the highest ``val_dice``; None without a finite Dice."""
    df = _frame(metrics)
    x, dice = _epochs(df), _column(df, "val_dice")
    ok = np.isfinite(dice) & np.isfinite(x)
    if not ok.any():
        return None
    if "best" in df.columns:
        flags = df["best"].astype(str).str.lower().isin(("true", "1")).to_numpy() & ok
        if flags.any():
            i = int(np.flatnonzero(flags)[-1])
            return float(x[i]), float(dice[i])
    i = int(np.nanargmax(np.where(ok, dice, np.nan)))
    return float(x[i]), float(dice[i])


def _line(ax, x, y, few: bool, **kw) -> bool:
    if not np.isfinite(y).any():
        return False
    ax.plot(x, y, marker="o" if few else None, markersize=3, **kw)
    return True


def _loss_axis(ax, drawn: list[np.ndarray]) -> None:
    vals = np.concatenate([v[np.isfinite(v)] for v in drawn]) if drawn else np.zeros(0)
    if vals.size and (vals > 0).all():
        ax.set_yscale("log")
    ax.set_ylabel("loss" + (" (log)" if vals.size and (vals > 0).all() else ""))


def _finish(ax, title: str, any_data: bool) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=10)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3, which="both")
    if not any_data:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    elif ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")


def plot_curves(metrics, out_png: str | os.PathLike, *, title: str = "", size: tuple[int, int] = CURVES_SIZE) -> Path:
    """Learning curves of one fold: train/val loss on a log axis (left) and val Dice overall and per
    class (right), the best epoch marked (a dotted line and a star).  ``size`` pixels, written atomically.

    ``metrics``: a list of per-epoch dicts or a DataFrame with ``epoch`` (else 1, 2, ...),
    ``train_loss``, ``val_loss``, ``val_dice``, ``dice_<k>`` and ``best`` columns; missing columns
    and NaNs are skipped.
    """
    df = _frame(metrics)
    x = _epochs(df)
    few = len(df) <= 25
    fig = _figure(size)
    ax_loss, ax_dice = fig.subplots(1, 2)
    drawn = []
    for name in ("train_loss", "val_loss"):
        y = _column(df, name)
        if _line(ax_loss, x, y, few, label=name.replace("_", " "), color=LOSS_COLOURS[name], lw=1.8):
            drawn.append(y)
    _loss_axis(ax_loss, drawn)
    any_dice = False
    for c in _dice_columns(df):
        any_dice |= _line(ax_dice, x, _column(df, c), few, label=f"class {c[5:]}",
                          color=_rgb01(class_colour(int(c[5:]))), lw=1.0, alpha=0.85)
    any_dice |= _line(ax_dice, x, _column(df, "val_dice"), few, label="val Dice", color="black", lw=2.2)
    best = best_epoch(df)
    if best is not None:
        for ax in (ax_loss, ax_dice):
            ax.axvline(best[0], color="grey", ls=":", lw=1.2)
        ax_dice.plot([best[0]], [best[1]], marker="*", markersize=13, color="gold", markeredgecolor="black",
                     ls="none", label=f"best {best[1]:.4f} @ {best[0]:g}")
    ax_dice.set_ylim(0, 1.0)
    ax_dice.set_ylabel("Dice")
    _finish(ax_loss, "loss", bool(drawn))
    _finish(ax_dice, "validation Dice", any_dice)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, out_png)


def plot_run_curves(histories: Mapping[str, object], out_png: str | os.PathLike, *, title: str = "",
                    size: tuple[int, int] = RUN_CURVES_SIZE) -> Path:
    """Curves of every fold of a run in one figure: train loss, val loss (log axes) and val Dice, one
    colour per fold, each fold's best epoch starred.  ``histories``: ``{fold name: metrics}``."""
    from matplotlib import colormaps

    fig = _figure(size)
    axes = fig.subplots(1, 3)
    cmap = colormaps["tab10"]
    drawn: dict[str, list] = {"train_loss": [], "val_loss": []}
    any_dice = False
    for j, (name, metrics) in enumerate(histories.items()):
        df = _frame(metrics)
        x, few, colour = _epochs(df), len(df) <= 25, cmap(j % 10)
        for ax, col in zip(axes[:2], ("train_loss", "val_loss")):
            y = _column(df, col)
            if _line(ax, x, y, few, label=str(name), color=colour, lw=1.4):
                drawn[col].append(y)
        any_dice |= _line(axes[2], x, _column(df, "val_dice"), few, label=str(name), color=colour, lw=1.6)
        best = best_epoch(df)
        if best is not None:
            axes[2].plot([best[0]], [best[1]], marker="*", markersize=11, color=colour, markeredgecolor="black")
    for ax, col in zip(axes[:2], ("train_loss", "val_loss")):
        _loss_axis(ax, drawn[col])
        _finish(ax, col.replace("_", " "), bool(drawn[col]))
    axes[2].set_ylim(0, 1.0)
    axes[2].set_ylabel("Dice")
    _finish(axes[2], "validation Dice (star: best epoch)", any_dice)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, out_png)


def plot_class_dice(scores: Mapping[str, Mapping], out_png: str | os.PathLike, *, title: str = "",
                    class_names: Mapping | None = None, size: tuple[int, int] = (900, 380)) -> Path:
    """Grouped bars of Dice per class: ``scores`` = ``{series (fold0, OOF...): {class: Dice}}``; the
    classes are the union of the series' keys (numeric order), ``class_names`` labels them."""
    series = {str(s): {str(k): v for k, v in d.items()} for s, d in scores.items()}
    classes = sorted({k for d in series.values() for k in d}, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
    names = {str(k): str(v) for k, v in (class_names or {}).items()}
    fig = _figure(size)
    ax = fig.subplots()
    n = max(len(series), 1)
    width = 0.8 / n
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    for j, (s, d) in enumerate(series.items()):
        vals = [float(d[k]) if d.get(k) is not None else np.nan for k in classes]
        pos = np.arange(len(classes)) - 0.4 + width * (j + 0.5)
        colour = "black" if s.lower() == "oof" else cmap(j % 10)
        bars = ax.bar(pos, vals, width * 0.92, label=s, color=colour, alpha=0.85)
        if len(classes) * n <= 24:
            ax.bar_label(bars, labels=[f"{v:.3f}" if np.isfinite(v) else "" for v in vals], fontsize=7, rotation=90,
                         padding=2)
    ax.set_xticks(np.arange(len(classes)), [names.get(k, f"class {k}") for k in classes])
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("Dice")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(title or "Dice per class", fontsize=10)
    if series and classes:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: bars reach the top
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.tight_layout()
    return _save(fig, out_png)


# ---------------------------------------------------------------------------------- contact sheet
def to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W]`` or ``[H, W, C]`` -> ``[H, W, 3]`` RGB in true colours: grey for one channel,
    R, G, 0 for two, the first three channels (R, G, B) for three or more (alpha dropped)."""
    img = np.asarray(image, dtype=np.uint8)
    if img.ndim == 2:
        return np.repeat(img[..., None], 3, axis=2)
    c = img.shape[-1]
    if c == 1:
        return np.repeat(img, 3, axis=2)
    if c == 2:
        return np.concatenate([img, np.zeros_like(img[..., :1])], axis=2)
    return np.ascontiguousarray(img[..., :3])


def mask_colour(rgb: np.ndarray, region: np.ndarray, k: int) -> tuple[int, int, int]:
    """Class ``k``'s colour, unless a tenth of the pixels along ``region``'s border (where its contour
    lies) are closer than ``MIN_CONTRAST`` to it: then the contrast colour that stands out best there.
    On grey images the class colours always stay (each is at least 160 from every grey)."""
    colour = class_colour(k)
    m = np.asarray(region, np.uint8)
    if not m.any():
        return colour
    kernel = np.ones((3, 3), np.uint8)
    ring = cv2.dilate(m, kernel).astype(bool) & ~cv2.erode(m, kernel, borderType=cv2.BORDER_REPLICATE).astype(bool)
    pixels = rgb[ring if ring.any() else m.astype(bool)].reshape(-1, 3).astype(np.float64)

    def contrast(c) -> float:
        return float(np.percentile(np.linalg.norm(pixels - np.asarray(c, np.float64), axis=1), 10))

    if contrast(colour) >= MIN_CONTRAST:
        return colour
    return max(_CONTRAST, key=contrast)


def overlay(image: np.ndarray, label: np.ndarray | None, *, style: str = "contour", alpha: float = OVERLAY_ALPHA,
            thickness: int = 1) -> np.ndarray:
    """One image as RGB (true colours) with label ``k >= 1`` drawn as contours (``style="contour"``)
    or blended fills (``"fill"``) in the class colour or one chosen against the image."""
    rgb = to_rgb(image)
    if label is None:
        return rgb.copy()
    label = np.asarray(label)
    out = rgb.copy()
    blend = out.astype(np.float32)
    for k in np.unique(label):
        if k <= 0:
            continue
        m = label == k
        colour = mask_colour(rgb, m, int(k))
        if style == "fill":
            blend[m] = (1 - alpha) * blend[m] + alpha * np.asarray(colour, np.float32)
        else:
            contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(out, contours, -1, tuple(int(c) for c in colour), thickness)
    if style == "fill":
        return np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    return out


def _caption(cell: np.ndarray, text: str, scale: float) -> None:
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    cw = cell.shape[1]
    cv2.rectangle(cell, (0, 0), (min(tw + 5, cw - 1), th + 6), (0, 0, 0), -1)  # keeps the text legible
    cv2.putText(cell, text, (2, th + 3), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)


def contact_sheet(images: np.ndarray, labels: np.ndarray | None, ids, out_png: str | os.PathLike, *,
                  cols: int = 8, scale: int = 2, truth: np.ndarray | None = None, style: str = "contour") -> Path:
    """Grid of images (true colours) with their label masks drawn over them, id in the corner.

    ``images``: uint8 ``[N, H, W]`` or ``[N, H, W, C]`` (channels R, G, B; see :func:`to_rgb`);
    ``labels``: ``[N, H, W]`` or None (images only); ``ids``: N names (or None: 0..N-1).  With
    ``truth`` (``[N, H, W]``) every cell is a pair, the image with the truth on the left and with
    ``labels`` (the prediction) on the right.  Masks are scaled with the image (nearest neighbour,
    cells ``H*scale x W*scale``) and drawn at that resolution; ``SHEET_PAD`` dark pixels between and
    around cells; ``min(cols, N)`` columns.  Written atomically as PNG.
    """
    images = np.asarray(images)
    if images.ndim not in (3, 4) or images.shape[0] == 0:
        raise ValueError(f"images must be [N, H, W] or [N, H, W, C] with N >= 1, got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    n, h, w = images.shape[:3]
    for name, arr in (("labels", labels), ("truth", truth)):
        if arr is not None and np.asarray(arr).shape != (n, h, w):
            raise ValueError(f"{name} shape {np.asarray(arr).shape} does not match images {(n, h, w)}")
    ids = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
    if len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} images")
    scale, cols = int(scale), int(cols)
    if scale < 1 or cols < 1:
        raise ValueError(f"cols and scale must be >= 1, got cols={cols}, scale={scale}")
    if style not in ("contour", "fill"):
        raise ValueError(f"style must be 'contour' or 'fill', got {style!r}")

    panels = 1 if truth is None else 2
    ncols = min(cols, n)
    nrows = -(-n // ncols)
    ch, cw = h * scale, w * scale * panels + SHEET_PAD * (panels - 1)
    sheet = np.full((nrows * ch + (nrows + 1) * SHEET_PAD, ncols * cw + (ncols + 1) * SHEET_PAD, 3),
                    SHEET_BACKGROUND, np.uint8)
    font_scale = float(np.clip(w * scale / 550.0, 0.25, 0.6))

    def big(a):
        return a if scale == 1 else np.repeat(np.repeat(np.asarray(a), scale, 0), scale, 1)

    for i in range(n):
        img = big(images[i])
        masks = [labels] if truth is None else [truth, labels]
        r, c = divmod(i, ncols)
        y0, x0 = SHEET_PAD + r * (ch + SHEET_PAD), SHEET_PAD + c * (cw + SHEET_PAD)
        for p, m in enumerate(masks):
            cell = overlay(img, None if m is None else big(m[i]), style=style, thickness=max(1, scale))
            text = ids[i] if p == 0 else "pred"
            if truth is not None and p == 0:
                text += " truth"
            _caption(cell, text, font_scale)
            xs = x0 + p * (w * scale + SHEET_PAD)
            sheet[y0:y0 + ch, xs:xs + w * scale] = cell
    ok, buf = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - cv2 can always encode uint8
        raise RuntimeError(f"{out_png}: PNG encoding failed")
    return atomic_write_bytes(out_png, buf.tobytes())
