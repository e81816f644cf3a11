"""SubmissionFormat: row id templates, header, pixel order, start, classes (pure, library level)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from conftest import course_rle
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kagglecmr.engine.evaluator import run_score
from kagglecmr.formats.metric import score_label_maps, score_rows
from kagglecmr.formats.submission import CMR, SubmissionFormat, label_to_rows, parse_row_id
from kagglecmr.formats.submission_csv import parse_submission, read_submission, submission_text, write_submission
from kagglecmr.utils.errors import ConfigError, SubmissionError

NAMES = ("background", "Fish", "Flower", "Sugar")



def ref_runs(flat: np.ndarray, start: int) -> str:
    """``start length`` pairs of a flat 0/1 array by walking it (independent of kagglecmr.formats.rle)."""
    out: list[list[int]] = []
    for j, v in enumerate(flat.tolist()):
        if v:
            if out and out[-1][0] + out[-1][1] == j + start:
                out[-1][1] += 1
            else:
                out.append([j + start, 1])
    return " ".join(f"{s} {n}" for s, n in out)


labels = st.tuples(st.integers(1, 12), st.integers(1, 12)).flatmap(
    lambda s: arrays(np.uint8, s, elements=st.integers(0, 3)))


# --------------------------------------------------------------------------- CMR is today's format


def test_cmr_defaults():
    assert CMR == SubmissionFormat() == SubmissionFormat.from_dict(None, num_classes=4)
    assert SubmissionFormat.from_dict({}, num_classes=4, source="x") == CMR
    assert (CMR.id, CMR.header, CMR.order, CMR.start, CMR.classes) == ("{id}_mask{class}", ("id", "encoding"),
                                                                       "column", 1, None)
    assert CMR.row_classes(4) == [1, 2, 3]


@settings(max_examples=100, deadline=None)
@given(labels)
def test_cmr_rows_are_todays_rows(label_map):
    rows = CMR.rows("cmr7", label_map, 4)
    assert rows == [(f"cmr7_mask{k}", course_rle((label_map == k).astype(np.uint8))) for k in (1, 2, 3)]
    assert rows == label_to_rows("cmr7", label_map)


def test_cmr_csv_bytes(tmp_path):
    m = np.array([[0, 1, 1], [3, 1, 0], [3, 0, 0]])
    rows = CMR.rows("cmr1", m, 4) + CMR.rows("cmr10", np.zeros((3, 3), int), 4)
    write_submission(rows, tmp_path / "s.csv", shape=(3, 3))
    assert (tmp_path / "s.csv").read_bytes() == (
        b"id,encoding\ncmr1_mask1,4 2 7 1\ncmr1_mask2,\ncmr1_mask3,2 2\ncmr10_mask1,\ncmr10_mask2,\ncmr10_mask3,\n"
    )


# --------------------------------------------------------------------------- encode / decode


@settings(max_examples=150, deadline=None)
@given(labels, st.sampled_from(["column", "row"]), st.sampled_from([0, 1]))
def test_encode_decode_roundtrip(label_map, order, start):
    fmt = SubmissionFormat(order=order, start=start)
    mask = label_map == 2
    enc = fmt.encode(mask)
    flat = (mask.T if order == "column" else mask).ravel()
    assert enc == ref_runs(flat, start)
    back = fmt.decode(enc, mask.shape)
    assert back.dtype == np.bool_
    np.testing.assert_array_equal(back, mask)


def test_decode_is_strict_for_its_start():
    fmt = SubmissionFormat(start=0)
    np.testing.assert_array_equal(fmt.decode("0 1", (2, 2)), [[True, False], [False, False]])
    with pytest.raises(SubmissionError, match="past the image's 4 pixels"):
        fmt.decode("3 2", (2, 2))
    with pytest.raises(SubmissionError, match=r"not >= 1 \(starts are 1-based\)"):
        CMR.decode("0 1", (2, 2))


# --------------------------------------------------------------------------- row ids


ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,12}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(ids, st.integers(1, 12), st.sampled_from(["{id}_mask{class}", "{id}_{class}", "{class}_{id}", "{id}-{class}.x",
                                                 "{id}mask{class}"]))
def test_parse_row_id_inverts_row_id(image_id, k, template):
    fmt = SubmissionFormat(id=template)
    assert fmt.parse_row_id(fmt.row_id(image_id, k)) == (image_id, k)


@pytest.mark.parametrize("rid,expected", [
    ("case_1_mask2", ("case_1", 2)),
    ("a_mask_b_mask12", ("a_mask_b", 12)),
    ("x_mask1_mask3", ("x_mask1", 3)),
    ("1_2_3_mask1", ("1_2_3", 1)),
])
def test_parse_row_id_with_underscores(rid, expected):
    assert CMR.parse_row_id(rid) == expected == parse_row_id(rid)


@pytest.mark.parametrize("rid", ["", "cmr1", "cmr1_mask", "cmr1_mask0", "cmr1_mask01", "_mask1", "cmr 1_mask1",
                                 "cmr1_maskA", "cmr1_mask1 "])
def test_parse_row_id_rejects(rid):
    with pytest.raises(SubmissionError, match="bad id .*expected <image id>_mask<class>, e.g. img1_mask1"):
        CMR.parse_row_id(rid)


def test_explicit_classes_restrict_ids():
    fmt = SubmissionFormat(id="{id}_{class}", classes=(3, 1))
    assert fmt.row_classes(4) == [3, 1]
    assert fmt.parse_row_id("a_1_3") == ("a_1", 3)
    with pytest.raises(SubmissionError, match="bad id 'a_2'"):
        fmt.parse_row_id("a_2")
    with pytest.raises(ValueError, match="class 2"):
        fmt.row_id("a", 2)
    assert [r for r, _ in fmt.rows("a", np.zeros((2, 2), int), 4)] == ["a_3", "a_1"]


def test_id_alone_is_one_row_per_image_for_a_binary_task(tmp_path):
    fmt = SubmissionFormat.from_dict({"id": "{id}", "header": ["ImageId", "EncodedPixels"], "order": "row",
                                      "start": 0}, num_classes=2)
    assert fmt.classes == (1,) and fmt.row_classes(2) == [1]
    m = np.array([[0, 1, 1], [1, 0, 0]])
    assert fmt.rows("img_01", m, 2) == [("img_01", "1 3")]
    assert fmt.parse_row_id("img_01") == ("img_01", 1)
    write_submission(fmt.rows("img_01", m, 2), tmp_path / "s.csv", shape=(2, 3), fmt=fmt)
    assert (tmp_path / "s.csv").read_text() == "ImageId,EncodedPixels\nimg_01,1 3\n"
    rows = read_submission(tmp_path / "s.csv", shape=(2, 3), fmt=fmt)
    np.testing.assert_array_equal(fmt.decode(rows["img_01"], (2, 3)), m.astype(bool))
    with pytest.raises(SubmissionError, match="header is 'id,encoding', expected 'ImageId,EncodedPixels'"):
        read_submission(write_submission([("a_mask1", "")], tmp_path / "cmr.csv", shape=(2, 2)), fmt=fmt)
    # one foreground class picked out of several
    lv = SubmissionFormat.from_dict({"id": "{id}", "classes": [3]}, num_classes=4)
    assert lv.rows("a", np.array([[1, 3]]), 4) == [("a", "2 1")]


def test_name_template(tmp_path):
    fmt = SubmissionFormat.from_dict({"id": "{id}_{name}"}, num_classes=4, class_names=NAMES)
    m = np.array([[1, 3], [1, 0]])
    rows = fmt.rows("0011165.jpg", m, 4)
    assert rows == [("0011165.jpg_Fish", "1 2"), ("0011165.jpg_Flower", ""), ("0011165.jpg_Sugar", "3 1")]
    assert [fmt.parse_row_id(r) for r, _ in rows] == [("0011165.jpg", 1), ("0011165.jpg", 2), ("0011165.jpg", 3)]
    assert fmt.parse_row_id("a_Fish_Sugar") == ("a_Fish", 3)
    with pytest.raises(SubmissionError, match="bad id 'a_Clouds': expected <image id>_<class name>, e.g. img1_Fish"):
        fmt.parse_row_id("a_Clouds")
    assert fmt.class_label(3) == "3 (Sugar)"
    pred = {"x": np.array([[1, 0], [1, 0]]), "y_1": np.zeros((3, 2), int)}
    truth = {"x": m, "y_1": np.ones((3, 2), int)}
    sub, sol = tmp_path / "s.csv", tmp_path / "t.csv"
    shapes = {i: t.shape for i, t in truth.items()}
    write_submission([r for i, p in pred.items() for r in fmt.rows(i, p, 4)], sub, shape=shapes, fmt=fmt)
    write_submission([r for i, t in truth.items() for r in fmt.rows(i, t, 4)], sol, shape=shapes, fmt=fmt)
    by_csv = score_rows(read_submission(sub, fmt=fmt), read_submission(sol, fmt=fmt), shapes, fmt=fmt)
    assert by_csv.row_dice == pytest.approx(score_label_maps(pred, truth, 4, fmt).row_dice)
    assert by_csv.row_dice["x_Fish"] == 1.0 and by_csv.row_dice["y_1_Fish"] == 0.0


def test_names_that_make_an_id_ambiguous():
    fmt = SubmissionFormat(id="{id}_{name}", class_names=("bg", "a", "b_a"))
    with pytest.raises(SubmissionError, match="ambiguous id 'x_b_a': image 'x_b' class 'a' or image 'x' class 'b_a'"):
        fmt.parse_row_id("x_b_a")
    assert fmt.parse_row_id("x_a") == ("x", 1)


def test_row_id_errors():
    with pytest.raises(ValueError, match="foreground"):
        CMR.row_id("cmr1", 0)
    with pytest.raises(SubmissionError, match="bad image id"):
        CMR.row_id("cmr,1", 1)
    with pytest.raises(ValueError, match="labels must lie in 0..1"):
        CMR.rows("a", np.array([[0, 2]]), 2)


# --------------------------------------------------------------------------- from_dict / to_dict


@pytest.mark.parametrize("d,num_classes", [
    ({"id": "{id}_{class}", "header": ["ImageId_ClassId", "EncodedPixels"], "order": "row", "start": 0}, 4),
    ({"id": "{id}", "header": ["img", "rle_mask"]}, 2),
    ({"id": "{id}_{name}", "classes": ["Sugar", "Fish"]}, 4),
    ({"classes": [2, 3]}, 4),
])
def test_to_dict_roundtrips(d, num_classes):
    names = NAMES if num_classes == 4 else None
    fmt = SubmissionFormat.from_dict(d, num_classes=num_classes, class_names=names)
    back = SubmissionFormat.from_dict(json.loads(json.dumps(fmt.to_dict())), num_classes=num_classes,
                                      class_names=names)
    assert back == fmt
    assert SubmissionFormat.from_dict(CMR.to_dict(), num_classes=4) == CMR


def test_classes_by_name():
    fmt = SubmissionFormat.from_dict({"classes": ["Sugar", 1]}, num_classes=4, class_names=NAMES)
    assert fmt.classes == (3, 1)


# (mapping, num_classes, key named in the message, words in the message)
BAD = {
    "not a mapping": (["id"], 4, None, "expected a mapping"),
    "unknown key": ({"id": "{id}_mask{class}", "encoding": "rle"}, 4, "unknown key 'encoding'", "known: id"),
    "id not text": ({"id": 3}, 4, "id", "template string"),
    "no {id}": ({"id": "img_{class}"}, 4, "id", "{id} exactly once"),
    "two {id}": ({"id": "{id}_{id}_{class}"}, 4, "id", "{id} exactly once"),
    "unknown placeholder": ({"id": "{id}_{klass}"}, 4, "id", "unknown placeholder {klass}"),
    "format spec": ({"id": "{id}_{class:02d}"}, 4, "id", "unknown placeholder"),
    "unbalanced brace": ({"id": "{id_{class}"}, 4, "id", "not valid"),
    "comma in template": ({"id": "{id},{class}"}, 4, "id", "literal text"),
    "class and name": ({"id": "{id}_{class}_{name}"}, 4, "id", "at most one"),
    "no separator": ({"id": "{id}{class}"}, 4, "id", "does not end with a digit"),
    "digit separator": ({"id": "{id}_1{class}"}, 4, "id", "does not end with a digit"),
    "digit separator, class first": ({"id": "{class}1_{id}"}, 4, "id", "does not start with a digit"),
    "{id} alone, several classes": ({"id": "{id}"}, 4, "id", "3 classes get rows"),
    "{id} alone, two classes": ({"id": "{id}", "classes": [1, 2]}, 4, "id", "2 classes get rows"),
    "{name} without names": ({"id": "{id}_{name}"}, 4, "id", "no names"),
    "header one name": ({"header": ["id"]}, 4, "header", "two column names"),
    "header not a list": ({"header": "id,encoding"}, 4, "header", "list of two"),
    "header comma": ({"header": ["id,x", "encoding"]}, 4, "header", "without commas"),
    "header same": ({"header": ["id", "id"]}, 4, "header", "both columns"),
    "order": ({"order": "diagonal"}, 4, "order", "column, row"),
    "start 2": ({"start": 2}, 4, "start", "1 or 0"),
    "start true": ({"start": True}, 4, "start", "1 or 0"),
    "start text": ({"start": "1"}, 4, "start", "1 or 0"),
    "class out of range": ({"classes": [1, 4]}, 4, "classes", "class 4 does not exist"),
    "negative class": ({"classes": [-1]}, 4, "classes", "not a class index"),
    "classes repeat": ({"classes": [1, 1]}, 4, "classes", "repeat"),
    "classes empty": ({"classes": []}, 4, "classes", "empty"),
    "classes not a list": ({"classes": 3}, 4, "classes", "expected a list"),
    "class name without names": ({"classes": ["LV"]}, 4, "classes", "unknown class name 'LV'"),
    "one class": ({}, 1, "num_classes", "at least 2"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_from_dict_errors(case):
    d, num_classes, key, words = BAD[case]
    with pytest.raises(ConfigError) as info:
        SubmissionFormat.from_dict(d, num_classes=num_classes, source="comp.yaml: submission")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("comp.yaml: submission: ") and words in msg, msg
    if key is not None:
        assert msg.startswith(f"comp.yaml: submission: {key}") or key in msg, msg


def test_from_dict_name_errors():
    with pytest.raises(ConfigError, match=r"^s: class_names: 3 names for 4 classes$"):
        SubmissionFormat.from_dict({}, num_classes=4, class_names=["a", "b", "c"], source="s")
    with pytest.raises(ConfigError, match="s: id: {name}: class name 'left ventricle' cannot be part of an id"):
        SubmissionFormat.from_dict({"id": "{id}_{name}"}, num_classes=2, class_names=["bg", "left ventricle"],
                                   source="s")


def test_direct_construction_is_validated():
    with pytest.raises(ValueError, match="order"):
        SubmissionFormat(order="diagonal")
    with pytest.raises(ValueError, match="set classes"):
        SubmissionFormat(id="{id}")


# --------------------------------------------------------------------------- a whole competition, end to end


def test_run_score_in_another_format(tmp_path, capsys):
    fmt = SubmissionFormat.from_dict({"id": "{id}", "header": ["img", "rle_mask"], "order": "row", "start": 0},
                                     num_classes=2)
    rng = np.random.default_rng(4)
    truth = {"car_01": rng.integers(0, 2, (6, 6)), "car_02": rng.integers(0, 2, (9, 9))}
    for i, m in truth.items():
        (tmp_path / "masks").mkdir(exist_ok=True)
        assert cv2.imwrite(str(tmp_path / "masks" / f"{i}.png"), m.astype(np.uint8))
    pred = {i: np.where(rng.random(m.shape) < 0.8, m, 1 - m) for i, m in truth.items()}
    sub = tmp_path / "sub.csv"
    write_submission([r for i, p in pred.items() for r in fmt.rows(i, p, 2)], sub,
                     shape={i: m.shape for i, m in truth.items()}, fmt=fmt)
    result = run_score(sub, truth=tmp_path / "masks", num_classes=2, fmt=fmt)
    assert result.row_dice == pytest.approx(score_label_maps(pred, truth, 2, fmt).row_dice)
    assert set(result.row_dice) == {"car_01", "car_02"} and "score" in capsys.readouterr().out
    with pytest.raises(SubmissionError, match="header is 'img,rle_mask', expected 'id,encoding'"):
        run_score(sub, truth=tmp_path / "masks", num_classes=2)


formats = st.builds(
    lambda template, order, start, classes: SubmissionFormat.from_dict(
        {"id": template, "order": order, "start": start, "classes": classes}, num_classes=4, class_names=NAMES),
    st.sampled_from(["{id}_mask{class}", "{class}-{id}", "{id}.{name}"]),
    st.sampled_from(["column", "row"]),
    st.sampled_from([0, 1]),
    st.sampled_from([None, [3], [2, 1]]),
)
label_sets = st.lists(labels, min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(formats, label_sets, label_sets)
def test_csv_path_equals_label_maps_in_any_format(fmt, truths, preds):
    truth = {f"im_{j}": t for j, t in enumerate(truths)}
    pred = {}
    for j, (i, t) in enumerate(truth.items()):  # a prediction of each truth's size
        p = preds[j % len(preds)]
        pred[i] = np.resize(p, t.shape).astype(np.uint8)
    shapes = {i: t.shape for i, t in truth.items()}
    rows = [r for i, m in pred.items() for r in fmt.rows(i, m, 4)]
    sub = parse_submission(submission_text(rows, fmt), "s", shapes, fmt)
    sol = {r: e for i, t in truth.items() for r, e in fmt.rows(i, t, 4)}
    by_csv = score_rows(sub, sol, shapes, fmt=fmt)
    by_maps = score_label_maps(pred, truth, 4, fmt)
    assert by_csv.row_dice == pytest.approx(by_maps.row_dice)
    assert by_csv.per_class_iou == pytest.approx(by_maps.per_class_iou)
    assert by_csv.per_class_pixel_accuracy == pytest.approx(by_maps.per_class_pixel_accuracy)
    assert set(by_csv.per_class) == {str(k) for k in fmt.row_classes(4)}
    for rid, enc in sub.items():  # every row decodes to its class mask at its image's size
        i, k = fmt.parse_row_id(rid)
        np.testing.assert_array_equal(fmt.decode(enc, shapes[i]), pred[i] == k)
