"""Dataset files (``--data DATASET.yaml``): layouts, mask value maps, channels, sizes, groups, and one-line
errors for every malformed dataset.  Every dataset is a handful of tiny PNGs written into ``tmp_path``."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from kagglecmr.cfg.config import SHIPPED_DATASETS, load_config
from kagglecmr.data.dataset import apply_dataset, auto_mask_map, load_dataset, recipe_for
from kagglecmr.utils.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
REAL_CMR = REPO.parent / "shared" / "data" / "cmr"


def write_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr), path
    return path


def blobs(seed: int, hw=(24, 32), levels=(0, 255)) -> np.ndarray:
    """A label image in raw values: a rectangle per non-background level."""
    rng = np.random.default_rng(seed)
    m = np.full(hw, levels[0], np.uint16 if max(levels) > 255 else np.uint8)
    for v in levels[1:]:
        y, x = rng.integers(0, hw[0] - 6), rng.integers(0, hw[1] - 6)
        m[y:y + 6, x:x + 6] = v
    return m


def rgb(seed: int, hw=(24, 32), dead_blue: bool = True) -> np.ndarray:
    """An RGB image (R, G random; B zero when ``dead_blue``), returned in RGB order."""
    rng = np.random.default_rng(100 + seed)
    img = rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    if dead_blue:
        img[:, :, 2] = 0
    return img


def write_dataset(tmp: Path, spec: dict, name: str = "ds.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def two_folder(tmp: Path, n: int = 6, levels=(0, 255), hw=(24, 32), **extra) -> Path:
    for i in range(n):
        write_png(tmp / "data" / "Img" / f"case{i}.png", rgb(i, hw)[:, :, ::-1])  # cv2 writes BGR
        write_png(tmp / "data" / "GT" / f"case{i}.png", blobs(i, hw, levels))
    spec = {"name": "two", "root": "data", "splits": {"train": {"image": "Img/{id}.png", "mask": "GT/{id}.png"}}}
    return write_dataset(tmp, spec | extra)


# ------------------------------------------------------------------------------------ layouts
def test_two_folders_rgb_with_dead_channel_in_rgb_order(tmp_path, capsys):
    ds = load_dataset(two_folder(tmp_path))
    assert (ds.num_classes, ds.in_channels, ds.channels, ds.size) == (2, 2, [0, 1], (24, 32))
    assert ds.mask_values == {0: 0, 255: 1}
    assert any("dropping channel(s) B" in n for n in ds.notes)
    split = ds.labelled()
    assert split.ids == [f"case{i}" for i in range(6)]
    assert split.images.shape == (6, 24, 32, 2) and split.masks.shape == (6, 24, 32)
    np.testing.assert_array_equal(split.images[3], rgb(3)[:, :, :2])  # red first, never OpenCV's BGR
    np.testing.assert_array_equal(split.masks[3], (blobs(3) == 255).astype(np.uint8))
    assert split.orig_sizes == [(24, 32)] * 6
    d = ds.describe()
    assert json.loads(json.dumps(d)) == d
    assert d["dropped_channels"] == [2] and d["mask_values"] == {"0": 0, "255": 1}


def test_one_folder_image_and_mask_side_by_side(tmp_path):
    for i in range(4):
        write_png(tmp_path / "Img" / f"{i}.png", rgb(i)[:, :, 0])
        write_png(tmp_path / "Img" / f"{i}_mask.png", blobs(i))
    ds = load_dataset(write_dataset(tmp_path, {"splits": {"train": {"image": "Img/{id}.png",
                                                                     "mask": "Img/{id}_mask.png"}}}))
    assert [i for i, _, _ in ds.items("train")] == ["0", "1", "2", "3"]  # the masks are not images
    assert ds.in_channels == 1 and ds.num_classes == 2
    np.testing.assert_array_equal(ds.labelled().images[2, :, :, 0], rgb(2)[:, :, 0])


def test_grey_levels_map_in_order_and_merge_map(tmp_path):
    levels = (0, 85, 170, 255)
    ds = load_dataset(two_folder(tmp_path, levels=levels))
    assert ds.mask_values == {0: 0, 85: 1, 170: 2, 255: 3} and ds.num_classes == 4
    raw = blobs(1, levels=levels)
    np.testing.assert_array_equal(ds.labelled().masks[1], np.searchsorted(levels, raw))
    np.testing.assert_array_equal(ds.to_raw(ds.labelled().masks[1]), raw)  # back to the dataset's own values
    merged = load_dataset(two_folder(tmp_path / "m", levels=levels, classes=["background", "lv"],
                                     mask_values={0: 0, 85: 0, 170: 1, 255: 1}))
    np.testing.assert_array_equal(merged.labelled().masks[1], (raw >= 170).astype(np.uint8))


@pytest.mark.parametrize(("values", "k", "expected"), [
    ({0, 1, 2, 3}, None, {0: 0, 1: 1, 2: 2, 3: 3}),
    ({0, 2}, 4, {0: 0, 1: 1, 2: 2, 3: 3}),
    ({0, 255}, None, {0: 0, 255: 1}),
    ({0, 1}, 2, {0: 0, 1: 1}),
    ({0, 127, 255}, None, {0: 0, 127: 1, 255: 2}),
    ({0, 85, 170, 255}, 4, {0: 0, 85: 1, 170: 2, 255: 3}),
])
def test_auto_mask_map(values, k, expected):
    assert auto_mask_map(values, k, "x.yaml") == expected


@pytest.mark.parametrize(("values", "k"), [({0, 3, 200}, None), ({0, 255}, 3), ({0, 100, 255}, None), ({0}, None)])
def test_auto_mask_map_refuses_and_lists_values(values, k):
    with pytest.raises(DataError, match="x.yaml: mask_values auto cannot map") as err:
        auto_mask_map(values, k, "x.yaml")
    assert ", ".join(map(str, sorted(values))) in str(err.value) and "\n" not in str(err.value)


def test_jpeg_masks_with_threshold_and_instance_masks_with_nonzero(tmp_path):
    """Binary tasks whose masks are not clean label maps: JPEG-compressed 0/255 masks (values smeared
    around 0 and 255 at edges) need ``threshold``; instance-id masks (one value per object) ``nonzero``."""
    hw = (40, 48)
    truth = {}
    for i in range(4):
        m = np.zeros(hw, np.uint8)
        cv2.circle(m, (24, 20), 8 + i, 255, -1)
        truth[f"k{i}"] = (m > 0).astype(np.uint8)
        write_png(tmp_path / "kv" / "images" / f"k{i}.png", rgb(i, hw, dead_blue=False)[:, :, ::-1])
        p = tmp_path / "kv" / "masks" / f"k{i}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        if i % 2:  # saved as a colour JPEG (Kvasir-SEG style): a tinted white, channels differ a little
            m = np.dstack([m * 0.96, m, m * 0.98]).astype(np.uint8)
        assert cv2.imwrite(str(p), m, [cv2.IMWRITE_JPEG_QUALITY, 70])
        inst = np.zeros(hw, np.uint8)
        inst[2:10, 2:10], inst[20:30, 30:40] = 1, 7 + i  # instance ids 1 and 7+i
        write_png(tmp_path / "gl" / f"g{i}.png", rgb(i, hw)[:, :, ::-1])
        write_png(tmp_path / "gl" / f"g{i}_anno.png", inst)
    kv = {"root": "kv", "splits": {"train": {"image": "images/{id}.png", "mask": "masks/{id}.jpg"}}}
    with pytest.raises(DataError, match="colour-coded"):  # auto refuses: the colour JPEGs look colour-coded
        load_dataset(write_dataset(tmp_path, kv, "kv_auto.yaml"))
    grey_only = kv | {"splits": {"train": {"image": "images/{id}.png", "mask": "masks/{id}.jpg"}}}
    for i in (1, 3):
        (tmp_path / "kv" / "images" / f"k{i}.png").rename(tmp_path / f"k{i}.png")
        (tmp_path / "kv" / "masks" / f"k{i}.jpg").rename(tmp_path / f"k{i}.jpg")
    with pytest.raises(DataError, match="mask_values: threshold"):  # grey JPEGs: auto says what to use
        load_dataset(write_dataset(tmp_path, grey_only, "kv_grey.yaml"))
    for i in (1, 3):
        (tmp_path / f"k{i}.png").rename(tmp_path / "kv" / "images" / f"k{i}.png")
        (tmp_path / f"k{i}.jpg").rename(tmp_path / "kv" / "masks" / f"k{i}.jpg")
    ds = load_dataset(write_dataset(tmp_path, kv | {"mask_values": "threshold"}, "kv.yaml"))
    assert ds.num_classes == 2 and ds.mask_values == {0: 0, 255: 1} and ds.describe()["mask_rule"] == "threshold"
    masks = ds.labelled().masks
    for i, m in zip(ds.labelled().ids, masks):
        assert set(np.unique(m)) <= {0, 1}
        assert np.abs(m.astype(int) - truth[i]).sum() <= 4  # JPEG ringing moves at most a few edge pixels
    np.testing.assert_array_equal(ds.to_raw(masks[0]), masks[0] * 255)  # written back as 0/255
    gl = {"root": "gl", "splits": {"train": {"image": "{id}.png", "mask": "{id}_anno.png"}}, "mask_values": "nonzero"}
    g = load_dataset(write_dataset(tmp_path, gl, "gl.yaml"))
    m = g.labelled().masks[3]
    assert m[5, 5] == 1 and m[25, 35] == 1 and m[15, 20] == 0 and m.sum() == 64 + 100
    with pytest.raises(DataError, match="binary task, but classes has 3 names"):
        load_dataset(write_dataset(tmp_path, gl | {"classes": ["bg", "a", "b"]}, "gl3.yaml"))


def test_one_folder_per_image_with_a_mask_file_per_object(tmp_path):
    """DSB 2018's layout: ``<id>/images/<id>.png`` and one binary PNG per nucleus in ``<id>/masks/``:
    ``{id}`` may repeat in a pattern, and a ``*`` in the mask pattern unites an image's mask files."""
    truth = {}
    for i in range(3):
        iid = f"a{i}f"
        write_png(tmp_path / "stage1" / iid / "images" / f"{iid}.png", rgb(i)[:, :, ::-1])
        union = np.zeros((24, 32), np.uint8)
        for j in range(i + 1):  # image k has k+1 objects, one file each
            m = np.zeros((24, 32), np.uint8)
            m[2 + 6 * j:6 + 6 * j, 3 + 5 * j:9 + 5 * j] = 255
            write_png(tmp_path / "stage1" / iid / "masks" / f"obj{j:03d}.png", m)
            union |= m
        truth[iid] = union // 255
    write_png(tmp_path / "stage1" / "a0f" / "images" / "other.png", rgb(9)[:, :, ::-1])  # {id} must repeat exactly
    spec = {"root": "stage1", "splits": {"train": {"image": "{id}/images/{id}.png", "mask": "{id}/masks/*.png"}}}
    ds = load_dataset(write_dataset(tmp_path, spec))
    split = ds.labelled()
    assert split.ids == ["a0f", "a1f", "a2f"] and ds.mask_values == {0: 0, 255: 1}
    for i, m in zip(split.ids, split.masks):
        np.testing.assert_array_equal(m, truth[i])
    write_png(tmp_path / "stage1" / "a2f" / "masks" / "odd.png", np.zeros((20, 20), np.uint8))
    with pytest.raises(DataError, match="odd.png: mask size 20x20 differs from obj000.png"):
        load_dataset(write_dataset(tmp_path, spec, "again.yaml")).labelled()


PALETTE = {(0, 0, 0): 0, (255, 0, 0): 1, (0, 128, 255): 2}  # RGB colour -> class


def test_colour_coded_masks_need_a_map_then_load_and_write_back(tmp_path):
    """Masks whose classes are colours (CamVid/DeepGlobe style): auto refuses and suggests a map of the
    colours found; with ``{"#rrggbb": class}`` the labels load, and predictions are written back in colour."""
    truth = []
    for i in range(4):
        lab = np.zeros((24, 32), np.uint8)
        lab[2 + i:10 + i, 3:12], lab[14:22, 10 + i:26] = 1, 2
        colours = np.zeros((24, 32, 3), np.uint8)
        for (r, g, b), k in PALETTE.items():
            colours[lab == k] = (b, g, r)  # cv2 writes BGR
        write_png(tmp_path / "d" / f"t{i}.png", rgb(i)[:, :, ::-1])
        write_png(tmp_path / "d" / f"t{i}_lab.png", colours)
        truth.append(lab)
    base = {"root": "d", "splits": {"train": {"image": "{id}.png", "mask": "{id}_lab.png"}}}
    with pytest.raises(DataError, match='colour-coded .3 colours.*"#000000": 0, "#0080ff": 1, "#ff0000": 2'):
        load_dataset(write_dataset(tmp_path, base, "auto.yaml"))
    spec = base | {"classes": ["bg", "road", "water"], "mask_values": {"#000000": 0, "#ff0000": 1, "#0080FF": 2}}
    ds = load_dataset(write_dataset(tmp_path, spec, "pal.yaml"))
    assert ds.colour and ds.num_classes == 3
    assert ds.describe()["mask_values"] == {"#000000": 0, "#0080ff": 2, "#ff0000": 1}
    np.testing.assert_array_equal(ds.labelled().masks, np.stack(truth))
    written = ds.to_raw(truth[1])  # back to the dataset's own colours (BGR for cv2.imwrite)
    np.testing.assert_array_equal(written, cv2.imread(str(tmp_path / "d" / "t1_lab.png")))
    from kagglecmr.data.mask_values import labels_to_raw

    np.testing.assert_array_equal(labels_to_raw(truth[1], ds.describe()["mask_values"], 3), written)  # dataset.json
    bad = spec | {"mask_values": {"#000000": 0, "#ff0000": 1}}
    with pytest.raises(DataError, match="t0_lab.png: mask value #0080ff is not in"):
        load_dataset(write_dataset(tmp_path, bad, "bad.yaml"))
    with pytest.raises(DataError, match="mask_values"):
        load_dataset(write_dataset(tmp_path, spec | {"mask_values": {"red": 1}}, "worse.yaml"))


def test_rgba_and_16bit_images(tmp_path):
    for i in range(3):
        bgra = np.dstack([rgb(i)[:, :, ::-1], np.full((24, 32), 255, np.uint8)])
        write_png(tmp_path / "a" / f"im{i}.png", bgra)
        write_png(tmp_path / "a" / f"im{i}_m.png", blobs(i))
        write_png(tmp_path / "b" / f"im{i}.png", rgb(i, dead_blue=False)[:, :, 0].astype(np.uint16) * 257)
        write_png(tmp_path / "b" / f"im{i}_m.png", blobs(i))
    a = load_dataset(write_dataset(tmp_path, {"splits": {"train": {"image": "a/{id}.png", "mask": "a/{id}_m.png"}}}))
    assert (a.source_channels, a.channels) == (3, [0, 1])  # constant alpha and dead blue dropped
    assert any("dropping channel(s) B, A" in n for n in a.notes)
    np.testing.assert_array_equal(a.labelled().images[1], rgb(1)[:, :, :2])
    b = load_dataset(write_dataset(tmp_path, {"splits": {"train": {"image": "b/{id}.png", "mask": "b/{id}_m.png"}}},
                                   "b.yaml"))
    assert b.labelled().images.dtype == np.uint8
    np.testing.assert_array_equal(b.labelled().images[2, :, :, 0], rgb(2, dead_blue=False)[:, :, 0])


def test_explicit_channels_keep_those_in_rgb_order(tmp_path):
    ds = load_dataset(two_folder(tmp_path, channels=[1, 0]))
    np.testing.assert_array_equal(ds.labelled().images[0], rgb(0)[:, :, [1, 0]])


def test_mixed_sizes_need_size_and_are_resized(tmp_path):
    path = two_folder(tmp_path, n=3)
    write_png(tmp_path / "data" / "Img" / "big.png", rgb(9, (40, 50))[:, :, ::-1])
    write_png(tmp_path / "data" / "GT" / "big.png", blobs(9, (40, 50)))
    with pytest.raises(DataError, match="images differ in size .*set size:") as err:
        load_dataset(path)
    assert str(path) in str(err.value)
    ds = load_dataset(write_dataset(tmp_path, yaml.safe_load(path.read_text()) | {"size": [16, 20]}))
    split = ds.labelled()
    assert split.images.shape == (4, 16, 20, 2) and split.masks.shape == (4, 16, 20)
    assert dict(zip(split.ids, split.orig_sizes))["big"] == (40, 50)
    assert set(np.unique(split.masks)) <= {0, 1}
    assert ds.read_mask(tmp_path / "data" / "GT" / "big.png", resize=False).shape == (40, 50)


def test_group_regex_keeps_groups_in_one_fold(tmp_path):
    from kagglecmr.data.folds import run_make_folds

    for p in range(6):
        for s in range(3):
            write_png(tmp_path / "d" / f"patient{p}_slice{s}.png", rgb(p * 3 + s)[:, :, ::-1])
            write_png(tmp_path / "d" / f"patient{p}_slice{s}_gt.png", blobs(p * 3 + s))
    path = write_dataset(tmp_path, {"splits": {"train": {"image": "d/{id}.png", "mask": "d/{id}_gt.png"}},
                                    "group": "(patient\\d+)_"})
    df = run_make_folds(path, n_folds=3, out=tmp_path / "folds.csv")
    df["patient"] = df["id"].str.split("_").str[0]
    assert (df.groupby("patient")["fold"].nunique() == 1).all()
    assert sorted(df["fold"].value_counts()) == [6, 6, 6]
    again = run_make_folds(path, n_folds=3, out=tmp_path / "again.csv")
    assert (tmp_path / "folds.csv").read_bytes() == (tmp_path / "again.csv").read_bytes()
    assert len(again) == 18


def test_folder_form_and_equivalent_file_give_the_same_data_and_folds(tmp_path):
    from kagglecmr.data.demo import make_demo_dataset
    from kagglecmr.data.folds import run_make_folds

    demo = tmp_path / "demo"
    make_demo_dataset(demo, n_train=20, n_val=5, n_test=4, seed=0)
    spec = {"root": str(demo), "classes": ["background", "RV", "Myo", "LV"],
            "splits": {"train": {"image": "train/image/{id}.png", "mask": "train/mask/{id}_mask.png"},
                       "val": {"image": "val/image/{id}.png", "mask": "val/mask/{id}_mask.png"},
                       "test": {"image": "test/image/{id}.png"}}}
    path = write_dataset(tmp_path, spec)
    a, b = load_dataset(demo), load_dataset(path)
    assert (a.num_classes, a.in_channels, a.size) == (b.num_classes, b.in_channels, b.size) == (4, 1, (96, 96))
    sa, sb = a.labelled(), b.labelled()
    assert sa.ids == sb.ids and sa.splits == sb.splits
    # the files as they are on disk (grey PNGs, labels 0..3): the arrays the folder reader always gave
    on_disk = [(cv2.imread(str(ip), cv2.IMREAD_UNCHANGED), cv2.imread(str(mp), cv2.IMREAD_UNCHANGED))
               for s in ("train", "val") for _, ip, mp in a.items(s)]
    np.testing.assert_array_equal(np.stack([img for img, _ in on_disk])[..., None], sa.images)
    np.testing.assert_array_equal(np.stack([m for _, m in on_disk]), sa.masks)
    np.testing.assert_array_equal(sa.images, sb.images)
    np.testing.assert_array_equal(sa.masks, sb.masks)
    run_make_folds(demo, out=tmp_path / "a.csv")
    run_make_folds(path, out=tmp_path / "b.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()


@pytest.mark.skipif(not (REAL_CMR / "train").is_dir(), reason="real CMR data not present")
def test_shipped_cmr_file_matches_the_folder(tmp_path):
    from kagglecmr.data.folds import run_make_folds

    a, b = load_dataset(REAL_CMR), load_dataset(SHIPPED_DATASETS / "cmr.yaml")
    sa, sb = a.labelled(), b.labelled()
    assert sa.ids == sb.ids
    np.testing.assert_array_equal(sa.images, sb.images)
    np.testing.assert_array_equal(sa.masks, sb.masks)
    assert [i for i, _, _ in a.items("test")] == [i for i, _, _ in b.items("test")]
    run_make_folds(REAL_CMR, out=tmp_path / "a.csv")
    run_make_folds(SHIPPED_DATASETS / "cmr.yaml", out=tmp_path / "b.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()

    # the same submission scores the same through both (a CSV of the true masks, some rows wrong)
    from kagglecmr.engine.evaluator import run_score_dataset
    from kagglecmr.formats.submission_csv import write_submission

    rows = [(rid, "" if n % 7 == 0 else enc) for n, (i, m) in enumerate(zip(sa.ids, sa.masks))
            for rid, enc in b.submission.rows(i, m, 4)]
    write_submission(rows, tmp_path / "sub.csv", shape=(96, 96))
    folder = run_score_dataset(tmp_path / "sub.csv", data=REAL_CMR)
    file = run_score_dataset(tmp_path / "sub.csv", data=SHIPPED_DATASETS / "cmr.yaml")
    assert folder.to_dict() == file.to_dict() and folder.score < 1.0


def test_config_pins_must_agree_with_the_dataset(tmp_path):
    ds = load_dataset(two_folder(tmp_path))
    cfg = apply_dataset(load_config("demo"), ds)
    assert (cfg.data.size, cfg.data.in_channels, cfg.data.num_classes) == ((24, 32), 2, 2)
    assert apply_dataset(load_config("demo", ["data.num_classes=2"]), ds).data.num_classes == 2
    for pin, needle in (("data.num_classes=4", "data.num_classes=4"), ("data.in_channels=3", "data.in_channels=3"),
                        ("data.size=64", "data.size=64")):
        with pytest.raises(ConfigError, match=needle) as err:
            apply_dataset(load_config("demo", [pin]), ds)
        assert str(ds.path) in str(err.value) and "\n" not in str(err.value)
    resized = apply_dataset(load_config("demo", ["data.size=16", "data.resize=true"]), ds)
    assert resized.data.size == 16 and ds.labelled().images.shape[1:3] == (16, 16)


def test_recipe_named_by_the_dataset_file(tmp_path):
    assert recipe_for(SHIPPED_DATASETS / "warwick.yaml") == "warwick"
    assert recipe_for(two_folder(tmp_path)) == "default"
    assert recipe_for(tmp_path) == "default"
    (tmp_path / "r.yaml").write_text("train: {epochs: 3}\n")
    p = write_dataset(tmp_path, yaml.safe_load((tmp_path / "ds.yaml").read_text()) | {"recipe": "r.yaml"}, "x.yaml")
    assert load_config(recipe_for(p)).train.epochs == 3


def test_dataset_yaml_inside_a_folder_wins(tmp_path):
    two_folder(tmp_path)
    spec = yaml.safe_load((tmp_path / "ds.yaml").read_text()) | {"root": "."}
    (tmp_path / "data" / "dataset.yaml").write_text(yaml.safe_dump(spec))
    assert load_dataset(tmp_path / "data").num_classes == 2


# ------------------------------------------------------------------------------------ malformed
def _break(tmp: Path, case: str) -> tuple[Path, list[str], str]:
    """A dataset broken one way: ``(dataset file, extra CLI args, what the one-line error must name)``."""
    path = two_folder(tmp)
    spec = yaml.safe_load(path.read_text())
    d = tmp / "data"
    if case == "missing key":
        spec.pop("splits")
        return write_dataset(tmp, spec), [], "splits"
    if case == "unknown key":
        return write_dataset(tmp, spec | {"clases": ["a", "b"]}), [], "clases: unknown key"
    if case == "bad pattern":
        spec["splits"]["train"]["image"] = "Img/case.png"
        return write_dataset(tmp, spec), [], "must be a relative path with {id}"
    if case == "no files":
        spec["splits"]["train"]["image"] = "Images/{id}.png"
        return write_dataset(tmp, spec), [], "no file matches"
    if case == "missing root":
        return write_dataset(tmp, spec | {"root": "nowhere"}), [], "nowhere"
    if case == "image without mask":
        (d / "GT" / "case2.png").unlink()
        return path, [], "case2.png: image has no mask"
    if case == "mask without image":
        write_png(d / "GT" / "case9.png", blobs(9))
        return path, [], "case9.png: mask has no image"
    if case == "id matching twice":
        write_png(d / "Img" / "case1.jpg", rgb(1))
        spec["splits"]["train"]["image"] = "Img/{id}.*"
        return write_dataset(tmp, spec), [], "id 'case1' matches"
    if case == "unknown mask value":
        return write_dataset(tmp, spec | {"mask_values": {0: 0}}), [], "mask value 255 is not in"
    if case == "unmappable mask values":
        write_png(d / "GT" / "case3.png", blobs(3, levels=(0, 7, 255)))
        return path, [], "0, 7, 255"
    if case == "conflicting sizes":
        write_png(d / "Img" / "case4.png", rgb(4, (30, 30)))
        write_png(d / "GT" / "case4.png", blobs(4, (30, 30)))
        return path, [], "differ in size"
    if case == "mask size differs":
        write_png(d / "GT" / "case4.png", blobs(4, (30, 30)))
        return write_dataset(tmp, spec | {"size": 16}), [], "case4.png: mask size 30x30 differs"
    if case == "unreadable image":
        p = d / "Img" / "case5.png"
        p.write_bytes(p.read_bytes()[:60])
        return path, [], "case5.png: not a readable PNG"
    if case == "colour mask":
        write_png(d / "GT" / "case0.png", rgb(0))
        return path, [], "the masks are colour-coded"
    if case == "conflicting config pin":
        (tmp / "pin.yaml").write_text("data: {num_classes: 3}\n")
        return path, ["--config", str(tmp / "pin.yaml")], "data.num_classes=3 conflicts with"
    raise AssertionError(case)


CASES = ["missing key", "unknown key", "bad pattern", "no files", "missing root", "image without mask",
         "mask without image", "id matching twice", "unknown mask value", "unmappable mask values",
         "conflicting sizes", "mask size differs", "unreadable image", "colour mask", "conflicting config pin"]


@pytest.mark.parametrize("case", CASES)
def test_malformed_dataset_is_one_line_exit_2_nothing_written(tmp_path, case, main_cli, assert_cli_error):
    path, extra, needle = _break(tmp_path, case)
    out = tmp_path / "folds" / "folds.csv"
    line = assert_cli_error(main_cli("make-folds", "--data", path, "--out", out, *extra), needle)
    assert path.name in line or "GT" in line or "Img" in line
    assert not out.exists() and not out.parent.exists()


def test_conflicting_pin_in_train_writes_nothing(tmp_path, main_cli, assert_cli_error):
    path = two_folder(tmp_path)
    assert main_cli("make-folds", "--data", path, "--out", tmp_path / "f.csv", "--n-folds", "2").returncode == 0
    assert_cli_error(main_cli("train", "--fold", "0", "--config", "demo", "--set", "data.in_channels=1", "--data",
                              path, "--folds", tmp_path / "f.csv", "--runs-dir", tmp_path / "runs"),
                     "data.in_channels=1 conflicts with", str(path))
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------ augmentation
@pytest.mark.parametrize("backend", ["torch", "albumentations"])
def test_augmentation_keeps_non_square_shapes(backend):
    import torch

    from kagglecmr.cfg.config import AugmentConfig
    from kagglecmr.data.batches import BatchMaker

    cfg = load_config("demo", ["augment.rot90=1.0", "augment.elastic=0.5", f"augment.backend={backend}"])
    assert isinstance(cfg.augment, AugmentConfig)
    images = np.stack([rgb(i, (24, 40)) for i in range(4)])
    masks = np.stack([(blobs(i, (24, 40)) > 0).astype(np.uint8) for i in range(4)])
    bm = BatchMaker(cfg, images, masks, torch.device("cpu"))
    bm.reseed(0)
    x, y = bm(np.arange(4))
    assert tuple(x.shape) == (4, 3, 24, 40) and tuple(y.shape) == (4, 24, 40)


def test_folder_of_mixed_sizes_trains_with_a_config_resize(tmp_path):
    """As before dataset files: a folder whose images differ in size loads with data.size + data.resize."""
    for i, side in enumerate((32, 40, 32)):
        write_png(tmp_path / "d" / "train" / "image" / f"cmr{i}.png", rgb(i, (side, side))[:, :, 0])
        write_png(tmp_path / "d" / "train" / "mask" / f"cmr{i}_mask.png", blobs(i, (side, side), (0, 1, 2)))
    ds = load_dataset(tmp_path / "d")
    with pytest.raises(DataError, match="differ in size.*data.resize: true"):
        ds.labelled()
    with pytest.raises(DataError, match="differ in size"):
        apply_dataset(load_config("demo"), ds)
    cfg = apply_dataset(load_config("demo", ["data.size=24", "data.resize=true"]), ds)
    assert cfg.data.size == 24 and cfg.data.num_classes == 3
    split = ds.labelled()
    assert split.images.shape == (3, 24, 24, 1) and split.orig_sizes == [(32, 32), (40, 40), (32, 32)]


def test_folder_with_grey_level_masks_maps_them(tmp_path):
    """A folder in the competition layout whose masks are 0/255 gets 2 classes, not 256."""
    for i in range(3):
        write_png(tmp_path / "d" / "train" / "image" / f"cmr{i}.png", rgb(i)[:, :, 0])
        write_png(tmp_path / "d" / "train" / "mask" / f"cmr{i}_mask.png", blobs(i))
    ds = load_dataset(tmp_path / "d")
    assert ds.num_classes == 2 and ds.mask_values == {0: 0, 255: 1}
    np.testing.assert_array_equal(ds.labelled().masks[0], (blobs(0) == 255).astype(np.uint8))


def _folder_with_labels(root: Path, n: int = 4, stray: int | None = None) -> Path:
    """A folder-form dataset (train/image/cmrN.png + train/mask/cmrN_mask.png) with labels 0..3, and in
    ``cmr2_mask.png`` one region of value ``stray`` (a corrupt mask)."""
    for i in range(n):
        write_png(root / "train" / "image" / f"cmr{i}.png", rgb(i)[:, :, 0])
        m = blobs(i, levels=(0, 1, 2, 3))
        if stray is not None and i == 2:
            m[-4:, -4:] = stray
        write_png(root / "train" / "mask" / f"cmr{i}_mask.png", m)
    return root


def test_folder_labels_are_0_to_k_minus_1_or_an_error_naming_the_mask(tmp_path, main_cli, assert_cli_error):
    """A stray value 7 among labels 0..3 is a one-line error naming the mask (it used to make an 8-class task)."""
    assert load_dataset(_folder_with_labels(tmp_path / "ok")).num_classes == 4
    root = _folder_with_labels(tmp_path / "d", stray=7)
    out = tmp_path / "folds" / "folds.csv"
    line = assert_cli_error(main_cli("make-folds", "--data", root, "--out", out), "cmr2_mask.png: mask value 7",
                            "0..3", "4, 5, 6 never appear", "data.num_classes (8 or more)")
    assert str(root / "train" / "mask" / "cmr2_mask.png") in line
    assert not out.exists() and not out.parent.exists()
    assert_cli_error(main_cli("make-folds", "--data", root, "--out", out, "--config", "demo"), "mask value 7")
    assert not out.parent.exists()
    ds = load_dataset(root)
    assert ds.num_classes == 4
    for pin in ("data.num_classes=4", "data.num_classes=7"):  # a pin must hold every value found
        with pytest.raises(DataError, match="cmr2_mask.png: mask value 7"):
            apply_dataset(load_config("demo", [pin]), load_dataset(root))
    cfg = apply_dataset(load_config("demo", ["data.num_classes=8"]), ds)  # a pinned count says the values are classes
    assert cfg.data.num_classes == 8 and ds.num_classes == 8
    assert ds.labelled().masks.max() == 7


@pytest.mark.parametrize("values, k, odd", [
    ({0: "a", 1: "a", 3: "b"}, 2, "b: mask value 3"),  # class 2 never appears
    ({0: "a", 2: "b", 5: "b", 1: "c", 9: "c"}, 3, "b: mask value 5"),  # the first file past the gap
    ({0: "a", 1: "a", 255: "b"}, 2, "b: mask value 255"),
])
def test_folder_label_gaps(values, k, odd):
    from kagglecmr.data.mask_values import LabelGapError, folder_labels

    with pytest.raises(LabelGapError, match=odd) as err:
        folder_labels(values)
    assert err.value.k == k and err.value.top == max(values) and "\n" not in str(err.value)
    assert folder_labels({0: "a"}) == 2 and folder_labels({1: "a", 2: "a"}) == 3 and folder_labels({0: 1, 1: 1, 2: 1}) == 3
