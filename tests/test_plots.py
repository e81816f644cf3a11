"""Plots: valid PNGs of the right size, robust to odd metrics; contact sheets in true colours."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pandas as pd
import pytest

from kagglecmr.utils.plots import (
    CURVES_SIZE,
    OVERLAY_ALPHA,
    RUN_CURVES_SIZE,
    SHEET_PAD,
    best_epoch,
    class_colour,
    contact_sheet,
    mask_colour,
    overlay,
    plot_class_dice,
    plot_curves,
    plot_run_curves,
    to_rgb,
)

NAN = float("nan")


def _metrics(n, best=None):
    return [
        {"epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": 1.2 / (e + 1), "val_dice": 0.5 + 0.04 * e,
         "dice_1": 0.4 + 0.05 * e, "dice_2": 0.5 + 0.03 * e, "dice_3": 0.6 + 0.035 * e, "best": e == best}
        for e in range(1, n + 1)
    ]


def _read_rgb(path):
    """The PNG as RGB (cv2 reads BGR)."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert img is not None, f"{path} is not a readable PNG"
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _only_file(folder, name):
    assert sorted(p.name for p in folder.iterdir()) == [name]  # atomic: no temp files left behind


def _count_colour(img, rgb, tol=40):
    diff = np.abs(img[..., :3].astype(int) - np.array(rgb)[None, None]).max(-1)
    return int((diff <= tol).sum())


# ------------------------------------------------------------------------------------ curves
def test_plot_curves_writes_png_of_expected_size(tmp_path):
    out = plot_curves(_metrics(12, best=7), tmp_path / "curves.png", title="fold 0")
    img = _read_rgb(out)
    w, h = CURVES_SIZE
    assert img.shape == (h, w, 3)
    _only_file(tmp_path, "curves.png")
    assert (img == 255).all(-1).mean() > 0.5  # white background
    right, left = img[:, w // 2:], img[:, : w // 2]
    for k in (1, 2, 3):  # per-class Dice lines (RV red, Myo green, LV blue) in the right panel
        assert _count_colour(right, class_colour(k)) > 30, k
    assert _count_colour(left, (0, 100, 200)) > 30  # train loss line in the left panel
    assert _count_colour(left, class_colour(1)) == 0  # and no class colours there
    assert _count_colour(right, (255, 215, 0), tol=30) > 20  # the gold star of the best epoch


def test_best_epoch_uses_best_flag_then_argmax():
    assert best_epoch(_metrics(12, best=7)) == (7, pytest.approx(0.78))
    assert best_epoch(_metrics(5)) == (5, pytest.approx(0.7))  # no row flagged: the highest Dice
    assert best_epoch([{"epoch": 1, "val_dice": NAN}]) is None
    assert best_epoch([]) is None


def test_plot_curves_accepts_dataframe_and_overwrites(tmp_path):
    path = tmp_path / "c.png"
    plot_curves(_metrics(3), path)
    first = path.read_bytes()
    plot_curves(pd.DataFrame(_metrics(8)), path)
    assert path.read_bytes() != first
    assert _read_rgb(path).shape[:2] == CURVES_SIZE[::-1]


def test_plot_curves_nan_missing_constant_empty(tmp_path):
    rows = [{"epoch": e, "train_loss": 0.3, "val_loss": NAN, "val_dice": 0.7 if e % 2 else NAN, "dice_1": NAN,
             "dice_2": 0.5} for e in range(10)]
    assert _read_rgb(plot_curves(rows, tmp_path / "nan.png")).shape[:2] == CURVES_SIZE[::-1]
    rows = [{"train_loss": x} for x in (1.0, math.inf, 0.5, None)]  # no epoch, no Dice
    assert _read_rgb(plot_curves(rows, tmp_path / "sparse.png")).shape[:2] == CURVES_SIZE[::-1]
    rows = [{"epoch": 1, "train_loss": -0.5}, {"epoch": 2, "train_loss": 0.0}]  # not loggable: linear axis
    assert _read_rgb(plot_curves(rows, tmp_path / "neg.png")).shape[:2] == CURVES_SIZE[::-1]
    assert _read_rgb(plot_curves([], tmp_path / "empty.png")).shape[:2] == CURVES_SIZE[::-1]


def test_plot_curves_many_epochs_and_more_classes(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"epoch": e, "train_loss": float(rng.random()), "val_dice": float(rng.random()),
             **{f"dice_{k}": float(rng.random()) for k in range(1, 7)}} for e in range(300)]
    img = _read_rgb(plot_curves(rows, tmp_path / "long.png", size=(800, 300)))
    assert img.shape == (300, 800, 3)
    assert _count_colour(img, class_colour(6), tol=30) > 30


def test_plot_run_curves_one_colour_per_fold(tmp_path):
    hist = {f"fold{k}": _metrics(6 + k, best=3) for k in range(3)}
    img = _read_rgb(plot_run_curves(hist, tmp_path / "run.png", title="tiny"))
    assert img.shape == (RUN_CURVES_SIZE[1], RUN_CURVES_SIZE[0], 3)
    _only_file(tmp_path, "run.png")
    for rgb in ((31, 119, 180), (255, 127, 14), (44, 160, 44)):  # tab10: blue, orange, green
        assert _count_colour(img, rgb, tol=25) > 30, rgb
    assert _count_colour(img, (214, 39, 40), tol=25) == 0  # no fourth fold
    assert _read_rgb(plot_run_curves({}, tmp_path / "none.png")).shape[:2] == RUN_CURVES_SIZE[::-1]


def test_plot_class_dice_bars(tmp_path):
    scores = {"fold0": {"1": 0.8, "2": 0.6, "3": 0.9}, "OOF": {1: 0.7, 2: 0.5, 3: 0.95}}
    img = _read_rgb(plot_class_dice(scores, tmp_path / "bars.png", class_names={1: "RV", 2: "Myo", 3: "LV"},
                                    size=(600, 300)))
    assert img.shape == (300, 600, 3)
    assert _count_colour(img, (31, 119, 180), tol=40) > 500  # fold0's bars
    assert _count_colour(img, (0, 0, 0), tol=40) > 500  # OOF's bars are black
    assert _read_rgb(plot_class_dice({}, tmp_path / "empty.png")).shape[2] == 3


# ------------------------------------------------------------------------------------ contact sheet
def _sheet_inputs(n=5, h=16, w=20):
    images = np.full((n, h, w), 100, np.uint8)
    labels = np.zeros((n, h, w), np.uint8)
    labels[:, 8:12, 0:4] = 1  # RV
    labels[:, 8:12, 6:10] = 2  # Myo
    labels[:, 8:12, 12:16] = 3  # LV
    return images, labels


def _cell(img, i, ncols, ch, cw):
    r, c = divmod(i, ncols)
    y0, x0 = SHEET_PAD + r * (ch + SHEET_PAD), SHEET_PAD + c * (cw + SHEET_PAD)
    return img[y0:y0 + ch, x0:x0 + cw].astype(int)


def test_contact_sheet_size_and_contour_colours(tmp_path):
    images, labels = _sheet_inputs(5)
    out = contact_sheet(images, labels, [f"cmr{i}" for i in range(5)], tmp_path / "sheet.png", cols=3, scale=2)
    img = _read_rgb(out)
    _only_file(tmp_path, "sheet.png")
    ch, cw = 16 * 2, 20 * 2
    assert img.shape == (2 * ch + 3 * SHEET_PAD, 3 * cw + 4 * SHEET_PAD, 3)
    for i in range(5):
        cl = _cell(img, i, 3, ch, cw)
        np.testing.assert_array_equal(cl[30, 38], [100, 100, 100])  # background pixel: plain grey
        for k, x0 in {1: 0, 2: 12, 3: 24}.items():  # label k covers rows 16..23, cols x0..x0+7 at scale 2
            edge, inside = cl[16, x0 + 3], cl[19:21, x0 + 3:x0 + 5]
            np.testing.assert_array_equal(edge, class_colour(k))  # the contour in the class colour
            assert (inside == 100).all()  # the inside stays visible
        corner = cl[:7, :16]  # the id: light text on a black box in the top-left corner
        assert (corner == 0).all(-1).any() and corner.max() > 120
    assert (_cell(img, 5, 3, ch, cw) < 50).all()  # unused grid slot stays dark background


def test_contact_sheet_true_colours_rgb_and_two_channels(tmp_path):
    red = np.zeros((2, 12, 12, 3), np.uint8)
    red[..., 0] = 230  # pure red in RGB order
    img = _read_rgb(contact_sheet(red, None, ["r", "r2"], tmp_path / "red.png", scale=2))
    px = img[SHEET_PAD + 20, SHEET_PAD + 20]
    assert px[0] == 230 and px[1] == 0 and px[2] == 0  # red stays red (no BGR swap)

    two = np.zeros((1, 12, 12, 2), np.uint8)
    two[..., 0], two[..., 1] = 40, 200  # stain 1 in R, stain 2 in G, no blue channel
    img = _read_rgb(contact_sheet(two, None, ["g"], tmp_path / "two.png", scale=2))
    np.testing.assert_array_equal(img[SHEET_PAD + 20, SHEET_PAD + 20], [40, 200, 0])
    np.testing.assert_array_equal(to_rgb(two[0])[0, 0], [40, 200, 0])
    np.testing.assert_array_equal(to_rgb(np.full((2, 2, 4), 9, np.uint8)).shape, (2, 2, 3))


def test_mask_colour_chosen_against_the_image(tmp_path):
    tissue = np.zeros((1, 20, 20, 3), np.uint8)
    tissue[...] = (220, 40, 50)  # red tissue
    lab = np.zeros((1, 20, 20), np.uint8)
    lab[0, 5:15, 5:15] = 1  # a class-1 (red) gland
    colour = mask_colour(tissue[0], lab[0] == 1, 1)
    assert colour != class_colour(1)
    assert np.linalg.norm(np.subtract(colour, (220, 40, 50))) > 200
    img = _read_rgb(contact_sheet(tissue, lab, ["w"], tmp_path / "w.png", scale=1))
    np.testing.assert_array_equal(img[SHEET_PAD + 14, SHEET_PAD + 10], colour)  # the bottom contour has that colour
    grey = np.full((20, 20), 100, np.uint8)
    assert mask_colour(to_rgb(grey), lab[0] == 1, 1) == class_colour(1)  # on grey the class colour stays


def test_contact_sheet_truth_vs_prediction_pairs(tmp_path):
    images = np.full((2, 32, 32), 100, np.uint8)
    truth, pred = np.zeros((2, 32, 32), np.uint8), np.zeros((2, 32, 32), np.uint8)
    truth[:, 20:26, 4:10] = 3
    pred[:, 20:26, 16:22] = 1
    img = _read_rgb(contact_sheet(images, pred, ["a", "b"], tmp_path / "tp.png", truth=truth, scale=1, cols=2))
    pair_w = 2 * 32 + SHEET_PAD
    assert img.shape == (32 + 2 * SHEET_PAD, 2 * pair_w + 3 * SHEET_PAD, 3)
    left = img[SHEET_PAD:SHEET_PAD + 32, SHEET_PAD:SHEET_PAD + 32]
    right = img[SHEET_PAD:SHEET_PAD + 32, 2 * SHEET_PAD + 32:2 * SHEET_PAD + 64]
    np.testing.assert_array_equal(left[20, 6], class_colour(3))  # truth panel: the LV square's top edge
    np.testing.assert_array_equal(right[20, 6], [100, 100, 100])  # not in the prediction
    np.testing.assert_array_equal(right[25, 18], class_colour(1))  # prediction panel: its RV
    assert _count_colour(left, class_colour(1), tol=0) == 0  # the prediction is not on the truth panel
    assert _count_colour(right, class_colour(3), tol=0) == 0


def test_contact_sheet_channels_and_generic_classes(tmp_path):
    images, labels = _sheet_inputs(2)
    labels[:, 0:2, 16:20] = 7  # a class beyond LV gets a generic colour
    img = _read_rgb(contact_sheet(images[..., None], labels, ["a", "b"], tmp_path / "s.png", cols=8, scale=1,
                                  style="fill"))
    assert img.shape == (16 + 2 * SHEET_PAD, 2 * 20 + 3 * SHEET_PAD, 3)  # cols capped at N
    px = img[SHEET_PAD + 1, SHEET_PAD + 18].astype(int)
    blend = np.rint((1 - OVERLAY_ALPHA) * 100 + OVERLAY_ALPHA * np.array(class_colour(7), float))
    np.testing.assert_allclose(px, blend, atol=1)
    assert class_colour(7) not in {class_colour(k) for k in (1, 2, 3)}


def test_overlay_leaves_background_untouched():
    img = np.arange(64, dtype=np.uint8).reshape(8, 8)
    lab = np.zeros((8, 8), np.uint8)
    lab[2, 3] = 2
    for style in ("contour", "fill"):
        out = overlay(img, lab, style=style)
        assert out.shape == (8, 8, 3)
        keep = lab == 0
        np.testing.assert_array_equal(out[keep], np.repeat(img[keep][:, None], 3, axis=1))
        assert tuple(out[2, 3]) != (img[2, 3],) * 3


@pytest.mark.parametrize("kwargs, match", [
    ({"labels": np.zeros((3, 16, 20), np.uint8)}, "labels shape"),
    ({"truth": np.zeros((2, 8, 20), np.uint8)}, "truth shape"),
    ({"ids": ["a"]}, "ids"),
    ({"cols": 0}, "cols"),
    ({"style": "dots"}, "style"),
    ({"images": np.zeros((0, 16, 20), np.uint8)}, "N >= 1"),
    ({"images": np.zeros((2, 16, 20), np.float32)}, "uint8"),
])
def test_contact_sheet_rejects_bad_inputs(tmp_path, kwargs, match):
    images, labels = _sheet_inputs(2)
    args = {"images": images, "labels": labels, "ids": ["a", "b"], "cols": 8, "truth": None, "style": "contour"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        contact_sheet(args["images"], args["labels"], args["ids"], tmp_path / "s.png", cols=args["cols"],
                      truth=args["truth"], style=args["style"])
    assert not (tmp_path / "s.png").exists()
