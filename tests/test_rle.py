"""Run-length encoding, row ids and the ``encode`` converter (library level)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import course_rle
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kagglecmr.data.mask_folder import mask_folder_paths, read_label_mask
from kagglecmr.engine.evaluator import run_encode
from kagglecmr.formats.rle import decode_rle, encode_rle, rle_extent
from kagglecmr.formats.submission import label_to_rows, parse_row_id, row_id
from kagglecmr.formats.submission_csv import read_submission
from kagglecmr.utils.errors import DataError, KaggleCMRError, SubmissionError

shapes = st.tuples(st.integers(1, 24), st.integers(1, 24))
masks = shapes.flatmap(lambda s: arrays(np.bool_, s))


# --------------------------------------------------------------------------- encode / decode


@settings(max_examples=300, deadline=None)
@given(masks)
def test_roundtrip_and_matches_course_converter(mask):
    enc = encode_rle(mask)
    assert enc == course_rle(mask.astype(np.uint8))
    back = decode_rle(enc, mask.shape)
    assert back.dtype == np.bool_ and back.shape == mask.shape
    np.testing.assert_array_equal(back, mask)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (7, 3), (96, 96), (17, 40)])
@pytest.mark.parametrize("fill", [False, True])
def test_all_empty_and_all_full(shape, fill):
    mask = np.full(shape, fill)
    enc = encode_rle(mask)
    assert enc == ("" if not fill else f"1 {shape[0] * shape[1]}")
    np.testing.assert_array_equal(decode_rle(enc, shape), mask)


def test_column_major_order():
    mask = np.array([[1, 0, 0], [1, 1, 0]])  # columns: [1,1], [0,1], [0,0]
    assert encode_rle(mask) == "1 2 4 1"
    assert encode_rle(mask.astype(bool)) == "1 2 4 1"


def test_decode_accepts_touching_runs_extra_whitespace_and_last_pixel():
    np.testing.assert_array_equal(decode_rle(" 1 2  3 2 ", (2, 2)), np.ones((2, 2), bool))
    assert decode_rle("9 1", (3, 3))[2, 2]


def test_encode_rejects_non_2d():
    with pytest.raises(ValueError):
        encode_rle(np.zeros((2, 2, 2)))


BAD_ENCODINGS = {
    "odd count": ("1 2 3", "odd number"),
    "single number": ("5", "odd number"),
    "letters": ("a 1", "not a non-negative integer"),
    "decimal": ("1.5 2", "not a non-negative integer"),
    "negative": ("-1 2", "not a non-negative integer"),
    "plus sign": ("+1 2", "not a non-negative integer"),
    "comma separated": ("1,2", "odd number"),
    "zero start": ("0 2", "not >= 1"),
    "zero length": ("1 0", "length 0"),
    "unsorted": ("5 2 1 2", "not sorted"),
    "overlap": ("1 3 3 1", "overlap"),
    "duplicate run": ("2 1 2 1", "overlap"),
    "past end": ("8 3", "past the image"),
    "start past end": ("10 1", "past the image"),
    "exactly at end is fine, one more is not": ("1 8 9 2", "past the image"),
    "huge number": ("99999999999999999999 1", "too large"),
}


@pytest.mark.parametrize("case", sorted(BAD_ENCODINGS))
def test_decode_is_strict(case):
    enc, expected = BAD_ENCODINGS[case]
    with pytest.raises(SubmissionError) as info:
        decode_rle(enc, (3, 3))
    msg = str(info.value)
    assert expected in msg and "\n" not in msg


def test_extent():
    assert rle_extent("") == 0
    assert rle_extent("3 2 9 4") == 12


# --------------------------------------------------------------------------- row ids


@pytest.mark.parametrize("image_id,k", [("cmr1", 1), ("cmr200", 3), ("case_07.a-b", 2), ("x_mask", 1), ("a", 12)])
def test_row_id_roundtrip(image_id, k):
    assert parse_row_id(row_id(image_id, k)) == (image_id, k)


def test_row_id_format():
    assert row_id("cmr7", 2) == "cmr7_mask2"


@pytest.mark.parametrize(
    "rid", ["", "cmr1", "cmr1_mask", "cmr1_mask0", "cmr1mask1", "_mask1", "cmr 1_mask1", "cmr1_maskA", "cmr1_mask1 "]
)
def test_parse_row_id_rejects(rid):
    with pytest.raises(SubmissionError, match="bad id"):
        parse_row_id(rid)


def test_row_id_rejects_bad_image_id_and_background():
    with pytest.raises(SubmissionError):
        row_id("cmr,1", 1)
    with pytest.raises(ValueError):
        row_id("cmr1", 0)


# --------------------------------------------------------------------------- label masks


@settings(max_examples=50, deadline=None)
@given(shapes.flatmap(lambda s: arrays(np.uint8, s, elements=st.integers(0, 3))))
def test_label_to_rows_reconstructs_labels(labels):
    rows = label_to_rows("cmr5", labels)
    assert [rid for rid, _ in rows] == ["cmr5_mask1", "cmr5_mask2", "cmr5_mask3"]
    rebuilt = np.zeros_like(labels)
    for rid, enc in rows:
        rebuilt[decode_rle(enc, labels.shape)] = parse_row_id(rid)[1]
    np.testing.assert_array_equal(rebuilt, labels)


def test_label_to_rows_num_classes_and_bad_labels():
    labels = np.array([[0, 1], [2, 1]])
    assert label_to_rows("a", labels, num_classes=3) == [("a_mask1", "3 2"), ("a_mask2", "2 1")]
    with pytest.raises(ValueError):
        label_to_rows("a", labels, num_classes=2)


# --------------------------------------------------------------------------- mask folders / encode


def write_png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.asarray(arr, dtype=np.uint8))
    return path


def random_labels(rng, size=8, num_classes=4):
    return rng.integers(0, num_classes, (size, size)).astype(np.uint8)


def test_mask_folder_paths_natural_order_and_names(tmp_path):
    rng = np.random.default_rng(0)
    for name in ["cmr10_mask.png", "cmr2_mask.png", "cmr1.png"]:
        write_png(tmp_path / name, random_labels(rng))
    (tmp_path / "notes.txt").write_text("ignored")
    assert list(mask_folder_paths(tmp_path)) == ["cmr1", "cmr2", "cmr10"]


def test_mask_folder_paths_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        mask_folder_paths(tmp_path / "nope")
    with pytest.raises(DataError, match="no PNG masks"):
        mask_folder_paths(tmp_path)
    write_png(tmp_path / "cmr1.png", np.zeros((4, 4)))
    write_png(tmp_path / "cmr1_mask.png", np.zeros((4, 4)))
    with pytest.raises(DataError, match="same image id 'cmr1'"):
        mask_folder_paths(tmp_path)
    (tmp_path / "cmr1.png").unlink()
    write_png(tmp_path / "cmr 2.png", np.zeros((4, 4)))
    with pytest.raises(DataError, match=r"cmr 2\.png: bad image id 'cmr 2'"):
        mask_folder_paths(tmp_path)


def test_read_label_mask_any_square_size_and_errors(tmp_path):
    labels = random_labels(np.random.default_rng(1), size=13)
    np.testing.assert_array_equal(read_label_mask(write_png(tmp_path / "a.png", labels)), labels)
    with pytest.raises(DataError, match="only square"):
        read_label_mask(write_png(tmp_path / "b.png", np.zeros((4, 6))))
    with pytest.raises(DataError, match="outside classes"):
        read_label_mask(write_png(tmp_path / "c.png", np.full((4, 4), 4)))
    (tmp_path / "d.png").write_bytes(b"not a png at all, really")
    with pytest.raises(DataError, match="not a readable PNG"):
        read_label_mask(tmp_path / "d.png")


def test_run_encode_writes_natural_order_and_summary(tmp_path, capsys):
    rng = np.random.default_rng(2)
    masks = {i: random_labels(rng, size=12) for i in ["cmr10", "cmr2", "cmr1"]}
    masks["cmr2"][masks["cmr2"] == 1] = 0  # class 1 empty in one image
    for i, m in masks.items():
        write_png(tmp_path / "masks" / f"{i}_mask.png", m)
    out = tmp_path / "sub" / "submission.csv"
    assert run_encode(tmp_path / "masks", out) == 9
    summary = capsys.readouterr().out.strip()
    assert "\n" not in summary and "9 rows" in summary and "class 1: 1" in summary
    rows = read_submission(out, shape=(12, 12))
    assert list(rows) == [f"{i}_mask{k}" for i in ["cmr1", "cmr2", "cmr10"] for k in (1, 2, 3)]
    for i, m in masks.items():
        for k in (1, 2, 3):
            np.testing.assert_array_equal(decode_rle(rows[f"{i}_mask{k}"], (12, 12)), m == k)
    assert out.read_text().startswith("id,encoding\n")
    assert not [p for p in out.parent.iterdir() if p != out]  # no temporary files left


def test_run_encode_num_classes(tmp_path):
    write_png(tmp_path / "m" / "x.png", np.array([[0, 1], [1, 0]]))
    assert run_encode(tmp_path / "m", tmp_path / "s.csv", num_classes=2) == 1
    assert read_submission(tmp_path / "s.csv") == {"x_mask1": "2 2"}


def test_run_encode_refuses_overwrite(tmp_path):
    write_png(tmp_path / "m" / "cmr1_mask.png", np.ones((4, 4)))
    out = tmp_path / "s.csv"
    out.write_bytes(b"old contents\r\n")
    with pytest.raises(KaggleCMRError, match="already exists"):
        run_encode(tmp_path / "m", out)
    assert out.read_bytes() == b"old contents\r\n"
    run_encode(tmp_path / "m", out, force=True)
    assert read_submission(out)["cmr1_mask1"] == "1 16"


def test_run_encode_mixed_sizes_each_at_its_own_size(tmp_path):
    a, b = np.zeros((4, 4)), np.zeros((5, 5))
    a[3, 3] = 1  # pixel 16 of a
    b[4, 4] = 2  # pixel 25 of b
    write_png(tmp_path / "m" / "a.png", a)
    write_png(tmp_path / "m" / "b.png", b)
    assert run_encode(tmp_path / "m", tmp_path / "s.csv") == 6
    shapes = {"a": (4, 4), "b": (5, 5)}
    rows = read_submission(tmp_path / "s.csv", shape=shapes)
    assert rows["a_mask1"] == "16 1" and rows["b_mask2"] == "25 1"
    with pytest.raises(SubmissionError, match="b_mask2: run '25 1' ends at pixel 25, past the image's 16 pixels"):
        read_submission(tmp_path / "s.csv", shape={"a": (4, 4), "b": (4, 4)})


# --------------------------------------------------------------------------- other orders and starts


@settings(max_examples=200, deadline=None)
@given(masks, st.sampled_from(["column", "row"]), st.sampled_from([0, 1]))
def test_roundtrip_any_order_and_start(mask, order, start):
    enc = encode_rle(mask, order=order, start=start)
    flat = mask.T.ravel() if order == "column" else mask.ravel()
    assert enc == " ".join(str(int(t) - 1 + start) if j % 2 == 0 else t
                           for j, t in enumerate(course_rle(flat[None].astype(np.uint8)).split()))
    np.testing.assert_array_equal(decode_rle(enc, mask.shape, order=order, start=start), mask)
    assert rle_extent(enc, start=start) == (int(np.flatnonzero(flat)[-1]) + 1 if flat.any() else 0)


def test_row_order_and_zero_start_by_hand():
    mask = np.array([[1, 0, 0], [1, 1, 0]])  # rows: [1,0,0], [1,1,0]
    assert encode_rle(mask, order="row") == "1 1 4 2"
    assert encode_rle(mask, order="row", start=0) == "0 1 3 2"
    assert encode_rle(mask, start=0) == "0 2 3 1"
    np.testing.assert_array_equal(decode_rle("0 1 3 2", (2, 3), order="row", start=0), mask.astype(bool))


@pytest.mark.parametrize("enc,expected", [("0 9", None), ("8 1", None), ("8 2", "past the image's 9 pixels"),
                                          ("9 1", "past the image"), ("3 0", "length 0")])
def test_decode_zero_based_is_strict(enc, expected):
    if expected is None:
        assert decode_rle(enc, (3, 3), start=0).sum() == int(enc.split()[1])
    else:
        with pytest.raises(SubmissionError, match=expected):
            decode_rle(enc, (3, 3), start=0)


def test_bad_order_and_start_are_value_errors():
    with pytest.raises(ValueError, match="order"):
        encode_rle(np.ones((2, 2)), order="diagonal")
    with pytest.raises(ValueError, match="start"):
        encode_rle(np.ones((2, 2)), start=2)
    with pytest.raises(ValueError, match="order"):
        decode_rle("1 1", (2, 2), order="diagonal")
