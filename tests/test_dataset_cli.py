"""End to end on a generated non-CMR competition through the command line: 2 classes, RGB, 0/255 masks,
non-square images of mixed sizes with ``size``, its own submission format: make-folds -> train (tiny
config, 1 epoch, 2 folds) -> ensemble --split test (written at each image's own size, scored) -> score -> encode."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import yaml

from kagglecmr.data.dataset import load_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = """\
seed: 3
model:
  arch: Unet
  encoder: resnet18
  weights: none
  params: {encoder_depth: 3, decoder_channels: [16, 8, 4]}
loss: {name: dice_ce}
augment: {hflip: 0.5, vflip: 0.5, rot90: 0.5, affine: 0.5, rotate: 15}
train: {epochs: 1, batch_size: 4, lr: 0.003, warmup_epochs: 0, amp: none, val_batch_size: 8}
infer: {tta: [none, hflip, vflip, hvflip]}
"""
SIZES = [(36, 52), (40, 60)]  # (H, W) on disk, alternating


def make_competition(root, n_train=12, n_test=4):
    """Green-ish tissue with bright blobs (the class), blue channel empty; masks 0/255."""
    rng = np.random.default_rng(0)
    for split, n in (("Train", n_train), ("Test", n_test)):
        for i in range(n):
            h, w = SIZES[i % 2]
            img = np.zeros((h, w, 3), np.uint8)
            img[:, :, 1] = rng.integers(40, 90, (h, w))
            img[:, :, 0] = rng.integers(0, 40, (h, w))
            mask = np.zeros((h, w), np.uint8)
            for _ in range(2):
                cy, cx, r = rng.integers(8, h - 8), rng.integers(8, w - 8), int(rng.integers(4, 8))
                cv2.circle(mask, (int(cx), int(cy)), r, 255, -1)
            img[mask > 0, 0] = 220
            (root / split).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / split / f"tile_{i:02d}.png"), img[:, :, ::-1])
            cv2.imwrite(str(root / split / f"tile_{i:02d}_anno.png"), mask)


def test_any_competition_end_to_end(tmp_path, main_cli):
    make_competition(tmp_path / "raw")
    ds_path = tmp_path / "glands.yaml"
    ds_path.write_text(yaml.safe_dump({
        "name": "glands", "root": "raw", "classes": ["background", "gland"],
        "splits": {"train": {"image": "Train/tile_{id}.png", "mask": "Train/tile_{id}_anno.png"},
                   "test": {"image": "Test/tile_{id}.png", "mask": "Test/tile_{id}_anno.png"}},
        "size": [32, 48],
        "submission": {"id": "{id}", "header": ["ImageId", "EncodedPixels"], "order": "column", "start": 1},
    }))
    (tmp_path / "tiny.yaml").write_text(TINY)

    folds = main_cli("make-folds", "--data", ds_path, "--n-folds", "2", "--out", tmp_path / "folds.csv")
    assert folds.returncode == 0, folds.stderr
    assert "dropping channel(s) B" in folds.stdout and "groups: similarity guard" in folds.stdout

    train = main_cli("train", "--fold", "0..1", "--config", tmp_path / "tiny.yaml", "--data", ds_path,
                     "--folds", tmp_path / "folds.csv", "--runs-dir", tmp_path / "runs", "--device", "cpu", "--quiet")
    assert train.returncode == 0, train.stderr
    fold0 = tmp_path / "runs" / "tiny" / "fold0"
    described = json.loads((fold0 / "dataset.json").read_text())
    assert described["size"] == [32, 48] and described["channels"] == [0, 1] and described["num_classes"] == 2
    from kagglecmr.models.checkpoint import load_best

    _, meta = load_best(fold0 / "best.safetensors")
    assert json.loads(meta["dataset"]) == described
    assert yaml.safe_load((fold0 / "config.yaml").read_text())["data"]["size"] == [32, 48]

    sub = tmp_path / "sub.csv"
    ens = main_cli("ensemble", "--runs", tmp_path / "runs" / "tiny", "--data", ds_path, "--split", "test",
                   "--tta", "--out", sub, "--save-masks", tmp_path / "masks", "--device", "cpu")
    assert ens.returncode == 0, ens.stderr
    line = next(x for x in ens.stdout.splitlines() if x.startswith("test Dice:"))
    assert "IoU" in line and "pixel accuracy" in line

    ds = load_dataset(ds_path)
    fmt = ds.submission
    lines = sub.read_text().splitlines()
    assert lines[0] == "ImageId,EncodedPixels"
    rows = dict(x.split(",", 1) for x in lines[1:])
    assert list(rows) == ["00", "01", "02", "03"]  # one row per image (binary task)
    for k, (i, enc) in enumerate(rows.items()):
        hw = SIZES[k % 2]
        saved = cv2.imread(str(tmp_path / "masks" / f"{i}_mask.png"), cv2.IMREAD_UNCHANGED)
        assert saved.shape == hw and set(np.unique(saved)) <= {0, 255}  # own size, own values
        np.testing.assert_array_equal(fmt.decode(enc, hw), saved == 255)

    scored = main_cli("score", sub, "--data", ds_path, "--split", "test", "--json")
    assert scored.returncode == 0, scored.stderr
    result = json.loads(scored.stdout)
    assert f"{result['score']:.4f}" == line.split()[2]
    assert {"iou", "pixel_accuracy"} <= set(result)

    # out-of-fold: the printed own-size line is what the leaderboard metric gives the written OOF CSV
    oof = main_cli("ensemble", "--runs", tmp_path / "runs" / "tiny", "--data", ds_path, "--split", "oof", "--tta",
                   "--postprocess", "none", "--out", tmp_path / "oof.csv", "--device", "cpu")
    assert oof.returncode == 0, oof.stderr
    own = next(x for x in oof.stdout.splitlines() if x.startswith("OOF at each image's own size"))
    scored_oof = main_cli("score", tmp_path / "oof.csv", "--data", ds_path, "--json")
    assert scored_oof.returncode == 0, scored_oof.stderr
    assert f"Dice: {json.loads(scored_oof.stdout)['score']:.4f} " in own

    again = main_cli("encode", tmp_path / "masks", "--data", ds_path, "--out", tmp_path / "again.csv")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again.csv").read_text() == sub.read_text()

    # the run report reads the worst out-of-fold images through the same dataset file
    report = main_cli("report", tmp_path / "runs" / "tiny", "--data", ds_path)
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "runs" / "tiny" / "report.html").read_text()
    assert "images not shown" not in page
    assert "truth mask (left)" in page or "true mask (left)" in page
