"""k-fold assignment: coverage, balance, grouping of near-duplicates, determinism, file safety."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from kagglecmr import api
from kagglecmr.data.dataset import load_dataset
from kagglecmr.data.demo import make_demo_dataset
from kagglecmr.data.folds import (
    SIMILARITY_THRESHOLD,
    fold_features,
    fold_problems,
    fold_table,
    image_similarity,
    make_folds,
    merge_rare_strata,
    read_folds,
    run_make_folds,
    similarity_cap,
    similarity_groups,
    write_folds,
)
from kagglecmr.data.similarity import cut_complete_linkage
from kagglecmr.utils.errors import DataError, KaggleCMRError
from kagglecmr.utils.naming import natural_sorted

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cmr"
needs_real = pytest.mark.skipif(not (REAL / "train" / "image").is_dir(), reason=f"real data not found at {REAL}")

# near-duplicate pairs written into the "dups" dataset: (copy, source); cmr61 is in val/
DUPLICATES = {"cmr2": "cmr1", "cmr30": "cmr5", "cmr31": "cmr30", "cmr61": "cmr7"}


def _image_path(root: Path, i: str) -> Path:
    return next(root.glob(f"*/image/{i}.png"))


def _near_duplicate(src: np.ndarray, other: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``src`` with the centre (the heart) taken from ``other``, brighter and re-noised: an ED/ES-like twin."""
    dup = src.astype(np.float32) * 1.1 + rng.normal(0, 4, src.shape)
    dup[33:63, 33:63] = other[33:63, 33:63]
    return np.clip(dup, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("folds") / "demo"
    make_demo_dataset(out, seed=0)
    return out


@pytest.fixture(scope="module")
def dups(tmp_path_factory, demo) -> Path:
    """The demo dataset with a few deliberately near-duplicate images (one chain of three, one across val)."""
    out = tmp_path_factory.mktemp("folds") / "dups"
    shutil.copytree(demo, out)
    rng = np.random.default_rng(0)
    for copy, src in DUPLICATES.items():
        img = cv2.imread(str(_image_path(out, src)), cv2.IMREAD_GRAYSCALE)
        other = cv2.imread(str(_image_path(out, "cmr50")), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(_image_path(out, copy)), _near_duplicate(img, other, rng))
    return out


def _run(root: Path, out: Path, **kw) -> pd.DataFrame:
    return run_make_folds(root, out=out, **kw)


# --------------------------------------------------------------------------- features and groups


def test_fold_features_cmr():
    masks = np.zeros((6, 8, 8), np.uint8)
    masks[:, :2, :2] = 1
    masks[:, 4:6, 4:] = 2
    masks[:, 6:, 4:] = 3
    masks[0, :2, :2] = 0  # no RV
    masks[1, 4:, :4] = 3  # bigger LV
    df = fold_features(masks, 4, n_folds=2)
    assert df["has_1"].tolist() == [0, 1, 1, 1, 1, 1]
    assert df["area_1"].tolist() == [0, 4, 4, 4, 4, 4]
    assert df["lv_myo_area"].tolist() == [16, 32, 16, 16, 16, 16]
    assert df["size_bin"].max() == 2 and df.loc[1, "size_bin"] == 2
    assert df["stratum"].value_counts().min() >= 2


def test_fold_features_binary_task():
    masks = np.zeros((10, 4, 4), np.uint8)
    for k in range(10):
        masks[k].flat[:k] = 1
    df = fold_features(masks, 2, n_folds=2)
    assert {"has_1", "area_1", "fg_area", "size_bin", "stratum"} <= set(df.columns)
    assert "lv_myo_area" not in df.columns and "has_2" not in df.columns
    assert df["has_1"].tolist() == [0] + [1] * 9
    assert df["fg_area"].tolist() == list(range(10))


def test_rare_strata_are_merged():
    fine = ["a_0"] * 6 + ["a_1"] * 2 + ["b_0"] * 1 + ["c_0"] * 5
    coarse = [f[0] for f in fine]
    assert merge_rare_strata(fine, coarse, 3) == ["a_0"] * 6 + ["rare"] * 3 + ["c_0"] * 5
    # a rare stratum that is still too small joins the most common one
    assert merge_rare_strata(fine, coarse, 4) == ["a_0"] * 6 + ["a_0"] * 3 + ["c_0"] * 5
    # a small fine stratum falls back to its coarse one when that is big enough
    fine = ["a_0"] * 3 + ["a_1"] * 3 + ["b_0"] * 4
    assert merge_rare_strata(fine, [f[0] for f in fine], 4) == ["a"] * 6 + ["b_0"] * 4


def test_similarity_groups_link_near_duplicates_numbered_by_first_member():
    rng = np.random.default_rng(1)
    base = [cv2.resize(rng.normal(100, 40, (24, 24)).clip(0, 255).astype(np.uint8), (96, 96)) for _ in range(3)]
    noisy = [np.clip(b + rng.normal(0, 3, b.shape), 0, 255).astype(np.uint8) for b in base]
    flat = np.full((96, 96), 7, np.uint8)
    images = np.stack([base[0], base[1], noisy[0], flat, base[2], noisy[1], flat])
    assert similarity_groups(images).tolist() == [0, 1, 0, 2, 3, 1, 4]
    assert similarity_groups(images[:, :, :, None]).tolist() == [0, 1, 0, 2, 3, 1, 4]  # [N, H, W, C] input
    assert similarity_groups(images[:0]).tolist() == []
    sim = image_similarity(images)
    assert sim.shape == (7, 7) and np.allclose(np.diag(sim), 1)


def test_demo_phantoms_are_not_near_duplicates(demo):
    split = load_dataset(demo).labelled()
    groups = similarity_groups(split.images)
    assert len(set(groups.tolist())) == len(split)


# --------------------------------------------------------------------------- make_folds on demo data


def test_every_labelled_image_exactly_once_including_val(demo, tmp_path, capsys):
    df = _run(demo, tmp_path / "f.csv")
    ids = load_dataset(demo).labelled().ids
    assert df["id"].tolist() == natural_sorted(ids)
    assert df["id"].is_unique and len(df) == 72
    assert set(df["fold"]) == set(range(5))
    assert df.loc[df["split"] == "val", "id"].tolist() == [f"cmr{i}" for i in range(61, 73)]
    assert {"id", "split", "fold", "group", "stratum", "has_1", "has_2", "has_3", "lv_myo_area"} <= set(df.columns)
    out = capsys.readouterr().out
    assert "similarity groups" in out and "fold" in out and "all" in out


def test_folds_are_balanced(demo):
    df = make_folds(load_dataset(demo).labelled(), n_folds=5)
    sizes = df["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 2
    no_rv = (df["has_1"] == 0).groupby(df["fold"]).sum()
    assert no_rv.max() - no_rv.min() <= 2
    for _, per_fold in df.groupby("size_bin")["fold"]:
        counts = per_fold.value_counts().reindex(range(5), fill_value=0)
        assert counts.max() - counts.min() <= 2


def test_no_sklearn_warnings(demo):
    split = load_dataset(demo).labelled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_folds(split, n_folds=5)
        make_folds(split.subset(split.ids[:20]), n_folds=5)


def test_deterministic_bytes_and_seed_matters(demo, tmp_path):
    _run(demo, tmp_path / "a.csv", seed=7)
    _run(demo, tmp_path / "b.csv", seed=7)
    _run(demo, tmp_path / "c.csv", seed=8)
    a, b, c = ((tmp_path / f"{x}.csv").read_bytes() for x in "abc")
    assert a == b
    assert a != c
    fa, fc = (read_folds(tmp_path / f"{x}.csv")["fold"] for x in "ac")
    assert (fa != fc).any()


def test_input_order_does_not_matter(demo):
    split = load_dataset(demo).labelled()
    shuffled = split.subset(list(reversed(split.ids)))
    pd.testing.assert_frame_equal(make_folds(split), make_folds(shuffled))


def test_near_duplicates_share_group_and_fold(dups, tmp_path):
    df = _run(dups, tmp_path / "f.csv").set_index("id")
    for copy, src in DUPLICATES.items():
        assert df.loc[copy, "group"] == df.loc[src, "group"], (copy, src)
        assert df.loc[copy, "fold"] == df.loc[src, "fold"], (copy, src)
    assert df["group"].nunique() == len(df) - len(DUPLICATES)
    assert df.groupby("group")["fold"].nunique().max() == 1
    assert df.loc["cmr61", "split"] == "val" and df.loc["cmr7", "split"] == "train"


def test_group_ids_numbered_by_first_member(dups, tmp_path):
    df = _run(dups, tmp_path / "f.csv")
    first_seen = df.drop_duplicates("group")["group"].tolist()
    assert first_seen == list(range(df["group"].nunique()))


def test_groups_hold_across_seeds(dups):
    split = load_dataset(dups).labelled()
    for seed in range(5):
        df = make_folds(split, seed=seed)
        assert df.groupby("group")["fold"].nunique().max() == 1


def test_no_groups_makes_each_image_its_own_group(dups, tmp_path, capsys):
    df = _run(dups, tmp_path / "f.csv", groups=False)
    assert df["group"].tolist() == list(range(len(df)))
    assert "no grouping" in capsys.readouterr().out


def test_refuses_to_overwrite_without_force(demo, tmp_path):
    target = tmp_path / "f.csv"
    target.write_bytes(b"precious,old\n1,2\n")
    with pytest.raises(KaggleCMRError, match="already exists"):
        _run(demo, target)
    assert target.read_bytes() == b"precious,old\n1,2\n"
    df = pd.DataFrame({"id": ["a", "b"], "fold": [0, 1]})
    with pytest.raises(KaggleCMRError, match="already exists"):
        write_folds(df, target)
    assert target.read_bytes() == b"precious,old\n1,2\n"
    _run(demo, target, force=True)
    assert read_folds(target)["id"].tolist()[:2] == ["cmr1", "cmr2"]
    assert [p.name for p in tmp_path.iterdir()] == ["f.csv"]


def test_n_folds_errors(demo, tmp_path):
    with pytest.raises(KaggleCMRError, match="at least 2"):
        _run(demo, tmp_path / "f.csv", n_folds=1)
    tiny = tmp_path / "tiny"
    make_demo_dataset(tiny, n_train=3, n_val=0, n_test=0)
    with pytest.raises(KaggleCMRError, match="more than the 3") as exc:
        _run(tiny, tmp_path / "f.csv", n_folds=5)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "f.csv").exists()


def test_fold_table(demo):
    df = make_folds(load_dataset(demo).labelled())
    table = fold_table(df)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["fold", "images", "groups", "val"]
    assert "RV" in lines[0] and "LV+Myo" in lines[0]
    assert len(lines) == 1 + 5 + 1 and lines[-1].split()[:2] == ["all", "72"]


# --------------------------------------------------------------------------- read_folds


def test_read_folds_roundtrip(demo, tmp_path):
    df = _run(demo, tmp_path / "f.csv")
    back = read_folds(tmp_path / "f.csv", ids=load_dataset(demo).labelled().ids)
    pd.testing.assert_frame_equal(back, df, check_dtype=False)


def test_read_folds_mismatch_names_file_and_ids(demo, tmp_path):
    path = tmp_path / "f.csv"
    df = _run(demo, path)
    ids = df["id"].tolist()
    wanted = [i for i in ids if i not in ("cmr3", "cmr40")] + ["cmr500"]
    with pytest.raises(DataError) as exc:
        read_folds(path, ids=wanted)
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg
    assert "cmr500" in msg and "cmr3" in msg and "cmr40" in msg
    assert "does not match" in msg


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "not a readable"),
        ("id,split\ncmr1,train\n", "missing column"),
        ("id,fold\n", "no rows"),
        ("id,fold\ncmr1,0\ncmr2,x\n", "integers"),
        ("id,fold\ncmr1,0\ncmr2,1.5\n", "integers"),
        ("id,fold\ncmr1,0\ncmr2,\n", "integers"),
        ("id,fold\ncmr1,0\ncmr1,1\n", "duplicate ids cmr1"),
        ("id,fold\ncmr1,0\ncmr2,2\n", "0..k-1"),
        ("id,fold\ncmr1,0\ncmr2,0\n", "0..k-1"),
        ("id,fold\ncmr1,-1\ncmr2,0\n", "0..k-1"),
        ("id,fold,group\ncmr1,0,0\ncmr2,1,0\n", "split across folds"),
    ],
)
def test_read_folds_rejects_bad_files(tmp_path, text, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=match) as exc:
        read_folds(path)
    assert "\n" not in str(exc.value) and str(path) in str(exc.value)


def test_read_folds_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_folds(tmp_path / "nope.csv")


def test_read_folds_accepts_minimal_file(tmp_path):
    path = tmp_path / "f.csv"
    path.write_text("id,fold\ncmr1,0\ncmr2,1\n")
    df = read_folds(path, ids=["cmr2", "cmr1"])
    assert df["fold"].dtype == np.int64 and df["id"].tolist() == ["cmr1", "cmr2"]


# --------------------------------------------------------------------------- command line


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kagglecmr", *args], capture_output=True, text=True, timeout=120)


def test_cli_make_folds(demo, tmp_path):
    out = tmp_path / "folds.csv"
    res = _cli("make-folds", "--data", str(demo), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "fold" in res.stdout and "images" in res.stdout and "all" in res.stdout
    assert len(read_folds(out)) == 72
    res = _cli("make-folds", "--data", str(demo), "--out", str(out))
    assert res.returncode == 2 and res.stderr.startswith("error:") and "already exists" in res.stderr


def test_cli_bad_data_dir(tmp_path):
    res = _cli("make-folds", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "f.csv"))
    assert res.returncode == 2
    assert res.stderr.startswith("error:")
    assert len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.stderr + res.stdout
    assert not (tmp_path / "f.csv").exists()


# --------------------------------------------------------------------------- real data (skipped when absent)


@pytest.fixture(scope="module")
def real_folds(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "folds.csv"
    df = run_make_folds(REAL, out=out)
    return df, out


@pytest.mark.realdata
@needs_real
def test_real_five_folds_of_about_twenty(real_folds):
    df, _ = real_folds
    assert df["id"].tolist() == [f"cmr{i}" for i in range(1, 101)]
    sizes = df["fold"].value_counts().sort_index()
    assert sizes.index.tolist() == [0, 1, 2, 3, 4]
    assert sizes.min() >= 16 and sizes.max() <= 24


@pytest.mark.realdata
@needs_real
def test_real_ed_es_pairs_are_grouped(real_folds):
    df, _ = real_folds
    members = df.groupby("group")["id"].apply(list).tolist()
    assert members == [[f"cmr{2 * k + 1}", f"cmr{2 * k + 2}"] for k in range(50)]
    assert df.groupby("group")["fold"].nunique().max() == 1


@pytest.mark.realdata
@needs_real
def test_real_deterministic(real_folds, tmp_path):
    _, first = real_folds
    run_make_folds(REAL, out=tmp_path / "again.csv")
    assert (tmp_path / "again.csv").read_bytes() == first.read_bytes()


# --------------------------------------------------------------------------- alike textures, balance (issue 23)


def make_texture_dataset(root: Path, n: int = 200, *, jitter: int = 4, unique: int = 0, group_every: int = 0,
                         seed: int = 0) -> Path:
    """Grey surface photos (40, 48 or 56 px square; ``size: 48``) all cut from one noise texture at an
    offset of up to ``jitter`` px, each its own brightness and noise, except the last ``unique`` images
    (each its own texture); a dark crack (class 1) in most, a bright pit (class 2) in every 7th.
    ``group_every``: ids ``p<i // group_every>_<i>`` and a ``group`` regex naming ``p<k>``."""
    rng = np.random.default_rng(seed)
    bases = [cv2.GaussianBlur(rng.normal(0, 120, (160, 160)), (0, 0), 1.5) + 128 for _ in range(1 + unique)]
    (root / "img").mkdir(parents=True)
    (root / "mask").mkdir()
    for i in range(n):
        s = (40, 48, 56)[i % 3]
        y, x = rng.integers(0, jitter + 1, 2) + 30
        base = bases[max(0, i - (n - unique) + 1)]
        img = cv2.resize(base[y:y + 96, x:x + 96], (s, s), interpolation=cv2.INTER_AREA)
        img = img * rng.uniform(0.8, 1.2) + rng.normal(0, 4, (s, s))
        mask = np.zeros((s, s), np.uint8)
        if i % 5:
            cv2.line(mask, tuple(int(v) for v in rng.integers(0, s, 2)), tuple(int(v) for v in rng.integers(0, s, 2)),
                     1, 2)
        if i % 7 == 3:
            cv2.circle(mask, tuple(int(v) for v in rng.integers(8, s - 8, 2)), 3, 2, -1)
        img[mask == 1] *= 0.5
        img[mask == 2] = 250
        name = f"p{i // group_every}_{i}" if group_every else f"{i}"
        cv2.imwrite(str(root / "img" / f"tile{name}.png"), np.clip(img, 0, 255).astype(np.uint8))
        cv2.imwrite(str(root / "mask" / f"tile{name}.png"), mask)
    spec = {"name": "tiles", "root": ".", "classes": ["background", "crack", "pit"], "size": 48,
            "splits": {"train": {"image": "img/tile{id}.png", "mask": "mask/tile{id}.png"}}}
    if group_every:
        spec["group"] = r"^(p\d+)_"
    (root / "tiles.yaml").write_text(yaml.safe_dump(spec))
    return root / "tiles.yaml"


def _chain_images(n: int = 40, step: float = 1.5) -> np.ndarray:
    """Windows of one texture sliding by ``step`` px: each alike only to its neighbours (~0.6; two apart ~0)."""
    rng = np.random.default_rng(0)
    base = cv2.GaussianBlur(rng.normal(0, 120, (200, 400)), (0, 0), 1.5) + 128
    out = []
    for i in range(n):
        win = cv2.warpAffine(base, np.float32([[1, 0, -step * i], [0, 1, -20]]), (96, 96))
        out.append(cv2.resize(win, (48, 48), interpolation=cv2.INTER_AREA) + rng.normal(0, 4, (48, 48)))
    return np.clip(np.stack(out), 0, 255).astype(np.uint8)


def _within_tolerance(df: pd.DataFrame, n_folds: int = 5) -> bool:
    sizes = df["fold"].value_counts().reindex(range(n_folds), fill_value=0)
    mean = len(df) / n_folds
    return bool((abs(sizes - mean) <= 0.25 * mean).all())


def test_a_chain_of_neighbours_is_not_one_group():
    images = _chain_images()
    sim = image_similarity(images)
    assert all(sim[i, i + 1] >= SIMILARITY_THRESHOLD for i in range(len(images) - 1))  # the chain is linked
    groups = similarity_groups(images)
    sizes = np.bincount(groups)
    assert sizes.max() <= 2 and len(sizes) >= 20
    for g in range(len(sizes)):  # complete linkage: every pair within a group is alike
        idx = np.flatnonzero(groups == g)
        assert sim[np.ix_(idx, idx)].min() >= SIMILARITY_THRESHOLD


def test_cut_complete_linkage_threshold_and_cap():
    sim = np.eye(9)
    for i in range(3):  # a chain 0~1~2~3 (neighbours 0.6, else 0)
        sim[i, i + 1] = sim[i + 1, i] = 0.6
    sim[4:9, 4:9] = np.where(np.eye(5, dtype=bool), 1.0, 0.8)  # a clique of five alike items
    groups, cut = cut_complete_linkage(sim, 0.4)
    assert np.bincount(groups).tolist() == [2, 2, 5] and cut == []
    assert groups[0] == groups[1] and groups[2] == groups[3]
    groups, cut = cut_complete_linkage(sim, 0.4, max_size=3)
    assert np.bincount(groups).max() <= 3 and cut == [5]
    groups, cut = cut_complete_linkage(sim[:1, :1], 0.4, max_size=1)
    assert groups.tolist() == [0] and cut == []


def _mixed_images() -> np.ndarray:
    """A chain of neighbours, a clique of 12 noisy copies of one texture, 3 pairs and 20 unrelated images, shuffled."""
    rng = np.random.default_rng(3)
    tex = cv2.GaussianBlur(rng.normal(0, 120, (48, 48)), (0, 0), 1.2) + 128
    clique = [tex + rng.normal(0, 4, tex.shape) for _ in range(12)]
    pairs = [b for a in [cv2.GaussianBlur(rng.normal(0, 120, (48, 48)), (0, 0), 1.2) + 128 for _ in range(3)]
             for b in (a, a + rng.normal(0, 4, a.shape))]
    loose = [rng.normal(128, 60, (48, 48)) for _ in range(20)]
    images = np.concatenate([_chain_images(), np.clip(np.stack(clique + pairs + loose), 0, 255).astype(np.uint8)])
    return images[rng.permutation(len(images))]


@pytest.mark.parametrize("cap", [None, 2, 5])
def test_blockwise_similarity_groups_equal_the_dense_linkage(cap, monkeypatch):
    from kagglecmr.data import similarity

    images = _mixed_images()
    dense = cut_complete_linkage(image_similarity(images), SIMILARITY_THRESHOLD, cap)
    monkeypatch.setattr(similarity, "BLOCK", 7)  # several blocks, components spread over them
    groups, cut = similarity.similarity_clusters(images, max_size=cap)
    assert groups.tolist() == dense[0].tolist() and cut == dense[1]
    assert np.bincount(groups).max() == (cap or 12) and cut == ([12] if cap else [])  # the clique, cut by the cap


def test_similarity_groups_never_hold_the_n_by_n_matrix():
    import tracemalloc

    images = np.random.default_rng(0).integers(0, 256, (4000, 16, 16), dtype=np.uint8)  # unrelated images
    tracemalloc.start()
    try:
        groups = similarity_groups(images, side=16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(np.unique(groups)) > 3950  # (a few random pairs correlate by chance)
    assert peak < 4000 * 4000 * 8 / 2, f"peak {peak / 1e6:.0f} MB"  # the dense matrix alone: 128 MB


def test_similarity_cap():
    assert similarity_cap(1344, 5) == 67 and similarity_cap(100, 5) == 5 and similarity_cap(20, 5) == 2


@pytest.mark.parametrize("jitter", [4, 0])
def test_alike_textures_give_balanced_folds(tmp_path, capsys, jitter):
    """190 photos of one texture (+10 others): once one group of 190 and folds of 190/3/3/2/2; now within ±25 %."""
    ds = make_texture_dataset(tmp_path / "tiles", 200, jitter=jitter, unique=10)
    df = run_make_folds(ds, out=tmp_path / "a.csv")
    out = capsys.readouterr().out
    assert _within_tolerance(df), df["fold"].value_counts()
    assert df["group"].value_counts().max() <= similarity_cap(200, 5)
    assert df.groupby("group")["fold"].nunique().max() == 1
    assert (df.groupby("fold")["has_2"].sum() > 0).all()  # the pit class is in every fold
    assert "!" not in out and "warning" not in out
    if jitter == 0:  # one set of 190 identical backgrounds: cut, and said so
        assert "1 set(s) of alike images (190 images) were cut into groups of at most 10" in out
    sim = image_similarity(load_dataset(ds).labelled().subset(df["id"].tolist()).images)
    for _, idx in df.groupby("group").indices.items():
        assert sim[np.ix_(idx, idx)].min() >= SIMILARITY_THRESHOLD
    run_make_folds(ds, out=tmp_path / "b.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()


def test_fold_problems_size_and_missing_class():
    df = pd.DataFrame({"fold": np.repeat(np.arange(5), 8), "has_1": 1, "has_2": 0})
    df.loc[:4, "has_2"] = 1  # a class in 5 images, all in fold 0
    problems = fold_problems(df, ["background", "crack", "pit"])
    assert list(problems) == [1, 2, 3, 4] and problems[1] == ["no pit image (5 overall)"]
    df.loc[4, "has_2"] = 0  # in 4 images only: too rare to ask for
    assert fold_problems(df) == {}
    sized = pd.DataFrame({"fold": [0] * 10 + [1] * 6, "has_1": 1})  # mean 8: 10 is +25 % (allowed), 6 is -25 %
    assert fold_problems(sized) == {}
    sized = pd.DataFrame({"fold": [0] * 11 + [1] * 5, "has_1": 1})
    problems = fold_problems(sized)
    assert problems[0] == ["11 images, 38% above the mean 8.0 (±25% allowed)"] and "below" in problems[1][0]
    table = fold_table(sized.assign(group=range(16)))
    assert [ln.split()[0] for ln in table.splitlines()[1:4]] == ["0!", "1!", "all"]
    assert table.splitlines()[-2].startswith("! fold 0: 11 images")


def test_cli_refuses_unbalanced_folds_unless_allowed(tmp_path):
    """Three regex groups of 11 cannot make two balanced folds (22 / 11): exit 2, one line, nothing written."""
    ds = make_texture_dataset(tmp_path / "tiles", 33, jitter=8, group_every=11)
    out = tmp_path / "folds" / "f.csv"
    res = _cli("make-folds", "--data", str(ds), "--n-folds", "2", "--out", str(out))
    assert res.returncode == 2, res.stdout + res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith("error:")
    msg = res.stderr
    assert str(ds) in msg and "unbalanced" in msg and "fold " in msg and "above the mean" in msg
    assert "--allow-unbalanced" in msg and "--no-groups" in msg and "Traceback" not in msg
    assert "!" in res.stdout  # the table printed before the refusal flags the folds
    assert not out.exists() and not out.parent.exists()
    res = _cli("make-folds", "--data", str(ds), "--n-folds", "2", "--out", str(out), "--allow-unbalanced")
    assert res.returncode == 0, res.stderr
    assert "warning: unbalanced folds" in res.stdout and "! fold" in res.stdout
    assert sorted(read_folds(out)["fold"].value_counts().tolist()) == [11, 22]


def test_regex_group_larger_than_a_fold_is_an_error(tmp_path, capsys):
    """Two folds of 20 on average, at most 25 each: a group of 30 fits in none."""
    ds = make_texture_dataset(tmp_path / "tiles", 40, jitter=8, group_every=30)  # p0: 30 images, p1: 10
    out = tmp_path / "f.csv"
    with pytest.raises(KaggleCMRError) as exc:
        run_make_folds(ds, out=out, n_folds=2)
    msg = str(exc.value)
    assert "\n" not in msg and str(ds) in msg and "p1" not in msg
    assert "group 'p0' has 30 images, more than a fold may hold (25 = mean fold 20.0 + 25%)" in msg
    assert "--allow-unbalanced" in msg and "--no-groups" in msg
    assert not out.exists()
    res = api.make_folds(ds, out=out, n_folds=2, allow_unbalanced=True)
    assert "warning: unbalanced folds" in capsys.readouterr().out
    assert res.folds.groupby("group")["fold"].nunique().max() == 1 and out.exists()
    df = run_make_folds(ds, out=tmp_path / "g.csv", groups=False)  # --no-groups: no such group
    assert _within_tolerance(df)
