"""Training curves and contact sheets: valid PNGs of the right size, robust to odd metrics."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pandas as pd
import pytest

from kagglecmr.plots import (
    CURVES_SIZE,
    OVERLAY_ALPHA,
    SHEET_PAD,
    class_colour,
    contact_sheet,
    overlay,
    plot_curves,
)

NAN = float("nan")


def _metrics(n):
    return [
        {"epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": 1.2 / (e + 1), "val_dice": 0.5 + 0.04 * e,
         "dice_1": 0.4 + 0.05 * e, "dice_2": 0.5 + 0.03 * e, "dice_3": 0.6 + 0.035 * e}
        for e in range(1, n + 1)
    ]


def _read(path):
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, f"{path} is not a readable PNG"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return img


def _only_file(folder, name):
    assert sorted(p.name for p in folder.iterdir()) == [name]  # atomic: no temp files left behind


def _count_colour(img, bgr, tol=40):
    diff = np.abs(img[..., :3].astype(int) - np.array(bgr)[None, None]).max(-1)
    return int((diff <= tol).sum())


# ------------------------------------------------------------------------------------ curves


def test_plot_curves_writes_png_of_expected_size(tmp_path):
    out = plot_curves(_metrics(12), tmp_path / "curves.png", title="fold 0")
    img = _read(out)
    w, h = CURVES_SIZE
    assert img.shape == (h, w, 3)
    _only_file(tmp_path, "curves.png")
    assert (img == 255).all(-1).mean() > 0.5  # white background
    # per-class lines (RV red, Myo green, LV blue) are drawn in the right (Dice) panel
    right = img[:, w // 2:]
    for k in (1, 2, 3):
        assert _count_colour(right, class_colour(k)) > 30, k
    assert _count_colour(img[:, : w // 2], (200, 100, 0)) > 30  # train_loss line in the left panel


def test_plot_curves_accepts_dataframe_and_overwrites(tmp_path):
    path = tmp_path / "c.png"
    plot_curves(_metrics(3), path)
    first = path.read_bytes()
    plot_curves(pd.DataFrame(_metrics(8)), path)
    assert path.read_bytes() != first
    assert _read(path).shape[:2] == CURVES_SIZE[::-1]


def test_plot_curves_single_epoch(tmp_path):
    img = _read(plot_curves(_metrics(1), tmp_path / "one.png"))
    assert img.shape[:2] == CURVES_SIZE[::-1]
    assert _count_colour(img, class_colour(1)) > 0  # a single point is still drawn (as a dot)


def test_plot_curves_nan_missing_and_constant(tmp_path):
    rows = [
        {"epoch": e, "train_loss": 0.3, "val_loss": NAN, "val_dice": 0.7 if e % 2 else NAN, "dice_1": NAN,
         "dice_2": 0.5}
        for e in range(10)
    ]
    img = _read(plot_curves(rows, tmp_path / "nan.png"))
    assert img.shape[:2] == CURVES_SIZE[::-1]
    # no val_loss / dice_3 columns at all, no epoch column
    rows = [{"train_loss": x} for x in (1.0, math.inf, 0.5, None)]
    assert _read(plot_curves(rows, tmp_path / "sparse.png")).shape[:2] == CURVES_SIZE[::-1]


def test_plot_curves_empty_and_all_nan(tmp_path):
    assert _read(plot_curves([], tmp_path / "empty.png")).shape[:2] == CURVES_SIZE[::-1]
    rows = [{"epoch": 1, "train_loss": NAN, "val_dice": NAN}]
    assert _read(plot_curves(rows, tmp_path / "allnan.png")).shape[:2] == CURVES_SIZE[::-1]


def test_plot_curves_many_epochs_and_more_classes(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"epoch": e, "train_loss": float(rng.random()), "val_dice": float(rng.random()),
             **{f"dice_{k}": float(rng.random()) for k in range(1, 7)}} for e in range(300)]
    assert _read(plot_curves(rows, tmp_path / "long.png")).shape[:2] == CURVES_SIZE[::-1]


# ------------------------------------------------------------------------------------ contact sheet


def _sheet_inputs(n=5, h=16, w=20):
    images = np.full((n, h, w), 100, np.uint8)
    labels = np.zeros((n, h, w), np.uint8)
    labels[:, 8:12, 0:4] = 1  # RV
    labels[:, 8:12, 6:10] = 2  # Myo
    labels[:, 8:12, 12:16] = 3  # LV
    return images, labels


def _blend(gray, colour, alpha=OVERLAY_ALPHA):
    return np.rint((1 - alpha) * gray + alpha * np.array(colour, float)).astype(int)


def test_contact_sheet_size_and_overlay_colours(tmp_path):
    images, labels = _sheet_inputs(5)
    out = contact_sheet(images, labels, [f"cmr{i}" for i in range(5)], tmp_path / "sheet.png", cols=3, scale=2)
    img = _read(out)
    _only_file(tmp_path, "sheet.png")
    ch, cw = 16 * 2, 20 * 2
    assert img.shape == (2 * ch + 3 * SHEET_PAD, 3 * cw + 4 * SHEET_PAD, 3)

    def cell(i):
        r, c = divmod(i, 3)
        y0, x0 = SHEET_PAD + r * (ch + SHEET_PAD), SHEET_PAD + c * (cw + SHEET_PAD)
        return img[y0:y0 + ch, x0:x0 + cw].astype(int)

    for i in range(5):
        cl = cell(i)
        np.testing.assert_array_equal(cl[30, 38], [100, 100, 100])  # background pixel: plain gray
        for k, (y, x) in {1: (20, 2), 2: (20, 14), 3: (20, 26)}.items():  # label k at (y/2, x/2)
            np.testing.assert_allclose(cl[y, x], _blend(100, class_colour(k)), atol=1)
        assert cl[20, 2, 2] > 150 and cl[20, 2, 0] < 70  # RV reads red (BGR)
        assert cl[20, 14, 1] > 140 and cl[20, 14, 0] < 70  # Myo reads green
        assert cl[20, 26, 0] > 150 and cl[20, 26, 2] < 70  # LV reads blue
        corner = cl[:7, :16]  # the id: light text on a black box in the top-left corner
        assert (corner == 0).all(-1).any() and corner.max() > 120
    # unused grid slot stays dark background
    assert (cell(5) < 50).all()


def test_contact_sheet_channels_and_generic_classes(tmp_path):
    images, labels = _sheet_inputs(2)
    labels[:, 0:2, 16:20] = 7  # a class beyond LV gets a generic colour
    img = _read(contact_sheet(images[..., None], labels, ["a", "b"], tmp_path / "s.png", cols=8, scale=1))
    assert img.shape == (16 + 2 * SHEET_PAD, 2 * 20 + 3 * SHEET_PAD, 3)  # cols capped at N
    px = img[SHEET_PAD + 1, SHEET_PAD + 18].astype(int)
    np.testing.assert_allclose(px, _blend(100, class_colour(7)), atol=1)
    assert class_colour(7) not in {class_colour(k) for k in (1, 2, 3)}


def test_contact_sheet_without_labels_or_ids(tmp_path):
    images, _ = _sheet_inputs(3)
    img = _read(contact_sheet(images, None, None, tmp_path / "s.png", cols=2, scale=3))
    assert img.shape == (2 * 48 + 3 * SHEET_PAD, 2 * 60 + 3 * SHEET_PAD, 3)
    y, x = SHEET_PAD + 30, SHEET_PAD + 50
    np.testing.assert_array_equal(img[y, x], [100, 100, 100])


def test_overlay_leaves_background_untouched():
    img = np.arange(64, dtype=np.uint8).reshape(8, 8)
    lab = np.zeros((8, 8), np.uint8)
    lab[2, 3] = 2
    out = overlay(img, lab)
    assert out.shape == (8, 8, 3)
    keep = lab == 0
    np.testing.assert_array_equal(out[keep], np.repeat(img[keep][:, None], 3, axis=1))
    assert tuple(out[2, 3]) != (img[2, 3],) * 3


@pytest.mark.parametrize("kwargs, match", [
    ({"labels": np.zeros((3, 16, 20), np.uint8)}, "labels shape"),
    ({"ids": ["a"]}, "ids"),
    ({"cols": 0}, "cols"),
    ({"images": np.zeros((0, 16, 20), np.uint8)}, "N >= 1"),
    ({"images": np.zeros((2, 16, 20), np.float32)}, "uint8"),
])
def test_contact_sheet_rejects_bad_inputs(tmp_path, kwargs, match):
    images, labels = _sheet_inputs(2)
    args = {"images": images, "labels": labels, "ids": ["a", "b"], "cols": 8}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        contact_sheet(args["images"], args["labels"], args["ids"], tmp_path / "s.png", cols=args["cols"])
    assert not (tmp_path / "s.png").exists()
