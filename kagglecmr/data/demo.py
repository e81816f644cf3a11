"""Synthetic cardiac-MR-like phantoms in the competition layout (for demos and tests).

Each image is a short-axis "slice": a textured body (smooth noise, a bright fat rim, dark
lungs, a few bright vessel-like blobs), and a heart made of a bright left-ventricle (LV) blood
pool inside a darker myocardium ring, with a mid-grey right-ventricle (RV) crescent hugging the
ring.  About 10% of the slices are apical slices without an RV.  Position, size, rotation,
intensities and noise vary per image.  Labels: 0 background, 1 RV, 2 myocardium, 3 LV.

The classes are separable by intensity *and* shape (the bright blobs in the background are
as bright as the LV, the myocardium is as dark as the background), so a small UNet learns
them quickly but thresholding alone does not.

``kind="sparse"`` (``demo-data --kind sparse``) leaves the heart out of about half the slices (as slices
below or above it: every class empty), the setting where empty-mask gating pays (SIIM-ACR, Severstal); the
bright vessel-like blobs stay, so a model has small, uncertain false positives to make there.

Everything is drawn with OpenCV from one ``np.random.default_rng(seed)``: the same seed gives
byte-identical PNGs.  The dataset is written to a temporary sibling folder and renamed into
place, so a failure never leaves half a dataset behind.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from kagglecmr.data.loader import MASK_SUFFIX, SPLITS
from kagglecmr.utils.errors import KaggleCMRError
from kagglecmr.utils.io import atomic_write_bytes

NO_RV_FRACTION = 0.1
EMPTY_FRACTION = 0.5  # kind "sparse": slices without a heart
KINDS = ("cmr", "sparse")
SHIFT = 4  # cv2 fixed-point bits: sub-pixel centres and axes
_SCALE = 1 << SHIFT


@dataclass(frozen=True)
class Ellipse:
    """A filled ellipse in pixel units (centre x, y; half-axes a, b; rotation in degrees)."""

    cx: float
    cy: float
    a: float
    b: float
    angle: float

    def grown(self, d: float) -> Ellipse:
        return Ellipse(self.cx, self.cy, self.a + d, self.b + d, self.angle)


def _fill(canvas: np.ndarray, e: Ellipse, value: float) -> None:
    """Draw ``e`` filled with ``value`` into ``canvas`` (in place, deterministic, sub-pixel)."""
    centre = (round(e.cx * _SCALE), round(e.cy * _SCALE))
    axes = (max(1, round(e.a * _SCALE)), max(1, round(e.b * _SCALE)))
    cv2.ellipse(canvas, centre, axes, e.angle, 0, 360, value, thickness=-1, lineType=cv2.LINE_8, shift=SHIFT)


def _ellipse_mask(size: int, e: Ellipse) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    _fill(m, e, 1)
    return m.astype(bool)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, amplitude: float) -> np.ndarray:
    """Low-frequency texture: a coarse random grid upsampled with bicubic interpolation."""
    coarse = rng.normal(0.0, amplitude, (cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def _body_outline(rng: np.random.Generator, size: int, n_points: int = 90) -> tuple[np.ndarray, np.ndarray]:
    """Unit-direction vectors and radii of a wobbly ellipse (the body cross-section), in pixels."""
    s = size / 96.0
    theta = np.linspace(0, 2 * np.pi, n_points, endpoint=False)
    wobble = 1 + sum(rng.uniform(0, 0.06) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4, 5))
    a, b = size * rng.uniform(0.55, 0.9), size * rng.uniform(0.45, 0.7)
    rot = math.radians(rng.uniform(-40, 40))
    x, y = a * np.cos(theta) * wobble, b * np.sin(theta) * wobble
    cx, cy = size / 2 + rng.uniform(-10, 10) * s, size / 2 + rng.uniform(-10, 10) * s
    pts = np.stack([cx + x * math.cos(rot) - y * math.sin(rot), cy + x * math.sin(rot) + y * math.cos(rot)], 1)
    return pts, np.array([cx, cy])


def _fill_polygon(canvas: np.ndarray, pts: np.ndarray, value: float) -> None:
    cv2.fillPoly(canvas, [np.rint(pts * _SCALE).astype(np.int32)], value, lineType=cv2.LINE_8, shift=SHIFT)


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, float]:
    """Body (bright fat rim, dark lungs, bright blobs, smooth texture) and its soft-tissue level."""
    s = size / 96.0
    img = np.full((size, size), rng.uniform(0, 12), np.float32)  # air
    body, centre = _body_outline(rng, size)
    outward = body - centre
    rim = body + outward / np.linalg.norm(outward, axis=1, keepdims=True) * rng.uniform(1.5, 4) * s
    _fill_polygon(img, rim, rng.uniform(110, 200))  # subcutaneous fat
    tissue = rng.uniform(55, 95)
    _fill_polygon(img, body, tissue)  # soft tissue
    for side in (-1, 1):  # lungs left and right of the heart
        if rng.random() < 0.8:
            lung = Ellipse(size / 2 + side * size * rng.uniform(0.25, 0.4), size / 2 + rng.normal(0, 8 * s),
                           size * rng.uniform(0.12, 0.22), size * rng.uniform(0.2, 0.32), rng.uniform(-30, 30))
            _fill(img, lung, rng.uniform(5, 30))
    for _ in range(rng.integers(3, 9)):  # vessels / fat: as bright as the blood pool, but no ring
        r = rng.uniform(1.5, 5.0) * s
        blob = Ellipse(rng.uniform(0, size), rng.uniform(0, size), r, r * rng.uniform(0.6, 1.0), rng.uniform(0, 180))
        _fill(img, blob, rng.uniform(120, 240))
    img += _smooth_noise(rng, size, int(rng.integers(5, 10)), rng.uniform(6, 16))
    img += _smooth_noise(rng, size, size // 4, rng.uniform(10, 16))  # fine anatomy-like texture
    return img, tissue


def _heart(rng: np.random.Generator, size: int, with_rv: bool, tissue: float) -> tuple[np.ndarray, dict[int, float]]:
    """Label map of one heart (0 outside, 4 = unlabelled RV wall) and the intensity of each label."""
    s = size / 96.0
    labels = np.zeros((size, size), np.uint8)
    apical = not with_rv
    r_lv = rng.uniform(5, 9) * s if apical else rng.uniform(8, 16) * s
    lv = Ellipse(size / 2 + rng.normal(0, 6 * s), size / 2 + rng.normal(0, 6 * s),
                 r_lv, r_lv * rng.uniform(0.8, 1.0), rng.uniform(0, 180))
    myo = lv.grown(rng.uniform(3.5, 6.5) * s)
    if with_rv:
        radius = (myo.a + myo.b) / 2
        phi = math.radians(rng.uniform(200, 250))  # RV to the upper left, as in the real slices
        r_minor = radius * rng.uniform(0.5, 0.8)
        r_major = radius * rng.uniform(1.1, 1.5)
        d = radius + r_minor * rng.uniform(0.2, 0.5)
        rv = Ellipse(myo.cx + d * math.cos(phi), myo.cy + d * math.sin(phi), r_minor, r_major, math.degrees(phi))
        labels[_ellipse_mask(size, rv.grown(1.5 * s))] = 4  # thin RV wall: drawn, but labelled background
        labels[_ellipse_mask(size, rv)] = 1
    labels[_ellipse_mask(size, myo)] = 2
    labels[_ellipse_mask(size, lv)] = 3
    blood = max(rng.uniform(140, 215), tissue + 60)  # the blood pool always stands out
    values = {1: blood * rng.uniform(0.65, 0.9), 2: rng.uniform(35, 80), 3: blood, 4: rng.uniform(35, 80)}
    return labels, values


def make_phantom(rng: np.random.Generator, size: int = 96, with_rv: bool = True,
                 with_heart: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One ``(image, mask)`` pair: uint8 ``[size, size]`` each, mask values 0..3 (all 0 without the heart)."""
    img, tissue = _background(rng, size)
    labels, values = _heart(rng, size, with_rv, tissue) if with_heart else (np.zeros((size, size), np.uint8), {})
    for k, v in values.items():
        img[labels == k] = v
    lv = labels == 3
    for _ in range(rng.integers(0, 4) if with_heart else 0):  # papillary muscles: dark dots inside the LV, labelled LV
        ys, xs = np.nonzero(lv)
        j = rng.integers(len(ys))
        cv2.circle(img, (int(xs[j]), int(ys[j])), int(rng.integers(1, 3)), values[2] * 1.2, -1)
    img[labels > 0] += _smooth_noise(rng, size, 6, 8.0)[labels > 0]
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.0))
    img = img * rng.uniform(0.8, 1.2) + rng.normal(0, rng.uniform(3, 9), img.shape).astype(np.float32)
    mask = np.where(labels == 4, 0, labels).astype(np.uint8)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask


def _png(arr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", arr)
    if not ok:  # pragma: no cover - cv2 always encodes uint8 2-D arrays
        raise KaggleCMRError("could not encode a PNG")
    return buf.tobytes()


def _check_args(n_train: int, n_val: int, n_test: int, size: int) -> None:
    if n_train < 1:
        raise KaggleCMRError(f"--n-train must be at least 1 (got {n_train})")
    if n_val < 0 or n_test < 0:
        raise KaggleCMRError(f"--n-val and --n-test must be >= 0 (got {n_val}, {n_test})")
    if size < 32:
        raise KaggleCMRError(f"--size must be at least 32 pixels (got {size})")


def _check_target(out: Path, force: bool, allowed=SPLITS) -> bool:
    """Return whether ``out`` holds a dataset to replace (only ``allowed`` names inside); refuse anything unsafe."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise KaggleCMRError(f"{out}: exists and is not a folder")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return False
    if not force:
        raise KaggleCMRError(f"{out}: folder is not empty (use --force to replace the dataset)")
    foreign = [e for e in entries if e not in allowed]
    if foreign:
        raise KaggleCMRError(f"{out}: does not look like a dataset (contains {', '.join(foreign[:3])}); "
                             "refusing to replace it even with --force")
    return True


def _write_dataset(root: Path, counts: dict[str, int], seed: int, size: int, kind: str = "cmr") -> dict:
    """Draw and write every split under ``root``; return per-split statistics."""
    rng = np.random.default_rng(seed)
    n_total = sum(counts.values())
    with_rv = rng.random(n_total) >= NO_RV_FRACTION
    heart = rng.random(n_total) >= EMPTY_FRACTION if kind == "sparse" else np.ones(n_total, bool)
    next_id, no_rv, empty, pixels = 1, 0, 0, np.zeros(4, np.int64)
    for split, n in counts.items():
        (root / split / "image").mkdir(parents=True, exist_ok=True)
        labelled = split != "test"
        if labelled:
            (root / split / "mask").mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            image, mask = make_phantom(rng, size, with_rv=bool(with_rv[next_id - 1]), with_heart=bool(heart[next_id - 1]))
            name = f"cmr{next_id}"
            atomic_write_bytes(root / split / "image" / f"{name}.png", _png(image))
            if labelled:
                atomic_write_bytes(root / split / "mask" / f"{name}{MASK_SUFFIX}.png", _png(mask))
                no_rv += int(not (mask == 1).any())
                empty += int(not mask.any())
                pixels += np.bincount(mask.ravel(), minlength=4)
            next_id += 1
    fractions = (pixels / max(1, pixels.sum())).round(4).tolist()
    return {"no_rv": no_rv, "class_fractions": fractions} | ({"empty": empty} if kind == "sparse" else {})


def _swap_in(tmp: Path, out: Path, replace: bool) -> None:
    """Move the finished dataset ``tmp`` to ``out``; the old one is removed only after success."""
    if not replace:
        if out.exists():
            out.rmdir()  # an empty folder
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{tmp.name}")
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old)


def make_demo_dataset(out, n_train: int = 60, n_val: int = 12, n_test: int = 24, seed: int = 0,
                      size: int = 96, force: bool = False, kind: str = "cmr") -> dict:
    """Write a synthetic CMR-like dataset to ``out`` in the competition layout.

    ``out/train/{image,mask}``, ``out/val/{image,mask}`` (when ``n_val > 0``) and
    ``out/test/image`` (when ``n_test > 0``); ids run ``cmr1..`` across train, val, test.  An
    existing non-empty ``out`` is refused unless ``force`` (and even then only when it holds
    nothing but ``train/``, ``val/``, ``test/``).  ``kind``: ``cmr`` or ``sparse`` (about half the slices
    without a heart).  Returns a summary dict.
    """
    _check_args(n_train, n_val, n_test, size)
    if kind not in KINDS:
        raise KaggleCMRError(f"--kind {kind}: expected {' or '.join(KINDS)}")
    out = Path(out)
    replace = _check_target(out, force)
    counts = {s: n for s, n in zip(SPLITS, (n_train, n_val, n_test)) if n > 0}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is an ordinary folder
    try:
        stats = _write_dataset(tmp, counts, seed, size, kind)
        _swap_in(tmp, out, replace)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    summary = {"out": str(out), "seed": seed, "size": size, "train": n_train, "val": n_val, "test": n_test, **stats}
    if kind != "cmr":
        summary["kind"] = kind
    empty = f", {stats['empty']} labelled empty" if kind == "sparse" else ""
    print(f"demo-data: wrote {n_train} train + {n_val} val (with masks) + {n_test} test images "
          f"({size}x{size}, seed {seed}, {stats['no_rv']} labelled without RV{empty}) to {out}")
    return summary
