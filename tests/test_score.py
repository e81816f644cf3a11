"""Metric, submission CSV reader/writer and ``run_score`` (library level)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kagglecmr.engine.evaluator import run_score, run_score_dataset
from kagglecmr.formats.metric import ScoreResult, dice_table, score_label_maps, score_rows
from kagglecmr.formats.rle import encode_rle
from kagglecmr.formats.submission import label_to_rows
from kagglecmr.formats.submission_csv import infer_shape, read_submission, write_submission
from kagglecmr.utils.errors import DataError, KaggleCMRError, SubmissionError

# --------------------------------------------------------------------------- independent reference


def ref_pixels(enc: str) -> set[int]:
    """Pixel indices of an encoding, by plain loops (independent of kagglecmr.formats.rle)."""
    nums = [int(t) for t in enc.split(" ") if t != ""]
    pixels: set[int] = set()
    for j in range(0, len(nums), 2):
        for offset in range(nums[j + 1]):
            pixels.add(nums[j] + offset)
    return pixels


def ref_dice(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return 2 * len(a & b) / (len(a) + len(b))


def ref_score(pred: dict[str, str], truth: dict[str, str]) -> float:
    return sum(ref_dice(ref_pixels(pred[rid]), ref_pixels(enc)) for rid, enc in truth.items()) / len(truth)


def ref_rle(pixels: set[int]) -> str:
    """Encode a set of 1-based pixel indices by walking them in order."""
    out: list[list[int]] = []
    for p in sorted(pixels):
        if out and out[-1][0] + out[-1][1] == p:
            out[-1][1] += 1
        else:
            out.append([p, 1])
    return " ".join(f"{s} {n}" for s, n in out)


# --------------------------------------------------------------------------- helpers


def write_png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.asarray(arr, dtype=np.uint8))
    return path


def labels_rows(label_maps: dict[str, np.ndarray], num_classes: int = 4) -> dict[str, str]:
    return {rid: enc for i, m in label_maps.items() for rid, enc in label_to_rows(i, m, num_classes)}


def one_line_error(exc_info, *needles) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


# --------------------------------------------------------------------------- Dice


pixel_sets = st.sets(st.integers(1, 64), max_size=40)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(pixel_sets, pixel_sets), min_size=1, max_size=12))
def test_score_rows_matches_reference(pairs):
    truth = {f"img{j // 3}_mask{j % 3 + 1}": ref_rle(t) for j, (_, t) in enumerate(pairs)}
    pred = {f"img{j // 3}_mask{j % 3 + 1}": ref_rle(p) for j, (p, _) in enumerate(pairs)}
    result = score_rows(pred, truth, (8, 8))
    assert abs(result.score - ref_score(pred, truth)) < 1e-9
    assert result.rows == len(truth)
    for rid, enc in truth.items():
        assert abs(result.row_dice[rid] - ref_dice(ref_pixels(pred[rid]), ref_pixels(enc))) < 1e-9


def test_empty_rules():
    truth = {"a_mask1": "", "a_mask2": "", "a_mask3": "1 4"}
    pred = {"a_mask1": "", "a_mask2": "3 1", "a_mask3": ""}
    result = score_rows(pred, truth, (4, 4))
    assert result.row_dice == {"a_mask1": 1.0, "a_mask2": 0.0, "a_mask3": 0.0}
    assert result.score == pytest.approx(1 / 3, abs=1e-12)


def test_known_value():
    # A = {1,2,3,4}, B = {3,4,5}: 2*2/(4+3)
    result = score_rows({"a_mask1": "1 4"}, {"a_mask1": "3 3"}, (4, 4))
    assert result.score == pytest.approx(4 / 7, abs=1e-12)


def ref_dice_table(pred, true, num_classes):
    n, h, w = true.shape
    out = np.zeros((n, num_classes - 1))
    for i in range(n):
        for k in range(1, num_classes):
            a = {(y, x) for y in range(h) for x in range(w) if pred[i, y, x] == k}
            b = {(y, x) for y in range(h) for x in range(w) if true[i, y, x] == k}
            out[i, k - 1] = ref_dice(a, b)
    return out


@pytest.mark.parametrize("seed", range(8))
def test_dice_table_matches_reference_and_score(seed):
    rng = np.random.default_rng(seed)
    num_classes = int(rng.integers(2, 6))
    n, h, w = int(rng.integers(1, 5)), int(rng.integers(1, 9)), int(rng.integers(1, 9))
    true = rng.integers(0, num_classes, (n, h, w))
    pred = np.where(rng.random((n, h, w)) < 0.7, true, rng.integers(0, num_classes, (n, h, w)))
    true[0] = 0  # an image with every class empty in the truth
    table = dice_table(pred.astype(np.uint8), true, num_classes)
    assert table.dtype == np.float64 and table.shape == (n, num_classes - 1)
    np.testing.assert_allclose(table, ref_dice_table(pred, true, num_classes), rtol=0, atol=1e-12)
    if num_classes == 4:  # the leaderboard score of the same masks is the table's mean
        ids = [f"im{i}" for i in range(n)]
        rows = score_rows(labels_rows(dict(zip(ids, pred))), labels_rows(dict(zip(ids, true))), (h, w))
        assert rows.score == pytest.approx(table.mean(), abs=1e-12)


def test_dice_table_edge_cases():
    assert dice_table(np.zeros((3, 3)), np.zeros((3, 3))).tolist() == [[1.0, 1.0, 1.0]]
    assert dice_table(np.zeros((0, 4, 4), int), np.zeros((0, 4, 4), int)).shape == (0, 3)
    with pytest.raises(ValueError, match="shape"):
        dice_table(np.zeros((1, 3, 3)), np.zeros((1, 3, 4)))
    with pytest.raises(ValueError, match="labels"):
        dice_table(np.full((1, 3, 3), 4), np.zeros((1, 3, 3)))


# --------------------------------------------------------------------------- reading submissions

GOOD = "id,encoding\ncmr1_mask1,1 2\ncmr1_mask2,\ncmr1_mask3,5 3\n"
GOOD_ROWS = {"cmr1_mask1": "1 2", "cmr1_mask2": "", "cmr1_mask3": "5 3"}


@pytest.mark.parametrize(
    "text",
    [
        GOOD,
        GOOD.rstrip("\n"),
        GOOD.replace("\n", "\r\n"),
        "\ufeff" + GOOD,
        GOOD.replace("cmr1_mask2,", 'cmr1_mask2,""').replace("1 2", '"1 2"'),
        GOOD + "\n\n",
    ],
    ids=["plain", "no trailing newline", "crlf", "bom", "quoted", "trailing blank lines"],
)
def test_read_submission_accepts(tmp_path, text):
    path = tmp_path / "s.csv"
    path.write_bytes(text.encode("utf-8"))
    rows = read_submission(path)
    assert rows == GOOD_ROWS and list(rows) == list(GOOD_ROWS)


# name -> (file bytes or None for a missing file, substrings the message must contain)
MALFORMED = {
    "missing file": (None, ["file not found"]),
    "empty file": (b"", ["empty file"]),
    "whitespace only": (b"\n \r\n", ["empty file"]),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", ["not a CSV text file"]),
    "wrong header": (b"id,enc\ncmr1_mask1,1 2\n", ["line 1", "header", "expected 'id,encoding'"]),
    "header case": (b"Id,Encoding\ncmr1_mask1,1 2\n", ["line 1", "header"]),
    "no header": (b"cmr1_mask1,1 2\n", ["line 1", "header"]),
    "json not csv": (b'{"id": "cmr1_mask1", "encoding": "1 2"}\n', ["line 1", "header"]),
    "header only": (b"id,encoding\n", ["no rows"]),
    "too many fields": (b"id,encoding\ncmr1_mask1,1 2,3\n", ["line 2", "expected 2 fields", "found 3"]),
    "too few fields": (b"id,encoding\ncmr1_mask1\n", ["line 2", "found 1"]),
    "blank line": (b"id,encoding\ncmr1_mask1,1 2\n\ncmr1_mask2,\n", ["line 3", "blank line"]),
    "bad quoting": (b'id,encoding\ncmr1_mask1,"1 2"x\n', ["line 2", "not valid CSV"]),
    "duplicate id": (b"id,encoding\ncmr1_mask1,1 2\ncmr1_mask1,\n", ["line 3", "duplicate id", "line 2"]),
    "bad id": (b"id,encoding\ncmr1-1,1 2\n", ["line 2", "bad id 'cmr1-1'"]),
    "background id": (b"id,encoding\ncmr1_mask0,1 2\n", ["line 2", "bad id"]),
    "odd tokens": (b"id,encoding\ncmr1_mask1,1 2 3\n", ["line 2", "cmr1_mask1", "odd number"]),
    "non-integer": (b"id,encoding\ncmr1_mask1,1 2.5\n", ["line 2", "not a non-negative integer"]),
    "negative": (b"id,encoding\ncmr1_mask1,-1 2\n", ["line 2", "not a non-negative integer"]),
    "zero start": (b"id,encoding\ncmr1_mask1,0 2\n", ["line 2", "not >= 1"]),
    "zero length": (b"id,encoding\ncmr1_mask1,3 0\n", ["line 2", "length 0"]),
    "unsorted runs": (b"id,encoding\ncmr1_mask1,9 2 1 2\n", ["line 2", "not sorted"]),
    "overlapping runs": (b"id,encoding\ncmr1_mask1,1 5 4 2\n", ["line 2", "overlap"]),
}


def write_case(tmp_path, name):
    content, needles = MALFORMED[name]
    path = tmp_path / "sub.csv"
    if content is not None:
        path.write_bytes(content)
    return path, needles


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_read_submission_rejects(tmp_path, name):
    path, needles = write_case(tmp_path, name)
    with pytest.raises(SubmissionError) as info:
        read_submission(path)
    assert one_line_error(info, *needles).startswith(str(path))


def test_read_submission_run_past_end_needs_shape(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("id,encoding\ncmr1_mask1,1 2\ncmr1_mask2,15 3\n")
    assert read_submission(path)["cmr1_mask2"] == "15 3"
    with pytest.raises(SubmissionError) as info:
        read_submission(path, shape=(4, 4))
    one_line_error(info, str(path), "line 3", "cmr1_mask2", "past the image's 16 pixels")


def test_messages_escape_newlines(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text('id,encoding\n"cmr1\n_mask1",1 2\n')
    with pytest.raises(SubmissionError) as info:
        read_submission(path)
    one_line_error(info, "bad id")


# --------------------------------------------------------------------------- writing submissions


def test_write_submission_roundtrip_and_overwrite(tmp_path):
    path = tmp_path / "out" / "s.csv"
    rows = list(GOOD_ROWS.items())
    write_submission(rows, path, shape=(4, 4))
    assert path.read_text() == GOOD
    assert read_submission(path) == GOOD_ROWS
    with pytest.raises(KaggleCMRError, match="already exists"):
        write_submission(rows[:1], path, shape=(4, 4))
    assert path.read_text() == GOOD
    write_submission(rows[:1], path, shape=(4, 4), overwrite=True)
    assert read_submission(path) == {"cmr1_mask1": "1 2"}


@pytest.mark.parametrize(
    "rows,needle",
    [
        ([("cmr1_mask1", "15 3")], "past the image"),
        ([("cmr1_mask1", "1 2 3")], "odd number"),
        ([("cmr1,x_mask1", "")], "bad id"),
        ([("a_mask1", ""), ("a_mask1", "")], "duplicate id"),
        ([], "no rows"),
    ],
)
def test_write_submission_validates_before_writing(tmp_path, rows, needle):
    path = tmp_path / "s.csv"
    with pytest.raises(SubmissionError) as info:
        write_submission(rows, path, shape=(4, 4))
    one_line_error(info, str(path), needle)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- score_rows / ScoreResult


def test_score_rows_missing_and_unknown_ids():
    truth = {f"cmr{i}_mask{k}": "" for i in range(1, 6) for k in (1, 2, 3)}
    pred = dict(truth)
    del pred["cmr2_mask1"], pred["cmr3_mask3"]
    with pytest.raises(SubmissionError) as info:
        score_rows(pred, truth, (4, 4), name="sub.csv")
    one_line_error(info, "sub.csv", "2 of 15 truth rows missing", "cmr2_mask1", "cmr3_mask3")
    pred = dict(truth, cmr9_mask1="", cmr10_mask1="", cmr11_mask1="", cmr12_mask1="")
    with pytest.raises(SubmissionError) as info:
        score_rows(pred, truth, (4, 4))
    one_line_error(info, "4 of 19 rows are not in the truth", "cmr9_mask1, cmr10_mask1, cmr11_mask1, ...")


def test_score_result_summary():
    # (|A∩B|, |A|, |B|, pixels) chosen for Dice 0.5, 1, 0.5, 0, 1, 0.9
    counts = {"b_mask1": (1, 2, 2, 10), "b_mask2": (0, 0, 0, 10), "a_mask1": (1, 1, 3, 10),
              "a_mask2": (0, 2, 0, 10), "c_mask1": (4, 4, 4, 10), "c_mask2": (9, 9, 11, 20)}
    result = ScoreResult.from_counts(counts)
    assert result.score == pytest.approx(3.9 / 6)
    assert result.per_class == pytest.approx({"1": 2 / 3, "2": 1.9 / 3})
    assert (result.rows, result.images) == (6, 3)
    assert result.worst == [("a_mask2", 0.0), ("a_mask1", 0.5), ("b_mask1", 0.5), ("c_mask2", 0.9), ("b_mask2", 1.0)]
    # IoU |A∩B|/|A∪B|: 1/3, 1, 1/3, 0, 1, 9/11; one-vs-rest accuracy 1 - |A xor B|/pixels: .8, 1, .8, .8, 1, .9
    assert result.iou == pytest.approx((1 / 3 + 1 + 1 / 3 + 0 + 1 + 9 / 11) / 6)
    assert result.per_class_iou == pytest.approx({"1": 5 / 9, "2": (1 + 9 / 11) / 3})
    assert result.pixel_accuracy == pytest.approx(5.3 / 6) and result.pixel_accuracy_of == "rows"
    assert result.per_class_pixel_accuracy == pytest.approx({"1": 2.6 / 3, "2": 0.9})
    d = json.loads(json.dumps(result.to_dict()))
    assert d["score"] == result.score and d["rows"] == 6 and d["worst"][0] == {"id": "a_mask2", "dice": 0.0}
    assert set(d) == {"score", "per_class", "metric", "rows", "images", "worst", "dice", "per_class_dice", "iou",
                      "pixel_accuracy", "per_class_iou", "per_class_pixel_accuracy"}
    assert d["metric"] == {"name": "dice", "per": "row", "empty": 1} and d["dice"] == d["score"]
    assert d["per_class_iou"] == result.per_class_iou and d["pixel_accuracy"] == result.pixel_accuracy
    report = result.report()
    assert "0.650000" in report and "class 2" in report and "a_mask2" in report
    assert f"IoU {result.iou:.6f}" in report and "pixel acc 0.900000" in report


# two 2x2 images, 3 classes; by hand (rows: image a class 1, a 2, b 1, b 2):
#   Dice 2/3, 2/3, 0, 1 | IoU 1/2, 1/2, 0, 1 | one-vs-rest accuracy 3/4, 3/4, 3/4, 1
#   correctly labelled pixels: 3 of 4 in a, 3 of 4 in b
HAND_TRUTH = {"a": np.array([[0, 1], [1, 2]]), "b": np.zeros((2, 2), int)}
HAND_PRED = {"a": np.array([[0, 1], [2, 2]]), "b": np.array([[0, 0], [0, 1]])}


def test_iou_and_pixel_accuracy_by_hand():
    from_labels = score_label_maps(HAND_PRED, HAND_TRUTH, 3)
    from_csv = score_rows(labels_rows(HAND_PRED, 3), labels_rows(HAND_TRUTH, 3), (2, 2))
    for r in (from_labels, from_csv):
        assert r.score == pytest.approx(7 / 12) and r.iou == pytest.approx(0.5)
        assert r.per_class == pytest.approx({"1": 1 / 3, "2": 5 / 6})
        assert r.per_class_iou == pytest.approx({"1": 0.25, "2": 0.75})
        assert r.per_class_pixel_accuracy == pytest.approx({"1": 0.75, "2": 0.875})
    assert from_labels.pixel_accuracy == pytest.approx(6 / 8) and from_labels.pixel_accuracy_of == "labels"
    assert from_csv.pixel_accuracy == pytest.approx(3.25 / 4) and from_csv.pixel_accuracy_of == "rows"
    assert "correctly labelled pixels" in from_labels.report()


def random_maps(rng, sizes, num_classes):
    truth = {f"im{j}": rng.integers(0, num_classes, hw) for j, hw in enumerate(sizes)}
    pred = {i: np.where(rng.random(t.shape) < 0.6, t, rng.integers(0, num_classes, t.shape)) for i, t in truth.items()}
    return pred, truth


@pytest.mark.parametrize("seed", range(4))
def test_score_label_maps_mixed_sizes_equals_each_size_and_the_csv(seed):
    rng = np.random.default_rng(seed)
    sizes = [(5, 5), (7, 3), (5, 5), (4, 6), (7, 3), (1, 1)]
    pred, truth = random_maps(rng, sizes, 4)
    truth["im0"][:] = 0  # every class empty in the truth of one image
    whole = score_label_maps(pred, truth, 4)
    correct = total = 0
    row_dice = {}
    for hw in set(sizes):
        ids = [i for i, t in truth.items() if t.shape == hw]
        part = score_label_maps({i: pred[i] for i in ids}, {i: truth[i] for i in ids}, 4)
        row_dice.update(part.row_dice)
        correct += part.pixel_accuracy * len(ids) * hw[0] * hw[1]
        total += len(ids) * hw[0] * hw[1]
    assert whole.row_dice == pytest.approx(row_dice) and whole.rows == 18 and whole.images == 6
    assert whole.pixel_accuracy == pytest.approx(correct / total)
    assert whole.pixel_accuracy == pytest.approx(
        sum(int((pred[i] == t).sum()) for i, t in truth.items()) / sum(t.size for t in truth.values()))
    shapes = {i: t.shape for i, t in truth.items()}
    csv = score_rows(labels_rows(pred), labels_rows(truth), shapes)
    assert csv.row_dice == pytest.approx(whole.row_dice) and csv.score == pytest.approx(whole.score)
    assert csv.per_class_iou == pytest.approx(whole.per_class_iou) and csv.iou == pytest.approx(whole.iou)
    assert csv.per_class_pixel_accuracy == pytest.approx(whole.per_class_pixel_accuracy)
    assert csv.worst == whole.worst


def test_score_label_maps_with_a_format_scores_its_row_classes_only():
    from kagglecmr.formats.submission import SubmissionFormat

    fmt = SubmissionFormat.from_dict({"id": "{id}_{name}", "classes": ["LV"]}, num_classes=4,
                                     class_names=["bg", "RV", "Myo", "LV"])
    rng = np.random.default_rng(5)
    pred, truth = random_maps(rng, [(6, 6), (3, 8)], 4)
    result = score_label_maps(pred, truth, 4, fmt)
    assert set(result.row_dice) == {"im0_LV", "im1_LV"} and set(result.per_class) == {"3"}
    assert result.score == pytest.approx(np.mean([dice_table(pred[i], truth[i])[0, 2] for i in truth]))
    assert "class 3 (LV)" in result.report()


def test_score_label_maps_errors():
    pred, truth = dict(HAND_PRED), dict(HAND_TRUTH)
    with pytest.raises(ValueError, match="1 of 2 truth images missing, e.g. b"):
        score_label_maps({"a": pred["a"]}, truth, 3)
    with pytest.raises(ValueError, match="b: prediction shape"):
        score_label_maps(dict(pred, b=np.zeros((3, 2), int)), truth, 3)
    with pytest.raises(ValueError, match="labels must lie in 0..2"):
        score_label_maps(dict(pred, b=np.full((2, 2), 3)), truth, 3)


def test_infer_shape():
    assert infer_shape({"a_mask1": "", "a_mask2": "1 10"}) == (96, 96)
    assert infer_shape({"a_mask1": "9216 1"}) == (96, 96)
    assert infer_shape({"a_mask1": "9216 2"}) == (97, 97)
    assert infer_shape({"a_mask1": "65000 536"}) == (256, 256)


# --------------------------------------------------------------------------- run_score


@pytest.fixture
def dataset(tmp_path):
    """A dataset root with 4 train and 2 val masks (16x16) and their rows."""
    rng = np.random.default_rng(7)
    root = tmp_path / "data"
    labels = {}
    for split, ids in (("train", ["cmr1", "cmr2", "cmr3", "cmr10"]), ("val", ["cmr11", "cmr12"])):
        for i in ids:
            labels[i] = rng.integers(0, 4, (16, 16)).astype(np.uint8)
            write_png(root / split / "mask" / f"{i}_mask.png", labels[i])
            write_png(root / split / "image" / f"{i}.png", labels[i] * 60)
    return root, labels


def write_rows(path, rows: dict[str, str]):
    write_submission(list(rows.items()), path, shape=(16, 16))
    return path


def test_run_score_against_folder_csv_and_data(tmp_path, dataset, capsys):
    root, labels = dataset
    train_ids = ["cmr1", "cmr2", "cmr3", "cmr10"]
    truth = labels_rows({i: labels[i] for i in train_ids})
    noisy = {i: np.where(labels[i] == 3, 2, labels[i]) for i in train_ids}
    sub = write_rows(tmp_path / "sub.csv", labels_rows(noisy))
    expected = ref_score(labels_rows(noisy), truth)

    by_folder = run_score(sub, truth=root / "train" / "mask")
    assert by_folder.score == pytest.approx(expected, abs=1e-12)
    assert "score" in capsys.readouterr().out
    solution = write_rows(tmp_path / "solution.csv", truth)
    assert run_score(sub, truth=solution).score == pytest.approx(expected, abs=1e-12)
    assert run_score_dataset(sub, data=root, as_json=True).score == pytest.approx(expected, abs=1e-12)
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert printed["score"] == pytest.approx(expected) and set(printed["per_class"]) == {"1", "2", "3"}
    assert run_score(solution, truth=solution).score == 1.0


def test_run_score_val_submission_scores_against_val(tmp_path, dataset, capsys):
    root, labels = dataset
    sub = write_rows(tmp_path / "val.csv", labels_rows({i: labels[i] for i in ["cmr11", "cmr12"]}))
    result = run_score_dataset(sub, data=root, as_json=True)
    assert (result.score, result.rows, result.images) == (1.0, 6, 2)
    assert json.loads(capsys.readouterr().out)["score"] == 1.0


def test_run_score_unknown_images_under_data(tmp_path, dataset):
    root, labels = dataset
    sub = write_rows(tmp_path / "s.csv", labels_rows({"cmr1": labels["cmr1"], "cmr99": labels["cmr2"]}))
    with pytest.raises(SubmissionError) as info:
        run_score_dataset(sub, data=root)
    one_line_error(info, str(sub), "1 of 2 images have no train/val mask", "cmr99")


def test_run_score_checks_runs_against_mask_shape(tmp_path, dataset):
    root, labels = dataset
    rows = labels_rows({"cmr1": labels["cmr1"]})
    rows["cmr1_mask1"] = "250 10"  # 16x16 = 256 pixels
    sub = tmp_path / "s.csv"
    write_submission(list(rows.items()), sub, shape=(96, 96))
    with pytest.raises(SubmissionError) as info:
        run_score_dataset(sub, data=root)
    one_line_error(info, str(sub), "cmr1_mask1", "past the image's 256 pixels")


def test_run_score_missing_truth(tmp_path):
    sub = tmp_path / "s.csv"
    sub.write_text(GOOD)
    with pytest.raises(DataError) as info:
        run_score(sub, truth=tmp_path / "nope")
    one_line_error(info, "nope", "truth not found")


def test_encoded_masks_score_perfectly(tmp_path):
    rng = np.random.default_rng(3)
    masks = {f"cmr{i}": rng.integers(0, 4, (10, 10)) for i in range(1, 6)}
    masks["cmr1"][:] = 0
    sub = write_rows(tmp_path / "s.csv", labels_rows(masks))
    for i, m in masks.items():
        write_png(tmp_path / "masks" / f"{i}.png", m)
    assert run_score(sub, truth=tmp_path / "masks").score == 1.0
    assert encode_rle(masks["cmr1"] == 1) == ""


def test_run_score_mixed_sizes_and_json_keys(tmp_path, capsys):
    rng = np.random.default_rng(11)
    masks = {"cmr1": rng.integers(0, 4, (8, 8)), "cmr2": rng.integers(0, 4, (12, 12))}
    for i, m in masks.items():
        write_png(tmp_path / "masks" / f"{i}_mask.png", m)
    pred = {i: np.where(m == 2, 1, m) for i, m in masks.items()}
    sub = tmp_path / "s.csv"
    write_submission(list(labels_rows(pred).items()), sub, shape={i: m.shape for i, m in masks.items()})
    result = run_score(sub, truth=tmp_path / "masks", as_json=True)
    printed = json.loads(capsys.readouterr().out)
    expected = score_label_maps(pred, masks, 4)
    assert printed["score"] == pytest.approx(expected.score) and printed["iou"] == pytest.approx(expected.iou)
    assert printed["per_class_pixel_accuracy"] == pytest.approx(expected.per_class_pixel_accuracy)
    assert result.row_dice == pytest.approx(expected.row_dice)
