"""The dataset's metric drives every choice and every score: best epoch, postprocessing, blend weights, ``score``
(checked against an independent per-row implementation of each metric), ``ensemble``'s OOF and the report."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import TINY_YAML, copy_run
from test_dataset import rgb, write_dataset, write_png

from kagglecmr.cfg.config import Config
from kagglecmr.data.dataset import load_dataset
from kagglecmr.data.loader import Split
from kagglecmr.engine import trainer
from kagglecmr.engine.blend import fit_weights
from kagglecmr.engine.evaluator import run_score_dataset
from kagglecmr.engine.postprocess import tune_plan
from kagglecmr.formats.competition_metric import Metric
from kagglecmr.formats.submission import CMR
from kagglecmr.formats.submission_csv import write_submission

IOU_DS = Metric("iou", per="dataset")


def _square(hw, y0, y1, x0, x1, value=1) -> np.ndarray:
    m = np.zeros(hw, np.uint8)
    m[y0:y1, x0:x1] = value
    return m


# ------------------------------------------------------------------------------- best epoch
# two held-out images: A holds a 16x16 object, B a 2x2 one; per epoch the predictions below
TRUTH = np.stack([_square((32, 32), 8, 24, 8, 24), _square((32, 32), 2, 4, 2, 4)])
EPOCHS = [np.stack([TRUTH[0], np.zeros((32, 32), np.uint8)]),            # A right, B missed
          np.stack([_square((32, 32), 8, 16, 8, 24), TRUTH[1]]),          # A half, B right
          np.stack([_square((32, 32), 8, 12, 8, 24), np.zeros((32, 32), np.uint8)])]  # A a quarter, B missed


def test_validation_scores_make_dice_and_iou_pick_different_epochs():
    dice = [trainer.validation_scores(p, TRUTH, Metric(), 2) for p in EPOCHS]
    iou = [trainer.validation_scores(p, TRUTH, IOU_DS, 2) for p in EPOCHS]
    assert [r["val_score"] for r in dice] == pytest.approx([0.5, (256 / 384 + 1) / 2, (128 / 320) / 2])
    assert [r["val_score"] for r in iou] == pytest.approx([256 / 260, 132 / 260, 64 / 260])
    assert [r["val_dice"] for r in iou] == [r["val_dice"] for r in dice] == [r["val_score"] for r in dice]
    assert all(set(r) == {"val_dice", "val_score", "dice_1"} for r in dice + iou)
    assert int(np.argmax([r["val_score"] for r in dice])) == 1 and int(np.argmax([r["val_score"] for r in iou])) == 0


def _tiny_cfg() -> Config:
    raw = yaml.safe_load(TINY_YAML)
    raw["data"] = {"size": 32, "in_channels": 1, "num_classes": 2}
    raw["train"] |= {"epochs": 3, "batch_size": 4, "threads": 1}
    raw["augment"] = {"hflip": 0, "vflip": 0, "affine": 0, "intensity": 0, "gamma": 0}
    return Config.model_validate(raw)


@pytest.mark.parametrize("metric, best", [(None, 2), (IOU_DS, 1)])
def test_training_keeps_the_epoch_the_datasets_metric_prefers(tmp_path, monkeypatch, metric, best):
    """The whole epoch loop, its validation predictions replaced by the ones above: the kept checkpoint is the
    Dice-best epoch under Dice and the IoU-best one under IoU per dataset."""
    import torch

    rng = np.random.default_rng(0)
    masks = np.concatenate([TRUTH, np.stack([_square((32, 32), 4, 20, 4, 20)] * 6)])
    data = Split(ids=[f"i{k}" for k in range(8)], images=rng.integers(0, 255, (8, 32, 32, 1), dtype=np.uint8),
                 masks=masks, splits=["train"] * 8)
    folds = pd.DataFrame({"id": data.ids, "fold": [0, 0] + [1] * 6})
    calls = iter(EPOCHS)

    def fake_validate(model, criterion, va, cfg, device, dtype, tiled, metric):
        return metric.table_labels(next(calls), np.asarray(va.masks), 2), 0.5

    monkeypatch.setattr(trainer, "_validate", fake_validate)
    desc = None if metric is None else {"metric": metric.to_dict(), "num_classes": 2, "classes": ["bg", "x"],
                                        "submission": CMR.to_dict(), "ignore": []}
    out = tmp_path / "run" / "fold0"
    res = trainer.train_fold(_tiny_cfg(), data, folds, 0, out, device=torch.device("cpu"), quiet=True, dataset=desc)
    summary = json.loads((out / "summary.json").read_text())
    hist = pd.read_csv(out / "metrics.csv")
    assert res.best_epoch == summary["best_epoch"] == best
    assert summary["metric"] == (metric or Metric()).to_dict()
    assert summary["best_score"] == pytest.approx(hist["val_score"].max(), abs=1e-6)
    assert hist["best"].tolist() == [True, best == 2, False]
    with np.load(out / "oof.npz") as z:  # the kept model's OOF, with the metric's counts beside the Dice rows
        assert z["counts"].shape == (2, 1, 3) and z["classes"].tolist() == [1] and z["dice"].shape == (2, 1)
    if metric is not None:
        from kagglecmr.reports.html_report import build_report

        assert "best IoU per dataset" in build_report(tmp_path / "run")


# ------------------------------------------------------------------------------- postprocessing
def test_postprocessing_follows_the_metric():
    """4-px strays on empty rows cost a whole Dice row each, but next to nothing of the dataset's IoU, where
    min_area would also delete real 4-px pieces: Dice wants min_area, IoU per dataset keeps none."""
    hw = (32, 32)
    big = _square(hw, 8, 28, 8, 28)
    true = np.stack([big] * 10 + [np.zeros(hw, np.uint8)] * 10 + [big] * 10)
    true[20:, 1:3, 1:3] = 1  # real small pieces
    pred = true.copy()
    pred[10:20, 1:3, 29:31] = 1  # strays on the empty rows
    plan, before, after, _ = tune_plan(pred, true, 2)
    assert plan == {"1": {"kind": "min_area", "area": 5}} and after > before
    plan, before, after, rows = tune_plan(pred, true, 2, metric=IOU_DS)
    assert plan == {"1": {"kind": "none"}} and after == before == pytest.approx(8040 / 8080)
    assert next(r for r in rows if r["rule"] == "min_area 5")["score"] == pytest.approx(8000 / 8040)


def test_postprocessing_with_class_zero_scored_weighs_the_whole_score():
    """When class 0 is scored, pixels a rule removes become class 0: tuned on the whole score."""
    hw = (16, 16)
    true = np.stack([_square(hw, 2, 10, 2, 10)] * 4)
    pred = true.copy()
    pred[:, 13:15, 13:15] = 1
    metric = Metric(classes=(0, 1))
    plan, before, after, _ = tune_plan(pred, true, 2, metric=metric)
    assert plan == {"1": {"kind": "min_area", "area": 5}} and after == 1.0 > before
    assert before == pytest.approx(metric.table_labels(pred, true, 2).score)


# ------------------------------------------------------------------------------- blend weights
def test_blend_weights_follow_the_metric():
    """Run A finds the objects whole but leaves 4-px strays on empty images; run B has no strays but finds half
    of each object.  Dice per row prefers B's strays-free blends, IoU per dataset A's whole objects."""
    hw = (24, 24)
    obj = _square(hw, 2, 22, 2, 22)  # 400 px
    truth = np.stack([obj] * 4 + [np.zeros(hw, np.uint8)] * 4)
    stray = _square(hw, 0, 2, 0, 2).astype(bool)
    half = np.zeros(hw, bool)
    half[12:22, 2:22] = True
    p_a, p_b = np.zeros((8, 24, 24), np.float32), np.zeros((8, 24, 24), np.float32)  # P(class 1)
    p_a[:4], p_b[:4] = obj * 0.9, obj * 0.9
    p_b[:4][:, half] = 0.05  # B misses the lower half: fixed for w_A > 0.53
    p_a[4:, stray], p_b[4:, stray] = 0.9, 0.3  # A's strays: kept for w_A > 1/3
    probs = [np.stack([1 - p, p], 1) for p in (p_a, p_b)]
    w_dice, _ = fit_weights(probs, truth, 2)
    w_iou, _ = fit_weights(probs, truth, 2, IOU_DS)
    assert w_dice[0] <= 1 / 3 and w_iou[0] > 0.53


# ------------------------------------------------------------------------------- score vs a reference
def _components(mask: np.ndarray) -> list[set]:
    """8-connected components by flood fill."""
    h, w = mask.shape
    seen, comps = set(), []
    for y in range(h):
        for x in range(w):
            if mask[y, x] and (y, x) not in seen:
                comp, stack = set(), [(y, x)]
                seen.add((y, x))
                while stack:
                    cy, cx = stack.pop()
                    comp.add((cy, cx))
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            ny, nx = cy + dy, cx + dx
                            if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and (ny, nx) not in seen:
                                seen.add((ny, nx))
                                stack.append((ny, nx))
                comps.append(comp)
    return comps


THRESHOLDS = [round(0.5 + 0.05 * i, 2) for i in range(10)]


def _ref_row(a: np.ndarray, b: np.ndarray, m: dict) -> float:
    """One row's score, written out: a = prediction, b = truth (void pixels already removed)."""
    na, nb, ni = int(a.sum()), int(b.sum()), int((a & b).sum())
    if na + nb == 0:
        return float(m.get("empty", 1))
    if m["name"] == "dice":
        return 2 * ni / (na + nb)
    iou = ni / (na + nb - ni)
    if m["name"] == "iou":
        return iou
    if m.get("objects", "mask") == "mask":
        return sum(iou > t for t in THRESHOLDS) / len(THRESHOLDS)
    pa, pb = _components(a), _components(b)
    ious = [[len(x & y) / len(x | y) for y in pb] for x in pa]
    out = []
    for t in THRESHOLDS:
        tp = sum(1 for j in range(len(pb)) if any(ious[i][j] > t for i in range(len(pa))))
        fp = sum(1 for i in range(len(pa)) if not any(ious[i][j] > t for j in range(len(pb))))
        out.append(tp / (tp + fp + (len(pb) - tp)))
    return sum(out) / len(out)


def _ref_score(pred: dict, truth: dict, classes: list[int], m: dict) -> tuple[float, dict]:
    rows = {}  # (image, class) -> (score, inter, |pred|, |truth|)
    for i, t in truth.items():
        keep = t != 11
        for k in classes:
            a, b = (pred[i] == k) & keep, (t == k) & keep
            rows[i, k] = (_ref_row(a, b, m), int((a & b).sum()), int(a.sum()), int(b.sum()))
    per = m.get("per", "row")
    if per == "dataset":
        per_class = {}
        for k in classes:
            ni, na, nb = (sum(rows[i, k][j] for i in truth) for j in (1, 2, 3))
            if na + nb == 0:
                per_class[k] = float(m.get("empty", 1))
            else:
                per_class[k] = 2 * ni / (na + nb) if m["name"] == "dice" else ni / (na + nb - ni)
        return sum(per_class.values()) / len(classes), per_class
    per_class = {k: sum(rows[i, k][0] for i in truth) / len(truth) for k in classes}
    if per == "row":
        return sum(r[0] for r in rows.values()) / len(rows), per_class
    images = [sum(rows[i, k][0] for k in classes) / len(classes) for i in truth]
    return sum(images) / len(images), per_class


def _blobby(rng, hw, with_void: bool) -> np.ndarray:
    m = np.zeros(hw, np.uint8)
    for k in (1, 2):
        for _ in range(int(rng.integers(0, 3))):
            y, x = rng.integers(0, hw[0] - 4), rng.integers(0, hw[1] - 4)
            m[y:y + int(rng.integers(2, 8)), x:x + int(rng.integers(2, 8))] = k
    if with_void:
        y, x = rng.integers(0, hw[0] - 6), rng.integers(0, hw[1] - 6)
        m[y:y + 6, x:x + 6] = 11
    return m


@pytest.fixture(scope="module")
def scored_set(tmp_path_factory):
    """Six truth masks (classes 0..2, void 11) on disk and six noisy predictions of them."""
    tmp = tmp_path_factory.mktemp("scored")
    rng = np.random.default_rng(5)
    hw = (24, 32)
    truth, pred = {}, {}
    for j in range(6):
        i = f"im{j}"
        truth[i] = _blobby(rng, hw, with_void=j % 2 == 0)
        write_png(tmp / "data" / "img" / f"{i}.png", rgb(j, hw)[:, :, ::-1])
        write_png(tmp / "data" / "gt" / f"{i}.png", truth[i])
        p = np.where(truth[i] == 11, rng.integers(0, 3, hw), truth[i]).astype(np.uint8)
        p = np.where(rng.random(hw) < 0.03, rng.integers(0, 3, hw), p)  # speckle
        moved = _blobby(rng, hw, False)
        p = np.where(moved > 0, moved, p)  # shifted and new pieces
        pred[i] = p.astype(np.uint8)
    return tmp, truth, pred


@pytest.mark.parametrize("metric, classes", [
    ({"name": "dice", "per": "row", "empty": 1}, [1, 2]),
    ({"name": "dice", "per": "dataset", "empty": 0}, [1, 2]),
    ({"name": "iou", "per": "row", "empty": 0}, [1, 2]),
    ({"name": "iou", "per": "image"}, [0, 1, 2]),
    ({"name": "iou", "per": "dataset"}, [0, 1, 2]),
    ({"name": "map_iou", "per": "row"}, [1, 2]),
    ({"name": "map_iou", "per": "image", "objects": "components"}, [1, 2]),
    ({"name": "map_iou", "per": "row", "objects": "components", "empty": 0}, [0, 1, 2]),
])
def test_score_agrees_with_an_independent_implementation(scored_set, metric, classes, capsys):
    tmp, truth, pred = scored_set
    spec = {"root": "data", "classes": ["background", "a", "b"], "ignore": [11], "metric": metric,
            "splits": {"train": {"image": "img/{id}.png", "mask": "gt/{id}.png"}},
            "submission": {"id": "{id}_{class}", "header": ["id", "encoding"], "classes": classes}}
    path = write_dataset(tmp, spec, f"ds-{metric['name']}-{metric['per']}-{len(classes)}.yaml")
    ds = load_dataset(path)
    sub = tmp / f"{path.stem}.csv"
    write_submission([r for i, p in pred.items() for r in ds.submission.rows(i, p, 3)], sub,
                     shape={i: p.shape for i, p in pred.items()}, fmt=ds.submission, overwrite=True)
    result = run_score_dataset(sub, data=path, as_json=True)
    printed = json.loads(capsys.readouterr().out)
    expected, per_class = _ref_score(pred, truth, classes, metric)
    assert 0 < expected < 1
    assert result.score == pytest.approx(expected, abs=1e-12) and printed["score"] == pytest.approx(expected, abs=1e-12)
    assert result.per_class == pytest.approx({str(k): v for k, v in per_class.items()}, abs=1e-12)
    assert printed["metric"] == Metric.from_dict(metric).to_dict()
    # label maps scored directly (ensemble's labelled splits) agree too
    table = ds.metric.table_labels(np.stack(list(pred.values())), ds.labelled().masks, 3)
    assert table.score == pytest.approx(expected, abs=1e-12)


# ------------------------------------------------------------------------------- ensemble and runs
def test_ensemble_prints_and_records_the_datasets_metric(project, tmp_path, main_cli):
    """The demo folder read through a dataset file scored by IoU per dataset."""
    d = project.data
    spec = {"root": str(d), "metric": {"name": "iou", "per": "dataset"},
            "splits": {s: {"image": f"{s}/image/{{id}}.png", "mask": f"{s}/mask/{{id}}_mask.png"}
                       for s in ("train", "val")} | {"test": {"image": "test/image/{id}.png"}}}
    path = write_dataset(tmp_path, spec, "demo-iou.yaml")
    run = copy_run(project.run, tmp_path / "runs" / "tiny", slim=True)
    (run / "ensemble_oof.json").unlink(missing_ok=True)
    proc = main_cli("ensemble", "--runs", run, "--data", path, "--device", "cpu", "--split", "oof",
                    "--out", tmp_path / "oof.csv")
    assert proc.returncode == 0, proc.stderr
    assert "OOF IoU per dataset (25 images, TTA none)" in proc.stdout
    assert "-> OOF IoU per dataset" in proc.stdout  # postprocessing chosen and reported with it
    rec = json.loads((run / "ensemble_oof.json").read_text())
    assert rec["metric"] == {"name": "iou", "per": "dataset", "empty": 1}
    proc = main_cli("score", tmp_path / "oof.csv", "--data", path, "--json")
    assert proc.returncode == 0, proc.stderr
    scored = json.loads(proc.stdout)
    assert scored["metric"]["name"] == "iou" and scored["score"] == pytest.approx(
        rec["entries"]["none"]["postprocess"]["score"], abs=1e-9)
