"""Void labels (a dataset file's ``ignore:``): decoded as VOID (255) and left out of the metric, ``score``, fold
statistics, patch locations, augmentation borders, postprocessing tuning and submission rows."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_dataset import rgb, write_dataset, write_png

from kagglecmr.cfg.config import AugmentConfig
from kagglecmr.data.augment import TorchAugment, build_albumentations
from kagglecmr.data.dataset import described_metric, load_dataset
from kagglecmr.data.folds import fold_features
from kagglecmr.data.patches import class_locations
from kagglecmr.engine.evaluator import run_score_dataset
from kagglecmr.engine.postprocess import tune_plan
from kagglecmr.formats.competition_metric import VOID, Metric
from kagglecmr.formats.submission_csv import write_submission
from kagglecmr.utils.errors import DataError

HW = (24, 32)


def raw_mask(i: int) -> np.ndarray:
    """Raw values: 0 background, 1 and 2 rectangles, 11 (void) on the right edge and in a corner square."""
    rng = np.random.default_rng(i)
    m = np.zeros(HW, np.uint8)
    for v in (1, 2):
        y, x = rng.integers(0, HW[0] - 6), rng.integers(0, HW[1] - 10)
        m[y:y + 6, x:x + 6] = v
    m[:, -3:] = 11
    m[:3, :3] = 11
    return m


def void_dataset(tmp, n: int = 8, **extra):
    for i in range(n):
        write_png(tmp / "data" / "img" / f"c{i}.png", rgb(i, HW)[:, :, ::-1])
        write_png(tmp / "data" / "gt" / f"c{i}.png", raw_mask(i))
    spec = {"name": "voids", "root": "data", "classes": ["background", "a", "b"],
            "splits": {"train": {"image": "img/{id}.png", "mask": "gt/{id}.png"}}, "ignore": [11]}
    return write_dataset(tmp, {k: v for k, v in (spec | extra).items() if v is not None})


def test_ignore_decodes_void_and_maps_the_other_values_as_before(tmp_path):
    ds = load_dataset(void_dataset(tmp_path))
    assert ds.num_classes == 3 and ds.mask_values == {0: 0, 1: 1, 2: 2} and ds.ignore == (11,)
    masks = ds.labelled().masks
    raw = np.stack([raw_mask(i) for i in range(8)])
    np.testing.assert_array_equal(masks, np.where(raw == 11, VOID, raw))
    d = ds.describe()
    assert d["ignore"] == [11] and d["metric"] == {"name": "dice", "per": "row", "empty": 1}
    assert described_metric(d) == Metric(classes=(1, 2))
    # written back (predictions never hold VOID): the dataset's own values, never the void value
    assert set(np.unique(ds.to_raw(np.where(masks[0] == VOID, 1, masks[0])))) <= {0, 1, 2}
    # the same as a mask_values entry
    other = load_dataset(void_dataset(tmp_path / "b", ignore=None, mask_values={0: 0, 1: 1, 2: 2, 11: "ignore"}))
    assert other.ignore == (11,) and other.num_classes == 3
    np.testing.assert_array_equal(other.labelled().masks, masks)
    # without it, auto cannot map 0, 1, 2, 11 to the three classes (as before)
    with pytest.raises(DataError, match="mask_values auto cannot map"):
        load_dataset(void_dataset(tmp_path / "c", ignore=None))
    with pytest.raises(DataError, match="ignore") as err:
        load_dataset(void_dataset(tmp_path / "d", ignore=["eleven"]))
    assert "\n" not in str(err.value)


def test_metric_key_is_checked_and_described(tmp_path):
    ds = load_dataset(void_dataset(tmp_path, metric={"name": "iou", "per": "dataset"}))
    assert ds.metric == Metric("iou", per="dataset", classes=(1, 2))
    assert described_metric(ds.describe()) == ds.metric
    old = {k: v for k, v in ds.describe().items() if k != "metric"}  # a run recorded before metrics: Dice
    assert described_metric(old) == Metric(classes=(1, 2)) and described_metric(None) == Metric()
    with pytest.raises(DataError, match=r"ds.yaml: metric: per: 'pixel'") as err:
        load_dataset(void_dataset(tmp_path / "b", metric={"name": "iou", "per": "pixel"}))
    assert "\n" not in str(err.value)


def test_score_leaves_void_pixels_out(tmp_path, capsys):
    path = void_dataset(tmp_path, metric={"name": "iou", "per": "dataset"})
    ds = load_dataset(path)
    truth = {i: ds.read_mask(mp) for i, _, mp in ds.items("train")}
    pred = {i: np.where(m == VOID, 2, m) for i, m in truth.items()}  # class 2 over every void pixel: no error
    rows = [row for i, m in pred.items() for row in ds.submission.rows(i, m, 3)]
    sub = tmp_path / "sub.csv"
    write_submission(rows, sub, shape={i: m.shape for i, m in pred.items()}, fmt=ds.submission)
    result = run_score_dataset(sub, data=path, as_json=True)
    printed = json.loads(capsys.readouterr().out)
    assert result.score == 1.0 and printed["score"] == 1.0 and result.pixel_accuracy == 1.0
    assert printed["metric"] == {"name": "iou", "per": "dataset", "empty": 1}
    # a mask holding void encodes it in no row (encode, and the truth rows score reads)
    void = truth["c0"] == VOID
    for _, enc in ds.submission.rows("c0", truth["c0"], 3):
        assert not (ds.submission.decode(enc, HW) & void).any()


def test_fold_statistics_and_patch_locations_leave_void_out():
    masks = np.zeros((3, 8, 8), np.uint8)
    masks[:, :4] = VOID
    masks[0, 5, 5] = 1
    masks[1, 6:, 6:] = 2
    feats = fold_features(masks, 3, n_folds=2)
    assert feats["area_1"].tolist() == [1, 0, 0] and feats["area_2"].tolist() == [0, 4, 0]
    assert feats["fg_area"].tolist() == [1, 4, 0]
    locs = class_locations(masks)
    assert [sorted(d) for d in locs] == [[1], [2], []]


@pytest.mark.parametrize("fill", [0, VOID])
def test_augmentation_border_is_void_where_asked(fill):
    cfg = AugmentConfig(hflip=0, vflip=0, affine=1.0, rotate=0, scale=(1.0, 1.0), translate=0.4, intensity=0,
                        gamma=0)
    mask = np.ones((32, 32), np.uint8)
    image = np.full((32, 32, 1), 100, np.uint8)
    pipe = build_albumentations(cfg, seed=3, mask_fill=fill)
    seen = set()
    for _ in range(8):
        seen |= set(np.unique(pipe(image=image, mask=mask)["mask"]).tolist())
    assert seen == {1, fill}
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 1, 32, 32), torch.ones(8, 32, 32, dtype=torch.long)
    _, yo = TorchAugment(cfg, mask_fill=fill)(x, y, g)
    assert set(torch.unique(yo).tolist()) == {1, fill}


def test_postprocessing_tuning_ignores_strays_on_void_pixels():
    true = np.zeros((12, 32, 32), np.uint8)
    true[:, 8:20, 8:20] = 1
    pred = true.copy()
    pred[::2, 26:28, 26:28] = 1  # 4-px strays
    void = true.copy()
    void[:, 24:, 24:] = VOID  # ... where nothing is labelled
    for metric in (Metric(), Metric("iou", per="dataset")):
        plan, before, after, _ = tune_plan(pred, true, 2, metric=metric)
        assert plan["1"]["kind"] == "min_area" and after > before
        plan, before, after, _ = tune_plan(pred, void, 2, metric=metric)
        assert plan == {"1": {"kind": "none"}} and before == after == 1.0


REAL_CAMVID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"


@pytest.mark.skipif(not (REAL_CAMVID / "trainannot").is_dir(), reason="real CamVid data not present")
def test_shipped_camvid_file():
    from kagglecmr.cfg.config import SHIPPED_DATASETS, load_config
    from kagglecmr.data.dataset import recipe_for

    path = SHIPPED_DATASETS / "camvid.yaml"
    ds = load_dataset(path)
    assert ds.num_classes == 11 and ds.classes[0] == "sky" and ds.ignore == (11,)
    assert ds.mask_values == {v: v for v in range(11)} and ds.size == (360, 480) and ds.in_channels == 3
    assert ds.metric == Metric("iou", per="dataset", classes=tuple(range(11)))  # sky scored too
    assert {s: len(ds.items(s)) for s in ds.split_names()} == {"train": 367, "val": 101, "test": 233}
    assert ds.has_masks("test") and ds.has_masks("val")
    i, _, mp = ds.items("test")[0]
    raw = cv2.imread(str(mp), cv2.IMREAD_UNCHANGED)
    m = ds.read_mask(mp)
    assert (raw == 11).any() and np.array_equal(m == VOID, raw == 11) and m[raw != 11].max() <= 10
    rows = dict(ds.submission.rows(i, np.where(m == VOID, 0, m), 11))
    assert len(rows) == 11 and f"{i}_10" in rows and ds.submission.parse_row_id(f"{i}_10") == (i, 10)
    groups = ds.groups([j for s in ("train", "val") for j, _, _ in ds.items(s)])
    assert len(set(groups)) == 117 and max(groups.count(g) for g in set(groups)) == 50
    assert recipe_for(path) == "camvid" and load_config("camvid").data.hw == (240, 320)
