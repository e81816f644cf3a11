"""Postprocessing of overlapping classes (``task: multilabel``), tuned on out-of-fold sigmoid probabilities.

Two steps, each chosen per class with the competition's metric (the dataset's ``metric``, mean Dice over
rows by default), saved together as the run's plan (``postprocess.json``):

1. **thresholds**: a class is predicted where its probability is above its threshold (0.5 unless another
   value of :data:`~kagglecmr.formats.multilabel.THRESHOLD_GRID` scores better on the OOF,
   :func:`~kagglecmr.formats.multilabel.tune_thresholds`);
2. **components**: the rules of :mod:`kagglecmr.engine.postprocess` (``none``, ``min_area A``, ``largest``)
   applied to each class's own binary mask, pixels removed from a class leaving the other classes as they are.

Classes do not interact under the metric, so choosing class by class is exact.  Pure numpy + OpenCV.
"""

from __future__ import annotations

import numpy as np

from kagglecmr.engine.postprocess import EPSILON, apply_plan, candidate_rules, validate_plan
from kagglecmr.formats.competition_metric import Metric
from kagglecmr.formats.multilabel import THRESHOLDS, class_mask, decode, table, tune_thresholds


def metric_of(ds) -> Metric:
    """The dataset's metric (``metric:`` of its dataset file), else the default (mean Dice over rows)."""
    return getattr(ds, "metric", None) or Metric()


def apply_rules(packed: np.ndarray, plan: dict, k: int) -> np.ndarray:
    """Each class's component rule of ``plan`` on its own mask of packed maps ``[N, H, W]`` or ``[H, W]``."""
    out = np.array(packed, copy=True)
    for c in range(1, k + 1):
        rule = plan.get(str(c))
        if rule is None or rule["kind"] == "none":
            continue
        bit = np.uint8(1 << (c - 1))
        kept = apply_plan(class_mask(out, c).astype(np.uint8), {"1": rule}, 2).astype(np.uint8)
        out = (out & ~bit) | (kept << (c - 1))
    return out


def decode_plan(probs: np.ndarray, plan: dict | None, k: int) -> np.ndarray:
    """Packed maps of probabilities ``[..., K, H, W]``: each class above its threshold, then its rule."""
    plan = plan or {}
    return apply_rules(decode(probs, plan.get(THRESHOLDS)), plan, k)


def tune_multilabel_plan(probs: np.ndarray, truth: np.ndarray, metric: Metric | None = None,
                         *, epsilon: float = EPSILON) -> dict:
    """The plan (thresholds, then a component rule per class) maximising ``metric`` on OOF probabilities
    ``[N, K, H, W]`` against packed truth ``[N, H, W]``."""
    metric = metric or Metric()
    k = probs.shape[1]
    thresholds, _ = tune_thresholds(probs, truth, metric)
    pred = decode(probs, thresholds)
    candidates = candidate_rules()
    scores = np.stack([table(pred if r["kind"] == "none" else apply_rules(pred, {str(c): r for c in range(1, k + 1)}, k),
                             truth, k, metric).per_class for r in candidates])  # [rules, classes]
    plan: dict = {}
    for c in range(k):
        best = int(np.argmax(scores[:, c]))  # the first of equal maxima: the least destructive
        plan[str(c + 1)] = dict(candidates[best] if scores[best, c] - scores[0, c] > epsilon else candidates[0])
    return validate_plan(plan | {THRESHOLDS: thresholds}, k + 1)
