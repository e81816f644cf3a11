"""Empty-mask gating (engine.gating, engine.gate_runs): the triplet and the head threshold tuned on synthetic
OOF probabilities, never lowering OOF, the plan's JSON round trip and its application to test predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kagglecmr.engine.gate_runs import gate_kinds, gated, split_keep
from kagglecmr.engine.gating import (
    candidate_gates,
    check_gate,
    describe_gate,
    gate_labels,
    gate_stats,
    gated_table,
    keep_matrix,
    plan_gates,
    tune_gates,
    with_gates,
)
from kagglecmr.engine.postprocess import apply_plan, describe_plan, load_plan, save_plan, validate_plan
from kagglecmr.formats.competition_metric import Metric
from kagglecmr.utils.errors import ConfigError, KaggleCMRError

K, H = 3, 32


def sparse_case(n: int, seed: int, *, fp_prob: float = 0.6, fp_side: int = 2):
    """Softmax probabilities ``[n, K, H, H]`` and truth: even images hold a confident 8x8 square of each class
    (truth 8x8), odd images are empty and get a small, low-confidence false positive of each class."""
    rng = np.random.default_rng(seed)
    probs = np.zeros((n, K, H, H), np.float32)
    probs[:, 0], probs[:, 1:] = 0.9, 0.05
    true = np.zeros((n, H, H), np.uint8)
    for i in range(n):
        for k in range(1, K):
            y, x = rng.integers(2, 22, 2)
            if i % 2 == 0:
                true[i, y:y + 8, x:x + 8] = k
                probs[i, k, y:y + 8, x:x + 7] = 0.9  # one column short: Dice < 1 but far above 0
                probs[i, 0, y:y + 8, x:x + 7] = 0.05
            else:
                probs[i, k, y:y + fp_side, x:x + fp_side] = fp_prob
                probs[i, 0, y:y + fp_side, x:x + fp_side] = 1 - fp_prob - 0.05
    return probs, true


# ------------------------------------------------------------------------------------------- triplet


def test_triplet_removes_low_confidence_false_positives_and_improves_oof():
    probs, true = sparse_case(40, 0)
    metric = Metric()
    table = metric.table_labels(probs.argmax(1), true, K)
    stats = gate_stats(probs, [1, 2])
    res = tune_gates(table, stats, groups=np.arange(40) % 5)
    # without gating every empty image scores 0 on both classes: about half of the rows
    assert res.before == pytest.approx(table.per_class) and res.before.mean() < 0.5
    assert set(res.gates) == {1, 2} and all("top" in g for g in res.gates.values())
    assert all(0.6 < g["top"] <= 0.9 for g in res.gates.values())  # between the false and the true maxima
    assert res.after.mean() > res.before.mean() + 0.4
    # the shortcut through counts equals scoring the gated label maps themselves
    keep = keep_matrix(res.gates, stats)
    assert keep[0::2].all() and not keep[1::2].any()
    gated_labels = gate_labels(probs.argmax(1).astype(np.uint8), keep, [1, 2])
    assert res.after == pytest.approx(metric.table_labels(gated_labels, true, K).per_class)
    assert res.nested == pytest.approx(res.after)  # every fold picks a gate that separates the two groups


def test_area_part_of_the_triplet_is_used_when_the_maximum_cannot_separate():
    probs, true = sparse_case(30, 1, fp_prob=0.9, fp_side=3)  # false positives as confident as the truth, smaller
    res = tune_gates(Metric().table_labels(probs.argmax(1), true, K), gate_stats(probs, [1, 2]))
    for g in res.gates.values():
        assert 9 < g["min_area"] <= 56  # 3x3 false blobs dropped, 8x7 true squares kept
    assert res.after.mean() > 0.9


def test_no_gate_when_gating_cannot_help():
    probs, true = sparse_case(20, 2)
    true[1::2] = probs[1::2].argmax(1)  # the "false positives" are right
    res = tune_gates(Metric().table_labels(probs.argmax(1), true, K), gate_stats(probs, [1, 2]))
    assert res.gates == {1: {}, 2: {}}
    assert res.after == pytest.approx(res.before)


@pytest.mark.parametrize("metric", [Metric(), Metric(name="iou", per="image"), Metric(name="iou", per="dataset"),
                                    Metric(name="map_iou"), Metric(name="map_iou", objects="components"),
                                    Metric(empty=0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gating_never_lowers_oof_and_the_counts_are_exact(metric, seed):
    rng = np.random.default_rng(seed)
    n = 16
    logits = rng.normal(0, 1, (n, K, 12, 12)).astype(np.float32)
    logits[:, 0] += rng.uniform(0, 2, (n, 1, 1))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    true = np.where(rng.random((n, 1, 1)) < 0.5, 0, rng.integers(0, K, (n, 12, 12))).astype(np.uint8)
    presence = rng.random((n, K - 1)).astype(np.float32)
    table = metric.table_labels(probs.argmax(1), true, K)
    stats = gate_stats(probs, [1, 2], presence=presence)
    res = tune_gates(table, stats, kinds=("triplet", "head"), groups=np.arange(n) % 4)
    assert np.all(res.after >= res.before - 1e-12)
    keep = keep_matrix(res.gates, stats)
    direct = metric.table_labels(gate_labels(probs.argmax(1).astype(np.uint8), keep, [1, 2]), true, K)
    assert gated_table(table, keep).per_class == pytest.approx(direct.per_class)
    assert res.after == pytest.approx(direct.per_class)
    assert res.nested is not None and res.nested.shape == (2,)


# ------------------------------------------------------------------------------------------- head


def test_head_threshold_on_a_constructed_case():
    probs, true = sparse_case(40, 3, fp_prob=0.9, fp_side=8)  # false positives look exactly like the truth
    present = np.stack([(true == k).any((1, 2)) for k in (1, 2)], 1)
    presence = np.where(present, 0.8, 0.2).astype(np.float32) + np.random.default_rng(0).uniform(-0.1, 0.1, present.shape)
    table = Metric().table_labels(probs.argmax(1), true, K)
    triplet_only = tune_gates(table, gate_stats(probs, [1, 2], presence=presence))
    res = tune_gates(table, gate_stats(probs, [1, 2], presence=presence), kinds=("head",))
    assert triplet_only.after.mean() < 0.6  # nothing in the probabilities tells the two apart
    assert all(0.2 < g["head"] <= 0.7 for g in res.gates.values())  # between the two groups
    assert res.after.mean() > res.before.mean() + 0.4
    assert res.after.mean() > triplet_only.after.mean() + 0.3
    with pytest.raises(ConfigError, match="cls_head"):
        tune_gates(table, gate_stats(probs, [1, 2]), kinds=("head",))


# ------------------------------------------------------------------------------------------- the plan


def test_plan_round_trips_through_json_and_applies_identically_to_test_predictions(tmp_path):
    probs, true = sparse_case(40, 4)
    oof_pred = probs.argmax(1).astype(np.uint8)
    plan = {"1": {"kind": "none"}, "2": {"kind": "min_area", "area": 3}}
    pp = apply_plan(oof_pred, plan, K)
    res = tune_gates(Metric().table_labels(pp, true, K), gate_stats(probs, [1, 2]))
    plan = with_gates(plan, res.gates)
    assert plan["2"]["kind"] == "min_area" and plan["2"]["gate"] == res.gates[2]
    path = save_plan(plan, tmp_path / "postprocess.json")
    loaded = load_plan(path, K)
    assert loaded == validate_plan(plan) and plan_gates(loaded) == res.gates
    assert json.loads(path.read_text())["1"]["gate"]["top"] == res.gates[1]["top"]
    assert "gate top" in describe_plan(loaded)
    # test predictions: fresh images of the same kind, gated from their own probabilities
    test_probs, test_true = sparse_case(10, 5)
    keep = split_keep(loaded, test_probs, presence=None)
    assert keep[0::2].all() and not keep[1::2].any()
    labels = gated([apply_plan(m, loaded, K) for m in test_probs.argmax(1).astype(np.uint8)], keep)
    assert all(not m.any() for m in labels[1::2]) and all(m.any() for m in labels[0::2])
    expected = gate_labels(apply_plan(test_probs.argmax(1).astype(np.uint8), plan, K), keep_matrix(res.gates, gate_stats(
        test_probs, [1, 2])), [1, 2])
    np.testing.assert_array_equal(np.stack(labels), expected)
    assert split_keep({"1": {"kind": "largest"}}, test_probs, None) is None  # no gates: nothing to decide


@pytest.mark.parametrize("gate, needle", [
    ({}, "expected an object"), ({"top": 0.5}, "together"), ({"top": 1.5, "bot": 0.5, "min_area": 1}, "bad top"),
    ({"top": 0.5, "bot": 0.5, "min_area": -1}, "bad min_area"), ({"head": "x"}, "bad head"),
    ({"head": 0.5, "size": 3}, "unexpected key"),
])
def test_bad_gates_are_one_line_errors(gate, needle):
    with pytest.raises(ConfigError, match=needle):
        check_gate(gate)
    with pytest.raises(ConfigError, match="class 1: gate"):
        validate_plan({"1": {"kind": "none", "gate": gate}}, source="p.json")


def test_describe_and_grid():
    assert describe_gate({"top": 0.8, "bot": 0.5, "min_area": 0}) == "top 0.80"
    assert describe_gate({"top": 0.8, "bot": 0.5, "min_area": 12, "head": 0.3}) == "top 0.80, 12 px >= 0.50 & head 0.30"
    cands = candidate_gates(1000, kinds=("triplet", "head"), tops=(0.5,), bots=(0.3, 0.5), area_fractions=(0, 0.01),
                            heads=(0.5,))
    assert cands[0] == {} and len(cands) == 1 + 3 + 1 + 3
    with pytest.raises(KaggleCMRError, match="--gate"):
        gate_kinds("triplets", [])
    assert gate_kinds(None, []) == () and gate_kinds("triplet", []) == ("triplet",) and gate_kinds("none", []) == ()
