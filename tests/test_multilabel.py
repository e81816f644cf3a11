"""Overlapping classes (``task: multilabel``): packed masks, thresholds, rows per class, per-class mask files,
labels CSVs with overlapping rows, folds on per-class presence and the multilabel losses (generated data)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import yaml

from kagglecmr.data.dataset import load_dataset
from kagglecmr.data.demo_multilabel import CLASSES, make_multilabel_demo
from kagglecmr.data.folds import fold_features
from kagglecmr.engine.multilabel_post import apply_rules, decode_plan, tune_multilabel_plan
from kagglecmr.engine.postprocess import describe_plan, validate_plan
from kagglecmr.formats.competition_metric import Metric
from kagglecmr.formats.multilabel import (
    MultilabelFormat,
    class_mask,
    decode,
    label_names,
    pack,
    table,
    tune_thresholds,
    unpack,
)
from kagglecmr.models.losses import IGNORE
from kagglecmr.models.losses_multilabel import build_multilabel_loss, unpack_targets
from kagglecmr.utils.errors import ConfigError, DataError


def squares(h=12, w=10):
    """Two overlapping squares: class 1 rows 1..6, class 2 rows 4..9 (overlap rows 4..6)."""
    m = np.zeros((2, h, w), bool)
    m[0, 1:7, 1:7] = True
    m[1, 4:10, 3:9] = True
    return m


# ------------------------------------------------------------------------------------------ formats
def test_pack_unpack_keeps_overlapping_classes():
    m = squares()
    packed = pack(m)
    assert packed.dtype == np.uint8 and packed[5, 4] == 3 and packed[1, 1] == 1 and packed[9, 8] == 2
    np.testing.assert_array_equal(unpack(packed, 2), m)
    np.testing.assert_array_equal(class_mask(packed, 2), m[1])
    with pytest.raises(ValueError, match="at most 7"):
        pack(np.zeros((8, 2, 2)))


def test_decode_cuts_each_class_at_its_threshold():
    probs = np.zeros((2, 4, 4), np.float32)
    probs[0, :2] = 0.6  # class 1: above 0.5, below 0.7
    probs[1, :, :2] = 0.9  # class 2
    np.testing.assert_array_equal(unpack(decode(probs), 2)[0], probs[0] > 0.5)
    both = decode(probs)
    assert both[0, 0] == 3 and both[3, 3] == 0  # both classes at once where both are above
    assert not class_mask(decode(probs, {"1": 0.7}), 1).any() and class_mask(decode(probs, {"1": 0.7}), 2).any()


def test_table_is_dice_per_image_and_class_empty_scores_one():
    true = pack(squares())[None]
    pred = pack(np.stack([squares()[0], np.zeros((12, 10), bool)]))[None]  # class 2 missed
    t = table(pred, true, 2)
    assert t.rows.shape == (1, 2) and t.rows[0, 0] == 1.0 and t.rows[0, 1] == 0.0 and t.score == 0.5
    empty = np.zeros((1, 12, 10), np.uint8)
    assert table(empty, empty, 2).score == 1.0
    a, b = squares()
    iou = (a & b).sum() / (a | b).sum()
    t2 = table(pack(np.stack([a, a]))[None], pack(np.stack([a, b]))[None], 2, Metric(name="iou"))
    assert t2.rows[0, 0] == 1.0 and t2.rows[0, 1] == pytest.approx(iou)


def test_rows_per_class_round_trip_through_the_format():
    fmt = MultilabelFormat.from_dict({"id": "{id}_{name}", "header": ["Image_Label", "EncodedPixels"]},
                                     num_classes=3, class_names=label_names(["a", "b"]))
    m = squares()
    rows = fmt.rows("img7", pack(m), 2)
    assert [r for r, _ in rows] == ["img7_a", "img7_b"]  # one row per class, overlap in both
    for (rid, enc), truth in zip(rows, m):
        image, c = fmt.parse_row_id(rid)
        assert image == "img7" and c in (1, 2)
        np.testing.assert_array_equal(fmt.decode(enc, truth.shape), truth)
    numbered = MultilabelFormat.from_dict(None, num_classes=3, class_names=label_names(["a", "b"]))
    assert [r for r, _ in numbered.rows("x", pack(m), 2)] == ["x_mask1", "x_mask2"]  # {class} counts from 1


def test_thresholds_tuned_per_class_with_the_metric():
    rng = np.random.default_rng(0)
    truth = rng.random((6, 2, 16, 16)) < 0.3
    probs = np.where(truth, 0.75, 0.25).astype(np.float32)
    probs[:, 0] += 0.3 * (~truth[:, 0])  # class 1: background at 0.55 -> 0.5 is too low, 0.6..0.7 exact
    thresholds, scores = tune_thresholds(probs, pack(truth), Metric())
    assert 0.55 <= thresholds["1"] < 0.75 and thresholds["2"] == 0.5  # class 2 is exact at 0.5 already
    assert table(decode(probs, thresholds), pack(truth), 2).score == 1.0
    plan = tune_multilabel_plan(probs, pack(truth))
    assert plan["thresholds"] == thresholds and validate_plan(plan, 3) == plan
    assert "thresholds 1: " in describe_plan(plan)
    with pytest.raises(ConfigError, match="probability"):
        validate_plan({"thresholds": {"1": 1.5}})


def test_component_rules_act_on_each_class_alone():
    m = squares()
    m[0, 10, 0] = True  # a one-pixel speck of class 1, inside nothing else
    packed = pack(m)
    out = apply_rules(packed, {"1": {"kind": "largest"}, "2": {"kind": "none"}}, 2)
    assert out[10, 0] == 0 and (class_mask(out, 2) == m[1]).all()  # class 2 untouched, overlap kept
    assert (decode_plan(m.astype(np.float32), {"1": {"kind": "largest"}}, 2) == out).all()


# ------------------------------------------------------------------------------------------ losses
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("name", ["dice_ce", "dice_focal", "lovasz_ce", "tversky_ce", "focal", "ce", "dice"])
def test_losses_train_overlapping_targets_and_skip_ignored_pixels(name):
    from kagglecmr.cfg.config import LossConfig

    target = torch.from_numpy(pack(squares())).long()[None].repeat(2, 1, 1)
    target[1, 0, :] = IGNORE
    t = unpack_targets(target, 2)
    assert t.shape == (2, 2, 12, 10) and t[0, :, 5, 4].tolist() == [1.0, 1.0] and (t[1, :, 0] == IGNORE).all()
    loss = build_multilabel_loss(LossConfig(name=name), 2)
    logits = torch.zeros(2, 2, 12, 10, requires_grad=True)
    value = loss(logits, target)
    value.backward()
    assert torch.isfinite(value) and value > 0
    assert logits.grad[1, :, 0].abs().max() == 0  # ignored pixels: no gradient
    perfect = (torch.where(t == 1, 20.0, -20.0) * (t != IGNORE)).detach()
    assert loss(perfect, target) < value  # right answers cost less, overlaps included


# ------------------------------------------------------------------------------------------ dataset files
def write_case(root, *, missing="empty", drop=("img2", "b")):
    """Three 12x10 RGB images; class a and b one 0/255 file each per image, one file left out."""
    m = squares()
    (root / "img").mkdir(parents=True, exist_ok=True)
    for n in (1, 2, 3):
        cv2.imwrite(str(root / "img" / f"img{n}.png"), np.full((12, 10, 3), 40 * n, np.uint8))
        for c, name in enumerate(("a", "b")):
            if (f"img{n}", name) == drop:
                continue
            (root / "GT" / name).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / "GT" / name / f"img{n}_{name}.png"), m[c].astype(np.uint8) * 255)
    spec = {"task": "multilabel", "classes": ["a", "b"], "missing": missing,
            "splits": {"train": {"image": "img/{id}.png", "mask": "GT/{name}/{id}_{name}.png"}}}
    (root / "ds.yaml").write_text(yaml.safe_dump(spec))
    return root / "ds.yaml"


def test_one_file_per_class_missing_file_is_an_empty_class(tmp_path):
    ds = load_dataset(write_case(tmp_path))
    assert ds.multilabel and ds.classes == ["a", "b"] and ds.num_classes == 2 and ds.mask_values == {0: 0, 255: 1}
    split = ds.labelled()
    np.testing.assert_array_equal(split.masks[0], pack(squares()))  # overlap kept: value 3
    np.testing.assert_array_equal(unpack(split.masks[1], 2), np.stack([squares()[0], np.zeros((12, 10), bool)]))
    assert ds.describe()["task"] == "multilabel"
    rows = ds.submission.rows("img1", split.masks[0], 2)
    assert [r for r, _ in rows] == ["img1_mask1", "img1_mask2"]


def test_missing_error_names_the_file(tmp_path, main_cli, assert_cli_error):
    path = write_case(tmp_path, missing="error")
    with pytest.raises(DataError, match=r"GT/b/img2_b.png: mask file of class 'b' missing"):
        load_dataset(path)
    proc = main_cli("make-folds", "--data", path, "--out", tmp_path / "f.csv")
    assert_cli_error(proc, "img2_b.png", "missing: error")
    assert not (tmp_path / "f.csv").exists()


@pytest.mark.parametrize(("change", "needle"), [
    ({"task": "softmax", "classes": ["bg", "a"]}, "names one file per class: set task: multilabel"),
    ({"classes": None}, "task multilabel needs the list"),
    ({"classes": list("abcdefgh")}, "at most 7 classes"),
    ({"splits": {"train": {"image": "img/{id}.png", "mask": "GT/{id}.png"}}}, "put {name} or {class}"),
    ({"mask_values": {0: 0, 255: 2}}, "map every value to 0 or 1"),
])
def test_bad_multilabel_dataset_files_are_one_line_errors(tmp_path, change, needle):
    path = write_case(tmp_path)
    spec = yaml.safe_load(path.read_text()) | change
    path.write_text(yaml.safe_dump({k: v for k, v in spec.items() if v is not None}))
    with pytest.raises(DataError) as err:
        load_dataset(path)
    assert needle in str(err.value) and str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_labels_csv_with_overlapping_rows(tmp_path):
    m = squares()
    (tmp_path / "img").mkdir()
    for n in (1, 2):
        cv2.imwrite(str(tmp_path / "img" / f"img{n}.png"), np.zeros((12, 10, 3), np.uint8))
    fmt = MultilabelFormat.from_dict({"id": "{id}_{name}"}, num_classes=3, class_names=label_names(["a", "b"]))
    lines = ["Image_Label,EncodedPixels"] + [f"{rid},{enc}" for rid, enc in fmt.rows("img1", pack(m), 2)]
    lines += ["img2_a,", "img2_b,1 3"]
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "ds.yaml").write_text(yaml.safe_dump({
        "task": "multilabel", "classes": ["a", "b"],
        "splits": {"train": {"image": "img/{id}.png", "mask": "train.csv"}},
        "submission": {"id": "{id}_{name}", "header": ["Image_Label", "EncodedPixels"]}}))
    split = load_dataset(tmp_path / "ds.yaml").labelled()
    np.testing.assert_array_equal(split.masks[0], pack(m))  # both rows kept where they overlap
    assert split.masks[1].max() == 2 and int((split.masks[1] == 2).sum()) == 3


def test_folds_stratify_on_each_class_presence():
    m = np.zeros((4, 4, 4), np.uint8)
    m[0, 0, 0] = 3  # both classes
    m[1, 1, 1] = 2
    feats = fold_features(m, 3, n_folds=2, multilabel=True)
    assert feats["has_1"].tolist() == [1, 0, 0, 0] and feats["has_2"].tolist() == [1, 1, 0, 0]
    assert feats["fg_area"].tolist() == [2, 1, 0, 0]


def test_demo_is_deterministic_with_overlaps_and_missing_files(tmp_path):
    a = make_multilabel_demo(tmp_path / "a", n_train=8, n_val=0, n_test=2, size=48, seed=1)
    make_multilabel_demo(tmp_path / "b", n_train=8, n_val=0, n_test=2, size=48, seed=1)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert a["missing_files"] > 0 and a["images_with_overlap"] > 0
    ds = load_dataset(tmp_path / "a")
    assert ds.classes == list(CLASSES) and ds.split_names() == ["train", "test"]
    assert (unpack(ds.labelled().masks, 3).sum(1) > 1).any()  # some pixels in two classes at once


@pytest.mark.usefixtures("one_torch_thread")
def test_sigmoid_model_learns_both_classes_where_they_overlap(tmp_path):
    """A per-pixel model (1x1 convolution) trained with the multilabel loss on the demo: decoded with the
    ensemble's path (sigmoid probabilities -> packed masks) it predicts both classes where they overlap, which
    one softmax over the classes cannot."""
    from kagglecmr.cfg.config import LossConfig
    from kagglecmr.models.factory import probabilities

    make_multilabel_demo(tmp_path / "d", n_train=16, n_val=0, n_test=1, size=32, seed=2)
    split = load_dataset(tmp_path / "d").labelled()
    x = torch.from_numpy(np.asarray(split.images)).permute(0, 3, 1, 2).float() / 255  # rows read from the cache
    y = torch.from_numpy(np.asarray(split.masks)).long()
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 3, 1)
    model.multilabel = True  # as SegModel of a multilabel run: sigmoid probabilities
    loss = build_multilabel_loss(LossConfig(name="dice_ce"), 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        probs = probabilities(model, model(x)).numpy()
    pred, truth = decode(probs), split.masks
    overlap = unpack(truth, 3)[:, 0] & unpack(truth, 3)[:, 1]
    assert overlap.sum() > 50
    assert ((pred[overlap] & 3) == 3).mean() > 0.9  # square and circle, both
    assert table(pred, truth, 3).score > 0.9


def test_augmentation_moves_packed_masks_exactly():
    """Both augmentation backends move mask values by nearest neighbour: no packed value is blended, so every
    pixel keeps a set of classes that existed (or none, outside the image)."""
    from kagglecmr.cfg.config import AugmentConfig
    from kagglecmr.data.augment import TorchAugment, augment_batch_albumentations, build_albumentations

    cfg = AugmentConfig(affine=1.0, rotate=30, elastic=1.0, rot90=1.0)
    a, b = squares(32, 32)
    masks = np.stack([pack(np.stack([a, np.zeros_like(a), b]))] * 4)  # values 0, 1, 4, 5: a blend gives 2 or 3
    images = np.repeat(masks[..., None] * 30, 3, axis=3).astype(np.uint8)
    _, out = augment_batch_albumentations(build_albumentations(cfg, seed=1), images, masks)
    assert set(np.unique(out)) <= {0, 1, 4, 5} and (out == 5).any()
    gen = torch.Generator().manual_seed(1)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    _, y = TorchAugment(cfg)(x, torch.from_numpy(masks).long(), gen)
    assert set(np.unique(y.numpy())) <= {0, 1, 4, 5} and (y == 5).any()
