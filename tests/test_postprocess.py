"""Connected-component post-processing: rules, tuning on OOF predictions, plan files."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from kagglecmr.engine.postprocess import (
    CONNECTIVITY,
    apply_plan,
    candidate_rules,
    describe_plan,
    format_table,
    load_plan,
    save_plan,
    tune_plan,
    validate_plan,
)
from kagglecmr.utils.errors import ConfigError

H = W = 96


def _ref_dice_table(pred, true, num_classes=4):
    """Private vectorised reference of the metric: [N, num_classes-1], 1 if both empty, 0 if one."""
    pred = np.asarray(pred).reshape(len(pred), -1)
    true = np.asarray(true).reshape(len(true), -1)
    ks = np.arange(1, num_classes)
    p = pred[:, None, :] == ks[None, :, None]
    t = true[:, None, :] == ks[None, :, None]
    inter = (p & t).sum(-1)
    denom = p.sum(-1) + t.sum(-1)
    return np.where(denom == 0, 1.0, 2.0 * inter / np.maximum(denom, 1))


@pytest.fixture
def dice_impl(monkeypatch):
    """The real ``kagglecmr.formats.metric.dice_table`` once it exists; until then the reference above."""
    try:
        from kagglecmr.formats.metric import dice_table
    except ImportError:
        stub = types.ModuleType("kagglecmr.formats.metric")
        stub.dice_table = _ref_dice_table
        monkeypatch.setitem(sys.modules, "kagglecmr.formats.metric", stub)
        return _ref_dice_table
    return dice_table


def _disk(cy, cx, r):
    yy, xx = np.mgrid[:H, :W]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _heart(rng):
    """A phantom label map: RV (1) left, myocardium ring (2) around LV (3)."""
    lab = np.zeros((H, W), np.uint8)
    cy, cx = 48 + rng.integers(-4, 5), 52 + rng.integers(-4, 5)
    r = rng.integers(10, 15)
    lab[_disk(cy, cx - r - 12, r * 0.8)] = 1
    lab[_disk(cy, cx, r + 4)] = 2
    lab[_disk(cy, cx, r)] = 3
    return lab


def _hearts(n, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([_heart(rng) for _ in range(n)])


def _add_blob(lab, cls, y, x, size):
    lab[y:y + size, x:x + size] = np.where(lab[y:y + size, x:x + size] == 0, cls, lab[y:y + size, x:x + size])


def _row(table, cls, rule):
    return next(r for r in table if r["class"] == cls and r["rule"] == rule)


# ------------------------------------------------------------------------------------ apply_plan


def test_none_plan_returns_equal_copy():
    lab = _hearts(3)
    out = apply_plan(lab, {"1": {"kind": "none"}, "2": {"kind": "none"}, "3": {"kind": "none"}})
    assert out is not lab and out.dtype == lab.dtype
    np.testing.assert_array_equal(out, lab)
    np.testing.assert_array_equal(apply_plan(lab, {}), lab)


def test_largest_keeps_largest_component_and_zeroes_the_rest():
    lab = np.zeros((20, 20), np.uint8)
    lab[0:5, 0:5] = 1  # 25 px
    lab[10:12, 10:12] = 1  # 4 px
    lab[15:20, 15:20] = 2  # other class untouched
    out = apply_plan(lab, {"1": {"kind": "largest"}})
    assert out.shape == (20, 20)
    assert (out == 1).sum() == 25 and (out[10:12, 10:12] == 0).all()
    np.testing.assert_array_equal(out == 2, lab == 2)


def test_components_are_8_connected():
    assert CONNECTIVITY == 8
    lab = np.zeros((10, 10), np.uint8)
    lab[2, 2] = lab[3, 3] = lab[4, 4] = 1  # a diagonal chain: one 8-connected component of 3 px
    lab[8, 0] = 1  # a separate single pixel
    out = apply_plan(lab, {"1": {"kind": "largest"}})
    assert (out == 1).sum() == 3 and out[8, 0] == 0
    out = apply_plan(lab, {"1": {"kind": "min_area", "area": 3}})
    assert (out == 1).sum() == 3


def test_min_area_drops_small_components_and_can_empty_the_class():
    lab = np.zeros((2, 30, 30), np.uint8)
    lab[0, 0:6, 0:6] = 3  # 36 px kept
    lab[0, 20:22, 20:22] = 3  # 4 px dropped
    lab[1, 0:3, 0:3] = 3  # 9 px only: dropped, class 3 empty on image 1
    lab[1, 10:20, 10:20] = 1
    out = apply_plan(lab, {3: {"kind": "min_area", "area": 10}})
    assert (out[0] == 3).sum() == 36 and (out[0, 20:22, 20:22] == 0).all()
    assert not (out[1] == 3).any()
    np.testing.assert_array_equal(out[1] == 1, lab[1] == 1)
    assert set(np.unique(out)) <= {0, 1, 3}


def test_labels_outside_plan_and_above_num_classes_untouched():
    lab = np.zeros((1, 10, 10), np.uint8)
    lab[0, 0, 0] = 5
    lab[0, 5, 5] = 1
    out = apply_plan(lab, {"1": {"kind": "min_area", "area": 2}}, num_classes=6)
    assert out[0, 0, 0] == 5 and out[0, 5, 5] == 0


@pytest.mark.parametrize("plan", [
    {"1": {"kind": "largest"}, "2": {"kind": "largest"}, "3": {"kind": "largest"}},
    {"1": {"kind": "min_area", "area": 5}, "2": {"kind": "min_area", "area": 40}, "3": {"kind": "none"}},
    {"1": {"kind": "largest"}, "2": {"kind": "min_area", "area": 3}, "3": {"kind": "min_area", "area": 80}},
])
def test_apply_plan_is_idempotent(plan):
    rng = np.random.default_rng(1)
    noisy = rng.choice(4, size=(6, 48, 48), p=[0.7, 0.1, 0.1, 0.1]).astype(np.uint8)
    once = apply_plan(noisy, plan)
    np.testing.assert_array_equal(apply_plan(once, plan), once)
    assert not np.array_equal(once, noisy)  # the plan did something
    # removed pixels became background, nothing else changed class
    changed = once != noisy
    assert (once[changed] == 0).all()


def test_apply_plan_rejects_bad_plans_and_shapes():
    lab = np.zeros((4, 4), np.uint8)
    with pytest.raises(ConfigError, match="class 1"):
        apply_plan(lab, {"1": {"kind": "biggest"}})
    with pytest.raises(ConfigError, match="out of range"):
        apply_plan(lab, {"4": {"kind": "largest"}}, num_classes=4)
    with pytest.raises(ValueError):
        apply_plan(np.zeros((1, 1, 4, 4), np.uint8), {})


# ------------------------------------------------------------------------------------ tuning


def test_reference_metric_matches_score_module_when_present():
    score = pytest.importorskip("kagglecmr.formats.metric")
    rng = np.random.default_rng(3)
    true = _hearts(12, seed=3)
    pred = true.copy()
    pred[rng.random(pred.shape) < 0.05] = 1
    pred[4][pred[4] == 2] = 0  # one image with an empty predicted class
    true[5][true[5] == 1] = 0  # one image with an empty true class
    np.testing.assert_allclose(score.dice_table(pred, true, num_classes=4), _ref_dice_table(pred, true), atol=1e-6)


def test_tune_keeps_none_on_clean_predictions(dice_impl):
    true = _hearts(30)
    pred = true.copy()
    pred[:, 40:60, :] = np.where(pred[:, 40:60, :] == 3, 2, pred[:, 40:60, :])  # imperfect but single blobs
    plan, before, after, _table = tune_plan(pred, true)
    assert plan == {"1": {"kind": "none"}, "2": {"kind": "none"}, "3": {"kind": "none"}}
    assert after == pytest.approx(before)
    assert before == pytest.approx(dice_impl(pred, true).mean())


def test_tune_picks_min_area_for_small_spurious_blobs(dice_impl):
    true = _hearts(40)
    pred = true.copy()
    for i in range(0, 40, 2):
        _add_blob(pred[i], 1, 2, 80, 3)  # 9-px stray RV blob in the corner
        _add_blob(pred[i], 1, 85, 5, 2)  # 4-px stray RV blob
    plan, before, after, table = tune_plan(pred, true)
    assert plan["1"]["kind"] == "min_area" and plan["1"]["area"] == 10  # smallest area that removes both
    assert plan["2"] == plan["3"] == {"kind": "none"}
    assert after > before + 1e-3
    assert after == pytest.approx(dice_impl(apply_plan(pred, plan), true).mean())
    assert after == pytest.approx(dice_impl(true, true).mean())  # = 1.0: the blobs were all the error
    chosen = [r for r in table if r["chosen"]]
    assert [r["class"] for r in chosen] == [1, 2, 3]
    assert _row(table, 1, "largest")["score"] == pytest.approx(_row(table, 1, "min_area 10")["score"])


def test_tune_picks_largest_when_spurious_blobs_are_big(dice_impl):
    true = _hearts(30)
    pred = true.copy()
    for i in range(30):
        _add_blob(pred[i], 3, 0, 0, 12)  # 144 px stray LV: bigger than every min_area candidate
    plan, _before, after, table = tune_plan(pred, true)
    assert plan["3"] == {"kind": "largest"}
    assert plan["1"] == plan["2"] == {"kind": "none"}
    assert _row(table, 3, "min_area 80")["delta"] == pytest.approx(0.0)
    assert after == pytest.approx(1.0)


def test_tune_prefers_min_area_when_truth_has_two_components(dice_impl):
    """Largest would delete a real second RV piece; min_area only removes the specks."""
    true = _hearts(30)
    for lab in true:
        _add_blob(lab, 1, 2, 2, 10)  # a genuine second RV component (100 px)
    pred = true.copy()
    for i in range(0, 30, 3):
        pred[i, 90, 90] = 1  # isolated single-pixel specks
    plan, _before, after, table = tune_plan(pred, true)
    assert plan["1"] == {"kind": "min_area", "area": 5}
    assert _row(table, 1, "largest")["delta"] < 0
    assert after == pytest.approx(1.0)


def test_tune_fixes_empty_rows_with_stray_pixels(dice_impl):
    """A stray RV pixel on a slice without RV scores 0 for that row; min_area makes it 1 again."""
    true = _hearts(20)
    true[:8][true[:8] == 1] = 0  # first 8 slices: no RV at all (e.g. apical slices)
    pred = true.copy()
    pred[:8, 5:7, 5] = 1  # 2-px stray RV on each of them
    rows = dice_impl(pred, true)
    assert (rows[:8, 0] == 0).all() and (rows[8:, 0] == 1).all()
    plan, before, after, table = tune_plan(pred, true)
    assert before == pytest.approx((3 * 20 - 8) / 60)
    # "largest" cannot help: the stray pixel *is* the largest (only) RV component on those rows
    assert _row(table, 1, "largest")["delta"] == pytest.approx(0.0)
    assert plan["1"] == {"kind": "min_area", "area": 5}
    fixed = dice_impl(apply_plan(pred, plan), true)
    assert (fixed == 1).all() and after == pytest.approx(1.0)


def test_tune_is_conservative_below_epsilon(dice_impl):
    """A gain of ~2e-5 in the class mean is not worth a rule."""
    true = np.zeros((10, H, W), np.uint8)
    true[:, 10:60, 10:60] = 3  # 2500 px LV
    pred = true.copy()
    pred[0, 90, 90] = 3  # one stray pixel on one image: class mean gain = (1 - 5000/5001) / 10
    plan, before, after, table = tune_plan(pred, true)
    assert 0 < _row(table, 3, "min_area 5")["delta"] < 1e-4
    assert plan["3"] == {"kind": "none"} and after == before
    plan, *_ = tune_plan(pred, true, epsilon=0.0)
    assert plan["3"] == {"kind": "min_area", "area": 5}


def test_tune_table_and_candidates(dice_impl):
    true = _hearts(5)
    plan, before, after, table = tune_plan(true, true, areas=(20, 5))
    assert [rule for rule in candidate_rules((20, 5))] == [
        {"kind": "none"}, {"kind": "min_area", "area": 5}, {"kind": "min_area", "area": 20}, {"kind": "largest"}]
    assert len(table) == 3 * 4
    assert set(table[0]) == {"class", "rule", "kind", "area", "score", "delta", "chosen"}
    json.dumps(table)  # printable / serialisable
    json.dumps(plan)
    text = format_table(table)
    assert "min_area 20" in text and text.count("*") == 3
    assert before == after == pytest.approx(1.0)


def test_tune_validates_inputs(dice_impl):
    with pytest.raises(ValueError, match="shape"):
        tune_plan(np.zeros((2, 8, 8), np.uint8), np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ValueError):
        tune_plan(np.zeros((0, 8, 8), np.uint8), np.zeros((0, 8, 8), np.uint8))
    with pytest.raises(ConfigError, match="area"):
        tune_plan(np.zeros((1, 8, 8), np.uint8), np.zeros((1, 8, 8), np.uint8), areas=(0,))


# ------------------------------------------------------------------------------------ plan files


def test_describe_plan():
    plan = {"3": {"kind": "min_area", "area": 20}, "1": {"kind": "largest"}, "2": {"kind": "none"}}
    assert describe_plan(plan) == "1: largest, 2: none, 3: min_area 20"


def test_save_load_round_trip(tmp_path):
    plan = {"1": {"kind": "largest"}, "2": {"kind": "none"}, "3": {"kind": "min_area", "area": 20}}
    path = save_plan(plan, tmp_path / "sub" / "plan.json")
    assert path.exists()
    assert [p.name for p in path.parent.iterdir()] == ["plan.json"]  # no temp files left behind
    assert load_plan(path) == plan
    assert json.loads(path.read_text()) == plan
    # int keys are normalised to strings
    assert load_plan(save_plan({1: {"kind": "largest"}}, tmp_path / "p2.json")) == {"1": {"kind": "largest"}}


@pytest.mark.parametrize("content, needle", [
    ('{"1": {"kind": "biggest"}}', "unknown kind"),
    ('{"1": {"kind": "min_area", "area": 0}}', "bad area"),
    ('{"1": {"kind": "min_area", "area": -3}}', "bad area"),
    ('{"1": {"kind": "min_area", "area": "20"}}', "bad area"),
    ('{"1": {"kind": "min_area", "area": 2.5}}', "bad area"),
    ('{"1": {"kind": "min_area", "area": true}}', "bad area"),
    ('{"1": {"kind": "min_area"}}', "needs an integer"),
    ('{"1": {"kind": "largest", "area": 5}}', "unexpected key"),
    ('{"1": "largest"}', "rule must be an object"),
    ('{"rv": {"kind": "largest"}}', "bad class key"),
    ('{"0": {"kind": "largest"}}', "bad class key"),
    ('[1, 2]', "JSON object"),
    ('{"1": {"kind": "largest"', "invalid JSON"),
])
def test_load_plan_rejects_bad_files(tmp_path, content, needle):
    path = tmp_path / "bad_plan.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_plan(path)
    msg = str(info.value)
    assert needle in msg and str(path) in msg and "\n" not in msg


def test_load_plan_missing_file_and_class_range(tmp_path):
    with pytest.raises(ConfigError, match="not found") as info:
        load_plan(tmp_path / "nope.json")
    assert "nope.json" in str(info.value)
    save_plan({"5": {"kind": "largest"}}, tmp_path / "p.json")
    with pytest.raises(ConfigError, match="out of range"):
        load_plan(tmp_path / "p.json", num_classes=4)


def test_save_plan_rejects_invalid_plan_without_writing(tmp_path):
    with pytest.raises(ConfigError, match="plan.json"):
        save_plan({"1": {"kind": "min_area", "area": 0}}, tmp_path / "plan.json")
    assert not (tmp_path / "plan.json").exists()


def test_validate_plan_normalises_order_and_keys():
    plan = validate_plan({3: {"kind": "none"}, "1": {"kind": "min_area", "area": np.int64(7)}})
    assert list(plan) == ["1", "3"] and plan["1"] == {"kind": "min_area", "area": 7}
    assert type(plan["1"]["area"]) is int
    with pytest.raises(ConfigError, match="given twice"):
        validate_plan({1: {"kind": "none"}, "1": {"kind": "none"}})
