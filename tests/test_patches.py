"""Patch training (data.patch, data.fg_oversample) and the step cap (train.max_steps)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from kagglecmr.cfg.config import load_config
from kagglecmr.data.batches import BatchMaker
from kagglecmr.data.patches import IGNORE, class_locations, crop, crop_batch, crop_corners
from kagglecmr.utils.errors import ConfigError


def _data(n=6, h=40, w=60, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, h, w, 1), dtype=np.uint8)
    masks = np.zeros((n, h, w), np.uint8)
    for i in range(n - 1):  # the last image has no foreground
        masks[i, 5 + i:9 + i, 40:44] = 1 + i % 3  # one small object far from the centre
    return images, masks


def test_class_locations_lists_each_present_foreground_class():
    _, masks = _data()
    loc = class_locations(masks)
    assert [sorted(d) for d in loc] == [[1], [2], [3], [1], [2], []]
    ys, xs = np.divmod(loc[0][1], masks.shape[2])
    assert (masks[0, ys, xs] == 1).all() and len(loc[0][1]) == 16


def test_foreground_share_of_crops_holds_foreground_and_crops_stay_inside():
    images, masks = _data()
    loc = class_locations(masks)
    rng = np.random.default_rng(0)
    idx = np.array([0, 1, 2, 3, 4, 0])
    for _ in range(20):
        corners = crop_corners(idx, (40, 60), (16, 16), loc, 0.5, rng)
        for j, (y, x) in enumerate(corners):
            assert 0 <= y <= 24 and 0 <= x <= 44
            if j >= 3:  # the last half: centred on foreground
                assert masks[idx[j], y:y + 16, x:x + 16].any()
    # no foreground share: uniform crops (most miss the tiny objects)
    hits = [masks[0, y:y + 16, x:x + 16].any() for y, x in crop_corners(np.zeros(200, int), (40, 60), (16, 16), loc,
                                                                          0.0, rng)]
    assert 0 < np.mean(hits) < 0.5


def test_patch_larger_than_the_image_is_padded_with_zero_and_ignore():
    images, masks = _data(h=20, w=30)
    corners = crop_corners(np.array([0, 1]), (20, 30), (32, 32), class_locations(masks), 0.5, np.random.default_rng(0))
    assert corners == [(-6, -1), (-6, -1)]
    xs, ys = crop_batch(images[:2], masks[:2], corners, (32, 32))
    assert xs.shape == (2, 32, 32, 1) and ys.shape == (2, 32, 32)
    assert (ys[:, :6] == IGNORE).all() and (ys[:, 26:] == IGNORE).all() and (xs[:, :6] == 0).all()
    assert np.array_equal(xs[0, 6:26, 1:31], images[0]) and np.array_equal(ys[0, 6:26, 1:31], masks[0])
    assert np.array_equal(crop(masks[0], 2, 3, (5, 7), 0), masks[0, 2:7, 3:10])


@pytest.mark.parametrize("backend", ["albumentations", "torch"])
def test_batch_maker_returns_patches_on_both_backends(backend):
    images, masks = _data()
    cfg = load_config("demo", ["data.patch=[16, 24]", f"augment.backend={backend}", "data.fg_oversample=1.0"])
    maker = BatchMaker(cfg, images, masks, torch.device("cpu"))
    maker.reseed(3)
    x, y = maker(np.array([0, 1, 2, 3]))
    assert tuple(x.shape) == (4, 1, 16, 24) and tuple(y.shape) == (4, 16, 24)
    assert all((y[k] > 0).any() for k in range(4))  # every crop centred on its object (fg_oversample 1)
    maker.reseed(3)
    x2, y2 = maker(np.array([0, 1, 2, 3]))
    assert torch.equal(x, x2) and torch.equal(y, y2)  # seeded


def test_patch_settings_are_validated():
    with pytest.raises(ConfigError):
        load_config("demo", ["data.patch=4"])
    with pytest.raises(ConfigError):
        load_config("demo", ["data.fg_oversample=1.5"])
    assert load_config("demo", ["data.patch=64"]).data.patch_hw == (64, 64)
    assert load_config("demo").data.patch_hw is None and load_config("demo").train.max_steps is None


@pytest.mark.slow
def test_patch_training_and_the_step_cap(project, tmp_path, main_cli):
    args = ["train", "--fold", "0", "--config", project.config, "--data", project.data, "--folds", project.folds,
            "--runs-dir", tmp_path, "--quiet", "--device", "cpu"]
    proc = main_cli(*args, "--name", "patch", "--set", "data.patch=[48, 64]", "--set", "train.epochs=2")
    assert proc.returncode == 0, proc.stderr
    metrics = pd.read_csv(tmp_path / "patch" / "fold0" / "metrics.csv")
    assert len(metrics) == 2 and metrics["val_dice"].notna().all()  # validated on whole images
    # 20 training images, batch 8 -> 2 steps an epoch; a cap of 3 steps stops in the second of 5 epochs
    proc = main_cli(*args, "--name", "cap", "--set", "train.epochs=5", "--set", "train.max_steps=3")
    assert proc.returncode == 0, proc.stderr
    metrics = pd.read_csv(tmp_path / "cap" / "fold0" / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2]
    assert (tmp_path / "cap" / "fold0" / "oof.npz").is_file() and (tmp_path / "cap" / "fold0" / "summary.json").is_file()


def test_patch_the_size_of_the_image_trains_exactly_as_whole_images(project, tmp_path, main_cli):
    """Issue 24: data.patch equal to the image size changes nothing (same batches, same metrics)."""
    args = ["train", "--fold", "0", "--config", project.config, "--data", project.data, "--folds", project.folds,
            "--runs-dir", tmp_path, "--quiet", "--device", "cpu", "--set", "train.epochs=2", "--set", "train.threads=1"]
    side = load_config(project.config).data.hw
    assert main_cli(*args, "--name", "whole").returncode == 0
    proc = main_cli(*args, "--name", "same", "--set", f"data.patch=[{side[0]}, {side[1]}]")
    assert proc.returncode == 0, proc.stderr
    cols = ["epoch", "train_loss", "val_loss", "val_dice"]
    whole = pd.read_csv(tmp_path / "whole" / "fold0" / "metrics.csv")[cols]
    same = pd.read_csv(tmp_path / "same" / "fold0" / "metrics.csv")[cols]
    pd.testing.assert_frame_equal(whole, same)
