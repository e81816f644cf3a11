"""The competition's metric (kagglecmr.formats.competition_metric): hand-computed cases for every mode."""

from __future__ import annotations

import numpy as np
import pytest

from kagglecmr.formats.competition_metric import Metric, MetricTable
from kagglecmr.formats.metric import dice_table
from kagglecmr.utils.errors import ConfigError


def _square(h, w, y0, y1, x0, x1, value=1, base=None):
    m = np.zeros((h, w), np.uint8) if base is None else base.copy()
    m[y0:y1, x0:x1] = value
    return m


def test_default_is_todays_dice_table():
    rng = np.random.default_rng(0)
    pred, true = rng.integers(0, 4, (6, 20, 24)), rng.integers(0, 4, (6, 20, 24))
    true[2] = 0
    pred[2] = 0  # an all-empty image: empty/empty rows score 1
    t = Metric().table_labels(pred, true, 4)
    np.testing.assert_allclose(t.rows, dice_table(pred, true, 4))
    assert t.score == pytest.approx(dice_table(pred, true, 4).mean())
    np.testing.assert_allclose(t.per_class, dice_table(pred, true, 4).mean(0))


def test_dice_and_iou_by_hand():
    # truth: 4x4 square (16 px); prediction: 4x2 half of it (8 px) -> Dice 2*8/24, IoU 8/16
    true = _square(10, 10, 0, 4, 0, 4)
    pred = _square(10, 10, 0, 4, 0, 2)
    assert Metric("dice").table_labels(pred, true, 2).score == pytest.approx(16 / 24)
    assert Metric("iou").table_labels(pred, true, 2).score == pytest.approx(0.5)


def test_empty_rule():
    z = np.zeros((1, 5, 5), np.uint8)
    assert Metric(empty=1).table_labels(z, z, 2).score == 1.0
    assert Metric(empty=0).table_labels(z, z, 2).score == 0.0
    one = z.copy()
    one[0, 0, 0] = 1
    assert Metric(empty=1).table_labels(one, z, 2).score == 0.0  # false positive on an empty truth


def test_per_dataset_sums_counts_over_images():
    # image 0: class 1 perfect (100 px); image 1: class 1 truth 4 px, prediction empty
    t0 = _square(10, 10, 0, 10, 0, 10)
    t1 = _square(10, 10, 0, 2, 0, 2)
    p0, p1 = t0.copy(), np.zeros_like(t1)
    pred, true = np.stack([p0, p1]), np.stack([t0, t1])
    row = Metric("iou", per="row").table_labels(pred, true, 2)
    ds = Metric("iou", per="dataset").table_labels(pred, true, 2)
    assert row.score == pytest.approx((1.0 + 0.0) / 2)
    assert ds.score == pytest.approx(100 / 104)  # sum inter / sum union
    img = Metric("iou", per="image").table_labels(pred, true, 2)
    assert img.score == pytest.approx(row.score)


def test_per_dataset_class_never_present_scores_empty():
    true = np.zeros((2, 4, 4), np.uint8)
    pred = true.copy()
    true[0, 0, 0] = pred[0, 0, 0] = 1
    t = Metric("iou", per="dataset").table_labels(pred, true, 3)
    np.testing.assert_allclose(t.per_class, [1.0, 1.0])
    assert Metric("iou", per="dataset", empty=0).table_labels(pred, true, 3).per_class[1] == 0.0


def test_map_iou_one_object_tgs_rules():
    m = Metric("map_iou")
    true = _square(10, 10, 0, 10, 0, 10)  # 100 px
    pred = _square(10, 10, 0, 10, 0, 7)   # 70 px -> IoU 0.7: above 0.5, 0.55, 0.6, 0.65 -> 4 of 10
    assert m.table_labels(pred, true, 2).score == pytest.approx(0.4)
    z = np.zeros((10, 10), np.uint8)
    assert m.table_labels(z, z, 2).score == 1.0          # empty truth, empty prediction
    assert m.table_labels(true, z, 2).score == 0.0       # empty truth, a prediction
    assert m.table_labels(z, true, 2).score == 0.0       # a truth, nothing predicted
    exact = _square(20, 20, 0, 20, 0, 19)                # IoU 0.95 is not above 0.95 -> 9 of 10
    assert m.table_labels(exact, _square(20, 20, 0, 20, 0, 20), 2).score == pytest.approx(0.9)


def test_map_iou_components_dsb_style():
    m = Metric("map_iou", objects="components")
    true = _square(20, 20, 0, 5, 0, 5)
    true = _square(20, 20, 10, 15, 10, 15, base=true)           # two nuclei
    pred = _square(20, 20, 0, 5, 0, 5)                          # finds the first exactly
    pred = _square(20, 20, 17, 19, 17, 19, base=pred)           # and a false positive
    # at every threshold: TP 1, FP 1, FN 1 -> 1/3
    assert m.table_labels(pred, true, 2).score == pytest.approx(1 / 3)
    # as one mask the same pair has IoU 25/54 < 0.5 -> 0
    assert Metric("map_iou").table_labels(pred, true, 2).score == 0.0
    # diagonal neighbours are one 8-connected object
    diag = np.zeros((4, 4), np.uint8)
    diag[0, 0] = diag[1, 1] = 1
    assert m.component_score(diag.astype(bool), diag.astype(bool)) == 1.0


def test_ignore_leaves_void_pixels_out():
    true = _square(10, 10, 0, 4, 0, 4)
    pred = _square(10, 10, 0, 4, 0, 8)      # 16 false-positive pixels in columns 4..7
    void = np.zeros((10, 10), bool)
    void[:, 4:] = True
    assert Metric().table_labels(pred, true, 2).score == pytest.approx(2 * 16 / 48)
    assert Metric().table_labels(pred, true, 2, ignore=void).score == 1.0


def test_scored_classes_may_include_background():
    true = np.stack([_square(4, 4, 0, 2, 0, 4)])
    pred = np.stack([_square(4, 4, 0, 2, 0, 4)])
    t = Metric("iou", per="dataset").table_labels(pred, true, 2, classes=[0, 1])
    assert t.classes == (0, 1)
    np.testing.assert_allclose(t.per_class, [1.0, 1.0])


def test_multilabel_masks_overlap():
    a = _square(10, 10, 0, 6, 0, 6).astype(bool)
    b = _square(10, 10, 4, 10, 4, 10).astype(bool)  # overlaps a at [4:6, 4:6]
    true = np.stack([a, b])[None]
    pred = np.stack([a, np.zeros_like(b)])[None]
    t = Metric().table_masks(pred, true)
    np.testing.assert_allclose(t.rows, [[1.0, 0.0]])
    assert t.score == 0.5


def test_table_subset_and_concat():
    rng = np.random.default_rng(1)
    pred, true = rng.integers(0, 3, (5, 8, 8)), rng.integers(0, 3, (5, 8, 8))
    m = Metric("dice", per="dataset")
    full = m.table_labels(pred, true, 3)
    joined = MetricTable.concat([full[[0, 1]], full[2:]])
    assert joined.score == pytest.approx(full.score)
    assert len(full[3]) == 1


@pytest.mark.parametrize("bad, msg", [
    ({"name": "f1"}, "metric.name"),
    ({"per": "class"}, "metric.per"),
    ({"empty": 0.5}, "metric.empty"),
    ({"name": "map_iou", "per": "dataset"}, "metric.per"),
    ({"name": "map_iou", "thresholds": [0.9, 0.5, 0.05]}, "metric.thresholds"),
    ({"objects": "blobs"}, "metric.objects"),
    ({"nmae": "dice"}, "unknown key 'nmae'"),
])
def test_from_dict_errors_are_one_line(bad, msg):
    with pytest.raises(ConfigError, match=msg) as exc:
        Metric.from_dict(bad, "ds.yaml")
    assert "\n" not in str(exc.value) and str(exc.value).startswith("ds.yaml")


def test_from_dict_round_trip():
    for d in ({}, {"name": "iou", "per": "dataset"}, {"name": "map_iou", "objects": "components", "empty": 0}):
        m = Metric.from_dict(d)
        assert Metric.from_dict(m.to_dict()) == m
    assert Metric.from_dict(None) == Metric()
    assert Metric.from_dict("iou").name == "iou"
