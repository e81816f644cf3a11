"""Channels as a user means them (kagglecmr.data.channels): images of one dataset stored with different channel
counts (RGBA with alpha 255 among RGB, grey among colour) load, and the same picture gives the same array
whatever its storage; a varying alpha among images without one is a one-line error naming both files and the
``channels:`` that works.  Datasets use DSB 2018's layout, ``{id}/images/{id}.png`` + ``{id}/masks/*.png``."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from kagglecmr.data.channels import channel_rule, to_channels
from kagglecmr.data.dataset import load_dataset
from kagglecmr.utils.errors import DataError

HW = (20, 24)


def picture(seed: int) -> np.ndarray:
    """A colour picture in RGB order, every channel varying."""
    return np.random.default_rng(seed).integers(0, 256, size=(*HW, 3), dtype=np.uint8)


def rgba(rgb: np.ndarray, alpha=255) -> np.ndarray:
    a = np.full(HW, alpha, np.uint8) if np.isscalar(alpha) else alpha
    return np.dstack([rgb, a])


def write_dsb(tmp: Path, images: dict[str, np.ndarray], name: str = "dsb.yaml", **extra) -> Path:
    """DSB 2018's layout: ``stage1/<id>/images/<id>.png`` (``images``: RGB(A) order or grey) and two binary masks
    per image in ``<id>/masks/``; returns the dataset file."""
    for k, (iid, img) in enumerate(images.items()):
        d = tmp / "stage1" / iid
        (d / "images").mkdir(parents=True, exist_ok=True)
        (d / "masks").mkdir(parents=True, exist_ok=True)
        stored = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR if img.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
        assert cv2.imwrite(str(d / "images" / f"{iid}.png"), stored)
        for j in range(2):
            m = np.zeros(HW, np.uint8)
            m[2 + 8 * j:8 + 8 * j, 2 + k % 10:10 + k % 10] = 255
            assert cv2.imwrite(str(d / "masks" / f"nucleus{j}.png"), m)
    spec = {"root": "stage1", "splits": {"train": {"image": "{id}/images/{id}.png", "mask": "{id}/masks/*.png"}}}
    path = tmp / name
    path.write_text(yaml.safe_dump(spec | extra, sort_keys=False))
    return path


def images_by_id(ds) -> dict[str, np.ndarray]:
    split = ds.labelled()
    return dict(zip(split.ids, split.images))


# ------------------------------------------------------------------------------- mixed channel counts
def test_rgba_with_opaque_alpha_among_rgb_loads_and_the_same_picture_gives_the_same_array(tmp_path):
    p0, p1 = picture(0), picture(1)
    ds = load_dataset(write_dsb(tmp_path, {"a0": rgba(p0), "a1": p0, "a2": p1, "a3": rgba(p1)}))
    assert (ds.source_channels, ds.channels) == (3, [0, 1, 2])
    got = images_by_id(ds)
    np.testing.assert_array_equal(got["a0"], p0)  # RGB order, alpha gone
    np.testing.assert_array_equal(got["a0"], got["a1"])
    np.testing.assert_array_equal(got["a3"], got["a2"])
    # the one rule every caller uses: RGBA and RGB of the same picture -> the same input array
    np.testing.assert_array_equal(to_channels(rgba(p0), ds.channels, ds.source_channels), to_channels(p0, ds.channels,
                                                                                                       ds.source_channels))


def test_grey_among_colour_images_is_expanded(tmp_path):
    p0 = picture(2)
    grey = p0[:, :, 1].copy()
    ds = load_dataset(write_dsb(tmp_path, {"c0": p0, "g1": grey, "g2": np.dstack([grey] * 3), "g3": rgba(np.dstack([grey] * 3))}))
    assert (ds.source_channels, ds.in_channels) == (3, 3)
    got = images_by_id(ds)
    np.testing.assert_array_equal(got["c0"], p0)
    for g in ("g1", "g2", "g3"):  # grey stored as grey, as RGB and as RGBA: one array
        np.testing.assert_array_equal(got[g], np.dstack([grey] * 3))


def test_grey_stored_every_which_way_stays_one_channel(tmp_path):
    grey = picture(3)[:, :, 0].copy()
    ds = load_dataset(write_dsb(tmp_path, {"g0": grey, "g1": np.dstack([grey] * 3), "g2": rgba(np.dstack([grey] * 3))}))
    assert (ds.source_channels, ds.channels) == (1, [0])
    assert any("equal in every training image; using one (grey)" in n for n in ds.notes)
    got = images_by_id(ds)
    for g in ("g0", "g1", "g2"):
        np.testing.assert_array_equal(got[g][:, :, 0], grey)


@pytest.mark.parametrize("alpha", ["opaque", "varying"])
def test_explicit_rgb_channels_on_a_rgba_and_rgb_mix(tmp_path, alpha):
    p0, p1 = picture(4), picture(5)
    a = 255 if alpha == "opaque" else np.random.default_rng(9).integers(0, 256, HW, dtype=np.uint8)
    ds = load_dataset(write_dsb(tmp_path, {"m0": rgba(p0, a), "m1": p0, "m2": p1}, channels=[0, 1, 2]))
    assert (ds.source_channels, ds.channels) == (3, [0, 1, 2])
    got = images_by_id(ds)
    np.testing.assert_array_equal(got["m0"], p0)
    np.testing.assert_array_equal(got["m0"], got["m1"])
    picked = load_dataset(write_dsb(tmp_path / "two", {"m0": rgba(p0, a), "m1": p1}, channels=[2, 0]))
    np.testing.assert_array_equal(images_by_id(picked)["m0"], p0[:, :, [2, 0]])


def test_varying_alpha_among_rgb_is_one_line_error_naming_both_files_and_the_fix(tmp_path, main_cli,
                                                                                 assert_cli_error):
    p0, p1 = picture(6), picture(7)
    alpha = np.random.default_rng(3).integers(0, 256, HW, dtype=np.uint8)
    path = write_dsb(tmp_path, {"r0": p0, "v1": rgba(p1, alpha), "r2": p1})
    out = tmp_path / "folds" / "folds.csv"
    line = assert_cli_error(main_cli("make-folds", "--data", path, "--out", out), "r0.png", "v1.png",
                            "varying alpha", "channels: [0, 1, 2]")
    assert "r0/images/r0.png: has no alpha channel (RGB)" in line
    assert not out.exists() and not out.parent.exists()
    # the suggested setting works, and so does keeping alpha (255 where an image has none)
    fixed = load_dataset(write_dsb(tmp_path, {}, "fixed.yaml", channels=[0, 1, 2]))
    np.testing.assert_array_equal(images_by_id(fixed)["v1"], p1)
    kept = load_dataset(write_dsb(tmp_path, {}, "kept.yaml", channels=[0, 1, 2, 3]))
    assert (kept.source_channels, kept.in_channels) == (4, 4)
    assert any("have no alpha channel" in n for n in kept.notes)
    got = images_by_id(kept)
    np.testing.assert_array_equal(got["v1"], rgba(p1, alpha))
    np.testing.assert_array_equal(got["r0"], rgba(p0))


def test_varying_alpha_in_every_image_is_kept(tmp_path):
    rng = np.random.default_rng(4)
    imgs = {f"v{i}": rgba(picture(10 + i), rng.integers(0, 256, HW, dtype=np.uint8)) for i in range(2)}
    ds = load_dataset(write_dsb(tmp_path, imgs))
    assert (ds.source_channels, ds.channels) == (4, [0, 1, 2, 3])
    np.testing.assert_array_equal(images_by_id(ds)["v1"], imgs["v1"])


def test_explicit_index_past_the_images_channels(tmp_path):
    with pytest.raises(DataError, match=r"channels: index 3 but the images have 3 channel\(s\) \(RGB\)"):
        load_dataset(write_dsb(tmp_path, {"x0": picture(0)}, channels=[0, 3]))


# ------------------------------------------------------------------------------- the per-image rule
def test_to_channels_brings_any_image_into_the_space():
    p = picture(8)
    lum = cv2.cvtColor(p, cv2.COLOR_RGB2GRAY)
    np.testing.assert_array_equal(to_channels(p, [0], 1)[:, :, 0], lum)  # colour in a grey space: luminance
    np.testing.assert_array_equal(to_channels(rgba(p, 7), [0], 1)[:, :, 0], lum)
    g = p[:, :, 0]
    for stored in (g, g[:, :, None], np.dstack([g] * 3), rgba(np.dstack([g] * 3))):
        np.testing.assert_array_equal(to_channels(stored, [0], 1)[:, :, 0], g)  # grey stored every way
        np.testing.assert_array_equal(to_channels(stored, [0, 1, 2], 3), np.dstack([g] * 3))
    np.testing.assert_array_equal(to_channels(p, [0, 1, 2, 3], 4), rgba(p))  # no alpha: opaque
    np.testing.assert_array_equal(to_channels(rgba(p, 9), [1, 0], 3), p[:, :, [1, 0]])
    np.testing.assert_array_equal(to_channels(np.dstack([g, p[:, :, 1]]), [0, 3], 4)[:, :, 1], p[:, :, 1])  # LA
    assert to_channels(p.astype(np.uint16) * 257, [0, 1, 2, 3], 4)[0, 0, 3] == 65535
    with pytest.raises(DataError, match=r"images\[3\]: shape \(20, 24, 5\)"):
        to_channels(np.zeros((*HW, 5), np.uint8), [0], 3, "images[3]")


@pytest.mark.parametrize("info, expected", [
    ({"in_channels": 2, "channels": [0, 1], "source_channels": 3}, ([0, 1], 3)),
    ({"in_channels": 1, "channels": [0], "source_channels": 3}, ([0], 3)),  # a red channel picked from colour
    ({"in_channels": 1, "channels": [0], "source_channels": 1}, ([0], 1)),
    ({"in_channels": 1, "channels": "grey"}, ([0], 1)),  # a config without dataset.json
    ({"in_channels": 3, "channels": "rgb"}, ([0, 1, 2], 3)),
    ({"in_channels": 2, "channels": [0, 2]}, ([0, 2], 3)),  # dataset.json before source_channels
    ({"in_channels": 4, "channels": "4ch"}, ([0, 1, 2, 3], 4)),
])
def test_channel_rule_of_a_run(info, expected):
    assert channel_rule(info) == expected


def test_predict_side_converts_images_like_training():
    """prepare_image with the run's channel space (dataset.json source_channels) applies the training rule: an
    RGBA image with constant alpha, its RGB twin and a grey image stored as RGB all give the training array."""
    from kagglecmr.engine.predictor import prepare_image

    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((12, 10, 1), 255, np.uint8)], axis=2)
    a = prepare_image(rgba, 3, (12, 10), keep=[0, 1, 2], source=3)
    b = prepare_image(rgb, 3, (12, 10), keep=[0, 1, 2], source=3)
    assert np.array_equal(a, b) and np.array_equal(a, to_channels(rgb, [0, 1, 2], 3))
    grey = rng.integers(0, 256, (12, 10), dtype=np.uint8)
    assert np.array_equal(prepare_image(grey, 3, (12, 10), keep=[0, 1, 2], source=3), np.repeat(grey[:, :, None], 3, 2))
    # a grey-space run given a colour image: its luminance, as training turned colour into grey
    lum = prepare_image(rgb, 1, (12, 10), keep=[0], source=1)
    assert np.array_equal(lum, to_channels(rgb, [0], 1))
