"""Big and deep images (kagglecmr.data.image_formats): 16-bit PNGs and TIFFs scaled by the image's min-max, TIFF
images and masks in every layout tifffile writes, 90+ Mpx JPEG/PNG files, and a whole-slide size refused."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml
from conftest import TINY_YAML

from kagglecmr.cfg.config import Config
from kagglecmr.data import loader as D
from kagglecmr.data.dataset import load_dataset
from kagglecmr.data.demo import make_demo_dataset
from kagglecmr.data.folds import run_make_folds
from kagglecmr.data.image_formats import header_size, read_tiff, to_uint8
from kagglecmr.engine.orchestrate import run_train
from kagglecmr.utils.errors import DataError


def _stretch(x: np.ndarray) -> np.ndarray:
    """The documented rule, written out: round((v - min) * 255 / (max - min))."""
    x = x.astype(np.float64)
    return np.rint((x - x.min()) * 255 / (x.max() - x.min())).astype(np.uint8)


# ------------------------------------------------------------------------------------ the uint8 rule
def test_deep_pixels_are_stretched_by_the_images_own_min_max():
    rng = np.random.default_rng(0)
    uw = rng.integers(40, 3100, (30, 40)).astype(np.uint16)  # a UW-Madison-like slice: a few thousand at most
    out = to_uint8(uw, "uw")
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255 and len(np.unique(out)) > 200
    np.testing.assert_array_equal(out, _stretch(uw))
    full = rng.integers(0, 256, (30, 40)).astype(np.uint8)
    full[0, :2] = 0, 255
    np.testing.assert_array_equal(to_uint8(full.astype(np.uint16) * 257, "full"), full)  # 0..65535: v / 257
    signed = rng.normal(0, 500, (8, 9, 3)).astype(np.int16)  # CT-like, negative values, colour: one min-max
    np.testing.assert_array_equal(to_uint8(signed, "ct"), _stretch(signed))
    np.testing.assert_array_equal(to_uint8(np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "f"),
                                  _stretch(np.linspace(-1, 1, 12).reshape(3, 4)))
    assert (to_uint8(np.full((4, 4), 700, np.uint16), "flat") == 0).all()
    np.testing.assert_array_equal(to_uint8(np.eye(3, dtype=bool), "b"), np.eye(3, dtype=np.uint8) * 255)
    with pytest.raises(DataError, match="nan.png: pixel values include NaN"):
        to_uint8(np.array([[0, np.nan]], np.float32), "nan.png")
    with pytest.raises(DataError, match="c.png: unsupported pixel type complex64"):
        to_uint8(np.zeros((2, 2), np.complex64), "c.png")


# ------------------------------------------------------------------------------------ TIFF layouts
def test_tiff_images_and_masks_in_the_layouts_tifffile_writes(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "contig.tif", rgb, photometric="rgb")
    tifffile.imwrite(tmp_path / "planar.tiff", np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    tifffile.imwrite(tmp_path / "zip.tif", rgb, photometric="rgb", compression="zlib")
    assert cv2.imwrite(str(tmp_path / "lzw.tif"), rgb[:, :, ::-1])  # OpenCV writes LZW: tifffile needs imagecodecs
    for name in ("contig.tif", "planar.tiff", "zip.tif", "lzw.tif"):
        np.testing.assert_array_equal(D.decode_image(tmp_path / name), rgb)  # RGB order kept
        assert D.image_size(tmp_path / name) == (20, 30)
    deep = rng.integers(100, 4000, (20, 30)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "deep.tif", deep)
    np.testing.assert_array_equal(D.decode_image(tmp_path / "deep.tif")[:, :, 0], _stretch(deep))
    labels = rng.integers(0, 3, (20, 30)).astype(np.int32)  # int32 labels -> uint8; 1-bit -> 0/255 as OpenCV
    tifffile.imwrite(tmp_path / "m.tif", labels)
    tifffile.imwrite(tmp_path / "bits.tif", labels > 0)
    np.testing.assert_array_equal(D.decode_mask(tmp_path / "m.tif"), labels.astype(np.uint8))
    np.testing.assert_array_equal(D.decode_mask(tmp_path / "bits.tif"), (labels > 0) * np.uint8(255))
    assert read_tiff(tmp_path / "bits.tif").dtype == np.uint8

    tifffile.imwrite(tmp_path / "stack.tif", rng.integers(0, 9, (6, 20, 30), dtype=np.uint8))
    with pytest.raises(DataError, match=r"stack.tif: TIFF holds 6x20x30 \(.*\), expected one 2-D image"):
        D.decode_image(tmp_path / "stack.tif")
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(DataError, match="bad.tif: not a readable TIFF"):
        D.decode_image(tmp_path / "bad.tif")


def _png_header_only(path: Path, w: int, h: int) -> None:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    path.write_bytes(D.PNG_SIGNATURE + chunk)


def test_a_whole_slide_size_is_refused_from_the_header(tmp_path):
    _png_header_only(tmp_path / "slide.png", 40000, 30000)
    with pytest.raises(DataError, match="slide.png: 40000x30000 pixels, more than 1024 Mpx; a whole-slide image is "
                                        "out of scope: cut it into tiles"):
        D.decode_image(tmp_path / "slide.png")


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_a_95_mpx_file_decodes(tmp_path, ext):
    """10,000 x 9,500 grey (95 Mpx, past PIL's 89-Mpx decompression-bomb warning): a constant picture compresses to
    a small file; its size comes from the header, its pixels decode whole."""
    h, w = 9500, 10000
    ok, buf = cv2.imencode(ext, np.full((h, w), 77, np.uint8))
    assert ok
    path = tmp_path / f"big{ext}"
    path.write_bytes(buf.tobytes())
    del buf
    assert path.stat().st_size < 3_000_000
    assert header_size(path) == (h, w) and D.image_size(path) == (h, w)
    img = D.decode_image(path)
    assert img.shape == (h, w, 1) and img.dtype == np.uint8
    assert abs(int(img[::97, ::89].mean()) - 77) <= 1


# ------------------------------------------------------------------------------------ datasets that train
def _as_16bit(src: Path, dst: Path, how: str) -> None:
    """The demo dataset with 16-bit images (values up to ~3,000, like UW-Madison) as PNG or TIFF (masks too)."""
    for p in src.rglob("*.png"):
        q = dst / p.relative_to(src)
        q.parent.mkdir(parents=True, exist_ok=True)
        arr = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        if p.parent.name == "image":
            arr = arr.astype(np.uint16) * 12 + 30
        if how == "tiff":
            tifffile.imwrite(q.with_suffix(".tif"), arr, compression="zlib")
        else:
            assert cv2.imwrite(str(q), arr)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["png16", "tiff"])
def test_a_16bit_dataset_loads_trains_one_epoch_and_predicts(tmp_path, how, main_cli):
    make_demo_dataset(tmp_path / "demo", n_train=8, n_val=0, n_test=1, seed=5)
    data = tmp_path / how
    _as_16bit(tmp_path / "demo", data, how)
    ds = load_dataset(data)
    split = ds.labelled()
    ref = load_dataset(tmp_path / "demo").labelled()
    assert split.ids == ref.ids and split.images.dtype == np.uint8
    for got, orig in zip(split.images, ref.images):  # each image stretched by its own min-max
        np.testing.assert_array_equal(got, _stretch(orig.astype(np.uint16) * 12 + 30))
    np.testing.assert_array_equal(split.masks, ref.masks)
    run_make_folds(data, n_folds=2, seed=0, out=tmp_path / "folds.csv")
    raw = yaml.safe_load(TINY_YAML)
    raw["train"].update(epochs=1, batch_size=4)
    run_train(Config.model_validate(raw), fold_spec="0", data_root=data, folds_path=tmp_path / "folds.csv",
              name=how, runs_dir=tmp_path / "runs", device="cpu", force=False, quiet=True)
    metrics = pd.read_csv(tmp_path / "runs" / how / "fold0" / "metrics.csv")
    assert len(metrics) == 1 and metrics["val_dice"].notna().all()
    (test,) = (data / "test" / "image").iterdir()  # predict takes the 16-bit file and a JPEG
    cv2.imwrite(str(tmp_path / "photo.jpg"), cv2.resize(ref.images[0], (120, 80)))
    (tmp_path / "zz.tif").write_bytes(b"II*\x00 not a tiff")  # a damaged file among them: nothing is written
    args = ["--runs", tmp_path / "runs" / how, "--out", tmp_path / "pred", "--device", "cpu"]
    proc = main_cli("predict", test, tmp_path / "photo.jpg", tmp_path / "zz.tif", *args)
    assert proc.returncode == 2 and "zz.tif: not a readable TIFF" in proc.stderr
    assert not (tmp_path / "pred").exists()
    proc = main_cli("predict", test, tmp_path / "photo.jpg", *args)
    assert proc.returncode == 0, proc.stderr
    assert cv2.imread(str(tmp_path / "pred" / f"{test.stem}.png"), cv2.IMREAD_UNCHANGED).shape == (96, 96)
    assert cv2.imread(str(tmp_path / "pred" / "photo.png"), cv2.IMREAD_UNCHANGED).shape == (80, 120)
