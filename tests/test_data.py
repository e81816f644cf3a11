"""Data layer: folder discovery, validated PNG decoding, resizing, channels, and one-line DataErrors.

Folder datasets are read through the dataset loader (``load_dataset(root).load/labelled``, and ``prepare``
with a config that pins ``data.size``/``data.resize``); the decoding primitives of ``kagglecmr.data.loader``
are tested directly.  Every dataset here is a handful of tiny PNGs written with cv2 into ``tmp_path``;
nothing trains.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from kagglecmr.cfg.config import DataSpec, load_config
from kagglecmr.data import loader as data
from kagglecmr.data.dataset import load_dataset, prepare
from kagglecmr.utils.errors import ConfigError, DataError, KaggleCMRError
from kagglecmr.utils.naming import natural_key, natural_sorted

S = 32  # image side used throughout (small files, quick decoding)
SPEC = DataSpec(size=S, in_channels=1, num_classes=4)  # what the primitives read_image/read_mask decode to


def labelled(root: Path):
    """Every labelled image of a folder dataset (train + val), as every command reads ``--data``."""
    return load_dataset(root).labelled()


def resized(root: Path, size: int = S, *sets: str):
    """The labelled split and the dataset of a folder read with a config that pins ``data.size`` and resizes."""
    _, ds, split = prepare(load_config(None, [f"data.size={size}", "data.resize=true", *sets]), root, quiet=True)
    return split, ds


# ------------------------------------------------------------------------------------ helpers
def image(seed: int = 0, size: int = S, channels: int | None = None, dtype=np.uint8) -> np.ndarray:
    """A random image: ``[size, size]`` (gray) or ``[size, size, channels]``."""
    rng = np.random.default_rng(seed)
    shape = (size, size) if channels is None else (size, size, channels)
    hi = 256 if dtype == np.uint8 else 65536
    return rng.integers(0, hi, size=shape, dtype=np.int64).astype(dtype)


def mask(seed: int = 0, size: int = S, num_classes: int = 4) -> np.ndarray:
    """A random label mask that contains every class."""
    rng = np.random.default_rng(1000 + seed)
    m = rng.integers(0, num_classes, size=(size, size)).astype(np.uint8)
    m.flat[:num_classes] = np.arange(num_classes)
    return m


def quadrants(size: int, labels=(0, 1, 2, 3)) -> np.ndarray:
    """A mask made of four blocks (survives nearest-neighbour resizing with every label)."""
    m = np.zeros((size, size), np.uint8)
    h = size // 2
    m[:h, :h], m[:h, h:], m[h:, :h], m[h:, h:] = labels
    return m


def write_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr), path
    return path


def make_root(root: Path, train=None, val=None, test=None) -> Path:
    """Write a dataset root.  ``train``/``val``: ``{id: (image, mask or None)}`` (None: no mask file);
    ``test``: ``{id: image}``.  A split given as ``{}`` gets an empty ``image/`` folder."""
    root.mkdir(parents=True, exist_ok=True)
    for split, items in (("train", train), ("val", val)):
        if items is None:
            continue
        (root / split / "image").mkdir(parents=True, exist_ok=True)
        for i, (img, m) in items.items():
            write_png(root / split / "image" / f"{i}.png", img)
            if m is not None:
                write_png(root / split / "mask" / f"{i}_mask.png", m)
    if test is not None:
        (root / "test" / "image").mkdir(parents=True, exist_ok=True)
        for i, img in test.items():
            write_png(root / "test" / "image" / f"{i}.png", img)
    return root


def labelled_items(ids, size: int = S, seed: int = 0, num_classes: int = 4) -> dict:
    return {i: (image(seed + k, size), mask(seed + k, size, num_classes)) for k, i in enumerate(ids)}


def one_line(exc: pytest.ExceptionInfo, *needles, kind: type = DataError) -> str:
    """The error is a DataError (or ``kind``) with a one-line message containing every needle."""
    assert isinstance(exc.value, kind) and isinstance(exc.value, KaggleCMRError)
    msg = str(exc.value)
    assert msg and "\n" not in msg and "\r" not in msg, msg
    for needle in needles:
        assert str(needle) in msg, (needle, msg)
    return msg


# ------------------------------------------------------------------------------------ discovery
def test_natural_key_orders_numbers_numerically():
    names = ["cmr10", "cmr2", "cmr1", "CMR3", "cmr100", "cmr20"]
    assert natural_sorted(names) == ["cmr1", "cmr2", "CMR3", "cmr10", "cmr20", "cmr100"]
    assert natural_key("cmr2") < natural_key("cmr10")


def test_mask_id():
    assert data.mask_id(Path("a/cmr7_mask.png")) == "cmr7"
    assert data.mask_id(Path("cmr7.png")) == "cmr7"


def test_discover_natural_order_and_mask_pairing(tmp_path):
    root = make_root(tmp_path / "d", train=labelled_items(["cmr10", "cmr2", "cmr1", "cmr21"]))
    items = data.discover(root, "train")
    assert [i for i, _, _ in items] == ["cmr1", "cmr2", "cmr10", "cmr21"]
    for i, ip, mp in items:
        assert ip == root / "train" / "image" / f"{i}.png"
        assert mp == root / "train" / "mask" / f"{i}_mask.png"


def test_discover_ignores_non_png_files(tmp_path):
    root = make_root(tmp_path / "d", train=labelled_items(["cmr1", "cmr2"]))
    (root / "train" / "image" / "notes.txt").write_text("x")
    (root / "train" / "mask" / "Thumbs.db").write_bytes(b"x")
    assert [i for i, _, _ in data.discover(root, "train")] == ["cmr1", "cmr2"]


def test_load_values_roundtrip(tmp_path):
    items = labelled_items(["cmr2", "cmr1"])
    root = make_root(tmp_path / "d", train=items)
    ds = load_dataset(root)
    assert (ds.size, ds.in_channels, ds.num_classes) == ((S, S), 1, 4)
    split = ds.load("train")
    assert split.ids == ["cmr1", "cmr2"]
    assert split.images.dtype == np.uint8 and split.images.shape == (2, S, S, 1)
    assert split.masks.dtype == np.uint8 and split.masks.shape == (2, S, S)
    for k, i in enumerate(split.ids):
        np.testing.assert_array_equal(split.images[k, :, :, 0], items[i][0])
        np.testing.assert_array_equal(split.masks[k], items[i][1])
    assert split.splits == ["train", "train"]
    assert split.image_paths == [root / "train" / "image" / f"{i}.png" for i in split.ids]
    assert split.orig_sizes == [(S, S), (S, S)]
    assert len(split) == 2


def test_labelled_includes_val_with_split_names(tmp_path):
    root = make_root(tmp_path / "d", train=labelled_items(["cmr10", "cmr3"]), val=labelled_items(["cmr2", "cmr11"], seed=5),
                     test={"cmr50": image(9)})
    split = labelled(root)
    assert split.ids == ["cmr3", "cmr10", "cmr2", "cmr11"]
    assert split.splits == ["train", "train", "val", "val"]
    assert split.images.shape == (4, S, S, 1) and split.masks.shape == (4, S, S)
    assert split.image_paths[2] == root / "val" / "image" / "cmr2.png"
    assert "cmr50" not in split.ids  # test/ is never labelled


def test_labelled_without_val(tmp_path):
    root = make_root(tmp_path / "d", train=labelled_items(["cmr1", "cmr2"]))
    split = labelled(root)
    assert split.ids == ["cmr1", "cmr2"] and set(split.splits) == {"train"}


def test_test_split_without_masks_loads_unlabelled(tmp_path):
    root = make_root(tmp_path / "d", train=labelled_items(["cmr1"]), test={"cmr12": image(1), "cmr9": image(2)})
    ds = load_dataset(root)
    for masks in (None, False):
        split = ds.load("test", labelled=masks)
        assert split.ids == ["cmr9", "cmr12"]
        assert split.masks is None
        assert split.images.shape == (2, S, S, 1)
        assert split.splits == ["test", "test"]
        np.testing.assert_array_equal(split.images[0, :, :, 0], image(2))
    with pytest.raises(DataError) as exc:  # asked for masks it does not have
        ds.load("test", labelled=True)
    one_line(exc, root, "test", "no masks")


def test_labelled_split_loaded_as_unlabelled_ignores_masks(tmp_path):
    root = make_root(tmp_path / "d", train=labelled_items(["cmr1", "cmr2"]))
    split = load_dataset(root).load("train", labelled=False)
    assert split.masks is None and split.ids == ["cmr1", "cmr2"]


def test_available_splits(tmp_path):
    a = make_root(tmp_path / "a", train=labelled_items(["cmr1"]), test={"cmr5": image()})
    assert data.available_splits(a) == ["train", "test"]
    b = make_root(tmp_path / "b", train=labelled_items(["cmr1"]), val=labelled_items(["cmr2"]), test={"cmr5": image()})
    assert data.available_splits(b) == ["train", "val", "test"]
    c = make_root(tmp_path / "c", train=labelled_items(["cmr1"]))
    assert data.available_splits(c) == ["train"]


# ------------------------------------------------------------------------------------ failures
def test_missing_root(tmp_path):
    missing = tmp_path / "nowhere"
    for call in (load_dataset, lambda r: prepare(None, r), data.available_splits, lambda r: data.discover(r, "train")):
        with pytest.raises(DataError) as exc:
            call(missing)
        one_line(exc, missing)


def test_root_without_labelled_split(tmp_path):
    root = make_root(tmp_path / "d", test={"cmr1": image()})
    with pytest.raises(DataError) as exc:
        labelled(root)
    one_line(exc, root / "train" / "image", "no labelled split")


def test_missing_split_folder(tmp_path):
    root = make_root(tmp_path / "d", train=labelled_items(["cmr1"]))
    with pytest.raises(DataError) as exc:
        load_dataset(root).load("test")
    one_line(exc, root, "no split 'test'", "has train")


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_empty_split(tmp_path, split):
    kwargs = {"train": labelled_items(["cmr1"])}
    kwargs[split] = {}
    root = make_root(tmp_path / "d", **kwargs)
    (root / split / "image" / "readme.txt").write_text("no pngs here")
    with pytest.raises(DataError) as exc:  # found when the dataset is read, whichever split is wanted
        load_dataset(root)
    one_line(exc, root / split / "image", f"split '{split}'", "no PNG")


def test_image_without_mask(tmp_path):
    items = labelled_items(["cmr1", "cmr2", "cmr3"])
    items["cmr2"] = (items["cmr2"][0], None)
    root = make_root(tmp_path / "d", train=items)
    with pytest.raises(DataError) as exc:
        labelled(root)
    one_line(exc, root / "train" / "image" / "cmr2.png", root / "train" / "mask" / "cmr2_mask.png")


def test_image_without_mask_in_val(tmp_path):
    val = labelled_items(["cmr7", "cmr8"])
    val["cmr8"] = (val["cmr8"][0], None)
    root = make_root(tmp_path / "d", train=labelled_items(["cmr1"]), val=val)
    with pytest.raises(DataError) as exc:
        labelled(root)
    one_line(exc, root / "val" / "image" / "cmr8.png", "no mask")


def test_labelled_split_without_mask_folder(tmp_path):
    root = make_root(tmp_path / "d", train={"cmr1": (image(), None)})
    with pytest.raises(DataError) as exc:
        labelled(root)
    one_line(exc, root, "no labelled split")


def test_mask_without_image(tmp_path):
    root = make_root(tmp_path / "d", train=labelled_items(["cmr1", "cmr2"]))
    write_png(root / "train" / "mask" / "cmr3_mask.png", mask())
    with pytest.raises(DataError) as exc:
        labelled(root)
    one_line(exc, root / "train" / "mask" / "cmr3_mask.png", root / "train" / "image" / "cmr3.png")


@pytest.mark.parametrize("resize", [False, True])
def test_image_and_mask_of_different_sizes(tmp_path, resize):
    items = labelled_items(["cmr1", "cmr2"])
    items["cmr2"] = (image(2, S), mask(2, S + 16))
    root = make_root(tmp_path / "d", train=items)
    with pytest.raises(DataError) as exc:
        resized(root) if resize else labelled(root)
    one_line(exc, root / "train" / "mask" / "cmr2_mask.png", f"{S + 16}x{S + 16}", f"{S}x{S}")


def test_image_and_mask_of_different_sizes_resized(tmp_path):
    """With resize on, a mask that does not match its own image is still an error (not silently resized)."""
    items = {"cmr1": (image(1, S + 16), mask(1, S))}
    root = make_root(tmp_path / "d", train=items)
    with pytest.raises(DataError) as exc:
        resized(root)
    one_line(exc, root / "train" / "mask" / "cmr1_mask.png", f"{S}x{S}", f"{S + 16}x{S + 16}")


def test_mask_values_outside_classes(tmp_path):
    items = labelled_items(["cmr1", "cmr2"])
    bad = mask(2)
    bad[3, 3], bad[4, 4] = 7, 200
    items["cmr2"] = (items["cmr2"][0], bad)
    root = make_root(tmp_path / "d", train=items)
    for read in (labelled, lambda r: resized(r, S, "data.num_classes=4")):  # a pinned class count does not allow them
        with pytest.raises(DataError) as exc:
            read(root)
        one_line(exc, root / "train" / "mask" / "cmr2_mask.png", "7", "200", "0..3")


def test_colour_mask(tmp_path):
    colour = np.zeros((S, S, 3), np.uint8)
    colour[:, :, 2] = mask(1) > 0  # red-ish labels, other channels 0
    items = labelled_items(["cmr1"])
    items["cmr1"] = (items["cmr1"][0], colour)
    root = make_root(tmp_path / "d", train=items)
    with pytest.raises(DataError) as exc:
        labelled(root)
    one_line(exc, root / "train" / "mask" / "cmr1_mask.png", "colour")


def test_grey_mask_saved_as_three_channels_is_accepted(tmp_path):
    m = mask(3)
    p = write_png(tmp_path / "m.png", np.repeat(m[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(data.read_mask(p, SPEC), m)


def test_16bit_mask_with_labels_is_accepted_and_large_values_rejected(tmp_path):
    m = mask(4)
    p = write_png(tmp_path / "m16.png", m.astype(np.uint16))
    np.testing.assert_array_equal(data.read_mask(p, SPEC), m)
    big = m.astype(np.uint16)
    big[0, 0] = 1000
    q = write_png(tmp_path / "big16.png", big)
    with pytest.raises(DataError) as exc:
        data.read_mask(q, SPEC)
    one_line(exc, q, "1000")


def test_image_of_other_size_without_resize(tmp_path):
    items = labelled_items(["cmr1", "cmr2"])
    items["cmr2"] = (image(2, S + 8), mask(2, S + 8))
    root = make_root(tmp_path / "d", train=items)
    with pytest.raises(DataError) as exc:
        labelled(root)
    one_line(exc, root, "cmr2.png", f"{S + 8}x{S + 8}", "data.resize: true")


def test_test_image_of_other_size_without_resize(tmp_path):
    root = make_root(tmp_path / "d", train=labelled_items(["cmr1"]), test={"cmr4": image(0, S), "cmr5": image(0, 20)})
    for read in (lambda: load_dataset(root).load("test"), lambda: labelled(root)):  # the dataset's size is unknown
        with pytest.raises(DataError) as exc:
            read()
        one_line(exc, root, "cmr5.png", "20x20", "data.resize: true")


def _truncated(good: bytes) -> bytes:
    return good[: len(good) // 2]


def _random(good: bytes) -> bytes:
    return np.random.default_rng(0).integers(0, 256, size=300, dtype=np.uint8).tobytes()


def _empty(good: bytes) -> bytes:
    return b""


def _bad_crc(good: bytes) -> bytes:
    raw = bytearray(good)
    pos = raw.index(b"IDAT") + 6  # inside the IDAT data: its CRC no longer matches
    raw[pos] ^= 0xFF
    return bytes(raw)


def _no_iend(good: bytes) -> bytes:
    return good[: good.index(b"IEND") - 4]


CORRUPTIONS = {"truncated": _truncated, "random": _random, "empty": _empty, "bad_crc": _bad_crc, "no_iend": _no_iend}


@pytest.mark.parametrize("which", ["image", "mask"])
@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_png(tmp_path, capfd, kind, which):
    root = make_root(tmp_path / "d", train=labelled_items(["cmr1", "cmr2", "cmr3"]))
    path = root / "train" / which / ("cmr2.png" if which == "image" else "cmr2_mask.png")
    path.write_bytes(CORRUPTIONS[kind](path.read_bytes()))
    capfd.readouterr()
    with pytest.raises(DataError) as exc:
        labelled(root)
    one_line(exc, path, "not a readable PNG")
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)  # no libpng complaints on the side


def test_corrupt_test_image(tmp_path, capfd):
    root = make_root(tmp_path / "d", train=labelled_items(["cmr1"]), test={"cmr8": image(), "cmr9": image(1)})
    path = root / "test" / "image" / "cmr9.png"
    path.write_bytes(_truncated(path.read_bytes()))
    capfd.readouterr()
    with pytest.raises(DataError) as exc:
        load_dataset(root).load("test")
    one_line(exc, path, "not a readable PNG")
    assert capfd.readouterr().err == ""


def test_png_size_reads_header(tmp_path):
    p = write_png(tmp_path / "r.png", image(0, 24)[:10])  # 10 rows x 24 columns
    assert data.png_size(p) == (10, 24)
    with pytest.raises(DataError) as exc:
        data.png_size(tmp_path / "missing.png")
    one_line(exc, tmp_path / "missing.png")


def test_read_missing_file(tmp_path):
    for reader in (data.read_image, data.read_mask):
        with pytest.raises(DataError) as exc:
            reader(tmp_path / "gone.png", SPEC)
        one_line(exc, tmp_path / "gone.png", "not found")


def test_same_id_in_train_and_val(tmp_path):
    root = make_root(tmp_path / "d", train=labelled_items(["cmr1", "cmr2"]), val=labelled_items(["cmr2", "cmr3"], seed=7))
    with pytest.raises(DataError) as exc:
        labelled(root)
    one_line(exc, "cmr2", root / "val" / "image" / "cmr2.png", "train")


# ------------------------------------------------------------------------------------ resize
def test_resize_images_and_masks_nearest(tmp_path):
    big = S + 16
    small = S // 2
    flat = np.full((big, big), 77, np.uint8)
    items = {
        "cmr1": (flat, quadrants(big)),
        "cmr2": (image(2, small), quadrants(small, (0, 3, 3, 1))),
        "cmr3": (image(3, S), mask(3, S)),
    }
    root = make_root(tmp_path / "d", train=items, test={"cmr9": image(9, big)})
    split, ds = resized(root)
    assert split.images.shape == (3, S, S, 1) and split.masks.shape == (3, S, S)
    assert split.images.dtype == np.uint8 and split.masks.dtype == np.uint8
    np.testing.assert_array_equal(split.images[0], 77)  # a flat image stays flat
    np.testing.assert_array_equal(split.masks[0], quadrants(S))  # nearest neighbour: blocks kept exactly
    np.testing.assert_array_equal(split.masks[1], quadrants(S, (0, 3, 3, 1)))
    assert set(np.unique(split.masks[1])) == {0, 1, 3}  # no interpolated labels such as 2
    np.testing.assert_array_equal(split.images[2, :, :, 0], image(3, S))  # right size: untouched
    np.testing.assert_array_equal(split.masks[2], mask(3, S))
    assert split.orig_sizes == [(S + 16, S + 16), (small, small), (S, S)]
    test = ds.load("test")
    assert test.images.shape == (1, S, S, 1) and test.orig_sizes == [(big, big)]


def test_resize_random_mask_adds_no_labels(tmp_path):
    m = mask(5, 50, num_classes=3)  # labels 0..2 only
    m[m == 1] = 2  # labels {0, 2}: a linear resize would invent 1s at the borders
    p = write_png(tmp_path / "m.png", m)
    out = data.read_mask(p, DataSpec(size=S, resize=True))
    assert out.shape == (S, S)
    assert set(np.unique(out)) <= {0, 2}


def test_resize_keeps_channels(tmp_path):
    bgr = image(1, 50, channels=3)
    p = write_png(tmp_path / "c.png", bgr)
    out = data.read_image(p, DataSpec(size=S, in_channels=3, resize=True))
    assert out.shape == (S, S, 3) and out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]
    gray = data.read_image(p, DataSpec(size=S, in_channels=1, resize=True))
    assert gray.shape == (S, S, 1)


# ------------------------------------------------------------------------------------ channels
def test_colour_image_read_as_grayscale(tmp_path):
    bgr = image(1, channels=3)
    p = write_png(tmp_path / "c.png", bgr)
    out = data.read_image(p, SPEC)
    assert out.shape == (S, S, 1) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, :, 0], cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))


def test_colour_image_keeps_three_channels(tmp_path):
    bgr = image(1, channels=3)
    p = write_png(tmp_path / "c.png", bgr)
    out = data.read_image(p, DataSpec(size=S, in_channels=3))
    assert out.shape == (S, S, 3) and out.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(out, bgr[:, :, ::-1])  # RGB order


def test_gray_image_repeated_to_three_channels(tmp_path):
    g = image(2)
    p = write_png(tmp_path / "g.png", g)
    out = data.read_image(p, DataSpec(size=S, in_channels=3))
    assert out.shape == (S, S, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], g)


def test_alpha_channel_dropped(tmp_path):
    bgra = image(3, channels=4)
    p = write_png(tmp_path / "a.png", bgra)
    out = data.read_image(p, DataSpec(size=S, in_channels=3))
    np.testing.assert_array_equal(out, bgra[:, :, 2::-1])
    assert data.read_image(p, SPEC).shape == (S, S, 1)


def test_16bit_image_scaled_to_uint8(tmp_path):
    base = image(4)
    p = write_png(tmp_path / "g16.png", base.astype(np.uint16) * 257)  # full 16-bit range
    out = data.read_image(p, SPEC)
    assert out.dtype == np.uint8 and out.shape == (S, S, 1)
    np.testing.assert_array_equal(out[:, :, 0], base)
    ramp = np.tile(np.linspace(0, 65535, S).astype(np.uint16), (S, 1))
    q = write_png(tmp_path / "ramp16.png", ramp)
    r = data.read_image(q, SPEC)[:, :, 0]
    assert r.dtype == np.uint8 and r.min() == 0 and r.max() == 255
    assert np.all(np.diff(r[0].astype(int)) >= 0)  # monotone, no wrap-around


def test_16bit_colour_image(tmp_path):
    bgr16 = image(5, channels=3).astype(np.uint16) * 257
    p = write_png(tmp_path / "c16.png", bgr16)
    out = data.read_image(p, DataSpec(size=S, in_channels=3))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, (bgr16 // 257).astype(np.uint8)[:, :, ::-1])


def test_16bit_dataset_loads(tmp_path):
    items = {"cmr1": (image(1).astype(np.uint16) * 257, mask(1))}
    root = make_root(tmp_path / "d", train=items)
    split = labelled(root)
    assert split.images.dtype == np.uint8
    np.testing.assert_array_equal(split.images[0, :, :, 0], image(1))


# ------------------------------------------------------------------------------------ config
def test_dataspec_from_config_binary_128(tmp_path):
    cfg_path = tmp_path / "binary.yaml"
    cfg_path.write_text("data: {size: 128, num_classes: 2}\n")
    spec = load_config(cfg_path).data.spec()
    assert spec == DataSpec(size=128, in_channels=1, num_classes=2, resize=False)
    assert load_config(None, ["data.size=128", "data.num_classes=2"]).data.spec() == spec

    items = {f"cmr{k}": (image(k, 128), mask(k, 128, num_classes=2)) for k in (1, 2)}
    root = make_root(tmp_path / "ok", train=items)
    cfg = load_config(cfg_path)
    resolved, _, split = prepare(cfg, root, quiet=True)
    assert resolved.data.spec() == spec
    assert split.images.shape == (2, 128, 128, 1)
    assert set(np.unique(split.masks)) == {0, 1}

    bad = mask(3, 128, num_classes=2)
    bad[10:12, 10:12] = 2
    items["cmr3"] = (image(3, 128), bad)
    root = make_root(tmp_path / "bad", train=items)
    with pytest.raises(ConfigError) as exc:  # the folder's labels 0..2 are three classes
        prepare(cfg, root, quiet=True)
    one_line(exc, root, "data.num_classes=2", "3 classes", kind=ConfigError)

    small = make_root(tmp_path / "small", train=labelled_items(["cmr1"], size=96, num_classes=2))
    with pytest.raises(ConfigError) as exc:  # default-size data against a 128 config
        prepare(cfg, small, quiet=True)
    one_line(exc, small, "96x96", "data.size=128", "data.resize: true", kind=ConfigError)


# ------------------------------------------------------------------------------------ CLI
def test_cli_make_folds_truncated_png(tmp_path, cli, assert_cli_error):
    root = make_root(tmp_path / "d", train=labelled_items([f"cmr{k}" for k in range(1, 7)], size=96),
                     val=labelled_items(["cmr7", "cmr8"], size=96, seed=20))
    bad = root / "train" / "image" / "cmr4.png"
    bad.write_bytes(_truncated(bad.read_bytes()))
    out = tmp_path / "folds" / "folds.csv"
    proc = cli("make-folds", "--data", root, "--out", out, "--n-folds", "2", timeout=120)
    line = assert_cli_error(proc, bad)
    assert line.startswith("error: ")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "libpng" not in proc.stderr.lower() and "Traceback" not in proc.stderr
    assert not out.exists() and not out.parent.exists()


# ------------------------------------------------------------------------------------ Split
def test_split_subset_and_index_stay_aligned(tmp_path):
    root = make_root(tmp_path / "d", train=labelled_items(["cmr1", "cmr2", "cmr3"]), val=labelled_items(["cmr4", "cmr5"], seed=3))
    full = labelled(root)
    pick = ["cmr5", "cmr1", "cmr3"]
    idx = full.index(pick)
    assert idx.dtype == np.int64 and idx.tolist() == [4, 0, 2]
    sub = full.subset(pick)
    assert sub.ids == pick and len(sub) == 3
    assert sub.splits == ["val", "train", "train"]
    assert sub.image_paths == [full.image_paths[k] for k in idx]
    for k, i in enumerate(pick):
        j = full.ids.index(i)
        np.testing.assert_array_equal(sub.images[k], full.images[j])
        np.testing.assert_array_equal(sub.masks[k], full.masks[j])
        assert sub.image_paths[k].stem == i
    before = np.array(full.images)
    if isinstance(sub.images, np.ndarray):
        sub.images[:] = 0  # an in-memory subset is a copy: changing it leaves the source alone
    else:
        with pytest.raises(TypeError):  # rows read from the cache are read-only
            sub.images[:] = 0
    np.testing.assert_array_equal(full.images, before)
    assert full.subset([]).ids == [] and len(full.subset([])) == 0


def test_split_subset_unlabelled(tmp_path):
    root = make_root(tmp_path / "d", train=labelled_items(["cmr1"]), test={"cmr3": image(3), "cmr1x": image(1), "cmr2": image(2)})
    test = load_dataset(root).load("test")
    assert test.ids == ["cmr1x", "cmr2", "cmr3"]
    sub = test.subset(["cmr3", "cmr1x"])
    assert sub.masks is None and sub.ids == ["cmr3", "cmr1x"] and sub.splits == ["test", "test"]
    np.testing.assert_array_equal(sub.images[0, :, :, 0], image(3))
    np.testing.assert_array_equal(sub.images[1, :, :, 0], image(1))


def test_split_subset_without_bookkeeping():
    imgs = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4, 1)
    s = data.Split(ids=["a", "b", "c"], images=imgs, masks=None)
    sub = s.subset(["c", "a"])
    assert sub.splits == [] and sub.image_paths == []
    np.testing.assert_array_equal(sub.images, imgs[[2, 0]])


def test_train_images_without_masks_name_the_mask_folder(tmp_path):
    root = make_root(tmp_path / "d", test={"cmr1": image()})
    (root / "train" / "image").mkdir(parents=True)
    cv2.imwrite(str(root / "train" / "image" / "cmr2.png"), image())
    with pytest.raises(DataError) as exc:
        labelled(root)
    one_line(exc, root / "train" / "mask", "no masks")
