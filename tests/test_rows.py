"""Memory at scale (issue 24): the cache's lazy rows (subset and concat stay on disk, batches read only their
rows), the block-by-block .npz writer, and validation / out-of-fold files written a block at a time giving
exactly what one block gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kagglecmr.cfg.config import load_config
from kagglecmr.data import loader, rows
from kagglecmr.data.batches import BatchMaker
from kagglecmr.data.loader import Split
from kagglecmr.data.rows import LazyRows
from kagglecmr.engine import trainer
from kagglecmr.models.factory import build_model
from kagglecmr.utils.npz import NpzWriter


def _lazy(tmp_path, name, arr) -> LazyRows:
    np.save(tmp_path / f"{name}.npy", arr)
    return LazyRows.of_file(tmp_path / f"{name}.npy")


def _split(tmp_path, n=12, hw=(24, 40), c=3, seed=0, lazy=True, prefix="a") -> Split:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *hw, c), dtype=np.uint8)
    masks = rng.integers(0, 3, (n, *hw), dtype=np.uint8)
    if lazy:
        images, masks = _lazy(tmp_path, f"{prefix}i", images), _lazy(tmp_path, f"{prefix}m", masks)
    return Split(ids=[f"{prefix}{k}" for k in range(n)], images=images, masks=masks, splits=["train"] * n)


def test_lazy_rows_index_like_numpy(tmp_path):
    arr = np.arange(7 * 3 * 4 * 2, dtype=np.uint8).reshape(7, 3, 4, 2)
    lazy = _lazy(tmp_path, "x", arr)
    assert lazy.shape == arr.shape and lazy.dtype == arr.dtype and len(lazy) == 7 and lazy.nbytes == arr.nbytes
    for key in (3, -1, slice(1, 5), slice(None, None, -2), [6, 0, 0, 2], np.array([5, 1]), arr[:, 0, 0, 0] % 2 == 0,
                (2, 1), (slice(0, 3), 0), ([1, 4], slice(None), 2), (Ellipsis, slice(2, None, -1)), (Ellipsis, 0),
                (slice(1, 3), Ellipsis, 1), (None, 2)):
        assert np.array_equal(lazy[key], arr[key]), key
    assert np.array_equal(np.asarray(lazy), arr) and np.array_equal(np.stack(list(lazy)), arr)
    assert lazy.max() == arr.max() and np.array_equal(lazy.astype(np.int16), arr)  # other ndarray methods: read all
    reflected = 5 == lazy  # noqa: SIM300 (the reflected operator is the point)
    for got, want in ((lazy == 5, arr == 5), (reflected, arr == 5), (lazy > 3, arr > 3), (lazy + 1, arr + 1),
                      (lazy >> 1, arr >> 1), (2 * lazy, 2 * arr), (~lazy, ~arr), (lazy != arr, arr != arr)):
        assert isinstance(got, np.ndarray) and np.array_equal(got, want)  # operators too, never identity
    assert not hasattr(lazy, "no_such_thing") and not hasattr(lazy, "__array_interface__")
    with pytest.raises(IndexError):
        lazy.__getitem__(7)


def test_subset_and_concat_stay_on_disk_and_batches_read_the_same_rows(tmp_path):
    lazy = loader.concat([_split(tmp_path, n=9, seed=1, prefix="a"), _split(tmp_path, n=5, seed=2, prefix="b")])
    plain = loader.concat([_split(tmp_path, n=9, seed=1, lazy=False, prefix="a"),
                           _split(tmp_path, n=5, seed=2, lazy=False, prefix="b")])
    assert isinstance(lazy.images, LazyRows) and len(lazy.images.files) == 2
    ids = ["b3", "a0", "a7", "b1", "a2"]
    sub, ref = lazy.subset(ids), plain.subset(ids)
    assert isinstance(sub.images, LazyRows) and isinstance(sub.masks, LazyRows) and sub.ids == ids
    assert np.array_equal(np.asarray(sub.images), ref.images) and np.array_equal(np.asarray(sub.masks), ref.masks)
    cfg = load_config("demo", ["data.size=[24,40]", "data.num_classes=3", "data.patch=[16,16]"])
    made = [BatchMaker(cfg, s.images, s.masks, torch.device("cpu")) for s in (sub, ref)]
    for bm in made:
        bm.reseed(7)
    idx = np.array([4, 0, 2])
    (xa, ya), (xb, yb) = (bm(idx) for bm in made)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_blocks_cover_any_array_in_order(tmp_path):
    arr = np.arange(10 * 6, dtype=np.uint8).reshape(10, 6)
    for a in (arr, _lazy(tmp_path, "b", arr)):
        got = list(rows.blocks(a, 4))
        assert [s for s, _ in got] == [0, 4, 8] and np.array_equal(np.concatenate([b for _, b in got]), arr)
    assert rows.block_rows(arr, max_bytes=25, multiple=2) == 4 and rows.block_rows(arr, max_bytes=1, multiple=3) == 3


def test_npz_writer_matches_savez_and_leaves_nothing_on_error(tmp_path):
    rng = np.random.default_rng(0)
    big = rng.random((7, 2, 5, 3)).astype(np.float16)
    with NpzWriter(tmp_path / "a.npz") as npz:
        npz.add("ids", np.array(["x", "y"]))
        out = npz.array("probs", big.shape, np.float16)
        for s in (0, 3, 4):
            out.write(big[s:s + (3 if s == 0 else 1 if s == 3 else 3)])
        npz.add("dice", np.ones((7, 2)))
    np.savez_compressed(tmp_path / "b.npz", ids=np.array(["x", "y"]), probs=big, dice=np.ones((7, 2)))
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert a.files == b.files == ["ids", "probs", "dice"]
        for k in a.files:
            assert np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype
    with pytest.raises(ValueError, match="got 2 of its 7 rows"), NpzWriter(tmp_path / "c.npz") as npz:
        npz.array("probs", big.shape, np.float16).write(big[:2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npz"]  # no c.npz, no spool folder


@pytest.mark.parametrize("tiled", [False, True])
def test_validation_and_oof_by_blocks_equal_one_block(tmp_path, monkeypatch, tiled):
    torch.manual_seed(0)
    cfg = load_config("demo", ["data.size=[32,48]", "data.in_channels=3", "data.num_classes=3",
                               "train.val_batch_size=2"] + (["infer.tile={size: 32, overlap: 0.5}"] if tiled else []))
    va = _split(tmp_path, n=7, hw=(32, 48))
    model = build_model(cfg).eval()
    crit = torch.nn.CrossEntropyLoss()
    out = {}
    for name, block in (("one", 1 << 30), ("blocks", 1)):  # 1 byte: blocks of one batch (2 images), or one image
        monkeypatch.setattr(trainer, "VAL_BLOCK_BYTES", block)
        assert len(list(trainer._val_blocks(va, cfg))) == (1 if name == "one" else 7 if tiled else 4)
        table, loss = trainer._validate(model, crit, va, cfg, torch.device("cpu"), None, tiled)
        trainer._save_oof(tmp_path / f"{name}.npz", model, va, cfg, torch.device("cpu"), None)
        with np.load(tmp_path / f"{name}.npz") as z:
            out[name] = (table, loss, {k: z[k] for k in z.files})
    (t1, l1, z1), (t2, l2, z2) = out["one"], out["blocks"]
    assert np.array_equal(t1.rows, t2.rows) and np.array_equal(t1.inter, t2.inter) and t1.score == t2.score
    assert np.isnan(l1) and np.isnan(l2) if tiled else l1 == l2
    assert z1.keys() == z2.keys() == {"ids", "probs", "labels", "dice", "counts", "classes", "scores"}
    for k in z1:
        assert np.array_equal(z1[k], z2[k]), k
    assert z1["probs"].shape == (7, 3, 32, 48) and np.array_equal(z1["scores"], t1.rows)
    assert np.array_equal(z1["counts"][..., 0], t1.inter) and tuple(z1["classes"]) == tuple(t1.classes)
