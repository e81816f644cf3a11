"""Training masks from a run-length CSV (Kaggle's ``train.csv``): the submission's own format, a class
column (Severstal-style), instance rows, images without rows, and one-line errors naming the CSV line."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from kagglecmr.data.dataset import load_dataset
from kagglecmr.formats.rle import encode_rle
from kagglecmr.utils.errors import DataError


def _image(i: int, hw) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8)


def _labels(i: int, hw, k: int) -> np.ndarray:
    """Class c (1..k-1) as a rectangle whose place depends on the image; image 0 is empty."""
    m = np.zeros(hw, np.uint8)
    if i == 0:
        return m
    for c in range(1, k):
        y, x = (3 * i + 5 * c) % (hw[0] - 8), (7 * i + 3 * c) % (hw[1] - 8)
        m[y:y + 6, x:x + 7] = c
    return m


def _write_csv(path: Path, header, rows) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _dataset(tmp: Path, spec: dict, n: int = 6, hw=(20, 28), k: int = 3, style: str = "submission") -> tuple[Path, dict]:
    """Images ``img/<id>.png`` and a labels CSV in ``style``; returns (dataset file, {id: truth})."""
    (tmp / "img").mkdir(parents=True, exist_ok=True)
    truth, rows = {}, []
    for i in range(n):
        iid = f"s{i:02d}"
        size = hw if i % 2 == 0 else (hw[0] + 4, hw[1] - 4)  # two image sizes: each mask decodes at its own
        assert cv2.imwrite(str(tmp / "img" / f"{iid}.png"), _image(i, size))
        truth[iid] = _labels(i, size, k)
        for c in range(1, k):
            on = truth[iid] == c
            if style == "submission":
                rows.append((f"{iid}_mask{c}", encode_rle(on)))
            elif on.any():  # severstal: only non-empty rows, the class in a column, one row per instance half
                left = on.copy()
                left[:, left.shape[1] // 2:] = False
                for part in (left, on & ~left):
                    if part.any():
                        rows.append((f"{iid}.jpg", str(c), encode_rle(part)))
    header = ["id", "encoding"] if style == "submission" else ["ImageId", "ClassId", "EncodedPixels"]
    _write_csv(tmp / "train.csv", header, rows)
    path = tmp / "ds.yaml"
    path.write_text(yaml.safe_dump({"splits": {"train": {"image": "img/{id}.png", "mask": "train.csv"}},
                                    "size": list(hw)} | spec))
    return path, truth


def _own_size_masks(ds) -> dict:
    return {i: ds.read_mask(mp, resize=False) for i, _, mp in ds.items("train")}


def test_masks_from_a_csv_in_the_submission_format(tmp_path):
    path, truth = _dataset(tmp_path, {})
    ds = load_dataset(path)
    assert ds.num_classes == 3 and ds.mask_values == {0: 0, 1: 1, 2: 2}
    got = _own_size_masks(ds)
    assert set(got) == set(truth)
    for i in truth:
        np.testing.assert_array_equal(got[i], truth[i])
    assert ds.labelled().masks.shape == (6, 20, 28)  # resized to the model size for training


def test_masks_from_a_csv_with_a_class_column_and_instance_rows(tmp_path):
    spec = {"classes": ["bg", "1", "2", "3"],
            "labels": {"id": "{id}.jpg", "header": ["ImageId", "EncodedPixels"], "class_column": "ClassId"},
            "submission": {"id": "{id}.jpg_{class}", "header": ["ImageId_ClassId", "EncodedPixels"]}}
    path, truth = _dataset(tmp_path, spec, k=4, style="severstal")
    ds = load_dataset(path)
    got = _own_size_masks(ds)
    for i in truth:  # two rows per class and image are united; s00 has no rows at all: empty
        np.testing.assert_array_equal(got[i], truth[i])
    assert not got["s00"].any() and ds.num_classes == 4


def test_a_submission_of_the_labels_scores_one(tmp_path, main_cli):
    path, truth = _dataset(tmp_path, {})
    r = main_cli("score", tmp_path / "train.csv", "--data", path, "--json")
    assert r.returncode == 0, r.stderr
    assert '"score": 1.0' in r.stdout
    r = main_cli("make-folds", "--data", path, "--out", tmp_path / "f.csv", "--n-folds", "2")
    assert r.returncode == 0, r.stderr


def _broken(tmp: Path, case: str) -> tuple[Path, str]:
    path, _ = _dataset(tmp, {})
    rows = list(csv.reader((tmp / "train.csv").read_text().splitlines()))
    spec = yaml.safe_load(path.read_text())
    if case == "unknown image":
        rows.append(["zz9_mask1", "1 2"])
        _write_csv(tmp / "train.csv", rows[0], rows[1:])
        return path, f"train.csv line {len(rows)}: image 'zz9' has no image file"
    if case == "bad encoding":
        rows[3][1] = "5 3 1 2"
        _write_csv(tmp / "train.csv", rows[0], rows[1:])
        return path, "train.csv line 4: image 's01'"
    if case == "run past the image":
        rows[3][1] = "5000 3"
        _write_csv(tmp / "train.csv", rows[0], rows[1:])
        return path, "past the image"
    if case == "bad row id":
        rows[2][0] = "s00-mask2"
        _write_csv(tmp / "train.csv", rows[0], rows[1:])
        return path, "train.csv line 3: bad id"
    if case == "missing column":
        spec["labels"] = {"header": ["ImageId", "EncodedPixels"]}
        path.write_text(yaml.safe_dump(spec))
        return path, "train.csv: no column 'ImageId'"
    if case == "class out of range":
        spec["classes"] = ["bg", "a"]
        path.write_text(yaml.safe_dump(spec))
        return path, "class 2 but"
    if case == "missing csv":
        (tmp / "train.csv").unlink()
        return path, "labels CSV"
    if case == "unknown labels key":
        spec["labels"] = {"idd": "{id}"}
        path.write_text(yaml.safe_dump(spec))
        return path, "labels: unknown key 'idd'"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["unknown image", "bad encoding", "run past the image", "bad row id",
                                  "missing column", "class out of range", "missing csv", "unknown labels key"])
def test_malformed_labels_csv_is_one_line_exit_2_nothing_written(tmp_path, case, main_cli, assert_cli_error):
    path, needle = _broken(tmp_path, case)
    with pytest.raises(DataError, match=re.escape(needle)):
        load_dataset(path).labelled()
    out = tmp_path / "folds" / "f.csv"
    assert_cli_error(main_cli("make-folds", "--data", path, "--out", out), needle)
    assert not out.parent.exists()


REAL_CMR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cmr"


@pytest.mark.skipif(not (REAL_CMR / "train").is_dir(), reason="needs ../shared/data/cmr")
def test_cmr_from_a_labels_csv_equals_the_folder_form(tmp_path):
    """The cardiac training masks written as a Kaggle train.csv (the competition's own format) load to the
    same arrays, ids and folds as the PNG masks."""
    from kagglecmr.data.folds import make_folds
    from kagglecmr.engine.evaluator import run_encode

    run_encode(REAL_CMR / "train" / "mask", tmp_path / "train.csv")
    path = tmp_path / "cmr_csv.yaml"
    path.write_text(yaml.safe_dump({"root": str(REAL_CMR), "classes": ["background", "RV", "Myo", "LV"],
                                    "splits": {"train": {"image": "train/image/{id}.png",
                                                         "mask": str(tmp_path / "train.csv")}}}))
    folder, csv_form = load_dataset(REAL_CMR).labelled(), load_dataset(path).labelled()
    assert csv_form.ids == folder.ids and len(folder.ids) == 100
    np.testing.assert_array_equal(csv_form.masks, folder.masks)
    np.testing.assert_array_equal(csv_form.images, folder.images)
    a = make_folds(folder, n_folds=5, seed=42)
    b = make_folds(csv_form, n_folds=5, seed=42)
    assert a.equals(b)
