"""The decoded-array cache (kagglecmr.data.cache): the same arrays as decoding into memory, opened memory-mapped,
rebuilt when a file changes or is added, shared by the commands, and the same training metrics at a fixed seed."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pandas as pd
import pytest

from kagglecmr.data import cache
from kagglecmr.data.dataset import load_dataset
from kagglecmr.data.demo import make_demo_dataset
from kagglecmr.data.rows import LazyRows


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setattr(cache, "_override", None)
    monkeypatch.setenv(cache.ENV, str(folder))
    return folder


def _entries(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def test_cached_split_equals_in_memory_and_is_read_lazily(tmp_path, cache_dir, monkeypatch):
    data = tmp_path / "d"
    make_demo_dataset(data, n_train=8, n_val=3, n_test=2, seed=1)
    cached = load_dataset(data).load("train")
    assert isinstance(cached.images, LazyRows) and isinstance(cached.masks, LazyRows)
    assert len(_entries(cache_dir)) == 1
    monkeypatch.setenv(cache.ENV, "off")
    plain = load_dataset(data).load("train")
    assert isinstance(plain.images, np.ndarray)
    assert cached.ids == plain.ids and cached.orig_sizes == plain.orig_sizes
    assert np.array_equal(cached.images, plain.images) and np.array_equal(cached.masks, plain.masks)
    assert _entries(cache_dir) and len(_entries(cache_dir)) == 1  # off: nothing written


def test_a_changed_or_added_file_makes_a_new_entry(tmp_path, cache_dir):
    data = tmp_path / "d"
    make_demo_dataset(data, n_train=6, n_val=0, n_test=2, seed=2)
    first = load_dataset(data).load("train")
    again = load_dataset(data).load("train")
    assert len(_entries(cache_dir)) == 1 and np.array_equal(first.images, again.images)
    img = data / "train" / "image" / f"{first.ids[0]}.png"
    cv2.imwrite(str(img), np.full((96, 96), 7, np.uint8))
    os.utime(img, ns=(1, 1))  # a different mtime even on a coarse clock
    changed = load_dataset(data).load("train")
    assert len(_entries(cache_dir)) == 2 and (changed.images[0] == 7).all()
    cv2.imwrite(str(data / "train" / "image" / "extra1.png"), np.full((96, 96), 9, np.uint8))
    cv2.imwrite(str(data / "train" / "mask" / "extra1_mask.png"), np.zeros((96, 96), np.uint8))
    added = load_dataset(data).load("train")
    assert len(_entries(cache_dir)) == 3 and "extra1" in added.ids and len(added) == len(first) + 1


def test_large_splits_decode_in_parallel_processes_with_progress(tmp_path, cache_dir, monkeypatch, capsys):
    data = tmp_path / "d"
    make_demo_dataset(data, n_train=70, n_val=0, n_test=2, seed=3, size=32)
    monkeypatch.setattr(cache.os, "cpu_count", lambda: 2)
    cached = load_dataset(data).load("train")
    assert "cache: decoded 70/70 images" in capsys.readouterr().err
    monkeypatch.setenv(cache.ENV, "off")
    plain = load_dataset(data).load("train")
    assert np.array_equal(np.asarray(cached.images), plain.images) and np.array_equal(cached.masks, plain.masks)


def test_a_half_built_entry_is_never_used(tmp_path, cache_dir, monkeypatch):
    data = tmp_path / "d"
    make_demo_dataset(data, n_train=4, n_val=0, n_test=2, seed=4)
    ds = load_dataset(data)

    def boom(*a):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        cache.load_split(ds, "train", True, boom)
    assert _entries(cache_dir) == [] and not any(cache_dir.iterdir())  # the temporary folder is gone too
    assert len(load_dataset(data).load("train")) == 4


@pytest.mark.slow
def test_training_metrics_are_identical_with_and_without_the_cache(tmp_path, main_cli, monkeypatch):
    monkeypatch.setattr(cache, "_override", None)  # --cache-dir below sets both for the process: restored after
    monkeypatch.setenv(cache.ENV, os.environ.get(cache.ENV, "off"))
    data = tmp_path / "d"
    make_demo_dataset(data, n_train=20, n_val=5, n_test=2, seed=5)
    assert main_cli("make-folds", "--data", data, "--out", tmp_path / "folds.csv").returncode == 0
    runs = {}
    for name, where in (("cached", str(tmp_path / "cache")), ("memory", "off")):
        proc = main_cli("--cache-dir", where, "train", "--fold", "0", "--config", "demo", "--data", data, "--folds",
                        tmp_path / "folds.csv", "--name", name, "--runs-dir", tmp_path / "runs", "--epochs", "2",
                        "--set", "train.threads=1", "--quiet", "--device", "cpu")
        assert proc.returncode == 0, proc.stderr
        df = pd.read_csv(tmp_path / "runs" / name / "fold0" / "metrics.csv")
        runs[name] = df.drop(columns=[c for c in df.columns if c.endswith("_s")])
    pd.testing.assert_frame_equal(runs["cached"], runs["memory"])
    assert _entries(tmp_path / "cache")
