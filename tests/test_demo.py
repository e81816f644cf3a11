"""Synthetic demo dataset: layout, labels, determinism, overwrite safety, loadability."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

import kagglecmr.data.demo as demo
from kagglecmr.data.dataset import load_dataset
from kagglecmr.data.demo import make_demo_dataset
from kagglecmr.utils.errors import KaggleCMRError
from kagglecmr.utils.naming import natural_sorted


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _names(folder: Path) -> list[str]:
    return natural_sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def default_demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "cmr"
    make_demo_dataset(out)
    return out


def test_layout_and_ids(tmp_path):
    out = tmp_path / "d"
    info = make_demo_dataset(out, n_train=4, n_val=2, n_test=3, seed=1)
    assert sorted(p.name for p in out.iterdir()) == ["test", "train", "val"]
    assert sorted(p.name for p in (out / "train").iterdir()) == ["image", "mask"]
    assert sorted(p.name for p in (out / "test").iterdir()) == ["image"]
    assert _names(out / "train" / "image") == [f"cmr{i}.png" for i in range(1, 5)]
    assert _names(out / "train" / "mask") == [f"cmr{i}_mask.png" for i in range(1, 5)]
    assert _names(out / "val" / "image") == ["cmr5.png", "cmr6.png"]
    assert _names(out / "val" / "mask") == ["cmr5_mask.png", "cmr6_mask.png"]
    assert _names(out / "test" / "image") == ["cmr7.png", "cmr8.png", "cmr9.png"]
    assert (info["train"], info["val"], info["test"]) == (4, 2, 3)
    assert not list(tmp_path.glob(".*")), "temporary folders left behind"


def test_zero_val_and_test_splits_are_omitted(tmp_path):
    make_demo_dataset(tmp_path / "d", n_train=3, n_val=0, n_test=0)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["train"]


def test_pngs_are_uint8_grayscale_with_labels_0_to_3(default_demo):
    values = set()
    for split in ("train", "val"):
        for p in (default_demo / split / "mask").iterdir():
            m = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
            assert m.dtype == np.uint8 and m.shape == (96, 96)
            values |= set(np.unique(m).tolist())
    assert values == {0, 1, 2, 3}
    for p in (default_demo / "test" / "image").iterdir():
        img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        assert img.dtype == np.uint8 and img.shape == (96, 96)


def test_some_slices_have_no_rv_but_all_have_lv_and_myo(default_demo):
    split = load_dataset(default_demo).labelled()
    has = np.array([[(m == k).any() for k in (1, 2, 3)] for m in split.masks])
    no_rv = int((~has[:, 0]).sum())
    assert 2 <= no_rv <= 16  # ~10% of 72
    assert has[:, 1:].all()


def test_classes_differ_in_intensity_and_lv_is_not_just_bright(default_demo):
    split = load_dataset(default_demo).labelled()
    img, m = split.images[..., 0].astype(float), split.masks
    mean = {k: img[m == k].mean() for k in range(4)}
    assert mean[3] > mean[1] > mean[2] + 30  # LV bright, RV mid-grey, myocardium dark
    bright_background = ((img > np.percentile(img[m == 3], 25)) & (m == 0)).sum()
    assert bright_background > 0.1 * (m == 3).sum()  # blobs as bright as the LV: not solvable by a threshold


def test_dataset_loader_reads_it(default_demo):
    split = load_dataset(default_demo).labelled()
    assert len(split) == 72
    assert split.ids[0] == "cmr1" and split.ids[-1] == "cmr72"
    assert split.splits.count("val") == 12
    assert split.images.shape == (72, 96, 96, 1) and split.masks.shape == (72, 96, 96)
    test = load_dataset(default_demo).load("test")
    assert test.ids == [f"cmr{i}" for i in range(73, 97)] and test.masks is None


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    kw = dict(n_train=5, n_val=2, n_test=2)
    make_demo_dataset(tmp_path / "a", seed=3, **kw)
    make_demo_dataset(tmp_path / "b", seed=3, **kw)
    make_demo_dataset(tmp_path / "c", seed=4, **kw)
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a)


def test_size_option(tmp_path):
    make_demo_dataset(tmp_path / "d", n_train=2, n_val=0, n_test=1, size=64)
    ds = load_dataset(tmp_path / "d")
    assert ds.size == (64, 64)
    assert ds.labelled().images.shape == (2, 64, 64, 1)


def test_fast(tmp_path):
    start = time.perf_counter()
    make_demo_dataset(tmp_path / "d")
    assert time.perf_counter() - start < 5.0  # ~0.3 s; generous for slow CI machines


@pytest.mark.parametrize("kw", [dict(n_train=0), dict(n_val=-1), dict(n_test=-2), dict(size=16)])
def test_bad_arguments(tmp_path, kw):
    with pytest.raises(KaggleCMRError):
        make_demo_dataset(tmp_path / "d", **kw)
    assert not (tmp_path / "d").exists()


def test_refuses_non_empty_folder_without_force(tmp_path):
    out = tmp_path / "d"
    make_demo_dataset(out, n_train=3, n_val=1, n_test=1, seed=0)
    before = _files(out)
    with pytest.raises(KaggleCMRError, match="not empty"):
        make_demo_dataset(out, n_train=2, n_val=0, n_test=0, seed=1)
    assert _files(out) == before


def test_force_replaces_dataset(tmp_path):
    out = tmp_path / "d"
    make_demo_dataset(out, n_train=3, n_val=1, n_test=1, seed=0)
    make_demo_dataset(out, n_train=2, n_val=0, n_test=0, seed=1, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["train"]
    assert _names(out / "train" / "image") == ["cmr1.png", "cmr2.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_empty_existing_folder_is_used(tmp_path):
    (tmp_path / "d").mkdir()
    make_demo_dataset(tmp_path / "d", n_train=2, n_val=0, n_test=0)
    assert len(list((tmp_path / "d" / "train" / "image").iterdir())) == 2


def test_force_never_deletes_a_folder_that_is_not_a_dataset(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(KaggleCMRError, match="does not look like a dataset"):
        make_demo_dataset(out, n_train=2, force=True)
    assert (out / "notes.txt").read_text() == "keep me"


def test_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(KaggleCMRError, match="not a folder"):
        make_demo_dataset(tmp_path / "f", force=True)


def test_failure_mid_write_keeps_the_old_dataset(tmp_path, monkeypatch):
    out = tmp_path / "d"
    make_demo_dataset(out, n_train=3, n_val=1, n_test=1)
    before = _files(out)
    calls = {"n": 0}
    real_png = demo._png

    def flaky_png(arr):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError("disk full")
        return real_png(arr)

    monkeypatch.setattr(demo, "_png", flaky_png)
    with pytest.raises(OSError):
        make_demo_dataset(out, n_train=5, n_val=0, n_test=0, seed=9, force=True)
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_phantom_is_deterministic_for_a_generator_state():
    a = demo.make_phantom(np.random.default_rng(5))
    b = demo.make_phantom(np.random.default_rng(5))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    img, mask = demo.make_phantom(np.random.default_rng(5), with_rv=False)
    assert not (mask == 1).any() and (mask == 3).any()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kagglecmr", *args], capture_output=True, text=True, timeout=120)


def test_cli_demo_data(tmp_path):
    out = tmp_path / "d"
    res = _cli("demo-data", str(out), "--n-train", "3", "--n-val", "1", "--n-test", "1")
    assert res.returncode == 0, res.stderr
    assert "demo-data: wrote 3 train" in res.stdout
    res = _cli("demo-data", str(out))
    assert res.returncode == 2
    assert res.stderr.startswith("error:") and len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.stderr
